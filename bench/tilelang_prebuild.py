"""Build the TileLang walks of the backward core (backends/tilelang/scan_bwd_core_chunk.py) for
this machine's GPU in parallel, one process per build, so that the tests and benchmarks after it
load them from TileLang's on-disk kernel cache instead of compiling one at a time (about 17 s
each through nvcc; a device call's minutes are counted).

    PYTHONPATH=$PWD python bench/tilelang_prebuild.py [--jobs 14] [--all | --keys '[["dq", 1, 128, 64], ...]']
        [--fwd]

Default keys: the (R, N, P) the GPU tests and benchmarks use (USED), both walks; --all: every
build in the walks' scope (R in {1, 2, 4, 8} x N, P in {64, 128}). Default threads and stages.
--fwd: the forward's TileLang phase 4 instead (backends/tilelang/scan_chunk_output.py), every
build key of tests/test_tilelang_scan_fwd_gpu.py's cases and of the SISO benchmark shapes.
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
    t = time.time()
    try:
        from mamba3_kernels.backends.tilelang.step import device_arch
        if isinstance(key, dict):   # the forward walk
            from mamba3_kernels.backends.tilelang import scan_chunk_output as fwd
            fwd.build(device_arch(), fwd.THREADS, key.pop("stages", None), **key)
            return tuple(sorted(key.items())), round(time.time() - t, 1), None
        from mamba3_kernels.backends.tilelang import scan_bwd_core_chunk as walks
        which, R, N, P = key
        walks.build(which, R, N, P, device_arch())
        return key, round(time.time() - t, 1), None
    except Exception as e:   # report it: the test that needs this build will fail with the details
        return key, round(time.time() - t, 1), repr(e)[:300]


def fwd_keys() -> list:
    """Build keys of the forward walk: the GPU test cases' specs and the SISO bench shapes', with
    and without entry states (and with the saved y for the bench spec)."""
    import os
    import sys
    from mamba3_kernels.backends.tilelang import scan_chunk_output as fwd
    from mamba3_kernels.spec import ScanSpec
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests"))
    import test_tilelang_scan_fwd_gpu as tg
    specs = [tg._spec(i, c[1], c[2], c[3], **c[8]) for i, c in enumerate(tg.CASES)]
    specs += [ScanSpec(d_state=n, head_dim=64, n_angles=n // 4, shared_angles=True, has_d=True, has_z=True)
              for n in (128, 64)]
    keys = []
    for sp in specs:
        for entry in (False, True):
            for y in ((False, True) if sp.has_z and sp.d_state == 128 and sp.n_angles == 32 else (False,)):
                k = fwd.spec_key(sp, entry, y, "float32")   # (scan_case and the bench: fp32 angles)
                if k not in keys:
                    keys.append(k)
                if sp.d_state == 128 and sp.n_angles == 32 and sp.shared_angles and not y:   # the stages-1 variant
                    keys.append(dict(k, stages=1))
    return keys


def main():
    from mamba3_kernels.backends.tilelang import scan_bwd_core_chunk as walks
    ap = argparse.ArgumentParser()
    ap.add_argument("--jobs", type=int, default=14)
    ap.add_argument("--keys", type=json.loads, default=None, help="[[which, R, N, P], ...]")
    ap.add_argument("--all", action="store_true")
    ap.add_argument("--fwd", action="store_true", help="the forward's TileLang phase 4 builds")
    args = ap.parse_args()
    if args.fwd:
        keys = fwd_keys()
    elif args.keys:
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
