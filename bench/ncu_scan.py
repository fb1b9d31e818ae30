"""Hardware-counter profile (Nsight Compute) of the scan's kernels on one benchmark shape: why a
kernel takes the time it takes (issue rate, stall reasons, pipe use, occupancy, memory).

    ncu --clock-control none --profile-from-start off --csv --page details \\
        --section SpeedOfLight --section Occupancy --section WarpStateStats \\
        --section SchedulerStats --section ComputeWorkloadAnalysis --section InstructionStats \\
        --section LaunchStats --section MemoryWorkloadAnalysis \\
        python bench/ncu_scan.py [--what fwd_siso,fwd_mimo,fwdbwd_siso,up_siso] > ncu.csv

Each workload runs once outside the profiled range (compiles, autotunes) and once inside it
(cudaProfilerStart / Stop): ncu records every kernel of that second run. Shapes: B4 L4096 H32
N128 P64 bf16 (bench/scan.py's make_inputs); upstream needs .upstream on PYTHONPATH.
"""
import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from scan import make_inputs, ours_bundle, upstream_siso  # noqa: E402

import mamba3_kernels as m3  # noqa: E402
from mamba3_kernels.backends.triton import scan_fwd as sf  # noqa: E402

LEAVES = ("q", "k", "v", "adt", "dt", "trap", "q_bias", "k_bias", "angles", "d", "z")


def workloads(what, B=4, L=4096, H=32):
    for w in what:
        kind = "mimo" if "mimo" in w else "siso"
        a = make_inputs(kind, B, L, H, 1, 128, 64, 4 if kind == "mimo" else 1)
        if w.startswith("fwd_"):
            spec, prob, t = ours_bundle(kind, a)
            cfg = sf.default_config(spec, prob)
            yield w, (lambda spec=spec, cfg=cfg, t=t: sf.forward(spec, cfg, t))
        elif w.startswith("fwdbwd_"):
            la = {n: (x.detach().clone().requires_grad_(True) if n in LEAVES else x) for n, x in a.items()}
            dout = torch.randn_like(a["v"])

            def run(la=la, dout=dout, kind=kind):
                out = m3.scan(**la, pairing="half" if kind == "mimo" else "interleaved")
                out.backward(dout)
            yield w, run
        elif w == "up_siso":
            up = upstream_siso(a)
            yield w, (lambda up=up: up())


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--what", default="fwd_siso,fwd_mimo,fwdbwd_siso")
    args = ap.parse_args()
    for name, fn in workloads(args.what.split(",")):
        with torch.no_grad() if not name.startswith("fwdbwd") else torch.enable_grad():
            fn()
            torch.cuda.synchronize()
            print(f"profiling {name}", file=sys.stderr, flush=True)
            torch.cuda.cudart().cudaProfilerStart()
            fn()
            torch.cuda.synchronize()
            torch.cuda.cudart().cudaProfilerStop()


if __name__ == "__main__":
    main()
