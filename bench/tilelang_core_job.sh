#!/usr/bin/env bash
# One device call validating and timing the TileLang walks of the backward core:
#   1. tests/test_tilelang_scan_bwd_core_gpu.py (the core vs the float64 core oracle, R 1/2/4/8)
#   2. tests/test_scan_bwd_gpu.py -k tilelang (every scan gradient with CORE_IMPL "tilelang")
#   3. bench/tilelang_dq_walk.py (each walk vs the Triton walk, SISO B4 L4096)
#   4. bench/scan_bwd_core_tilelang.py (the whole core, SISO and MIMO shapes)
#   5. bench/scan_bwd_ab.py --b CORE_IMPL tilelang (fwd+bwd from CUDA graphs, gradients vs Triton's)
# On the device, repo root, carry [".carry/tilelang"]: MAMBA3_COMMIT=<sha> bash bench/tilelang_core_job.sh
set -uo pipefail
source .carry/tilelang/activate.sh > /dev/null 2>&1
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD:${PYTHONPATH:-} MAMBA3_EXPERIMENTAL_TILELANG_CORE=1
{ nvidia-smi --query-gpu=name,driver_version --format=csv; echo "commit ${MAMBA3_COMMIT:-unknown}";
  python -c "import torch, triton, tilelang; print(torch.__version__, triton.__version__, tilelang.__version__)"; } > $OUT/env.txt 2>&1
c=${MAMBA3_COMMIT:-unknown}
timeout ${T1:-150} python -m pytest -q -x tests/test_tilelang_scan_bwd_core_gpu.py -rA > $OUT/gpu_tests_tilelang_core_$c.log 2>&1
timeout ${T2:-150} python -m pytest -q tests/test_scan_bwd_gpu.py -k tilelang -rA > $OUT/gpu_tests_scan_bwd_tilelang_$c.log 2>&1
timeout ${T3:-90} python bench/tilelang_dq_walk.py --out $OUT/tilelang_walks_h100_$c.json > $OUT/walks_$c.log 2>&1
timeout ${T4:-120} python bench/scan_bwd_core_tilelang.py --out $OUT/scan_bwd_core_tilelang_h100_$c.json > $OUT/core_$c.log 2>&1
timeout ${T5:-240} python bench/scan_bwd_ab.py --b '{"CORE_IMPL": "tilelang"}' --kinds ${KINDS:-siso,mimo} \
    --out $OUT/scan_bwd_ab_tilelang_core_h100_$c.json > $OUT/ab_$c.log 2>&1
for f in $OUT/gpu_tests_*.log; do echo "== $f"; tail -4 $f; done
tail -8 $OUT/walks_$c.log; tail -8 $OUT/core_$c.log; tail -12 $OUT/ab_$c.log
