#!/usr/bin/env bash
# Checks the deployment files without a container engine: the compose file parses and
# interpolates, Prometheus' configuration and alert rules validate, the Grafana dashboard and
# its provisioning load. (That every metric they query exists is a Rust test:
# ivr-server/tests/deploy.rs.) Installs docker-compose and promtool from Debian when missing.
set -euo pipefail
cd "$(dirname "$0")"

need=()
command -v docker-compose >/dev/null || need+=(docker-compose)
command -v promtool >/dev/null || need+=(prometheus)
if [ ${#need[@]} -gt 0 ]; then
  echo "deploy/check: installing ${need[*]}"
  apt-get update -qq >/dev/null
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

# compose: every required variable set (to throwaway values), then parse and interpolate.
sed -e 's/^\([A-Z_]*\)=$/\1=check-only/' env.example > "$tmp/env"
docker-compose --env-file "$tmp/env" -f compose.yaml config -q
echo "deploy/check: compose.yaml parses"

# Prometheus: the configuration (its rule file lives at the container's path) and the rules.
promtool check config --syntax-only prometheus/prometheus.yml >/dev/null
promtool check rules prometheus/alerts.yml

# Grafana: the provisioning files are YAML, the dashboard JSON loads and every panel queries.
python3 - <<'PY'
import json, sys
dash = json.load(open("grafana/dashboards/ivr.json"))
panels = dash["panels"]
empty = [p["title"] for p in panels if not any(t.get("expr") for t in p.get("targets", []))]
if empty:
    sys.exit(f"deploy/check: dashboard panels without a query: {empty}")
print(f"deploy/check: dashboard {dash['title']!r} loads with {len(panels)} panels")
PY
# Debian's python3 has PyYAML (docker-compose needs it).
/usr/bin/python3 - grafana/provisioning/*/*.yml <<'PY'
import sys, yaml
for path in sys.argv[1:]:
    doc = yaml.safe_load(open(path))
    if doc.get("apiVersion") != 1:
        sys.exit(f"deploy/check: {path} is not Grafana provisioning (apiVersion 1)")
print(f"deploy/check: {len(sys.argv) - 1} Grafana provisioning files load")
PY
echo "deploy/check: all deployment files check out"
