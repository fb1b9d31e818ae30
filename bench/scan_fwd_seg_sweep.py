"""Forward launch knobs the tuner does not vary well, on the benchmark's SISO and MIMO R=4 shapes:
the segment length (SEG, chunks per segment) and any other config key (--set KEY=V1,V2).

    PYTHONPATH=$PWD python bench/scan_fwd_seg_sweep.py [--kind mimo] [--segs 16,32,64,128]
        [--default-seg-only] [--set STATE_SPLIT=1,2,4] [--out f.json]

Per shape and variant: median ms of the whole forward (triton.testing.do_bench, and CUDA-graph
replay) and of each phase alone; everything else at the default config.
"""
import argparse
import itertools
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import write_report  # noqa: E402
from scan import MIMO_EXTRA, SHAPES, accuracy, bench, breakdown, make_inputs, oracle_slice, ours_bundle  # noqa: E402

from mamba3_kernels.backends.triton import scan_fwd as sf  # noqa: E402


def _value(text):
    return None if text in ("None", "") else json.loads(text)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--segs", default="16,32,64,128")
    ap.add_argument("--default-seg-only", action="store_true")
    ap.add_argument("--set", action="append", default=[], help="KEY=V1,V2 (JSON values; None = unset)")
    ap.add_argument("--only", default="B4-L4096-H32,B1-L16384-H32,B8-L2048-H32")
    ap.add_argument("--kind", default="siso", choices=("siso", "mimo"))
    ap.add_argument("--acc", action="store_true", help="rel_l2 vs the float64 oracle (4 heads, 1024 tokens), "
                    "output poisoned before the run")
    ap.add_argument("--out", default="scan_fwd_seg_sweep.json")
    args = ap.parse_args()
    knobs = [(k, [_value(v) for v in vs.split(",")]) for k, vs in (s.split("=", 1) for s in args.set)]
    R = 4 if args.kind == "mimo" else 1
    rows = []
    for label, B, L, H, G, N, P in SHAPES + MIMO_EXTRA:
        if label not in args.only.split(","):
            continue
        a = make_inputs(args.kind, B, L, H, G, N, P, R)
        spec, prob, t = ours_bundle(args.kind, a)
        d = sf.default_config(spec, prob)
        ref = oracle_slice(args.kind, a, 4, min(L, 1024)) if args.acc else None
        segs = [d["SEG"]] if args.default_seg_only else sorted({int(x) for x in args.segs.split(",")} | {d["SEG"]})
        for seg in segs:
            for combo in itertools.product(*[vs for _, vs in knobs]):
                over = {k: v for (k, _), v in zip(knobs, combo)}
                cfg = dict(d, SEG=seg, **over)
                acc = None
                if ref is not None:
                    t.out.fill_(float("nan"))
                    sf.forward(spec, cfg, t)
                    acc = accuracy(t.out, ref, 4, min(L, 1024))
                    acc["finite"] = bool(torch.isfinite(t.out).all())
                ms, gms = bench(lambda: sf.forward(spec, cfg, t), graph=True)
                ph = breakdown(spec, cfg, t)
                eff = sf.effective_config(spec, cfg, t)   # after the spill guard: what ran
                stepped = {k: v for k, v in eff.items() if cfg.get(k) != v}
                rows.append(dict(kind=args.kind, shape=label, SEG=seg, default_SEG=d["SEG"], overrides=over,
                                 spill_guard_changed=stepped, ms=ms, graph_ms=gms, phase_ms=ph, acc=acc))
                print(f"{label:<16} SEG {seg:4d}{' (default)' if seg == d['SEG'] else '':10s} {over} "
                      f"{'guard ' + str(stepped) + ' ' if stepped else ''}"
                      f"{ms:.4f} {gms:.4f} ms  {'' if acc is None else 'l2 %.2e ' % acc['rel_l2']}phases "
                      + " ".join(f"{k.replace('scan_', '')} {v:.3f}" for k, v in ph.items()), flush=True)
    write_report(args.out, rows)


if __name__ == "__main__":
    main()
