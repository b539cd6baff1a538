#!/usr/bin/env bash
# A/B throughput of two Ferry builds, alternating, in one session (the machine is noisy: only
# figures from the same session compare).
#
#   bench/ab.sh DIR_A DIR_B [ROUNDS]
#
# DIR_A and DIR_B each hold a `ferry-relay` and a `ferry` binary, e.g. target/release and the
# release build of an older commit:
#
#   git worktree add /tmp/old <commit>
#   (cd /tmp/old && CARGO_TARGET_DIR=/tmp/old-target cargo build --release -p ferry-relay -p ferry)
#   bench/ab.sh /tmp/old-target/release target/release
#
# Each round runs wrk (two threads, one with BENCH_CONNS=1) with BENCH_CONNS connections
# (default 64; 1 measures latency) for BENCH_DURATION (default
# 5s, after a 1 s warm-up), POSTing BENCH_SIZE bytes (default 1024) through relay and client to
# bench-origin, and prints requests/s, the relay's, the client's and the origin's CPU
# microseconds per request (/proc/PID/stat), and how idle the whole machine was (/proc/stat:
# a tunnel that leaves CPU idle while carrying fewer requests is waiting, not working). Builds that know `--data-dir` and
# `--state-dir` get fresh ones in a temporary directory. Needs wrk, python3 and a release build
# of ferry-bench (for bench-origin).
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
A=${1:?usage: bench/ab.sh DIR_A DIR_B [ROUNDS]}
B=${2:?usage: bench/ab.sh DIR_A DIR_B [ROUNDS]}
ROUNDS=${3:-3}
DUR=${BENCH_DURATION:-5s}
ORIGIN_BIN="$ROOT/target/release/bench-origin"
[[ -x $ORIGIN_BIN ]] || cargo build --release -q -p ferry-bench --manifest-path "$ROOT/Cargo.toml"
source "$ROOT/bench/work.sh"
work_dir ab

free_port() {
  python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}
ticks() { awk '{ print $14 + $15 }' "/proc/$1/stat"; }
# wait_for FILE PATTERN: up to 10 s.
wait_for() {
  local i
  for i in $(seq 1 100); do grep -q "$2" "$1" 2>/dev/null && return 0; sleep 0.1; done
  echo "timed out waiting for '$2' in $1" >&2
  return 1
}
# knows OPTION CMD...: whether CMD's help mentions OPTION.
knows() { local option=$1; shift; "$@" --help 2>&1 | grep -q -- "$option"; }

SIZE=${BENCH_SIZE:-1024}
CONNS=${BENCH_CONNS:-64}
THREADS=$((CONNS < 2 ? 1 : 2))
python3 -c 'import base64, os, sys; n = int(sys.argv[1]); sys.stdout.write(base64.b64encode(os.urandom(n))[:n].decode())' "$SIZE" >"$WORK/body.json"
ORIGIN_PORT=$(free_port)
"$ORIGIN_BIN" --listen "127.0.0.1:$ORIGIN_PORT" >"$WORK/origin.log" 2>&1 &
ORIGIN_PID=$!
PIDS+=("$ORIGIN_PID")

# round DIR N: one measurement of the build in DIR.
round() {
  local dir=$1 n=$2 port data=() state=() relay client line r0 r1 c0 c1 o0 o1 s0 s1 count
  port=$(free_port)
  if knows --data-dir "$dir/ferry-relay"; then data=(--data-dir "$WORK/data-$n"); fi
  if knows --state-dir "$dir/ferry" listen; then state=(--state-dir "$WORK/state-$n"); fi
  "$dir/ferry-relay" --listen "127.0.0.1:$port" --public-url "http://127.0.0.1:$port" \
    --token ab-token "${data[@]}" >"$WORK/relay-$n.log" 2>&1 &
  relay=$!
  PIDS+=("$relay")
  wait_for "$WORK/relay-$n.log" 'listening on'
  "$dir/ferry" listen "127.0.0.1:$ORIGIN_PORT" --relay "http://127.0.0.1:$port" --token ab-token \
    --name ab-test --json "${state[@]}" >"$WORK/client-$n.log" 2>&1 &
  client=$!
  PIDS+=("$client")
  wait_for "$WORK/client-$n.log" '"event":"ready"'
  local url="http://127.0.0.1:$port/ab-test/hook"
  WRK_BODY_FILE="$WORK/body.json" wrk -t"$THREADS" -c"$CONNS" -d1s -s "$ROOT/bench/wrk/post.lua" "$url" >/dev/null
  r0=$(ticks "$relay"); c0=$(ticks "$client"); o0=$(ticks "$ORIGIN_PID"); s0=$(cpu_idle)
  line=$(WRK_BODY_FILE="$WORK/body.json" wrk -t"$THREADS" -c"$CONNS" -d"$DUR" -s "$ROOT/bench/wrk/post.lua" "$url" | grep '^BENCH ')
  r1=$(ticks "$relay"); c1=$(ticks "$client"); o1=$(ticks "$ORIGIN_PID"); s1=$(cpu_idle)
  count=$(sed -n 's/.* requests=\([0-9]*\).*/\1/p' <<<"$line")
  local tck; tck=$(getconf CLK_TCK)
  awk -v d="$dir" -v l="$line" -v n="$count" -v r="$((r1 - r0))" -v c="$((c1 - c0))" -v t="$tck" \
    -v o="$((o1 - o0))" -v idle="$(idle_pct "$s0" "$s1")" 'BEGIN {
    match(l, /rps=[0-9.]+/); rps = substr(l, RSTART + 4, RLENGTH - 4)
    match(l, /p50_us=[0-9]+/); p50 = substr(l, RSTART + 7, RLENGTH - 7)
    printf "%s\trps=%.0f\tp50_us=%s\trelay_cpu_us=%.1f\tclient_cpu_us=%.1f\torigin_cpu_us=%.1f\tidle_pct=%s\n", d, rps, p50, r * 1e6 / t / n, c * 1e6 / t / n, o * 1e6 / t / n, idle
  }'
  kill "$client" "$relay"
  wait "$client" "$relay" 2>/dev/null || true
}

for i in $(seq 1 "$ROUNDS"); do
  round "$A" "a$i"
  round "$B" "b$i"
done
