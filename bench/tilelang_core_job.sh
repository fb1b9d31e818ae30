#!/usr/bin/env bash
# Device calls validating and timing the TileLang walks of the backward core. Every part first
# builds all the walks in parallel (bench/tilelang_prebuild.py: TileLang's disk cache then serves
# the rest; a fresh machine has an empty cache).
# PART lists the steps (default "tests"):
#   tests  tests/test_tilelang_scan_bwd_core_gpu.py (the core vs the float64 core oracle) and
#          tests/test_scan_bwd_gpu.py -k tilelang (every scan gradient with CORE_IMPL "tilelang")
#   grid   every GPU test of the backward (tests/test_scan_bwd_gpu.py, CORE_IMPL "auto" included)
#          and the TileLang core's, as 8 pytest processes (bench/gpu_tests_parallel.sh)
#   walks  bench/tilelang_dq_walk.py (each walk vs the Triton walk, SISO B4 L4096; WALK_ARGS)
#   core   bench/scan_bwd_core_tilelang.py (the whole core and each kernel, SISO and MIMO)
#   ab     bench/scan_bwd_ab.py (fwd+bwd from CUDA graphs): AB_A (default {}) vs AB_B (default CORE_IMPL
#          tilelang) [and AB_B2]
#   bench  bench/scan_bwd.py --graph (fwd+bwd of the defaults, side by side with upstream's SISO;
#          carry .upstream too; BENCH_ARGS)
# On the device, repo root, carry [".carry/tilelang"]:
#   PART="tests walks core" MAMBA3_COMMIT=<sha> bash bench/tilelang_core_job.sh
source bench/device_env.sh
timeout ${T0:-120} python bench/tilelang_prebuild.py > $OUT/prebuild_$c.log 2>&1
tail -1 $OUT/prebuild_$c.log
for part in ${PART:-tests}; do case $part in
tests)   # the two test files side by side (a fresh machine JIT-compiles every Triton kernel: ~5 min)
  timeout ${T1:-420} python -m pytest -q tests/test_tilelang_scan_bwd_core_gpu.py -rA --durations=0 \
      > $OUT/gpu_tests_tilelang_core_$c.log 2>&1 &
  timeout ${T2:-400} python -m pytest -q tests/test_scan_bwd_gpu.py -k tilelang -rA --durations=0 \
      > $OUT/gpu_tests_scan_bwd_tilelang_$c.log 2>&1 &
  wait
  for f in $OUT/gpu_tests_*.log; do echo "== $f"; grep -E "passed|failed|FAILED|Error" $f | tail -15; done;;
grid)
  bash bench/gpu_tests_parallel.sh 8 ${T6:-420} $OUT/gpu_tests_bwd_grid_h100_$c.log \
      tests/test_scan_bwd_gpu.py tests/test_tilelang_scan_bwd_core_gpu.py;;
walks)
  timeout ${T3:-90} python bench/tilelang_dq_walk.py ${WALK_ARGS:-} --out $OUT/tilelang_walks_h100_$c.json > $OUT/walks_$c.log 2>&1
  grep -o "'impl': '[a-z_]*'\|'us': [0-9.]*" $OUT/walks_$c.log;;
core)
  timeout ${T4:-150} python bench/scan_bwd_core_tilelang.py ${CORE_ARGS:-} --out $OUT/scan_bwd_core_tilelang_h100_$c.json > $OUT/core_$c.log 2>&1
  grep speedup $OUT/core_$c.log | cut -c1-300;;
ab)
  timeout ${T5:-400} python bench/scan_bwd_ab.py --a "${AB_A:-{\}}" --b "${AB_B:-{\"CORE_IMPL\": \"tilelang\"\}}" \
      ${AB_B2:+--b "$AB_B2"} --kinds ${KINDS:-siso,mimo} \
      --out $OUT/scan_bwd_ab_tilelang_core_h100_$c.json > $OUT/ab_$c.log 2>&1
  tail -12 $OUT/ab_$c.log;;
bench)
  PYTHONPATH=$PWD/.upstream:$PYTHONPATH timeout ${T7:-500} python bench/scan_bwd.py --graph --prewarm-upstream 14 \
      ${BENCH_ARGS:-} --out $OUT/scan_bwd_h100_graph_$c.json > $OUT/bench_$c.log 2>&1
  tail -30 $OUT/bench_$c.log | cut -c1-250;;
esac; done
