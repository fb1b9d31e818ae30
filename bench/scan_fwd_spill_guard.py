"""The forward's spill guard (config SPILL_GUARD, backends/triton/scan_fwd.py) on the GPU: for SISO
N=128 specs where the pipelined load orders spill, the effective (guarded) config against the
spilling one, and the guard's host cost once its decision is remembered.

    PYTHONPATH=$PWD python bench/scan_fwd_spill_guard.py [--out f.json]

Per spec (B4 L4096 H32 N128 P64 bf16, D and Z; bench/scan.py's inputs with the angles replaced):
registers and spills of every kernel the effective config runs (n_regs / n_spills of the JIT's
build), graph ms of the forward with the guard and without it (the default's spilling load
order as is), whether both outputs are bitwise equal (phase 4's load order changes no
arithmetic; phase 2's fallback takes its default chunk length, which changes the summation order),
and the host µs of effective_config on a remembered decision.
"""
import argparse
import functools
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import write_report  # noqa: E402
from scan import bench, make_inputs  # noqa: E402
from spills_gpu import built  # noqa: E402

from mamba3_kernels.backends.triton import scan_fwd as sf  # noqa: E402
from mamba3_kernels.scan_tensors import prepare_scan  # noqa: E402
from mamba3_kernels.spec import resolve_scan  # noqa: E402

SPECS = [("shared-A32 (bench)", 32, True, "interleaved"), ("per-head-A32", 32, False, "interleaved"),
         ("shared-A64", 64, True, "interleaved"), ("per-head-A64-half", 64, False, "half"),
         ("shared-A16", 16, True, "interleaved")]


def kernels(spec, cfg, t):
    return built(sf.plan(spec, cfg, t)[0])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="scan_fwd_spill_guard.json")
    args = ap.parse_args()
    B, L, H, N, P = 4, 4096, 32, 128, 64
    rows = []
    for label, A, shared, pairing in SPECS:
        a = make_inputs("siso", B, L, H, 1, N, P, 1)
        g = torch.Generator(device="cuda").manual_seed(1)
        a["angles"] = torch.randn((B, L, A) if shared else (B, L, H, A), device="cuda", generator=g)
        spec, prob = resolve_scan(**a, pairing=pairing)
        t = prepare_scan(spec, prob, **a)
        d = sf.default_config(spec, prob)
        eff = sf.effective_config(spec, d, t)
        n = 2000
        t0 = time.perf_counter()
        for _ in range(n):
            sf.effective_config(spec, d, t)
        host_us = (time.perf_counter() - t0) / n * 1e6
        row = dict(spec=label, A=A, shared=shared, pairing=pairing, default=d,
                   fell_back={k: (d.get(k), v) for k, v in eff.items() if d.get(k) != v},
                   kernels_guarded=kernels(spec, eff, t), kernels_unguarded=kernels(spec, d, t),
                   effective_config_host_us=host_us)
        t.out.fill_(float("nan"))
        sf.forward(spec, d, t)
        y1 = t.out.clone()
        t.out.fill_(float("nan"))
        sf.forward(spec, dict(d, SPILL_GUARD=False), t)
        row["bitwise_equal"] = bool(torch.equal(y1, t.out)) and bool(torch.isfinite(y1).all())
        _, row["guarded_ms"] = bench(functools.partial(sf.forward, spec, d, t), graph=True)
        _, row["unguarded_ms"] = bench(functools.partial(sf.forward, spec, dict(d, SPILL_GUARD=False), t), graph=True)
        rows.append(row)
        print(json.dumps({k: v for k, v in row.items() if k != "default"}), flush=True)
        del t, a
    write_report(args.out, rows)

if __name__ == "__main__":
    main()
