#!/usr/bin/env bash
# Run GPU test files as W pytest processes side by side (the float64 oracle is the slow, single-
# threaded part; the GPU is shared). Usage on the device, repo root:
#   bash bench/gpu_tests_parallel.sh W TIMEOUT_S OUTFILE tests/test_a.py [tests/test_b.py ...]
# Test ids are dealt round-robin; OUTFILE gets every PASSED/FAILED line and each part's summary.
set -uo pipefail
W=$1; T=$2; OUTF=$3; shift 3
ids=$(python -m pytest --collect-only -q -m gpu -p no:cacheprovider "$@" 2>/dev/null | grep "::")
tmp=$(mktemp -d)
for i in $(seq 0 $((W - 1))); do
  echo "$ids" | awk -v w=$W -v i=$i 'NR % w == i' > $tmp/part$i
  if [ -s $tmp/part$i ]; then
    timeout $T python -m pytest -v -m gpu -p no:cacheprovider $(cat $tmp/part$i) > $tmp/log$i 2>&1 &
  fi
done
wait
for i in $(seq 0 $((W - 1))); do
  [ -f $tmp/log$i ] && grep -E "PASSED|FAILED|ERROR|^E |passed|failed" $tmp/log$i
done > $OUTF
grep -c PASSED $OUTF | sed 's/^/passed: /'; grep -E "FAILED|ERROR" $OUTF | head -20
echo "collected: $(echo "$ids" | wc -l)"
