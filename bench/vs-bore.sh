#!/usr/bin/env bash
# Ferry against bore in alternating rounds, for the two targets of issue 3 that a single run of
# bench/run.sh measures least steadily (its ratios moved from 0.52x to 0.77x between runs an
# hour apart on this machine):
#
#   bench/vs-bore.sh [ROUNDS]
#
# Starts bench-origin, Ferry's relay and client, and bore's server and client once, all on
# loopback; then each round measures Ferry, then bore: (a) p50 at one connection and (b)
# requests/s at 64 connections, 1 KiB POSTs, BENCH_DURATION each (default 4s, after a 1 s
# warm-up). Prints every round and the median of the per-round ratios, Ferry to bore. Needs
# wrk, python3, bore (bench/run.sh installs it) and the release build in target/pgo/release
# (pgo/build.sh, run if it is missing; BENCH_BIN=target/release measures a plain build).
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
ROUNDS=${1:-5}
DUR=${BENCH_DURATION:-4s}
BIN=${BENCH_BIN:-$ROOT/target/pgo/release}
PATH="$HOME/.cargo/bin:$PATH"
command -v bore >/dev/null || { echo "bore is not installed: run bench/run.sh once, or cargo install bore-cli" >&2; exit 1; }
command -v wrk >/dev/null || { echo "wrk is not installed: apt-get install wrk" >&2; exit 1; }
[[ -x $BIN/ferry-relay && -x $BIN/ferry && -x $BIN/bench-origin ]] ||
  "$ROOT/pgo/build.sh" -q -p ferry-relay -p ferry -p ferry-bench
source "$ROOT/bench/work.sh"
work_dir vs-bore

free_port() {
  python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}
# wait_for FILE PATTERN: up to 10 s.
wait_for() {
  local i
  for i in $(seq 1 100); do grep -q "$2" "$1" 2>/dev/null && return 0; sleep 0.1; done
  echo "timed out waiting for '$2' in $1" >&2
  return 1
}
# bench_line URL THREADS CONNS DURATION: wrk's BENCH line.
bench_line() {
  WRK_BODY_FILE="$WORK/body.json" wrk -t"$2" -c"$3" -d"$4" -s "$ROOT/bench/wrk/post.lua" "$1" | grep '^BENCH '
}
field() { sed -n "s/.* $2=\([0-9.]*\).*/\1/p" <<<" $1"; }

python3 -c 'import base64, os; print(base64.b64encode(os.urandom(1024))[:1024].decode(), end="")' >"$WORK/body.json"
ORIGIN_PORT=$(free_port)
"$BIN/bench-origin" --listen "127.0.0.1:$ORIGIN_PORT" >"$WORK/origin.log" 2>&1 &
PIDS+=($!)

RELAY_PORT=$(free_port)
"$BIN/ferry-relay" --listen "127.0.0.1:$RELAY_PORT" --public-url "http://127.0.0.1:$RELAY_PORT" \
  --token vs-bore --data-dir "$WORK/data" >"$WORK/relay.log" 2>&1 &
PIDS+=($!)
wait_for "$WORK/relay.log" 'listening on'
"$BIN/ferry" listen "127.0.0.1:$ORIGIN_PORT" --relay "http://127.0.0.1:$RELAY_PORT" --token vs-bore \
  --name bench --json --state-dir "$WORK/state" >"$WORK/client.log" 2>&1 &
PIDS+=($!)
wait_for "$WORK/client.log" '"event":"ready"'
FERRY_URL="http://127.0.0.1:$RELAY_PORT/bench/hook"

if (exec 3<>/dev/tcp/127.0.0.1/7835) 2>/dev/null; then
  echo "port 7835 (bore's fixed control port) is busy" >&2
  exit 1
fi
BORE_PORT=$(free_port)
bore server --bind-addr 127.0.0.1 --min-port "$BORE_PORT" --max-port "$BORE_PORT" >"$WORK/bore-server.log" 2>&1 &
PIDS+=($!)
for _ in $(seq 1 100); do (exec 3<>/dev/tcp/127.0.0.1/7835) 2>/dev/null && break; sleep 0.1; done
RUST_LOG=info bore local "$ORIGIN_PORT" --local-host 127.0.0.1 --to 127.0.0.1 --port "$BORE_PORT" >"$WORK/bore-local.log" 2>&1 &
PIDS+=($!)
wait_for "$WORK/bore-local.log" 'listening at'
BORE_URL="http://127.0.0.1:$BORE_PORT/hook"

printf 'round\tferry p50 us\tbore p50 us\tp50 ratio\tferry req/s\tbore req/s\treq/s ratio\n'
for round in $(seq 1 "$ROUNDS"); do
  declare -A P50 RPS
  for tunnel in ferry bore; do
    url=$FERRY_URL
    [[ $tunnel == bore ]] && url=$BORE_URL
    bench_line "$url" 1 4 1s >/dev/null
    P50[$tunnel]=$(field "$(bench_line "$url" 1 1 "$DUR")" p50_us)
    RPS[$tunnel]=$(field "$(bench_line "$url" 2 64 "$DUR")" rps)
  done
  awk -v r="$round" -v fp="${P50[ferry]}" -v bp="${P50[bore]}" -v fr="${RPS[ferry]}" -v br="${RPS[bore]}" \
    'BEGIN { printf "%d\t%s\t%s\t%.2f\t%.0f\t%.0f\t%.2f\n", r, fp, bp, fp / bp, fr, br, fr / br }'
done | tee "$WORK/rounds.tsv"
# median COLUMN: the median of that column of the rounds.
median() {
  cut -f"$1" "$WORK/rounds.tsv" | sort -g | awk '{ v[NR] = $1 } END {
    if (NR % 2) print v[(NR + 1) / 2]; else printf "%.2f\n", (v[NR / 2] + v[NR / 2 + 1]) / 2 }'
}
echo "median of $ROUNDS rounds: p50 $(median 4)x bore's (target <= 1.2x), req/s $(median 7)x bore's (target >= 0.9x)"
