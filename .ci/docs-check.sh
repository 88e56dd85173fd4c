#!/usr/bin/env bash
# The /docs page in a real browser: headless Chromium (Debian's, installed when missing) driven
# by playwright-core (pinned in docs-check/package-lock.json, installed into a temporary folder).
# Usage: .ci/docs-check.sh BASE_URL USERNAME PASSWORD [SCREENSHOT]
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"

if ! command -v chromium >/dev/null 2>&1; then
  echo "installing chromium"
  apt-get update -qq >/dev/null
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
fi
node_dir=$(mktemp -d)
trap 'rm -rf "$node_dir"' EXIT
cp "$here/docs-check/package.json" "$here/docs-check/package-lock.json" "$here/docs-check/docs-check.mjs" "$node_dir/"
(cd "$node_dir" && npm ci --silent --no-audit --no-fund >/dev/null)
CHROMIUM="$(command -v chromium)" node "$node_dir/docs-check.mjs" "$@"
