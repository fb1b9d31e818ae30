"""Gradient-accuracy sweep of the scan on the GPU: `scan_grad_report` (out, final states and every
gradient vs the float64 oracle on the very inputs the kernels saw) over variants of one base case,
several fresh draws each. A diagnostic for a failing conformance row: which factor (rank,
pairing, output mode, angles, dtype, length, forward config) moves which gradient.

    PYTHONPATH=$PWD MAMBA3_COMMIT=$(git rev-parse HEAD) python bench/scan_grad_sweep.py \\
        [--base mimo2-norm] [--draws 3] [--out bench/results/scan_grad_sweep.json]

Base "mimo2-norm": `mamba3-kernels validate`'s scan row of that name (cli.scan_grid, GPU length).
Each row of the JSON: variant, draw, and per output / gradient rel_l2 and worst/bound.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import use_checkout

use_checkout()

from mamba3_kernels.backends.triton import scan_fwd
from mamba3_kernels.cli import scan_grid
from mamba3_kernels.scan_grad_testing import scan_grad_report


def variants(s, p):
    """(name, spec, problem, scan kwargs) around the base case, one factor at a time."""
    return [
        ("base", s, p, {}),
        ("L37", s, dataclasses.replace(p, seqlen=37), {}),
        ("L1000", s, dataclasses.replace(p, seqlen=1000), {}),
        ("R1", s.replace(rank=1), p, {}),
        ("R4", s.replace(rank=4), p, {}),
        ("interleaved", s.replace(pairing="interleaved"), p, {}),
        ("reduce", s.replace(output_mode="reduce"), p, {}),
        ("per_rank", s.replace(output_mode="per_rank", has_mimo_out=False), p, {}),
        ("no_angles", s.replace(n_angles=0), p, {}),
        ("no_mimo_proj", s.replace(has_mimo_v=False, has_mimo_z=False, has_mimo_out=False), p, {}),
        ("float32", s.replace(input_dtype="float32"), p, {}),
        ("fwd_exact_diag", s, p, {"config": {**scan_fwd.default_config(s, p), "EXACT_DIAG": True}}),
    ]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--base", default="mimo2 norm")
    ap.add_argument("--draws", type=int, default=3)
    ap.add_argument("--only", default="")
    ap.add_argument("--out", default="bench/results/scan_grad_sweep.json")
    args = ap.parse_args()
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    grid = {lab: (spec, prob, lens) for lab, spec, prob, lens in scan_grid(dev == "cuda")}
    spec, prob, lens = grid[args.base.replace("-", " ")]
    meta = dict(device=torch.cuda.get_device_name() if dev == "cuda" else "cpu", torch=torch.__version__,
                triton=__import__("triton").__version__, commit=os.environ.get("MAMBA3_COMMIT", "unknown"),
                base=args.base, draws=args.draws)
    rows = []
    rng = np.random.default_rng()
    for name, s, p, kw in variants(spec, prob):
        if args.only and name not in args.only.split(","):
            continue
        for d in range(args.draws):
            t = time.time()
            try:
                rep = scan_grad_report(s, p, rng, device=dev, lengths=lens, label=name, **kw)
                vals = {r.name: [r.rel_l2, r.rel_l2 / r.bound_l2] for r in rep.rows}
                row = dict(variant=name, draw=d, ok=rep.ok, rows=vals)
                worst = sorted(vals.items(), key=lambda kv: -kv[1][1])[:4]
                print(f"{name:<16} {d} {'ok  ' if rep.ok else 'FAIL'} {time.time() - t:5.1f}s  "
                      + "  ".join(f"{k}={v[0]:.1e}" for k, v in worst), flush=True)
            except Exception as e:  # noqa: BLE001
                row = dict(variant=name, draw=d, error=f"{type(e).__name__}: {e}"[:400])
                print(f"{name:<16} {d} ERROR {row['error']}", flush=True)
            rows.append(row)
            with open(args.out, "w") as f:
                json.dump(dict(meta=meta, rows=rows), f, indent=1)


if __name__ == "__main__":
    main()
