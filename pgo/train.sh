#!/usr/bin/env bash
# Regenerates pgo/ferry.profdata.gz, the profile that pgo/build.sh compiles the release binaries
# with (profile-guided optimisation; docs/BENCHMARKS.md, finding 35).
#
#   pgo/train.sh
#
# 1. Builds ferry-relay and ferry instrumented (-Cprofile-generate) into target/pgo-train.
# 2. Runs them on loopback against bench-origin the way webhooks use them: 1 KiB POSTs at one
#    and at 64 connections, 5 MiB uploads and downloads, durable accepts while the client is
#    away, and the delivery of that queue when it comes back.
# 3. Stops both cleanly (the profile is written at exit), merges what they recorded with
#    llvm-profdata (rustup's llvm-tools, installed if missing) and writes it, gzipped, to
#    pgo/ferry.profdata.gz, with the toolchain it was made with in pgo/PROFILE.
#
# Run it again when the hot path changes: a function whose code changed since the profile was
# made is compiled as without one. That includes either binary's `main.rs`: the async runtime's
# scheduler loop is inlined into `main`, and without its profile the client's thread took ~25 %
# more CPU per request (finding 38). Needs wrk, curl and python3. Takes ~9 minutes (two builds).
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
SECONDS_PER_STEP=${PGO_SECONDS:-4}
source "$ROOT/bench/work.sh"
work_dir pgo
log() { echo "[pgo] $*" >&2; }

for tool in wrk curl python3; do
  command -v "$tool" >/dev/null || { log "$tool is missing (apt-get install $tool)"; exit 1; }
done

host=$(rustc -vV | sed -n 's/^host: //p')
profdata="$(rustc --print sysroot)/lib/rustlib/$host/bin/llvm-profdata"
if [[ ! -x $profdata ]]; then
  log "installing rustup's llvm-tools (for llvm-profdata)"
  rustup component add llvm-tools
fi

log "building instrumented binaries"
RAW="$WORK/raw"
mkdir -p "$RAW"
RUSTFLAGS="-Cprofile-generate=$RAW" CARGO_TARGET_DIR="$ROOT/target/pgo-train" \
  cargo build --release --locked -q --manifest-path "$ROOT/Cargo.toml" -p ferry-relay -p ferry
cargo build --release --locked -q --manifest-path "$ROOT/Cargo.toml" -p ferry-bench
BIN="$ROOT/target/pgo-train/release"

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
wait_line() { # FILE REGEX
  local i
  for ((i = 0; i < 600; i++)); do grep -qE "$2" "$1" 2>/dev/null && return 0; sleep 0.05; done
  log "timeout waiting for '$2' in $1"; return 1
}
lines() { grep -c "$1" "$2" 2>/dev/null || true; }

ORIGIN=$(free_port)
RELAY=$(free_port)
TOKEN="pgo-$$"
head -c 768 /dev/urandom | base64 -w0 >"$WORK/1k.json"
head -c 5242880 /dev/zero | tr '\0' 'x' >"$WORK/5m.bin"

"$ROOT/target/release/bench-origin" --listen "127.0.0.1:$ORIGIN" >/dev/null 2>&1 &
PIDS+=($!)
"$BIN/ferry-relay" --listen "127.0.0.1:$RELAY" --public-url "http://127.0.0.1:$RELAY" \
  --token "$TOKEN" --data-dir "$WORK/data" >"$WORK/relay.out" 2>&1 &
relay_pid=$!
PIDS+=("$relay_pid")
wait_line "$WORK/relay.out" 'listening on'

start_client() {
  "$BIN/ferry" listen "$ORIGIN" --relay "http://127.0.0.1:$RELAY" --token "$TOKEN" --name pgo \
    --json --state-dir "$WORK/state" >>"$WORK/client.out" 2>&1 &
  client_pid=$!
  PIDS+=("$client_pid")
}
stop_client() { kill -INT "$client_pid"; wait "$client_pid" || true; }

URL="http://127.0.0.1:$RELAY/pgo/hook"
post() { # CONNS BODY
  WRK_BODY_FILE=$2 wrk -t1 -c"$1" -d"${SECONDS_PER_STEP}s" -s "$ROOT/bench/wrk/post.lua" "$URL" | grep BENCH
}

start_client
wait_line "$WORK/client.out" '"event":"ready"'
log "1 KiB POSTs, one connection";     post 1 "$WORK/1k.json"
log "1 KiB POSTs, 64 connections";     post 64 "$WORK/1k.json"
log "5 MiB POSTs, 4 connections";      post 4 "$WORK/5m.bin"
log "5 MiB downloads, 4 connections"
wrk -t1 -c4 -d"${SECONDS_PER_STEP}s" "http://127.0.0.1:$RELAY/pgo/download/5M" | grep -E 'Requests/sec|Non-2xx' || true

log "durable accepts while the client is away"
stop_client
post 16 "$WORK/1k.json"
queued=$(curl -s -o /dev/null -w '%{http_code}' -X POST --data-binary @"$WORK/1k.json" "$URL")
[[ $queued == 202 ]] || { log "expected 202 with the client away, got $queued"; exit 1; }

log "delivering the queue"
before=$(lines '"event":"request"' "$WORK/client.out")
start_client
wait_line "$WORK/client.out" '"event":"ready"'
# The queue is delivered before new requests: once a fresh request is answered 200, it is empty.
for ((i = 0; i < 1200; i++)); do
  code=$(curl -s -o /dev/null -w '%{http_code}' -X POST --data-binary @"$WORK/1k.json" "$URL")
  [[ $code == 200 ]] && break
  sleep 0.1
done
log "delivered $(($(lines '"event":"request"' "$WORK/client.out") - before)) requests after the restart"
stop_client
kill -TERM "$relay_pid"
wait "$relay_pid" || true

"$profdata" merge --sparse -o "$WORK/ferry.profdata" "$RAW"/*.profraw
gzip -n -9 -c "$WORK/ferry.profdata" >"$ROOT/pgo/ferry.profdata.gz"
{
  echo "commit $(git -C "$ROOT" rev-parse HEAD)"
  rustc -vV | grep -E '^(release|LLVM version):'
} >"$ROOT/pgo/PROFILE"
log "wrote pgo/ferry.profdata.gz ($(wc -c <"$ROOT/pgo/ferry.profdata.gz") bytes) and pgo/PROFILE"
