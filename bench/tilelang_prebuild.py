"""Build the TileLang walks of the backward core (backends/tilelang/scan_bwd_core_chunk.py) for
this machine's GPU in parallel, one process per build, so that the tests and benchmarks after it
load them from TileLang's on-disk kernel cache instead of compiling one at a time (about 17 s
each through nvcc; a device call's minutes are counted).

    PYTHONPATH=$PWD python bench/tilelang_prebuild.py [--jobs 14] [--all | --keys '[["dq", 1, 128, 64], ...]']

Default keys: the (R, N, P) the GPU tests and benchmarks use (USED), both walks; --all: every
build in the walks' scope (R in {1, 2, 4, 8} x N, P in {64, 128}). Default threads and stages.
Prints one line per build (seconds, or the error).
"""
import argparse
import itertools
import json
import multiprocessing as mp
import time

# (R, N, P) of tests/test_tilelang_scan_bwd_core_gpu.py, tests/test_scan_bwd_gpu.py -k tilelang
# (the core's R: MIMO rank 3 runs at 4), bench/tilelang_dq_walk.py, bench/scan_bwd_core_tilelang.py
# (with --more) and bench/scan_bwd_ab.py's SISO / MIMO shapes
USED = [(1, 128, 64), (1, 64, 64), (1, 128, 128), (2, 64, 128), (4, 128, 64), (8, 64, 64),
        (2, 128, 64), (8, 128, 64), (4, 64, 64), (4, 128, 128)]


def _build(key):
    which, R, N, P = key
    t = time.time()
    try:
        from mamba3_kernels.backends.tilelang import scan_bwd_core_chunk as walks
        from mamba3_kernels.backends.tilelang.step import device_arch
        walks.build(which, R, N, P, device_arch())
        return key, round(time.time() - t, 1), None
    except Exception as e:   # report it: the test that needs this build will fail with the details
        return key, round(time.time() - t, 1), repr(e)[:300]


def main():
    from mamba3_kernels.backends.tilelang import scan_bwd_core_chunk as walks
    ap = argparse.ArgumentParser()
    ap.add_argument("--jobs", type=int, default=14)
    ap.add_argument("--keys", type=json.loads, default=None, help="[[which, R, N, P], ...]")
    ap.add_argument("--all", action="store_true")
    args = ap.parse_args()
    if args.keys:
        keys = [tuple(k) for k in args.keys]
    elif args.all:
        keys = list(itertools.product(("dq", "dkv"), walks.RANKS, (64, 128), (64, 128)))
    else:
        keys = [(w, *k) for w in ("dq", "dkv") for k in USED]
    t = time.time()
    with mp.get_context("spawn").Pool(min(args.jobs, len(keys))) as pool:
        for key, s, err in pool.imap_unordered(_build, keys):
            print("prebuild", *key, f"{s} s", err or "ok", flush=True)
    print(f"prebuild: {len(keys)} builds in {time.time() - t:.0f} s", flush=True)


if __name__ == "__main__":
    main()
