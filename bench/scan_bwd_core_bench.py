"""Backward core (issue 5) on the GPU: correctness vs reference/core_adjoint.py, determinism, and
timings of the tuning space, per kernel, with a traffic estimate.

    PYTHONPATH=$PWD python bench/scan_bwd_core_bench.py --out bench/results/scan_bwd_core.json
                                                       [--budget-s 150] [--quick]

Checks (rel_l2 vs the float64 reference on the exact operands; bf16 bound 2e-2, fp32 2e-3):
dense bf16 with segments, varlen with empty sequences (MIMO R=4), fp32; two runs bitwise equal.
Timings (median of CUDA-event times, bf16 operands, N=128, P=64, fresh random inputs):
SISO B4-L4096-H32, SISO B1-L16384-H32, MIMO R4 B4-L2048-H32; the whole space on the first
shape, the default and a few variants on the others; the per-kernel split of each shape's
default and best. 'min_gb' is the unavoidable traffic (operands in, gradients out), 'gbps' that
over the measured time, so a fraction of the HBM bandwidth (H100: about 3.35 TB/s).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import events_us  # noqa: E402

from mamba3_kernels.backends.triton import scan_bwd_core as core
from mamba3_kernels.reference import core_adjoint as ca
from mamba3_kernels.reference.compare import rel_l2

DEVICE = "cuda"


def inputs(B, L, R, H, N, P, dtype, S=None, states=True, seed=0, device=None, adt_scale=1.0):
    device = device or DEVICE
    g = torch.Generator(device="cpu").manual_seed(seed)
    X = B if S is None else S
    r = lambda *s: torch.randn(*s, generator=g)
    t = {"qh": r(B, L, R, H, N) / N ** 0.5, "ks": r(B, L, R, H, N) / N ** 0.5, "vt": r(B, L, R, H, P),
         "dy": r(B, L, R, H, P), "adt": -(torch.rand(B, H, L, generator=g) * 0.99 + 0.01) * adt_scale,
         "s0": r(X, H, P, N) if states else None, "ds_final": r(X, H, P, N) if states else None}
    t = {k: None if v is None else v.to(device) for k, v in t.items()}
    for k in ("qh", "ks", "vt", "dy"):
        t[k] = t[k].to(dtype)
    return t


def check(name, B, L, R, H, N, P, dtype, cfg=None, lengths=None, states=True, adt_scale=1.0):
    cu = None
    if lengths is not None:
        cu = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
        B, L = 1, int(cu[-1])
    t = inputs(B, L, R, H, N, P, dtype, None if cu is None else len(lengths), states, adt_scale=adt_scale)
    cut = None if cu is None else torch.as_tensor(cu, device=DEVICE)
    args = (t["qh"], t["ks"], t["vt"], t["adt"], t["dy"], t["s0"], t["ds_final"], cut)
    out = core.core_backward(*args, config=cfg, poison=True)
    out2 = core.core_backward(*args, config=cfg, poison=True)
    if DEVICE == "cuda":
        torch.cuda.synchronize()
    det = all(torch.equal(out[k], out2[k]) for k in out)
    f = lambda v: None if v is None else v.double().cpu().numpy()
    ref = ca.core_backward(f(t["qh"]), f(t["ks"]), f(t["vt"]), f(t["adt"]), f(t["dy"]), f(t["s0"]),
                           f(t["ds_final"]), cu)
    errs = {k: rel_l2(out[k].double().cpu().numpy(), ref[k]) for k in ref}
    tol = 2e-2 if dtype == torch.bfloat16 else 2e-3
    ok = det and all(e <= tol for e in errs.values())
    row = {"check": name, "ok": ok, "deterministic": det, "rel_l2": errs, "tol": tol}
    print(json.dumps(row), flush=True)
    return row


def _events_ms(fn, reps=15, warm=3):
    return events_us(fn, reps=reps, iters=1, warmup=warm) / 1000


def time_config(t, cfg, per_kernel=False):
    calls, _ = core.plan(t["qh"], t["ks"], t["vt"], t["adt"], t["dy"], t["s0"], t["ds_final"], None, cfg)
    calls = [c for c in calls if c["run"]]

    def all_():
        for c in calls:
            core.launch(c)
    res = {"total_ms": _events_ms(all_)}
    if per_kernel:
        res["kernels_ms"] = {c["name"][14:]: _events_ms(lambda c=c: core.launch(c)) for c in calls}
    seg = calls[-1]["constexprs"]["SEG"]
    res["SEG"] = seg
    return res


def min_gb(B, L, R, H, N, P):
    rows = B * L * R * H
    return (rows * (2 * N + 2 * P) * 2 + rows * (2 * N + P) * 4 + 2 * B * H * L * 4) / 1e9


def bench(label, B, L, R, H, N, P, configs, deadline, out_rows):
    t = inputs(B, L, R, H, N, P, torch.bfloat16)
    gb = min_gb(B, L, R, H, N, P)
    best = None
    for i, cfg in enumerate(configs):
        if time.time() > deadline:
            print(f"{label}: time budget reached, {len(configs) - i} configs not timed", flush=True)
            break
        try:
            r = time_config(t, cfg, per_kernel=(i == 0))
        except Exception as e:  # noqa: BLE001 (recorded)
            r = {"error": f"{type(e).__name__}: {e}"[:500]}
        row = {"shape": label, "B": B, "L": L, "R": R, "H": H, "N": N, "P": P, "config": cfg, **r,
               "min_gb": gb}
        if "total_ms" in r:
            row["gbps"] = gb / (r["total_ms"] / 1e3)
            if best is None or r["total_ms"] < best[0]["total_ms"]:
                best = (row, cfg)
        print(json.dumps(row), flush=True)
        out_rows.append(row)
    if best is not None and best[1] is not configs[0] and time.time() < deadline:
        r = time_config(t, best[1], per_kernel=True)
        out_rows.append({"shape": label, "best": True, "config": best[1], **r, "min_gb": gb,
                         "gbps": gb / (r["total_ms"] / 1e3)})
        print(json.dumps(out_rows[-1]), flush=True)
    del t
    torch.cuda.empty_cache()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="bench/results/scan_bwd_core.json")
    ap.add_argument("--budget-s", type=float, default=150.0)
    ap.add_argument("--quick", action="store_true")
    a = ap.parse_args()
    t0 = time.time()
    import triton
    meta = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
            "commit": os.environ.get("MAMBA3_COMMIT", "")}
    rows = []
    d1 = core.default_config(1, 128, 64, "bfloat16")
    rows.append(check("dense-bf16-R1-seg4", 2, 1000, 1, 3, 128, 64, torch.bfloat16, dict(d1, SEG=4)))
    rows.append(check("dense-bf16-R1-N128-P64-auto", 1, 2048, 1, 2, 128, 64, torch.bfloat16))
    rows.append(check("varlen-bf16-R4-seg2", 1, 0, 4, 2, 64, 64, torch.bfloat16,
                      dict(core.default_config(4, 64, 64, "bfloat16"), SEG=2), lengths=[300, 0, 517, 1]))
    rows.append(check("dense-fp32-R2-N128", 1, 300, 2, 2, 128, 64, torch.float32))
    rows.append(check("dense-bf16-R1-blockN64", 1, 777, 1, 2, 128, 64, torch.bfloat16,
                      dict(d1, BLOCK_N=64, num_warps=4, SEG=2), states=False))
    deadline = t0 + a.budget_s
    sp1 = core.space(1, 128, 64, "bfloat16")
    sp4 = core.space(4, 128, 64, "bfloat16")
    shapes = [("siso-B4-L4096-H32", 4, 4096, 1, 32, 128, 64, sp1),
              ("siso-B1-L16384-H32", 1, 16384, 1, 32, 128, 64, [sp1[0]] + [c for c in sp1 if "SEG_SCALE" in c]),
              ("mimo-R4-B4-L2048-H32", 4, 2048, 4, 32, 128, 64, sp4 if not a.quick else sp4[:3])]
    for label, B, L, R, H, N, P, cfgs in shapes:
        bench(label, B, L, R, H, N, P, cfgs, deadline, rows)
    os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
    with open(a.out, "w") as f:
        json.dump({"meta": meta, "rows": rows, "wall_s": time.time() - t0}, f, indent=1)
    print("wrote", a.out, f"{time.time() - t0:.0f}s")


if __name__ == "__main__":
    main()
