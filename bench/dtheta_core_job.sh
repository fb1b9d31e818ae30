#!/usr/bin/env bash
# Device call for the backward's CORE_DTHETA / CORE_GRADS (session 9): fwd+bwd A / B on the
# benchmark shapes (A = the previous path: post forms the angle terms from fp32 dqh / dks), then
# the backward's GPU tests at the new default. On the device, repo root (carry .upstream):
#   MAMBA3_COMMIT=<sha> bash bench/dtheta_core_job.sh
set -uo pipefail
export PYTHONUNBUFFERED=1
export PYTHONPATH=$PWD:$PWD/.upstream:${PYTHONPATH:-}
{ nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem --format=csv
  echo "commit ${MAMBA3_COMMIT:-unknown}"
  python -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"; } > $OUT/env.txt 2>&1
step() {  # name timeout cmd...
  local name=$1 t=$2; shift 2
  local t0=$(date +%s)
  timeout $t "$@" > $OUT/$name.log 2>&1
  echo "== $name rc=$? $(( $(date +%s) - t0 )) s"; tail -${TAIL:-14} $OUT/$name.log
}
OLD='{"CORE_DTHETA": false, "CORE_GRADS": "float32"}'
step ab ${AB_S:-300} python bench/scan_bwd_ab.py --a "$OLD" --b '{}' --b '{"CORE_GRADS": "float32"}' \
  --b '{"CORE": {"SPILL_GUARD": false}}' --kinds ${AB_KINDS:-siso,mimo} --only ${AB_ONLY:-B4-L4096-H32,B8-L2048-H32,B1-L16384-H32,B4-L4096-H32-G8-N64,B4-L2048-H32} \
  --reps 2 --out $OUT/scan_bwd_ab_dtheta.json
step gpu_tests ${TESTS_S:-280} bash bench/gpu_tests_parallel.sh 8 260 $OUT/gpu_tests_bwd.log tests/test_scan_bwd_gpu.py
