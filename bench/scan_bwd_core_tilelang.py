"""The backward core with the TileLang walks (backends/tilelang/scan_bwd_core.py) against the
Triton core on the same operands: GPU time of the whole core (local, pass, dq, dkv, dadt; CUDA
events around back-to-back calls, median; eager, since the TileLang kernels launch through
tvm-ffi), each kernel of both plans alone, and every output's rel_l2 between the two (both approximate the same float64 result;
the GPU test checks each against the oracle). Shapes: the benchmark's core shapes, SISO and MIMO R4
(--more: R 2 / 8, MIMO N 64 and P 128).

    PYTHONPATH=$PWD python bench/scan_bwd_core_tilelang.py [--more] [--only LABELS] [--out f.json]   (carry .carry/tilelang)
"""
import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import events_us, use_checkout, write_report  # noqa: E402

use_checkout()
SHAPES = [("B4-L4096-H32", 1, 4, 4096, 32, 128, 64), ("B8-L2048-H32", 1, 8, 2048, 32, 128, 64),
          ("B1-L16384-H32", 1, 1, 16384, 32, 128, 64), ("B4-L4096-H32-N64", 1, 4, 4096, 32, 64, 64),
          ("R4-B4-L2048-H32", 4, 4, 2048, 32, 128, 64), ("R4-B4-L4096-H32", 4, 4, 4096, 32, 128, 64)]
# the other core ranks and the MIMO N = 64 head (--more): where CORE_IMPL "auto" may send them
MORE = [("R2-B4-L4096-H32", 2, 4, 4096, 32, 128, 64), ("R8-B4-L2048-H32", 8, 4, 2048, 32, 128, 64),
        ("R4-B4-L4096-H32-N64", 4, 4, 4096, 32, 64, 64), ("R4-B4-L2048-H32-P128", 4, 4, 2048, 32, 128, 128)]


def main():
    import tilelang

    from mamba3_kernels.backends.tilelang import scan_bwd_core as hyb
    from mamba3_kernels.backends.triton import scan_bwd_core as tcore
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="scan_bwd_core_tilelang.json")
    ap.add_argument("--more", action="store_true", help="also the MORE shapes")
    ap.add_argument("--only", default="", help="comma-separated shape labels")
    args = ap.parse_args()
    rows = []
    for label, R, B, L, H, N, P in SHAPES + (MORE if args.more else []):
        if args.only and label not in args.only.split(","):
            continue
        g = torch.Generator(device="cuda").manual_seed(0)
        bf = lambda *s, k=1.0: (torch.randn(*s, device="cuda", generator=g) * k).to(torch.bfloat16)  # noqa: E731
        qh, ks = bf(B, L, R, H, N), bf(B, L, R, H, N, k=0.3)
        vt, dy = bf(B, L, R, H, P), bf(B, L, R, H, P)
        adt = -torch.rand(B, H, L, device="cuda", generator=g) * 0.1
        s0 = torch.randn(B, H, P, N, device="cuda", generator=g)
        dsf = torch.randn(B, H, P, N, device="cuda", generator=g)
        a = (qh, ks, vt, adt, dy, s0, dsf)
        row = dict(shape=label, R=R, B=B, L=L, H=H, N=N, P=P)
        try:
            t_out = tcore.core_backward(*a)
            h_out = hyb.core_backward(*a)
            torch.cuda.synchronize()
            row["rel_vs_triton"] = {k: float((h_out[k].double() - t_out[k].double()).norm() / t_out[k].double().norm())
                                    for k in ("dqh", "dks", "dvt", "dadt", "ds0")}
            row["triton_core_us"] = events_us(lambda: tcore.core_backward(*a), reps=15, iters=5)
            row["tilelang_walks_core_us"] = events_us(lambda: hyb.core_backward(*a), reps=15, iters=5)
            row["speedup"] = row["triton_core_us"] / row["tilelang_walks_core_us"]
            for name, mod in (("triton", tcore), ("tilelang", hyb)):   # each kernel of the plan alone
                calls, _ = mod.plan(*tcore.contiguous_operands(*a))
                row[f"{name}_kernels_us"] = {c["name"]: round(events_us(lambda c=c: mod.launch(c), reps=15, iters=5), 1)
                                             for c in calls if c["run"]}
        except Exception as e:  # report and go on
            row["error"] = repr(e)[:800]
        print(row, flush=True)
        rows.append(row)
    write_report(args.out, rows, tilelang=tilelang.__version__)


if __name__ == "__main__":
    main()
