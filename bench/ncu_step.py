"""One decode step of ours (CuTe, the default config) and of upstream's CuTe kernel under Nsight
Compute, for reading where a small-batch step's time goes (bench/notes/step.md).

    ncu --clock-control none --profile-from-start off --csv --page details \\
        --section SpeedOfLight --section WarpStateStats --section LaunchStats \\
        --section SchedulerStats --section InstructionStats \\
        python bench/ncu_step.py [--B 1] [--R 4] [--state float32] > ncu_step.csv

Each callable runs twice first (compile, warm caches), then once between cudaProfilerStart and
cudaProfilerStop, so ncu records exactly one launch of each. Inputs as bench/step.py's (H=32,
N=128, P=64, bf16 inputs).
"""
from __future__ import annotations

import argparse
import os
import sys

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import use_checkout  # noqa: E402

use_checkout()

import step as sb  # noqa: E402

from mamba3_kernels import backends  # noqa: E402
from mamba3_kernels.spec import Problem  # noqa: E402
from mamba3_kernels.tensors import prepare_step  # noqa: E402
from mamba3_kernels.testing import step_inputs  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--B", type=int, default=1)
    ap.add_argument("--R", type=int, default=4)
    ap.add_argument("--state", default="float32")
    ap.add_argument("--config", default="", help="JSON overrides of our default config")
    a = ap.parse_args()
    import json
    spec = sb.make_spec(a.R, a.state)
    prob = Problem(a.B, 1, sb.H, sb.G, a.B)
    cute = backends.get("cute")
    cfg = dict(cute.default_config(spec, prob, "step"), **(json.loads(a.config) if a.config else {}))
    t = prepare_step(spec, **step_inputs(spec, prob, np.random.default_rng(0), device="cuda"), inplace=True)
    calls = [("ours", lambda: cute.step(spec, cfg, t))]
    up = sb.upstream_calls("upstream-cute", spec, a.B, np.random.default_rng(1), 1)
    if up:
        calls.append(("upstream", up[0]))
    for _, fn in calls:
        fn()
        fn()
    torch.cuda.synchronize()
    print(f"# config {cfg}", file=sys.stderr)
    torch.cuda.cudart().cudaProfilerStart()
    for _, fn in calls:
        fn()
    torch.cuda.synchronize()
    torch.cuda.cudart().cudaProfilerStop()


if __name__ == "__main__":
    main()
