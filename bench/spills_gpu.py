"""Registers and spills of the kernels the GPU actually runs (the JIT's own builds on this
machine's Triton, not the CPU's AOT builds under another version): the forward's effective
default configs (after the spill guard) on the benchmark shapes, and the backward core's
default kernels.

    PYTHONPATH=$PWD python bench/spills_gpu.py [--out f.json]
"""
import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import write_report  # noqa: E402
from scan import MIMO_EXTRA, SHAPES, make_inputs, ours_bundle  # noqa: E402

from mamba3_kernels.backends.triton import scan_bwd_core as core  # noqa: E402
from mamba3_kernels.backends.triton.aot import jit_build  # noqa: E402
from mamba3_kernels.backends.triton import scan_fwd as sf  # noqa: E402


def built(calls):
    """(name, registers, spill bytes) of each call's JIT build (built, not launched)."""
    return [dict(name=c["name"], regs=k.n_regs, spills=k.n_spills)
            for c in calls if c["run"] for k in [jit_build(c)]]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="spills_gpu.json")
    args = ap.parse_args()
    rows = []
    for kind in ("siso", "mimo"):
        for label, B, L, H, G, N, P in SHAPES + (MIMO_EXTRA if kind == "mimo" else []):
            R = 4 if kind == "mimo" else 1
            a = make_inputs(kind, B, L, H, G, N, P, R)
            spec, prob, t = ours_bundle(kind, a)
            d = sf.default_config(spec, prob)
            eff = sf.effective_config(spec, d, t)
            rows.append(dict(part="forward", kind=kind, shape=label, fell_back={k: v for k, v in eff.items()
                                                                                if d.get(k) != v},
                             kernels=built(sf.plan(spec, eff, t)[0])))
            print(json.dumps(rows[-1]), flush=True)
            if label in ("B4-L4096-H32", "B4-L4096-H32-G8-N64", "B4-L2048-H32"):
                RC = 1 << (R - 1).bit_length()
                bf = torch.bfloat16
                qh = torch.randn(B, L, RC, H, N, device="cuda", dtype=bf)
                vt = torch.randn(B, L, RC, H, P, device="cuda", dtype=bf)
                adt = -torch.rand(B, H, L, device="cuda") * 0.1
                calls, _ = core.plan(qh, qh, vt, adt, vt, dvt_partials=True)
                rows.append(dict(part="backward core", kind=kind, shape=label, config=core.default_config(R, N, P),
                                 kernels=built(calls)))
                print(json.dumps(rows[-1]), flush=True)
            del t, a
            torch.cuda.empty_cache()
    write_report(args.out, rows)

if __name__ == "__main__":
    main()
