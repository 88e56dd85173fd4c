#!/usr/bin/env bash
# The status path under load, as a ratio to the machine's limit measured in the same run.
#
#   scripts/status-load.sh                 # memory and SQLite; PostgreSQL too with DATABASE_URL_PG
#   DATABASE_URL_PG=postgres://postgres@127.0.0.1:5432/test scripts/status-load.sh
#
#   STATUS_PATH=/api/v1/calls/ scripts/status-load.sh   # GET /api/v1/calls/{id} instead
#
# For each store it starts the fake Asterisk and ivr-server (release builds), seeds calls
# through the API (SEED_ENDED that end at once, SEED_LIVE that stay up), measures the size of
# one status answer, starts examples/baseline_http with a body of that size, and drives both
# with wrk at 32 and 128 connections, DURATION a run, in REPEAT rounds per row. A round is the
# baseline, then ivr and a second copy of the baseline (its twin), these two taking turns to go
# second; each takes its ratios to the baseline's run just before it, and a row shows the
# medians. The twin's p99 ratio is what noise alone makes of that ratio between two identical
# servers in this run (TWIN=0: no twin). On a shared machine a single run's p99 can be several
# times its neighbour's, whichever server it is; a median of paired rounds is steady where each
# side's best run was not.
#
# It prints a row per (store, calls, connections): medians of req/s, p50 and p99, the ratios,
# how many rounds had a p99 ratio over 1.5x (ivr and the twin), and the peak RSS of ivr-server;
# then a one-line summary, and a line counting the rows that meet issue 10's goals (req/s at
# least 0.8x the baseline for ended calls and 0.5x for live ones; p99 at most 1.5x). A run with
# non-2xx answers or socket errors is flagged on its row (they would flatter ivr). For ended calls it then offers both servers the same paced load (PACED_SHARES percent
# of the baseline's req/s flat out at 32 connections in that store's run, or PACED_RATES GETs a
# second if set; examples/api_load) and prints p50 and p99 of each: at equal load the latency
# is the server's, where flat out it is wherever the queue sits.
#
# On the memory store it also measures POST /api/v1/calls at 32 connections with
# examples/api_load, flat out and at CREATE_RATE creates a second: per request, the time the
# client saw minus the ARI originate time the answer reports (Server-Timing), i.e. ivr's own
# share; p50 and p99 of each. Loopback only; every process it starts is stopped. The access log
# is off (RUST_LOG=warn), as the baseline logs nothing either.
set -euo pipefail
cd "$(dirname "$0")/.."

DURATION=${DURATION:-2s}
REPEAT=${REPEAT:-5}   # rounds per row; the medians of their paired ratios count
SEED_ENDED=${SEED_ENDED:-2000}
SEED_LIVE=${SEED_LIVE:-200}
CONNECTIONS=${CONNECTIONS:-"32 128"}
CREATE_RATE=${CREATE_RATE:-1000}   # creates per second offered in the paced create run
# GETs per second offered to both servers in the paced rows: PACED_RATES if set, else
# PACED_SHARES percent of the baseline's flat-out req/s (a fixed rate near one machine's limit
# is past another's, and an open loop past a server's limit measures only its queue; the paced
# client costs more a request than wrk, and at 70% it was its own queue here).
PACED_RATES=${PACED_RATES:-}
PACED_SHARES=${PACED_SHARES:-"25 50"}
# Both servers get the same worker threads: by default the cores less the one wrk runs on, so
# that the client and the server do not take turns on a core (the server's p99 is then the
# scheduler's time slice, not its own).
SERVER_THREADS=${SERVER_THREADS:-$(n=$(nproc); echo $((n > 1 ? n - 1 : 1)))}
TWIN=${TWIN:-1}   # measure a second copy of the baseline too (the p99 ratio's noise floor)
STORES=${STORES:-"memory sqlite${DATABASE_URL_PG:+ postgres}"}
# The GET measured: /api/v1/status/{id} or /api/v1/calls/{id} (the same call, one handler).
STATUS_PATH=${STATUS_PATH:-/api/v1/status/}
case $STATUS_PATH in
  /api/v1/status/ | /api/v1/calls/) ;;
  *) echo "STATUS_PATH must be /api/v1/status/ or /api/v1/calls/, not $STATUS_PATH" >&2; exit 2 ;;
esac
# The live calls (+15550000007) play demo-congrats once answered, 30 s at the fake's time scale
# 1, and then end (without audio they would run the recorded ivr-menu dialplan, which hangs up
# 3.4 s after the answer). The fake runs slower, in whole steps, until they outlast the live
# rows with 20 s to spare; all of its delays scale, so the ended calls talk TIME_SCALE seconds.
live_rows_seconds=$(( $(echo "$CONNECTIONS" | wc -w) * REPEAT * (TWIN == 1 ? 3 : 2) * ${DURATION%s} ))
TIME_SCALE=${TIME_SCALE:-$(( (live_rows_seconds + 20 + 29) / 30 ))}

command -v wrk >/dev/null || { echo "installing wrk"; apt-get install -y -qq wrk >/dev/null; }
echo "building release binaries"
cargo build --release -q -p ivr-server && cargo build --release -q -p ivr --example fake_asterisk --example baseline_http --example api_load
bin=${CARGO_TARGET_DIR:-target}/release
work=$(mktemp -d)
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$work"; }
trap cleanup EXIT

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
wait_http() { for _ in $(seq 1 100); do curl -sf -o /dev/null "$1" && return 0; sleep 0.1; done; echo "no answer from $1"; return 1; }

# wrk's summary → "req/s p50_ms p99_ms failures" (non-2xx answers and socket errors)
wrk_summary() {
  awk '
    function ms(v) { if (v ~ /us$/) return v / 1000; if (v ~ /ms$/) return v + 0; if (v ~ /s$/) return v * 1000; return v }
    /^ +50%/ { p50 = ms($2) } /^ +99%/ { p99 = ms($2) } /^Requests\/sec/ { rps = $2 } /Non-2xx/ { bad += $4 }
    /Socket errors/ { gsub(",", ""); bad += $4 + $6 + $8 + $10 }
    END { printf "%.0f %.2f %.2f %d\n", rps, p50, p99, bad }'
}
# examples/api_load at a fixed rate over 32 connections → "p50_ms p99_ms"
paced() { # url prefix rate [token]
  IVR_LOAD_TOKEN=${4:-} "$bin/examples/api_load" --url "$1" --prefix "$2" --rate "$3" --get "$work/ended.ids" --connections 32 \
    --seconds "${DURATION%s}" | tail -n1 | sed 's/total_p50_ms=\([^ ]*\) total_p99_ms=\([^ ]*\).*/\1 \2/'
}
ratio_of() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.2f", (b > 0 ? a / b : 0) }'; }   # a / b, 0 when b is 0
at_least() { awk -v a="$1" -v b="$2" 'BEGIN { exit !(a >= b) }'; }   # succeeds when a >= b
median() { # the middle value as given, or the mean of the middle two
  printf '%s\n' "$@" | sort -g | awk '{ v[NR] = $1 } END { print (NR % 2 ? v[(NR + 1) / 2] : sprintf("%.2f", (v[NR / 2] + v[NR / 2 + 1]) / 2)) }'
}
over_goal() { printf '%s\n' "$@" | awk '$1 > 1.5 { n++ } END { print n + 0 }'; }   # how many ratios exceed 1.5
median_run() { # sort-key run... → the run whose number at sort-key (sort -k) is the median
  local key=$1; shift
  printf '%s\n' "$@" | sort -k"$key" -g | awk '{ runs[NR] = $0 } END { print runs[int((NR + 1) / 2)] }'
}
run_wrk() { # url conns ids_file prefix
  IDS_FILE=$3 PATH_PREFIX=$4 TOKEN=${TOKEN:-} wrk -t1 -c"$2" -d"$DURATION" --latency -s scripts/status-get.lua "$1" \
    | wrk_summary
}

summary=()
rows_total=0 rps_met=0 p99_met=0 twin_met=0 rounds_total=0 rounds_over=0 twin_rounds_over=0
create=()
paced_rows=()
echo
echo "GET ${STATUS_PATH}{id}; both servers on $SERVER_THREADS worker thread(s) of $(nproc) cores; wrk -t1; $DURATION a run, $REPEAT rounds a row, medians"
echo "| store | calls | conns | baseline req/s | ivr req/s | ratio | baseline p99 | ivr p99 | p99 ratio | rounds > 1.5x | twin's p99 ratio | twin's rounds > 1.5x | ivr p50 | peak RSS |"
echo "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"
# Starts the fake Asterisk at time scale $1 and sets env_common for an ivr-server beside it
# (fake_pid, port).
start_fake() {
  local fake_port; fake_port=$(free_port)
  "$bin/examples/fake_asterisk" --port "$fake_port" --time-scale "$1" > "$work/fake.env" &
  fake_pid=$!
  pids+=($fake_pid)
  for _ in $(seq 1 100); do grep -q '^ARI_APP=' "$work/fake.env" 2>/dev/null && break; sleep 0.1; done
  port=$(free_port)
  env_common=(SECRET_KEY="$(head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n')"
              $(grep '^ARI_' "$work/fake.env") LISTEN_ADDR="127.0.0.1:$port"
              MAX_ACTIVE_CALLS=100000 MAX_QUEUED_CALLS=100000 MAX_CALLS_PER_SECOND=0 METRICS_ENABLED=true RUST_LOG=warn
              MAX_CONNECTIONS_PER_CLIENT=1024  # wrk is one client: its 128 connections must all be served
              WORKER_THREADS="$SERVER_THREADS")
}
# A token for the memory store, which has no users table to log in against.
memory_token() { env "${env_common[@]}" "${env_store[@]}" "$bin/ivr-server" token --sub bench 2>/dev/null; }
# Starts ivr-server (env_common, env_store) and waits until it answers (ivr_pid).
start_ivr() {
  env "${env_common[@]}" "${env_store[@]}" "$bin/ivr-server" > "$work/ivr-$store.log" 2>&1 &
  ivr_pid=$!
  pids+=($ivr_pid)
  wait_http "http://127.0.0.1:$port/healthz"
}

for store in $STORES; do
  start_fake "$TIME_SCALE"
  case $store in
    memory) env_store=(DISABLE_DB=true) ;;
    sqlite) env_store=(DATABASE_URL="sqlite://$work/bench.db") ;;
    postgres)
      schema_db="ivr_bench_$$"
      psql "$DATABASE_URL_PG" -qc "DROP DATABASE IF EXISTS $schema_db" -c "CREATE DATABASE $schema_db" >/dev/null
      env_store=(DATABASE_URL="${DATABASE_URL_PG%/*}/$schema_db") ;;
  esac
  if [ "$store" = memory ]; then
    TOKEN=$(memory_token)
  else
    echo "bench-password" | env "${env_common[@]}" "${env_store[@]}" BCRYPT_COST=4 "$bin/ivr-server" user add bench >/dev/null 2>&1
  fi
  start_ivr
  if [ "$store" != memory ]; then
    TOKEN=$(curl -s -X POST "http://127.0.0.1:$port/api/v1/token" -d username=bench -d password=bench-password \
            | sed 's/.*"access_token":"\([^"]*\)".*/\1/')
  fi
  export TOKEN
  seed() { # count number file [audio]
    seq "$1" | xargs -P 16 -I{} curl -s -X POST "http://127.0.0.1:$port/api/v1/calls" \
        -H "Authorization: Bearer $TOKEN" -H 'Content-Type: application/json' \
        -d "{\"phone_number\": \"$2\"${4:+, \"audio\": \"$4\"}}" \
      | grep -o '"call_id":"[^"]*"' | cut -d'"' -f4 > "$3" || true   # a failed create is counted below
    local made; made=$(wc -l < "$3")
    [ "$made" -eq "$1" ] || echo "WARNING: $store: $made of $1 calls to $2 were created" >&2
    [ "$made" -gt 0 ] || { echo "$store: no call could be created; see $work/ivr-$store.log" >&2; exit 1; }
  }
  echo "$store: seeding $SEED_ENDED ended and $SEED_LIVE live calls" >&2
  status_of() { curl -s "http://127.0.0.1:$port/api/v1/status/$1" -H "Authorization: Bearer $TOKEN"; }
  until_all() { # ids_file pattern: each call's answer matches the pattern (a bound of 20 s a TIME_SCALE)
    local id
    while read -r id; do
      for _ in $(seq 1 $((100 * TIME_SCALE))); do status_of "$id" | grep -q "$2" && break; sleep 0.2; done
    done < "$1"
  }
  seed "$SEED_ENDED" +15550000005 "$work/ended.ids"   # answers at once, hangs up after TIME_SCALE s
  until_all "$work/ended.ids" '"is_completed":true'
  # The live calls only once the ended ones are checked (2,000 status reads, ~20 s on a
  # database store), so that their time up is spent in their rows.
  seed "$SEED_LIVE" +15550000007 "$work/live.ids" sound:demo-congrats   # answers after TIME_SCALE s, up 30 times that
  until_all "$work/live.ids" '"answered_at":"'   # ringing and answering are over before the rows
  # Live calls first, while they are up (TIME_SCALE is set for that). Each kind against a
  # baseline whose body is the size of that kind's answer.
  for kind in live ended; do
    size=$(status_of "$(head -n1 "$work/$kind.ids")" | wc -c)
    base_port=$(free_port)
    TOKIO_WORKER_THREADS="$SERVER_THREADS" "$bin/examples/baseline_http" --port "$base_port" --bytes "$size" >/dev/null &
    base_pid=$!
    pids+=($base_pid)
    wait_http "http://127.0.0.1:$base_port/"
    if [ "$TWIN" = 1 ]; then
      twin_port=$(free_port)
      TOKIO_WORKER_THREADS="$SERVER_THREADS" "$bin/examples/baseline_http" --port "$twin_port" --bytes "$size" >/dev/null &
      twin_pid=$!
      pids+=($twin_pid)
      wait_http "http://127.0.0.1:$twin_port/"
    fi
    paced_base=""
    for c in $CONNECTIONS; do
      # REPEAT rounds: the baseline, then ivr and the twin, which take turns going second (so
      # that neither always runs right after the baseline). Each round's ratios are to the
      # baseline's run just before; the row shows the medians.
      b_rps=() b_p99=() i_rps=() i_p50=() i_p99=() rps_r=() p99_r=() twin_r=() i_bad=0
      for round in $(seq "$REPEAT"); do
        read -r rps _ p99 _ < <(run_wrk "http://127.0.0.1:$base_port" "$c" "$work/$kind.ids" /)
        b_rps+=("$rps") b_p99+=("$p99")
        sides="ivr twin"
        [ $((round % 2)) = 0 ] && sides="twin ivr"
        for side in $sides; do
          if [ "$side" = ivr ]; then
            read -r rps p50 p99 bad < <(run_wrk "http://127.0.0.1:$port" "$c" "$work/$kind.ids" "$STATUS_PATH")
            i_rps+=("$rps") i_p50+=("$p50") i_p99+=("$p99") i_bad=$((i_bad + bad))
            rps_r+=("$(ratio_of "$rps" "${b_rps[-1]}")") p99_r+=("$(ratio_of "$p99" "${b_p99[-1]}")")
          elif [ "$TWIN" = 1 ]; then
            read -r _ _ p99 _ < <(run_wrk "http://127.0.0.1:$twin_port" "$c" "$work/$kind.ids" /)
            twin_r+=("$(ratio_of "$p99" "${b_p99[-1]}")")
          fi
        done
      done
      rss=$(awk '/VmHWM/ {printf "%.0f MB", $2 / 1024}' "/proc/$ivr_pid/status")
      ratio=$(median "${rps_r[@]}")
      p99r=$(median "${p99_r[@]}")
      i_over=$(over_goal "${p99_r[@]}")
      rounds_total=$((rounds_total + REPEAT)) rounds_over=$((rounds_over + i_over))
      twinr=– t_over=–
      if [ "$TWIN" = 1 ]; then
        twinr=$(median "${twin_r[@]}")
        t_over=$(over_goal "${twin_r[@]}")
        twin_rounds_over=$((twin_rounds_over + t_over))
        at_least 1.5 "$twinr" && twin_met=$((twin_met + 1))
      fi
      flag=""
      [ "$i_bad" -gt 0 ] && flag=" ($i_bad non-2xx or socket errors!)"
      b_med=$(median "${b_rps[@]}")
      echo "| $store | $kind ($size B) | $c | $b_med | $(median "${i_rps[@]}")$flag | $ratio | $(median "${b_p99[@]}") ms" \
        "| $(median "${i_p99[@]}") ms | $p99r | $i_over/$REPEAT | $twinr | $t_over/$REPEAT | $(median "${i_p50[@]}") ms | $rss |"
      summary+=("$store/$kind/$c=${ratio}x")
      # What the paced rows' shares are of: the 32-connection row's (else the first row's).
      { [ "$c" = 32 ] || [ -z "$paced_base" ]; } && paced_base=$b_med
      # The issue's goals per row: req/s at least 0.8x (ended) or 0.5x (live), p99 at most 1.5x.
      goal=$([ "$kind" = ended ] && echo 0.8 || echo 0.5)
      rows_total=$((rows_total + 1))
      at_least "$ratio" "$goal" && rps_met=$((rps_met + 1))
      at_least 1.5 "$p99r" && p99_met=$((p99_met + 1))
    done
    if [ "$kind" = ended ]; then
      # Paced: both servers offered the same load (examples/api_load --rate), REPEAT runs each,
      # interleaved; the median run's p50 and p99 count.
      rates=$PACED_RATES
      [ -n "$rates" ] || rates=$(for share in $PACED_SHARES; do echo $((paced_base * share / 100)); done)
      for rate in $rates; do
        b_runs=() i_runs=()
        for _ in $(seq "$REPEAT"); do
          b_runs+=("$(paced "http://127.0.0.1:$base_port" / "$rate")")
          i_runs+=("$(paced "http://127.0.0.1:$port" "$STATUS_PATH" "$rate" "$TOKEN")")
        done
        read -r b_p50 b_p99 < <(median_run 2 "${b_runs[@]}")   # runs are "p50 p99"
        read -r i_p50 i_p99 < <(median_run 2 "${i_runs[@]}")
        p99r=$(ratio_of "$i_p99" "$b_p99")
        paced_rows+=("| $store | ended | 32 | $rate | $b_p50 ms | $i_p50 ms | $b_p99 ms | $i_p99 ms | $p99r |")
      done
    fi
    kill "$base_pid" 2>/dev/null || true
    if [ "$kind" = live ]; then
      status_of "$(tail -n1 "$work/live.ids")" | grep -q '"is_active":true' \
        || echo "WARNING: $store: the live calls ended during their rows (TIME_SCALE=$TIME_SCALE is too small)" >&2
      # Hang the live calls up and wait until they have ended. Left to end by themselves, 30 ×
      # TIME_SCALE s after their answer, they would end during the ended calls' rows: ivr would answer
      # those while following 200 hangups and writing them to its store, which the baseline
      # never does (that made ivr's p99 2.7-4.3x in the first ended row on SQLite and
      # PostgreSQL).
      xargs -P 16 -I{} curl -s -o /dev/null -X DELETE "http://127.0.0.1:$port/api/v1/calls/{}" \
        -H "Authorization: Bearer $TOKEN" < "$work/live.ids"
      until_all "$work/live.ids" '"is_completed":true'
    fi
    [ "$TWIN" = 1 ] && kill "$twin_pid" 2>/dev/null || true
  done
  if [ "$store" = memory ]; then
    # POST /api/v1/calls at 32 connections against the fake (MAX_CALLS_PER_SECOND=0), flat out
    # and at CREATE_RATE a second; examples/api_load subtracts each answer's own ARI time
    # (its Server-Timing header) from what the client saw. Paced first: a flat-out run leaves
    # thousands of calls ending over the next second, which the paced run would share the
    # machine with. On a fresh server beside a fake at time scale 1, whatever TIME_SCALE the
    # rows needed, so that its calls last 1 s as in earlier sessions' figures (three runs at
    # TIME_SCALE=2 gave 2.1-3.9 ms at p99 against 1.0-1.07 just before at 1, though the same
    # run at 1 later spread over 0.9-4.2 ms). A first paced run, not counted, warms the fresh
    # server up as the seeding warmed the first.
    kill "$ivr_pid" "$fake_pid" 2>/dev/null || true
    wait "$ivr_pid" "$fake_pid" 2>/dev/null || true
    start_fake 1
    TOKEN=$(memory_token)
    start_ivr
    IVR_LOAD_TOKEN=$TOKEN "$bin/examples/api_load" --url "http://127.0.0.1:$port" --connections 32 --seconds 2 \
      --rate "$CREATE_RATE" >/dev/null
    sleep 2   # its calls end after 1 s
    # Paced: REPEAT runs, a second apart (their calls end after 1 s); the run with the median
    # share counts, as one run's p99 moved 1.0-3.7 ms from one minute to the next here.
    create_once() { # [rate] -> api_load's summary line
      local out
      out=$(IVR_LOAD_TOKEN=$TOKEN "$bin/examples/api_load" --url "http://127.0.0.1:$port" --connections 32 \
              --seconds "${DURATION%s}" ${1:+--rate "$1"})
      echo "$out" | sed 's/^/    /' >&2
      echo "$out" | tail -n1
    }
    echo "$store: POST /api/v1/calls at 32 connections, $CREATE_RATE/s offered, $REPEAT runs" >&2
    runs=()
    for _ in $(seq "$REPEAT"); do
      runs+=("$(create_once "$CREATE_RATE")")
      sleep 1
    done
    shares=$(printf '%s\n' "${runs[@]}" | sed 's/^own_p99_ms=\([^ ]*\).*/\1/' | sort -g | tr '\n' ' ')
    middle=$(median_run 1.12 "${runs[@]}")   # runs are "own_p99_ms=… …": its number from character 12
    create+=("$middle offered=$CREATE_RATE/s (the median of $REPEAT runs; ivr's share at p99 in each: ${shares% } ms)")
    echo "$store: POST /api/v1/calls at 32 connections" >&2
    create+=("$(create_once)")
  fi
  kill "$ivr_pid" "$fake_pid" 2>/dev/null || true
  wait 2>/dev/null || true
  pids=()
  [ "$store" = postgres ] && psql "$DATABASE_URL_PG" -qc "DROP DATABASE IF EXISTS $schema_db WITH (FORCE)" >/dev/null
done
echo
echo "summary (ivr req/s as a ratio to the minimal hyper server, same run): ${summary[*]}"
twin_note=""
[ "$TWIN" = 1 ] && twin_note=" (the baseline's twin against the baseline: on $twin_met of $rows_total rows)"
echo "goals: req/s (>= 0.8x ended, >= 0.5x live) met on $rps_met of $rows_total rows; p99 <= 1.5x met on $p99_met of $rows_total rows$twin_note"
twin_note=""
[ "$TWIN" = 1 ] && twin_note=", the twin $twin_rounds_over of $rounds_total"
echo "rounds with a p99 ratio over 1.5x: ivr $rounds_over of $rounds_total$twin_note"
if [ ${#paced_rows[@]} -gt 0 ]; then
  echo
  echo "paced: both servers offered the same GETs per second (examples/api_load --rate), median of $REPEAT runs"
  echo "| store | calls | conns | offered req/s | baseline p50 | ivr p50 | baseline p99 | ivr p99 | p99 ratio |"
  echo "|---|---|---|---|---|---|---|---|---|"
  printf '%s\n' "${paced_rows[@]}"
  echo
fi
for c in "${create[@]}"; do echo "POST /api/v1/calls at 32 connections (memory store): $c"; done
