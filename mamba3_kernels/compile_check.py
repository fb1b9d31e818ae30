"""`python -m mamba3_kernels.compile_check BACKEND`: build BACKEND's kernels for sm_90a, no GPU needed.

Compiles the default config of every case of cli.step_grid (GPU-sized shapes) and prints one
line per kernel and a summary line last. Exit codes: 0 built, 1 a build failed, 3 the DSL is not
installed here (skipped). Runs in its own process (AOT builds and the Triton interpreter must
not share one; a CuTe host-side abort must not take the caller down).
"""
from __future__ import annotations

import sys


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python -m mamba3_kernels.compile_check {triton,tilelang,cute}", file=sys.stderr)
        return 2
    from . import backends
    from .cli import step_grid
    name = argv[0]
    mod = backends.get(name)
    dsl = {"triton": "triton", "tilelang": "tilelang", "cute": "cutlass.cute"}[name]
    ok, why = backends.dsl_importable(dsl)
    if not ok:
        print(f"skipped: {why}")
        return 3
    if not hasattr(mod, "compile"):
        print(f"{name}: backend has no AOT compile entry point")
        return 1
    n, worst_regs, spills = 0, 0, 0
    for spec, prob, _ in step_grid(on_gpu=True):
        sup, swhy = mod.supports(spec, "step")
        if not sup:
            print(f"  unsupported: {swhy}")
            continue
        cfg = mod.default_config(spec, prob, "step")
        info = mod.compile(spec, cfg, "step", arch="sm_90a")
        n += 1
        regs = info.get("registers") or 0
        worst_regs = max(worst_regs, regs)
        spills += info.get("spills") or 0
        print(f"  step R{spec.rank} N{spec.d_state} P{spec.head_dim} {spec.output_mode}: config {cfg} "
              f"registers {info.get('registers')} spills {info.get('spills')} shared {info.get('shared')}")
    print(f"{n} step kernels built for sm_90a; max registers {worst_regs}; spill bytes {spills}")
    return 0 if n else 1


if __name__ == "__main__":
    sys.exit(main())
