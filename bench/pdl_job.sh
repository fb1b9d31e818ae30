set -x
export PYTHONPATH=$PWD:$PYTHONPATH MAMBA3_COMMIT=$(git rev-parse --short HEAD)
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
timeout 200 python -m pytest -q -x tests/test_scan_gpu.py -k pdl 2>&1 | tail -5
S=B4-L4096-H32,B1-L16384-H32,B4-L4096-H32-G8-N64,B1-L65536-H32
timeout 250 python bench/scan_fwd_seg_sweep.py --default-seg-only --acc --set PDL=false,true --only $S --out $OUT/pdl_siso.json 2>&1 | grep -v Warn | tail -12
timeout 150 python bench/scan_fwd_seg_sweep.py --kind mimo --default-seg-only --set PDL=false,true --only B4-L4096-H32,B1-L16384-H32,B4-L2048-H32 --out $OUT/pdl_mimo.json 2>&1 | tail -8
