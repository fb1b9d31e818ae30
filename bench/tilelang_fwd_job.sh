#!/usr/bin/env bash
# Device call validating and timing the forward's TileLang phase 4 (backends/tilelang/scan_chunk_output.py).
# PART lists the steps (default "sweep tests"):
#   sweep  bench/scan_fwd_seg_sweep.py: the SISO bench shapes, OUT_IMPL triton vs tilelang (default SEG,
#          accuracy vs the float64 oracle, per-phase times; SWEEP_ARGS adds to it)
#   tests  tests/test_tilelang_scan_fwd_gpu.py (the walk vs the float64 oracle and vs the Triton phase 4)
#   fwdgrid  tests/test_scan_gpu.py (the Triton forward's GPU tests), beside the tests above
#   validate  mamba3-kernels validate's TileLang phase-4 rows (forward + every gradient through the API)
#   walk   bench/tilelang_fwd_walk.py: phase 4 alone, TileLang with phases left out and A = 0, vs Triton
#   bench  bench/scan.py side by side with upstream (carry .upstream too; BENCH_ARGS)
# On the device, repo root, carry [".carry/tilelang"]:
#   PART="sweep tests" MAMBA3_COMMIT=<sha> bash bench/tilelang_fwd_job.sh
source bench/device_env.sh
[ "${PREBUILD:-1}" = 1 ] && timeout ${T0:-150} python bench/tilelang_prebuild.py --fwd > $OUT/prebuild_fwd_$c.log 2>&1
grep -v " ok$" $OUT/prebuild_fwd_$c.log | tail -5
for part in ${PART:-sweep tests}; do case $part in
sweep)
  timeout ${T1:-240} python bench/scan_fwd_seg_sweep.py --default-seg-only --acc \
      --only ${ONLY:-B4-L4096-H32,B8-L2048-H32,B1-L16384-H32,B4-L4096-H32-G8-N64} \
      --set 'OUT_IMPL="triton","tilelang"' ${SWEEP_ARGS:-} --out $OUT/scan_fwd_tilelang_out_h100_$c.json \
      > $OUT/sweep_$c.log 2>&1
  tail -12 $OUT/sweep_$c.log | cut -c1-300;;
tests)
  timeout ${T2:-300} python -m pytest -q tests/test_tilelang_scan_fwd_gpu.py -rA --durations=0 -x \
      > $OUT/gpu_tests_tilelang_fwd_$c.log 2>&1
  grep -E "passed|failed|FAILED|Error|assert" $OUT/gpu_tests_tilelang_fwd_$c.log | tail -20;;
fwdgrid)
  timeout ${T5:-480} python -m pytest -q tests/test_scan_gpu.py -rA --durations=0 \
      > $OUT/gpu_tests_scan_fwd_$c.log 2>&1
  grep -E "passed|failed|FAILED|Error" $OUT/gpu_tests_scan_fwd_$c.log | tail -10;;
validate)
  timeout ${T6:-300} python -c "
from mamba3_kernels.cli import _tilelang_phase4_section
import sys; sys.exit(0 if _tilelang_phase4_section([], True) else 1)" > $OUT/validate_tilelang_phase4_$c.log 2>&1
  echo "rc $?"; tail -5 $OUT/validate_tilelang_phase4_$c.log | cut -c1-250;;
walk)
  timeout ${T4:-300} python bench/tilelang_fwd_walk.py ${WALK_ARGS:-} --out $OUT/tilelang_fwd_walk_h100_$c.json \
      > $OUT/walk_$c.log 2>&1
  grep " us" $OUT/walk_$c.log;;
bench)
  PYTHONPATH=$PWD/.upstream:$PYTHONPATH timeout ${T3:-400} python bench/scan.py ${BENCH_ARGS:-} \
      --out $OUT/scan_fwd_h100_$c.json > $OUT/bench_$c.log 2>&1
  tail -30 $OUT/bench_$c.log | cut -c1-250;;
esac; done
