#!/usr/bin/env bash
# One device call validating the chunked scan (forward + backward) on the H100 and timing it
# against upstream. Usage on the device, repo root (carry .upstream):
#   MAMBA3_COMMIT=<sha> bash bench/gpu_validate_scan.sh [quick]
# Writes under $OUT: env.txt, bwd_tests.log, fwd_tests.log, scan_bwd.json, scan.json, bench.log.
# Every step has its own timeout so a slow one leaves the rest their time; pytest -v lines land in
# the logs as tests finish (a cut run keeps what passed).
set -uo pipefail
export PYTHONUNBUFFERED=1
export PYTHONPATH=$PWD:$PWD/.upstream:${PYTHONPATH:-}
quick=${1:-}
{ nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem,temperature.gpu --format=csv
  echo "commit ${MAMBA3_COMMIT:-unknown}"; python -m mamba3_kernels info; } > $OUT/env.txt 2>&1
py="python -m pytest -v -m gpu -p no:cacheprovider"
timeout ${BWD_TESTS_S:-200} $py tests/test_scan_bwd_gpu.py -k "not grid" 2>&1 | grep -E "PASS|FAIL|ERROR|SKIP|Error|assert|passed|failed" > $OUT/bwd_tests.log
timeout ${BENCH_BWD_S:-420} python bench/scan_bwd.py --prewarm-upstream 14 --graph ${quick:+--quick} --out $OUT/scan_bwd.json > $OUT/bench.log 2>&1
timeout ${BENCH_FWD_S:-90} python bench/scan.py --quick --out $OUT/scan.json >> $OUT/bench.log 2>&1
timeout ${FWD_TESTS_S:-90} $py tests/test_scan_gpu.py -k "varlen or split or grid" 2>&1 | grep -E "PASS|FAIL|ERROR|SKIP|Error|assert|passed|failed" > $OUT/fwd_tests.log
timeout ${GRID_S:-60} $py tests/test_scan_bwd_gpu.py -k "grid" 2>&1 | grep -E "PASS|FAIL|ERROR|SKIP|Error|assert|passed|failed" >> $OUT/bwd_tests.log
tail -5 $OUT/bwd_tests.log $OUT/fwd_tests.log; tail -30 $OUT/bench.log
