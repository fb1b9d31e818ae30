"""Segment length (SEG, chunks per segment) of the Triton forward on the forward benchmark's SISO
and MIMO R=4 shapes: is the default's program count (about four per SM, longest segments) the right one?

    PYTHONPATH=$PWD python bench/scan_fwd_seg_sweep.py [--segs 16,24,32,48,64] [--out f.json]

Per shape and SEG: median ms of the whole forward (triton.testing.do_bench, and CUDA-graph
replay), everything else at the default config.
"""
import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from scan import MIMO_EXTRA, SHAPES, bench, make_inputs, ours_bundle  # noqa: E402  (bench/scan.py)

from mamba3_kernels.backends.triton import scan_fwd as sf  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--segs", default="16,24,32,40,48,64")
    ap.add_argument("--only", default="B4-L4096-H32,B1-L16384-H32,B8-L2048-H32")
    ap.add_argument("--kind", default="siso", choices=("siso", "mimo"))
    ap.add_argument("--out", default="scan_fwd_seg_sweep.json")
    args = ap.parse_args()
    rows = []
    R = 4 if args.kind == "mimo" else 1
    for label, B, L, H, G, N, P in SHAPES + MIMO_EXTRA:
        if label not in args.only.split(","):
            continue
        a = make_inputs(args.kind, B, L, H, G, N, P, R)
        spec, prob, t = ours_bundle(args.kind, a)
        d = sf.default_config(spec, prob)
        for seg in sorted({int(s) for s in args.segs.split(",")} | {d["SEG"]}):
            cfg = dict(d, SEG=seg)
            ms, gms = bench(lambda: sf.forward(spec, cfg, t), graph=True)
            rows.append(dict(kind=args.kind, shape=label, SEG=seg, default=seg == d["SEG"], ms=ms, graph_ms=gms))
            print(f"{label:<16} SEG {seg:3d}{' (default)' if seg == d['SEG'] else '':10s} {ms:.4f} {gms:.4f} ms",
                  flush=True)
    with open(args.out, "w") as f:
        json.dump(dict(commit=os.environ.get("MAMBA3_COMMIT"), rows=rows), f, indent=1)


if __name__ == "__main__":
    main()
