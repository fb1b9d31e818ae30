#!/usr/bin/env bash
# One device call: the gradient-accuracy sweep of the failing validate row, then the fwd+bwd
# benchmark against upstream (its autotune pre-compiled by parallel workers).
# On the device, repo root (carry .upstream): MAMBA3_COMMIT=<sha> bash bench/bwd_job.sh
set -uo pipefail
export PYTHONUNBUFFERED=1
export PYTHONPATH=$PWD:$PWD/.upstream:${PYTHONPATH:-}
{ nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem --format=csv; echo "commit ${MAMBA3_COMMIT:-unknown}"; } > $OUT/env.txt 2>&1
timeout ${SWEEP_S:-150} python bench/scan_grad_sweep.py --draws ${DRAWS:-3} --out $OUT/scan_grad_sweep.json > $OUT/sweep.log 2>&1
timeout ${BENCH_S:-420} python bench/scan_bwd.py --prewarm-upstream ${WORKERS:-14} ${BENCH_ARGS:-} --out $OUT/scan_bwd.json > $OUT/bench.log 2>&1
tail -20 $OUT/sweep.log; tail -25 $OUT/bench.log
