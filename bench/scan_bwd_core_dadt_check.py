"""The backward core's dadt on long segments (d T's recurrence runs over a whole segment's
chunks): rel_l2 of every core gradient against reference/core_adjoint.py (float64) at the
longest segments the automatic SEG picks (64 chunks) and beyond, strong and weak decay.

    PYTHONPATH=$PWD python bench/scan_bwd_core_dadt_check.py --out f.json
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import scan_bwd_core_bench as cb  # noqa: E402
from common import write_report  # noqa: E402

# (name, B, L, R, H, N, P, SEG, adt scale): adt = -scale * U(0.01, 1)
CASES = [("siso seg64 strong", 1, 4096, 1, 2, 128, 64, 64, 1.0),
         ("siso seg64 weak", 1, 4096, 1, 2, 128, 64, 64, 0.01),
         ("siso seg128 weak", 1, 4096, 1, 2, 128, 64, 128, 0.01),
         ("mimo r4 seg128 weak", 1, 2048, 4, 2, 128, 64, 128, 0.01)]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="scan_bwd_core_dadt_check.json")
    args = ap.parse_args()
    rows = []
    for name, B, L, R, H, N, P, seg, scale in CASES:
        cfg = dict(cb.core.default_config(R, N, P, "bfloat16"), SEG=seg)
        rows.append(cb.check(name, B, L, R, H, N, P, torch.bfloat16, cfg=cfg, adt_scale=scale))
    write_report(args.out, rows)


if __name__ == "__main__":
    main()
