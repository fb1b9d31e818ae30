"""GPU check of the backward core's FUSED walks (config FUSED: dq's and dkv's walks in one
kernel) against the two kernels on one benchmark-sized problem: every output equal (or within
fp32 rounding, reported), and the registers / spills of the GPU's own builds of dq, dkv, dqkv.

    PYTHONPATH=$PWD python bench/core_fused_check.py [--out f.json]
"""
import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import use_checkout, write_report  # noqa: E402

use_checkout()

from mamba3_kernels.backends.triton import scan_bwd_core as core  # noqa: E402
from mamba3_kernels.backends.triton.aot import jit_build  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="core_fused_check.json")
    args = ap.parse_args()
    rows = []
    for R, seg in ((1, 0), (1, 16), (4, 0), (4, 8)):
        B, L, H, N, P = 2, 4096, 8, 128, 64
        g = torch.Generator(device="cuda").manual_seed(R * 100 + seg)
        rn = lambda *s: torch.randn(*s, device="cuda", generator=g)  # noqa: E731
        qh, ks = (rn(B, L, R, H, N).mul(0.3).bfloat16() for _ in range(2))
        vt, dy = (rn(B, L, R, H, P).bfloat16() for _ in range(2))
        adt = -torch.rand(B, H, L, device="cuda", generator=g) * 0.2
        s0, dsf = rn(B, H, P, N), rn(B, H, P, N)
        cfg = dict(core.default_config(R, N, P, "bfloat16"), SEG=seg)
        outs = {}
        for fused in (False, True):
            c = dict(cfg, FUSED=fused)
            eff = core.effective_config(c, qh, ks, vt, adt, dy, s0, dsf, None, True, False)
            calls, _ = core.plan(qh, ks, vt, adt, dy, s0, dsf, None, eff)
            builds = {k["name"]: (jit_build(k).n_regs, jit_build(k).n_spills) for k in calls
                      if k["name"] in ("scan_bwd_core_dq", "scan_bwd_core_dkv", "scan_bwd_core_dqkv")}
            outs[fused] = core.core_backward(qh, ks, vt, adt, dy, s0, dsf, config=c, poison=True)
            rows.append(dict(R=R, SEG=seg, FUSED=fused, builds=builds,
                             stages={k: eff.get(k) for k in ("dq_num_stages", "dkv_num_stages")}))
        diff = {}
        for k, a in outs[False].items():
            b = outs[True][k]
            if a is None:
                continue
            diff[k] = dict(equal=bool(torch.equal(a, b)), nan=bool(b.isnan().any()),
                           max_rel=float((a - b).abs().max() / a.abs().max().clamp_min(1e-30)))
        rows.append(dict(R=R, SEG=seg, compare=diff))
        print(json.dumps(rows[-3:]), flush=True)
    write_report(args.out, rows)


if __name__ == "__main__":
    main()
