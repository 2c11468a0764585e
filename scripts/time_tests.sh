#!/usr/bin/env bash
# How long `make test` takes, quiet and with other work beside it: RUNS runs each, then the
# median of each. The load is LOAD processes that keep one core each busy (1 by default: on a
# 2-core machine, half of it taken, as when CI or a build runs beside the tests).
#
#   scripts/time_tests.sh            # 5 quiet + 5 loaded runs
#   RUNS=3 LOAD=1 scripts/time_tests.sh
set -euo pipefail
cd "$(dirname "$0")/.."
RUNS=${RUNS:-5}
LOAD=${LOAD:-1}
make setup >/dev/null

one_run() {
  local start end took
  start=$(date +%s.%N)
  make test >/tmp/time_tests.last.log 2>&1 || { tail -30 /tmp/time_tests.last.log >&2; exit 1; }
  end=$(date +%s.%N)
  took=$(python3 -c "print(round($end - $start, 1))")
  echo "make test: $took s" >&2  # as it goes
  echo "$took"
}

median() { sort -n | awk '{a[NR]=$1} END {print (NR % 2) ? a[(NR + 1) / 2] : (a[NR / 2] + a[NR / 2 + 1]) / 2}'; }

quiet=()
for _ in $(seq "$RUNS"); do quiet+=("$(one_run)"); done

pids=()
for _ in $(seq "$LOAD"); do
  python3 -c 'while True: pass' &
  pids+=($!)
done
trap 'kill "${pids[@]}" 2>/dev/null || true' EXIT
loaded=()
for _ in $(seq "$RUNS"); do loaded+=("$(one_run)"); done

echo "make test, quiet  (s): ${quiet[*]}  median $(printf '%s\n' "${quiet[@]}" | median)"
echo "make test, loaded (s): ${loaded[*]}  median $(printf '%s\n' "${loaded[@]}" | median)" \
  "($LOAD busy core(s) beside it)"
