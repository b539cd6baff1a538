# Sourced by bench/ab.sh, bench/vs-bore.sh, bench/run.sh and pgo/train.sh: a work directory and
# the processes a script starts (their PIDs go into PIDS), all cleaned up when the script exits,
# every process by its PID (bench/run.sh keeps its own clean-up). BENCH_KEEP=1 keeps the
# directory. Also the machine's idle share, which bench/run.sh and bench/ab.sh report.
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

# cpu_idle: total and idle (idle + iowait) jiffies of the whole machine, from /proc/stat.
cpu_idle() { awk '/^cpu / { t = 0; for (i = 2; i <= NF; i++) t += $i; print t, $5 + $6 }' /proc/stat; }

# idle_pct BEFORE AFTER: the share of the machine left idle between two cpu_idle readings, in %.
idle_pct() { awk -v a="$1" -v b="$2" 'BEGIN { split(a, x); split(b, y); if (y[1] > x[1]) printf "%.0f", (y[2] - x[2]) * 100 / (y[1] - x[1]); else print "-" }'; }
