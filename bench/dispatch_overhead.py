"""Dispatch overhead on the GPU host (issue 6 target: a warm cache adds < 20 µs per call over
calling the chosen kernel directly). Needs a tuning cache that holds the shape (MAMBA3_TUNE_CACHE
or --cache; e.g. the one bench/tune_job.sh just wrote).

    PYTHONPATH=$PWD MAMBA3_TUNE_CACHE=<cache.json> python bench/dispatch_overhead.py \\
        [--B 1] [--R 1] [--out dispatch_overhead.json]

Per call (host wall time over 2000 back-to-back calls, then one synchronize; at B = 1 the kernel
is shorter than its launch, so these are host-bound), for the backend the cache chose:
  direct        backend.step(spec, config, bundle): the chosen kernel, nothing of ours
  select        dispatch.select (warm memo: the cache decision already taken)
  plan          StepPlan call: per-token checks + the cached choice + the kernel
  step          mamba3_kernels.step: full argument validation + dispatch + the kernel
  step_explicit mamba3_kernels.step(..., backend=<chosen>, config=<chosen>): the chosen kernel
                named by the caller, so no tuning-cache decision
dispatch = select's own time, plan - direct (what the cached dispatch path adds to a StepPlan
call), and step - step_explicit (what the cache-based choice adds to a public step call; the
argument validation both share is step_explicit - direct).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import use_checkout

use_checkout()

import mamba3_kernels as m3  # noqa: E402
from mamba3_kernels import dispatch  # noqa: E402
from mamba3_kernels.autotune.commands import step_spec_problem  # noqa: E402
from mamba3_kernels.testing import step_inputs  # noqa: E402


def per_call_us(fn, n=2000):
    for _ in range(100):
        fn()
    torch.cuda.synchronize()
    reps = []
    for _ in range(5):
        t = time.perf_counter()
        for _ in range(n):
            fn()
        torch.cuda.synchronize()
        reps.append((time.perf_counter() - t) / n * 1e6)
    return float(np.median(reps))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--B", default="1")
    ap.add_argument("--R", default="1")
    ap.add_argument("--out", default="dispatch_overhead.json")
    args = ap.parse_args()
    rows = []
    for R in map(int, args.R.split(",")):
        for B in map(int, args.B.split(",")):
            # the shapes of bench/tune_job.sh (the same key a tuned cache holds)
            mimo = dict(pairing="half", mimo_v=True, mimo_z=True, mimo_out=True) if R > 1 else {}
            spec, prob = step_spec_problem(B, 32, 128, 64, R, 1, 32, has_d=True, has_z=True, **mimo)
            a = step_inputs(spec, prob, np.random.default_rng(0), device="cuda")
            mod, cfg, src = dispatch.select("step", spec, prob, a["v"].device)
            row = dict(B=B, R=R, source=src, backend=mod.NAME, config=cfg)
            if src != "cache":
                row["note"] = "no cache entry for this shape: the numbers below are the default's"
            plan = m3.StepPlan(**a)
            tok = {n: a[n] for n in ("q", "k", "v", "adt", "dt", "trap", "angles", "z")}
            t = plan._t
            row["direct_us"] = per_call_us(lambda: mod.step(spec, cfg, t))
            row["select_us"] = per_call_us(lambda: dispatch.select("step", spec, prob, a["v"].device))
            row["plan_us"] = per_call_us(lambda: plan(**tok))
            row["step_us"] = per_call_us(lambda: m3.step(**a))
            row["step_explicit_us"] = per_call_us(lambda: m3.step(**a, backend=mod.NAME, config=cfg))
            row["dispatch_added_us"] = row["plan_us"] - row["direct_us"]
            row["step_dispatch_added_us"] = row["step_us"] - row["step_explicit_us"]
            row["step_validation_us"] = row["step_explicit_us"] - row["direct_us"]
            rows.append(row)
            print(json.dumps(row, default=str), flush=True)
    meta = dict(device=torch.cuda.get_device_name(), torch=torch.__version__, triton=__import__("triton").__version__,
                commit=os.environ.get("MAMBA3_COMMIT", "unknown"), cache=os.environ.get("MAMBA3_TUNE_CACHE"))
    with open(args.out, "w") as f:
        json.dump(dict(meta=meta, rows=rows), f, indent=1, default=str)
    print(f"{'B':>4} {'R':>2} {'backend':<9} {'src':<7} {'direct':>8} {'select':>7} {'plan':>8} {'step':>8} "
          f"{'explicit':>8} {'added':>7}")
    for r in rows:
        print(f"{r['B']:>4} {r['R']:>2} {r['backend']:<9} {r['source']:<7} {r['direct_us']:8.1f} {r['select_us']:7.1f} "
              f"{r['plan_us']:8.1f} {r['step_us']:8.1f} {r['step_explicit_us']:8.1f} {r['dispatch_added_us']:7.1f}")


if __name__ == "__main__":
    main()
