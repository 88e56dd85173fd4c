#!/usr/bin/env bash
# Load: floods POST /api/v1/calls of the release ivr-server against the fake Asterisk, waits
# for every call to end, then checks each call's status against its number's known outcome.
# Not a test: it prints figures. See README, "Load".
#
#   scripts/load.sh                            # ivr-server's defaults (CPS limit, queue bound)
#   MAX_CALLS_PER_SECOND=0 scripts/load.sh     # the CPS limit lifted
#
# Every ivr-server setting in the environment passes through (MAX_CALLS_PER_SECOND,
# MAX_QUEUED_CALLS, ARI_MAX_CONNECTIONS, MAX_ACTIVE_CALLS — default here 1000000 —,
# MAX_CONNECTIONS_PER_CLIENT — default here 100000, since all the load comes from one client —,
# RUST_LOG…).
# The load's own knobs:
#   LOAD_DURATION (10s)  LOAD_CONNECTIONS (32)  LOAD_THREADS (1)   wrk's -d, -c, -t
#   LOAD_SETTLE_SECONDS (300)   longest wait for the calls to end after the flood
#   LOAD_API_PORT (18000)  LOAD_FAKE_PORT (18088)  loopback ports
#   LOAD_LOGS (a temp dir)     where the fake's and the server's logs go
set -euo pipefail

cd "$(dirname "$0")/.."
DURATION=${LOAD_DURATION:-10s}
CONNECTIONS=${LOAD_CONNECTIONS:-32}
THREADS=${LOAD_THREADS:-1}
SETTLE=${LOAD_SETTLE_SECONDS:-300}
API_PORT=${LOAD_API_PORT:-18000}
FAKE_PORT=${LOAD_FAKE_PORT:-18088}
LOGS=${LOAD_LOGS:-$(mktemp -d -t ivr-load.XXXXXX)}
mkdir -p "$LOGS"
TARGET=${CARGO_TARGET_DIR:-target}
API=http://127.0.0.1:$API_PORT

say() { printf '%s\n' "load: $*" >&2; }

for tool in wrk jq curl; do
  if ! command -v "$tool" >/dev/null; then
    say "installing $tool (Debian package)"
    if [ "$(id -u)" = 0 ]; then apt-get install -y -qq "$tool" >/dev/null; else sudo apt-get install -y -qq "$tool" >/dev/null; fi
  fi
done

say "building the release binaries"
cargo build --release --quiet -p ivr-server --bin ivr-server
cargo build --release --quiet --example fake_asterisk

FAKE_PID= SERVER_PID=
cleanup() {
  [ -n "$SERVER_PID" ] && kill "$SERVER_PID" 2>/dev/null || true
  [ -n "$FAKE_PID" ] && kill "$FAKE_PID" 2>/dev/null || true
}
trap cleanup EXIT

"$TARGET/release/examples/fake_asterisk" --port "$FAKE_PORT" >"$LOGS/fake.out" 2>"$LOGS/fake.err" &
FAKE_PID=$!
for _ in $(seq 100); do grep -q '^ARI_HTTP_URL=' "$LOGS/fake.out" 2>/dev/null && break; sleep 0.1; done
grep -q '^ARI_HTTP_URL=' "$LOGS/fake.out" || { say "the fake Asterisk did not start: $(cat "$LOGS/fake.err")"; exit 1; }

SECRET_KEY=$(head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n')
export SECRET_KEY
IVR_LOAD_TOKEN=$(DISABLE_DB=true "$TARGET/release/ivr-server" token --sub load 2>/dev/null)
export IVR_LOAD_TOKEN

DISABLE_DB=true METRICS_ENABLED=true LISTEN_ADDR=127.0.0.1:$API_PORT \
  ARI_HTTP_URL=http://127.0.0.1:$FAKE_PORT/ari ARI_USERNAME=ivr ARI_PASSWORD=ivr-secret ARI_APP=ivr \
  MAX_ACTIVE_CALLS=${MAX_ACTIVE_CALLS:-1000000} MAX_CONNECTIONS_PER_CLIENT=${MAX_CONNECTIONS_PER_CLIENT:-100000} RUST_LOG=${RUST_LOG:-warn} \
  "$TARGET/release/ivr-server" >"$LOGS/server.log" 2>&1 &
SERVER_PID=$!
for _ in $(seq 100); do curl -fs "$API/readyz" >/dev/null 2>&1 && break; sleep 0.1; done
curl -fs "$API/readyz" >/dev/null || { say "ivr-server is not ready: $(tail -5 "$LOGS/server.log")"; exit 1; }

metric() { # the sum of a metric's samples (0 when absent)
  curl -fs "$API/metrics" | awk -v m="$1" '$1 == m || index($1, m "{") == 1 { s += $2 } END { printf "%d\n", s }'
}

say "flooding for $DURATION with $CONNECTIONS connections (settings: MAX_CALLS_PER_SECOND=${MAX_CALLS_PER_SECOND:-default} MAX_QUEUED_CALLS=${MAX_QUEUED_CALLS:-default} ARI_MAX_CONNECTIONS=${ARI_MAX_CONNECTIONS:-default})"
wrk -t"$THREADS" -c"$CONNECTIONS" -d"$DURATION" --latency -s scripts/load.lua "$API" >"$LOGS/wrk.out"
grep -E 'Requests/sec|Latency  ' "$LOGS/wrk.out" | sed 's/^/load: wrk: /' >&2

say "waiting (at most ${SETTLE}s) until no call is active"
deadline=$((SECONDS + SETTLE))
while :; do
  active=$(metric ivr_active_calls); queued=$(metric ivr_calls_queued)
  [ "$active" = 0 ] && [ "$queued" = 0 ] && break
  [ $SECONDS -ge $deadline ] && { say "still $active active, $queued queued after ${SETTLE}s"; break; }
  sleep 1
done

# Every call, through the API, one page of 1000 at a time.
: >"$LOGS/calls.tsv"
cursor=
while :; do
  page=$(curl -fs "$API/api/v1/calls?limit=1000${cursor:+&cursor=$cursor}" -H "Authorization: Bearer $IVR_LOAD_TOKEN")
  jq -r '.calls[] | [.phone_number, .status, (.failure_reason // "-"), .is_active] | @tsv' <<<"$page" >>"$LOGS/calls.tsv"
  cursor=$(jq -r '.next_cursor // empty' <<<"$page")
  [ -z "$cursor" ] && break
done

taken=$(metric ivr_ari_events_total)
reconcile_metric=$(curl -fs "$API/metrics" | awk '$1 ~ /^ivr_reconcile/ { s += $2; n++ } END { if (n) printf "%d\n", s; else print "n/a" }')
rss=$(awk '/^VmHWM/ { printf "%.0f MB\n", $2 / 1024 }' "/proc/$SERVER_PID/status")
kill -INT "$FAKE_PID"; wait "$FAKE_PID" 2>/dev/null || true; FAKE_PID=
fake_stats=$(sed -n 's/^fake_asterisk: stats //p' "$LOGS/fake.err")
fake() { tr ' ' '\n' <<<"$fake_stats" | sed -n "s/^$1=//p"; }

# The known outcome of each number (the fake's plans over PJSIP/{number}@trunk).
read -r accepted right wrong stranded < <(awk -F'\t' '
  BEGIN { want["+15550000005"] = "completed -"; want["+15550000002"] = "failed busy";
          want["+15550000006"] = "failed rejected"; want["+15550009999"] = "failed unreachable" }
  { n++; if ($4 == "true") s++; else if (want[$1] == $2 " " $3) r++; else w++ }
  END { printf "%d %d %d %d\n", n, r, w, s }' "$LOGS/calls.tsv")
refused=$(awk '$1 == "wrk-status" && ($2 == 503 || $2 == 429) { s += $3 } END { printf "%d\n", s }' "$LOGS/wrk.out")
others=$(awk '$1 == "wrk-status" && $2 != 201 && $2 != 200 && $2 != 503 && $2 != 429 { printf "%s%s×%s", sep, $2, $3; sep = " " }' "$LOGS/wrk.out")

echo "calls accepted:            $accepted"
echo "refused (503/429):         $refused${others:+   other answers: $others}"
echo "right:                     $right"
echo "wrong:                     $wrong"
echo "stranded (still active):   $stranded"
# Every event the fake wrote must have been taken by ivr's event loop.
echo "events dropped:            $(( $(fake events_written) - taken )) ($(fake events_written) written by the fake, $taken taken by ivr)"
echo "reconcile requests sent:   GET /channels/{id} $(fake channel_gets), GET /channels $(fake channel_lists) (fake); ivr_reconcile* metrics: $reconcile_metric"
echo "ARI sessions (fake):       peak $(fake peak_sessions), refused $(fake refused_sessions)"
echo "peak RSS of ivr-server:    $rss"
if [ "$wrong" != 0 ] || [ "$stranded" != 0 ]; then
  echo "outcomes, by number (status, reason, still active):"
  awk -F'\t' '{ print $1, $2, $3, ($4 == "true" ? "active" : "") }' "$LOGS/calls.tsv" | sort | uniq -c | sort -rn | head -16
fi
say "logs in $LOGS"
