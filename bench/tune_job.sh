#!/usr/bin/env bash
# One device call of the tuning campaign (issue 6), for the backends one DSL bundle makes
# importable (the CuTe and TileLang bundles cannot travel together: 55 + 38 MB > 64 MiB).
# Usage on the device, repo root:   bash bench/tune_job.sh cute       (carry .carry/cute)
#                                   bash bench/tune_job.sh tilelang   (carry .carry/tilelang)
# Each process tunes the step grid with a per-shape budget (BUDGET s, default 28: the two
# processes together stay under a minute per shape), re-measures every built candidate
# (--remeasure: the chosen one's regret), and with FULL=1 also runs an unbudgeted tune of the
# shapes FULL_B into a second cache (the "best of the whole space" the budgeted choice is
# judged against). With SCAN="<tune args>" the cute process also tunes the scan forward.
# Writes under $OUT: env_<b>.txt, tune_<b>.log, tune_<b>.json (cache), full_<b>.json (FULL=1).
# Afterwards, here:  mamba3-kernels tune --merge $OUT/tune_cute.json $OUT/tune_tilelang.json \
#                        --cache bench/results/tune_cache_h100_merged.json
set -uo pipefail
bundle=$1
budget=${BUDGET:-28}
export PYTHONUNBUFFERED=1
source .carry/$bundle/activate.sh
export PYTHONPATH=$PWD:${PYTHONPATH:-}
case $bundle in
  cute) ours=triton,cute ;;
  tilelang) ours=triton,tilelang ;;
  *) echo "bundle: expected cute or tilelang, got $bundle"; exit 2 ;;
esac
{ nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem,temperature.gpu --format=csv
  echo "commit ${MAMBA3_COMMIT:-unknown}"
  python -m mamba3_kernels info; } > $OUT/env_$bundle.txt 2>&1
common="--H 32 --N 128 --P 64 --A 32 --has-d --has-z --backends $ours --no-progress --remeasure"
mimo="--pairing half --mimo-v --mimo-z --mimo-out"
run() {  # tune <cache> <budget> <extra...>
  local cache=$1 b=$2; shift 2
  timeout ${TUNE_TIMEOUT:-400} python -m mamba3_kernels tune --op step $common --cache $cache --budget $b "$@"
}
{
  echo "=== budgeted ($budget s per shape)"
  run $OUT/tune_$bundle.json $budget --B 1,64,256 --R 1
  run $OUT/tune_$bundle.json $budget --B 1,64,256 --R 4 $mimo
  run $OUT/tune_$bundle.json $budget --B 256 --R 1 --state-dtype bfloat16
  run $OUT/tune_$bundle.json $budget --B 256 --R 4 $mimo --state-dtype bfloat16
  if [ "${FULL:-0}" = 1 ]; then
    echo "=== full space, no budget (the yardstick of the budgeted choice)"
    run $OUT/full_$bundle.json 0 --B ${FULL_B:-64} --R 1
    run $OUT/full_$bundle.json 0 --B ${FULL_B:-64} --R 4 $mimo
  fi
  if [ "$bundle" = cute ] && [ -n "${SCAN:-}" ]; then
    echo "=== scan forward (Triton)"
    timeout 300 python -m mamba3_kernels tune --op forward $SCAN --cache $OUT/tune_$bundle.json --budget 90 \
      --backends triton --no-progress --remeasure
  fi
} 2>&1 | grep -v "^ *[0-9]* .* pruned .*budget: not built" > $OUT/tune_$bundle.log
tail -40 $OUT/tune_$bundle.log
