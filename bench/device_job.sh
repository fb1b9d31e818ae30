#!/usr/bin/env bash
# One device call of the step campaign: GPU tests, the side-by-side benchmark and tuning for the
# backends that the carried bundle makes importable. Usage (on the device, repo root):
#   bash bench/device_job.sh cute      # carry .carry/cute and .upstream: triton + cute + upstream
#   bash bench/device_job.sh tilelang  # carry .carry/tilelang: triton + tilelang
# Writes under $OUT: env.txt, tests.log, bench.log, step_<bundle>.json, tune_<bundle>.json, tune.log
# Variants of one backend's knobs, each checked against the oracle first: bench/step_variants.py.
# Afterwards, here: python bench/summarize_step.py <both step_*.json> (one table), and
#   mamba3-kernels tune --merge <both tune_*.json> --cache bench/results/tune_cache_h100_merged.json
set -uo pipefail
bundle=$1
export PYTHONUNBUFFERED=1
source .carry/$bundle/activate.sh
export PYTHONPATH=$PWD:$PWD/.upstream:${PYTHONPATH:-}
case $bundle in
  cute) ours=triton,cute; kexpr="triton or cute" ;;
  tilelang) ours=triton,tilelang; kexpr="tilelang" ;;
esac
{ nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem,temperature.gpu --format=csv
  echo "commit ${MAMBA3_COMMIT:-unknown}"
  python -m mamba3_kernels info; } 2>&1 | tee $OUT/env.txt
timeout ${TEST_TIMEOUT:-240} python -m pytest -q -m gpu tests/test_step_gpu.py -k "$kexpr" -p no:cacheprovider \
  ${PYTEST_EXTRA:-} 2>&1 | tail -60 | tee $OUT/tests.log
timeout ${BENCH_TIMEOUT:-200} python bench/step.py --backends $ours ${BENCH_EXTRA:-} --out $OUT/step_$bundle.json \
  2>&1 | tee $OUT/bench.log
for spec in "--B 1 --R 1" "--B 64 --R 1" "--B 256 --R 1" "--B 1 --R 4 --pairing half --mimo-v --mimo-z --mimo-out" \
            "--B 64 --R 4 --pairing half --mimo-v --mimo-z --mimo-out" "--B 64 --R 1 --state-dtype bfloat16" \
            "--B 256 --R 4 --pairing half --mimo-v --mimo-z --mimo-out --state-dtype bfloat16"; do
  timeout ${TUNE_TIMEOUT:-60} python -m mamba3_kernels tune --op step $spec --H 32 --N 128 --P 64 --A 32 --has-d --has-z \
    --backends $ours --cache $OUT/tune_$bundle.json --no-progress 2>&1 | tail -25
done | tee $OUT/tune.log
