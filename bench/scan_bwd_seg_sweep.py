"""Segment length of the backward core (CORE SEG, chunks per segment; 0 = its automatic rule) and
any other core config key (--core KEY=V1,V2, JSON values) on the fwd+bwd benchmark shapes: fwd+bwd
replayed from one CUDA graph per variant.

    PYTHONPATH=$PWD python bench/scan_bwd_seg_sweep.py [--segs 0,16,32,64,128,256]
        [--core num_stages=1,2,3] [--out f.json]
"""
import argparse
import itertools
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from scan_bwd import bench_cases, graph_ms, ours_fwd  # noqa: E402  (bench/scan_bwd.py)
from common import write_report  # noqa: E402

from mamba3_kernels.backends.triton import scan_bwd_core  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--segs", default="0,16,32,64,128,256")
    ap.add_argument("--kinds", default="siso,mimo")
    ap.add_argument("--only", default="")
    ap.add_argument("--core", action="append", default=[], help="KEY=V1,V2 (JSON values)")
    ap.add_argument("--out", default="scan_bwd_seg_sweep.json")
    args = ap.parse_args()
    knobs = [(k, [json.loads(v) for v in vs.split(",")]) for k, vs in (c.split("=", 1) for c in args.core)]
    rows = []
    for kind, label, a, dout in bench_cases(args.kinds, args.only):
        for seg, combo in itertools.product((int(s) for s in args.segs.split(",")),
                                            itertools.product(*[vs for _, vs in knobs])):
            over = {k: v for (k, _), v in zip(knobs, combo)}
            try:
                ms = graph_ms(ours_fwd(kind, bwd_config=dict(CORE=dict(SEG=seg, **over))), a, dout)
            except Exception as e:  # noqa: BLE001
                ms = f"{type(e).__name__}: {e}"[:200]
            rows.append(dict(kind=kind, shape=label, core_SEG=seg, core_overrides=over, fwd_bwd_graph_ms=ms))
            print(f"{kind} {label:<22} core SEG {seg:4d}{' (auto)' if seg == 0 else ''} {over} "
                  f"{ms if isinstance(ms, str) else f'{ms:.3f} ms'}", flush=True)
            torch.cuda.empty_cache()
    write_report(args.out, rows, auto_rule=scan_bwd_core._seg.__doc__)


if __name__ == "__main__":
    main()
