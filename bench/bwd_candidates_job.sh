#!/usr/bin/env bash
# Device calls that time the backward's speed candidates (FUSED core, rows post, the backward
# tuner's choice). On the device, repo root (carry .upstream):
#   MAMBA3_COMMIT=<sha> bash bench/bwd_candidates_job.sh A|B
# A: core_fused_check, the SEG x FUSED sweep, the MIMO post stage sweep (POST_IMPL rows).
# B: `tune --op backward` at SISO B4 L4096 and MIMO R4 B4 L2048, then fwd+bwd side by side
#    with upstream from CUDA graphs (the tuned cache in effect via MAMBA3_TUNE_CACHE).
# ab: bench/scan_bwd_ab.py of the backward configs AB_A (default {}) and AB_B over AB_KINDS
#    (default siso), then the backward's GPU tests in 8 processes.
# Everything lands under $OUT (logs, JSON reports, env.txt).
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
  echo "== $name rc=$? $(( $(date +%s) - t0 )) s"; tail -${TAIL:-12} $OUT/$name.log
}
common="--H 32 --N 128 --P 64 --A 32 --has-d --has-z --shared-angles --no-progress --remeasure"
case ${1:-A} in
  A)
    step core_fused 120 python bench/core_fused_check.py --out $OUT/core_fused_check.json
    step seg_sweep ${SEG_S:-280} python bench/scan_bwd_seg_sweep.py --segs ${SEGS:-0,8,16} \
      --core FUSED=false,true --out $OUT/scan_bwd_seg_sweep.json
    step post_sweep 150 python bench/scan_bwd_stage_sweep.py --only post --shapes mimo \
      --out $OUT/scan_bwd_stage_sweep_post_mimo.json
    ;;
  B)
    step tune_siso 170 python -m mamba3_kernels tune --op backward --B 4 --L 4096 $common \
      --budget ${BUDGET:-120} --cache $OUT/tune_bwd.json --json $OUT/tune_bwd_siso.json
    step tune_mimo 200 python -m mamba3_kernels tune --op backward --B 4 --L 2048 --R 4 $common \
      --pairing half --mimo-v --mimo-z --mimo-out --budget ${BUDGET:-120} --cache $OUT/tune_bwd.json \
      --json $OUT/tune_bwd_mimo.json
    MAMBA3_TUNE_CACHE=$OUT/tune_bwd.json step bench_graph 220 python bench/scan_bwd.py --graph \
      --prewarm-upstream 14 --no-acc --out $OUT/scan_bwd_graph.json
    ;;
  ab)
    step ab ${AB_S:-240} python bench/scan_bwd_ab.py --a "${AB_A:-{\}}" --b "$AB_B" --kinds ${AB_KINDS:-siso} \
      --out $OUT/scan_bwd_ab.json
    step gpu_tests ${TESTS_S:-300} bash bench/gpu_tests_parallel.sh 8 280 $OUT/gpu_tests_bwd.log tests/test_scan_bwd_gpu.py
    ;;
esac
