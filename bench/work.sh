# Sourced by bench/ab.sh, bench/vs-bore.sh and pgo/train.sh: a work directory and the processes
# a script starts (their PIDs go into PIDS), all cleaned up when the script exits, every process
# by its PID. BENCH_KEEP=1 keeps the directory.
#
#   source "$ROOT/bench/work.sh"; work_dir NAME    # sets WORK=/tmp/ferry-NAME.XXXXXX and PIDS=()

work_dir() {
  WORK=$(mktemp -d "/tmp/ferry-$1.XXXXXX")
  PIDS=()
  trap cleanup_work EXIT
}

cleanup_work() {
  local pid
  for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
  for pid in "${PIDS[@]}"; do wait "$pid" 2>/dev/null || true; done
  if [[ ${BENCH_KEEP:-0} == 1 ]]; then echo "kept $WORK" >&2; else rm -rf "$WORK"; fi
}
