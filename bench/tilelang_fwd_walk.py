"""The forward's TileLang phase 4 alone (backends/tilelang/scan_chunk_output.py) on the SISO bench
shape, with phases left out (`program(debug=...)`: timing ablations, wrong results) and A = 0, against
the Triton phase 4 on the same inputs: where the walk's time goes.

    PYTHONPATH=$PWD python bench/tilelang_fwd_walk.py [--shape B4-L4096-H32] [--out f.json]

Median us of the phase-4 kernel alone (triton.testing.do_bench, L2 not flushed: the kernel reads
~100 MB, twice L2).
"""
import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import write_report  # noqa: E402
from scan import SHAPES, make_inputs, ours_bundle  # noqa: E402

from mamba3_kernels.backends.tilelang import scan_chunk_output as walk  # noqa: E402
from mamba3_kernels.backends.tilelang.step import device_arch  # noqa: E402
from mamba3_kernels.backends.triton import scan_fwd as sf  # noqa: E402

VARIANTS = [(), ("scan",), ("trig",), ("rotate",), ("weights",), ("store",), ("update",),
            ("scan", "trig", "rotate"), ("scan", "trig", "rotate", "weights", "store", "update")]


def main():
    from triton.testing import do_bench
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="B4-L4096-H32")
    ap.add_argument("--out", default="tilelang_fwd_walk.json")
    ap.add_argument("--quick", action="store_true", help="no ablations: the whole walk and Triton's only")
    args = ap.parse_args()
    label, B, L, H, G, N, P = next(s for s in SHAPES if s[0] == args.shape)
    a = make_inputs("siso", B, L, H, G, N, P, 1)
    rows = []
    for A0 in (False, True):
        aa = dict(a)
        if A0:
            aa["angles"] = None
        spec, prob, t = ours_bundle("siso", aa)
        cfg = dict(sf.default_config(spec, prob), OUT_IMPL="tilelang")
        calls, _ = sf.plan(spec, cfg, t)
        for c in calls:   # everything before phase 4, once
            if c["run"] and c["name"] != "tilelang_chunk_output":
                sf.launch(c)
        wc = next(c for c in calls if c["name"] == "tilelang_chunk_output")
        tri = next(c for c in sf.plan(spec, sf.default_config(spec, prob), t)[0] if c["name"] == "scan_chunk_output")
        sf.launch(tri)
        us = do_bench(lambda: sf.launch(tri), warmup=10, rep=100, return_mode="median") * 1e3
        rows.append(dict(shape=label, A=spec.n_angles, impl="triton", debug=[], us=us))
        print(f"{label} A={spec.n_angles} triton phase 4 {us:.1f} us", flush=True)
        for dbg in (VARIANTS if not (A0 or args.quick) else [()]):
            k = dict(wc["tilelang"])
            k.pop("arch")
            stages = k.pop("stages", None)
            kern = walk.build(device_arch(), walk.THREADS, stages, debug=dbg, **k)
            argv = [x for _, x in wc["args"]]
            kern(*argv)
            torch.cuda.synchronize()
            us = do_bench(lambda: kern(*argv), warmup=10, rep=100, return_mode="median") * 1e3
            rows.append(dict(shape=label, A=spec.n_angles, impl="tilelang", debug=list(dbg), us=us))
            print(f"{label} A={spec.n_angles} tilelang without {','.join(dbg) or '-'}: {us:.1f} us", flush=True)
    write_report(args.out, rows)


if __name__ == "__main__":
    main()
