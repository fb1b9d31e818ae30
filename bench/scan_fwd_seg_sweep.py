"""Segment length (SEG, chunks per segment) of the Triton forward on the forward benchmark's SISO
and MIMO R=4 shapes: is the default's program count (about four per SM, longest segments) the right one?

    PYTHONPATH=$PWD python bench/scan_fwd_seg_sweep.py [--segs 16,24,32,48,64] [--out f.json]

Per shape, SEG and STATE_BLOCK_P: median ms of the whole forward (triton.testing.do_bench, and CUDA-graph
replay), everything else at the default config.
"""
import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from scan import MIMO_EXTRA, SHAPES, bench, breakdown, make_inputs, ours_bundle  # noqa: E402  (bench/scan.py)

from mamba3_kernels.backends.triton import scan_fwd as sf  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--segs", default="16,24,32,40,48,64")
    ap.add_argument("--only", default="B4-L4096-H32,B1-L16384-H32,B8-L2048-H32")
    ap.add_argument("--state-bps", default="0", help="STATE_BLOCK_P values (0 = BLOCK_P, the default)")
    ap.add_argument("--default-seg-only", action="store_true")
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
        segs = [d["SEG"]] if args.default_seg_only else sorted({int(x) for x in args.segs.split(",")} | {d["SEG"]})
        for seg in segs:
            for sbp in (int(x) for x in args.state_bps.split(",")):
                cfg = dict(d, SEG=seg, STATE_BLOCK_P=sbp or None)
                ms, gms = bench(lambda: sf.forward(spec, cfg, t), graph=True)
                ph = breakdown(spec, cfg, t)
                rows.append(dict(kind=args.kind, shape=label, SEG=seg, STATE_BLOCK_P=sbp or None,
                                 default=seg == d["SEG"] and not sbp, ms=ms, graph_ms=gms, phase_ms=ph))
                print(f"{label:<16} SEG {seg:4d}{' (default)' if seg == d['SEG'] else '':10s} STATE_BLOCK_P "
                      f"{sbp or '-':>3} {ms:.4f} {gms:.4f} ms  phases "
                      + " ".join(f"{k.replace('scan_', '')} {v:.3f}" for k, v in ph.items()), flush=True)
    with open(args.out, "w") as f:
        json.dump(dict(commit=os.environ.get("MAMBA3_COMMIT"), rows=rows), f, indent=1)


if __name__ == "__main__":
    main()
