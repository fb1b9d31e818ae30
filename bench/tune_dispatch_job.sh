#!/usr/bin/env bash
# One device call (carry .carry/<bundle>): budgeted step tuning of a few shapes with one DSL
# bundle (triton + that DSL), then the dispatch overhead with the cache it wrote.
# Usage on the device, repo root:  bash bench/tune_dispatch_job.sh cute|tilelang
# Writes under $OUT: tune_<b>.json (cache), tune_<b>.log, dispatch_<b>.json.
set -uo pipefail
b=$1
export PYTHONUNBUFFERED=1
source .carry/$b/activate.sh
export PYTHONPATH=$PWD:${PYTHONPATH:-}
ours=triton,$b
common="--H 32 --N 128 --P 64 --A 32 --has-d --has-z --backends $ours --no-progress --remeasure --budget ${BUDGET:-28}"
mimo="--pairing half --mimo-v --mimo-z --mimo-out"
{
  for B in ${SHAPES_R1:-1 64}; do
    /usr/bin/time -f "wall %e s: --B $B --R 1" timeout 200 python -m mamba3_kernels tune --op step $common --cache $OUT/tune_$b.json --B $B --R 1
  done
  for B in ${SHAPES_R4:-256}; do
    /usr/bin/time -f "wall %e s: --B $B --R 4" timeout 200 python -m mamba3_kernels tune --op step $common $mimo --cache $OUT/tune_$b.json --B $B --R 4
  done
} 2>&1 | grep -v "pruned .*budget: not built" > $OUT/tune_$b.log
MAMBA3_TUNE_CACHE=$OUT/tune_$b.json timeout 120 python bench/dispatch_overhead.py --B 1,64 --R 1 --out $OUT/dispatch_$b.json 2>&1 | tail -4
grep -E "wall|chosen|best|took|seconds" $OUT/tune_$b.log | tail -20
