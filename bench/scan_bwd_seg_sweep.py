"""Segment length of the backward core (CORE SEG, chunks per segment; 0 = its automatic rule) on
the fwd+bwd benchmark shapes: fwd+bwd replayed from one CUDA graph per value.

    PYTHONPATH=$PWD python bench/scan_bwd_seg_sweep.py [--segs 0,16,32,64,128,256] [--out f.json]
"""
import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from scan_bwd import MIMO_SHAPES, SHAPES, graph_ms, ours_fwd  # noqa: E402  (bench/scan_bwd.py)
from scan import make_inputs  # noqa: E402

from mamba3_kernels.backends.triton import scan_bwd_core  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--segs", default="0,16,32,64,128,256")
    ap.add_argument("--kinds", default="siso,mimo")
    ap.add_argument("--only", default="")
    ap.add_argument("--out", default="scan_bwd_seg_sweep.json")
    args = ap.parse_args()
    rows = []
    for kind in args.kinds.split(","):
        R = 4 if kind == "mimo" else 1
        for label, B, L, H, G, N, P in (MIMO_SHAPES if kind == "mimo" else SHAPES):
            if args.only and label not in args.only.split(","):
                continue
            a = make_inputs(kind, B, L, H, G, N, P, R)
            dout = torch.randn(a["v"].shape, device="cuda").to(torch.bfloat16)
            for seg in (int(s) for s in args.segs.split(",")):
                try:
                    ms = graph_ms(ours_fwd(kind, bwd_config=dict(CORE=dict(SEG=seg))), a, dout)
                except Exception as e:  # noqa: BLE001
                    ms = f"{type(e).__name__}: {e}"[:200]
                rows.append(dict(kind=kind, shape=label, core_SEG=seg, fwd_bwd_graph_ms=ms))
                print(f"{kind} {label:<22} core SEG {seg:4d}{' (auto)' if seg == 0 else ''} "
                      f"{ms if isinstance(ms, str) else f'{ms:.3f} ms'}", flush=True)
                torch.cuda.empty_cache()
    with open(args.out, "w") as f:
        json.dump(dict(commit=os.environ.get("MAMBA3_COMMIT"), auto_rule=scan_bwd_core._seg.__doc__,
                       rows=rows), f, indent=1)


if __name__ == "__main__":
    main()
