#!/usr/bin/env bash
# Instructions a cached status GET costs ivr-server and the baseline (examples/baseline_http),
# counted by callgrind: repeatable where wall-clock figures on a shared machine are not.
#
#   scripts/status-callgrind.sh                  # memory store (DISABLE_DB), ended calls
#   STORE=sqlite scripts/status-callgrind.sh     # SQLite, with its users table and user check
#   KIND=live scripts/status-callgrind.sh        # calls that are up (answered, playing audio)
#
# It starts the fake Asterisk and ivr-server under valgrind (release build, one worker thread),
# seeds CALLS calls, reads each once, then counts only the load phase (callgrind_control -z,
# then -d): wrk -t1 -c4 for DURATION s of GET /api/v1/status/{id} with random ids and a valid
# token. Then the baseline the same way, with a body of the same size, and prints instructions a
# request for each and their ratio. Keeps the profiles in OUT (a temporary folder by default):
# `callgrind_annotate OUT/ivr.PID.1` (the load phase) shows where they go. Loopback only; it
# stops what it starts.
set -euo pipefail
cd "$(dirname "$0")/.."

STORE=${STORE:-memory}
KIND=${KIND:-ended}
CALLS=${CALLS:-200}
DURATION=${DURATION:-5}
OUT=${OUT:-$(mktemp -d)}
case $STORE in memory | sqlite) ;; *) echo "STORE must be memory or sqlite, not $STORE" >&2; exit 2 ;; esac
case $KIND in
  ended) scale=0.01 number=+15550000005 audio="" ;;
  live) scale=1 number=+15550000007 audio=', "audio": "sound:demo-congrats"' ;;   # up 30 s after the answer
  *) echo "KIND must be ended or live, not $KIND" >&2; exit 2 ;;
esac
for tool in valgrind wrk; do
  command -v $tool >/dev/null || { echo "installing $tool"; apt-get install -y -qq $tool >/dev/null; }
done
echo "building release binaries"
cargo build --release -q -p ivr-server && cargo build --release -q -p ivr --example fake_asterisk --example baseline_http
bin=${CARGO_TARGET_DIR:-target}/release
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; }
trap cleanup EXIT

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
wait_http() { for _ in $(seq 1 300); do curl -sf -o /dev/null "$1" && return 0; sleep 0.2; done; echo "no answer from $1" >&2; return 1; }
load() { # url prefix seconds
  IDS_FILE="$OUT/ids" PATH_PREFIX=$2 TOKEN=$TOKEN wrk -t1 -c4 -d"$3"s -s scripts/status-get.lua "$1"
}
# Runs wrk against the server under callgrind (pid, url, prefix), counting only that phase;
# prints "instructions requests".
measure() {
  load "$2" "$3" 2 >/dev/null   # warm: every id read, every connection's token remembered
  callgrind_control -z "$1" >/dev/null 2>&1
  local requests
  requests=$(load "$2" "$3" "$DURATION" | awk '/requests in/ {print $1}')
  callgrind_control -d "$1" >/dev/null 2>&1
  kill "$1"; wait "$1" 2>/dev/null || true
  local profile; profile=$(ls -t "$OUT/$4".*.1 | head -n1)
  echo "$(callgrind_annotate "$profile" | awk '/PROGRAM TOTALS/ {gsub(",", "", $1); print $1}') $requests"
}

fake_port=$(free_port) port=$(free_port) base_port=$(free_port)
"$bin/examples/fake_asterisk" --port "$fake_port" --time-scale "$scale" > "$OUT/fake.env" &
pids+=($!)
for _ in $(seq 1 100); do grep -q '^ARI_APP=' "$OUT/fake.env" 2>/dev/null && break; sleep 0.1; done
env_ivr=(SECRET_KEY="$(head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n')" $(grep '^ARI_' "$OUT/fake.env")
         LISTEN_ADDR="127.0.0.1:$port" MAX_ACTIVE_CALLS=100000 MAX_QUEUED_CALLS=100000 MAX_CALLS_PER_SECOND=0
         METRICS_ENABLED=true RUST_LOG=warn MAX_CONNECTIONS_PER_CLIENT=1024 WORKER_THREADS=1)
if [ "$STORE" = memory ]; then
  env_ivr+=(DISABLE_DB=true)
  TOKEN=$(env "${env_ivr[@]}" "$bin/ivr-server" token --sub bench 2>/dev/null)
else
  env_ivr+=(DATABASE_URL="sqlite://$OUT/bench.db")
  echo bench-password | env "${env_ivr[@]}" BCRYPT_COST=4 "$bin/ivr-server" user add bench >/dev/null 2>&1
fi
env "${env_ivr[@]}" valgrind --tool=callgrind --callgrind-out-file="$OUT/ivr.%p" "$bin/ivr-server" > "$OUT/ivr.log" 2>&1 &
ivr_pid=$!
pids+=($ivr_pid)
wait_http "http://127.0.0.1:$port/healthz"
if [ "$STORE" = sqlite ]; then
  TOKEN=$(curl -s -X POST "http://127.0.0.1:$port/api/v1/token" -d username=bench -d password=bench-password \
          | sed 's/.*"access_token":"\([^"]*\)".*/\1/')
fi
echo "$STORE: seeding $CALLS $KIND calls (under valgrind)" >&2
seq "$CALLS" | xargs -P 8 -I{} curl -s -X POST "http://127.0.0.1:$port/api/v1/calls" -H "Authorization: Bearer $TOKEN" \
    -H 'Content-Type: application/json' -d "{\"phone_number\": \"$number\"$audio}" \
  | grep -o '"call_id":"[^"]*"' | cut -d'"' -f4 > "$OUT/ids"
[ -s "$OUT/ids" ] || { echo "no call could be created; see $OUT/ivr.log" >&2; exit 1; }
until_all() { # pattern: each call's answer matches it
  local id
  while read -r id; do
    for _ in $(seq 1 100); do
      curl -s "http://127.0.0.1:$port/api/v1/status/$id" -H "Authorization: Bearer $TOKEN" | grep -q "$1" && break
      sleep 0.2
    done
  done < "$OUT/ids"
}
if [ "$KIND" = ended ]; then until_all '"is_completed":true'; else until_all '"answered_at":"'; fi
size=$(curl -s "http://127.0.0.1:$port/api/v1/status/$(head -n1 "$OUT/ids")" -H "Authorization: Bearer $TOKEN" | wc -c)
read -r ivr_ir ivr_n < <(measure "$ivr_pid" "http://127.0.0.1:$port" /api/v1/status/ ivr)
TOKIO_WORKER_THREADS=1 valgrind --tool=callgrind --callgrind-out-file="$OUT/base.%p" \
  "$bin/examples/baseline_http" --port "$base_port" --bytes "$size" > "$OUT/base.log" 2>&1 &
base_pid=$!
pids+=($base_pid)
wait_http "http://127.0.0.1:$base_port/"
read -r base_ir base_n < <(measure "$base_pid" "http://127.0.0.1:$base_port" / base)
awk -v a="$ivr_ir" -v n="$ivr_n" -v b="$base_ir" -v m="$base_n" -v what="$STORE, $KIND calls ($size B)" -v out="$OUT" 'BEGIN {
  printf "cached GET /api/v1/status/{id}, %s: ivr %.0f instructions a request (%d requests), baseline %.0f (%d): %.2fx\n", what, a / n, n, b / m, m, (a / n) / (b / m)
  printf "profiles in %s\n", out }'
