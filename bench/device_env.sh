# Sourced by the device jobs (bench/tilelang_*_job.sh): the TileLang bundle's environment, one kernel
# cache for every process (tests/conftest.py's dirs: the prebuild's TileLang builds and the
# benchmarks' Triton builds are then hits in the tests; session 12's tests rebuilt every walk),
# $OUT/env.txt (GPU, driver, commit, versions), and c = the commit for file names.
set -uo pipefail
source .carry/tilelang/activate.sh > /dev/null 2>&1
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD:${PYTHONPATH:-}
export TILELANG_CACHE_DIR=$PWD/.cache/tilelang TRITON_CACHE_DIR=$PWD/.cache/triton
{ nvidia-smi --query-gpu=name,driver_version --format=csv; echo "commit ${MAMBA3_COMMIT:-unknown}";
  python -c "import torch, triton, tilelang; print(torch.__version__, triton.__version__, tilelang.__version__)"; } > $OUT/env.txt 2>&1
c=${MAMBA3_COMMIT:-unknown}
