"""`mamba3-kernels` / `python -m mamba3_kernels`: info, validate (and tune, bench from autotune).

- `info`: versions of the package and of torch/triton/tilelang/cutlass-dsl, the GPU, and every
  backend's availability with the reason.
- `validate`: the oracle's self-consistency over a spec grid, then every backend that can run
  here against the oracle (on a CPU: the Triton kernels under the interpreter; on a GPU also
  the Triton forward with its phase 4 as the TileLang walk, OUT_IMPL "tilelang"), and an sm_90a
  compile of the backends that cannot run here. Prints tables; `--json` saves the report.
  Exit code 1 if anything fails.
"""
from __future__ import annotations

import argparse
import importlib.metadata as md
import json
import os
import platform
import subprocess
import sys
import time

DISTS = (("torch", "torch"), ("triton", "triton"), ("tilelang", "tilelang"),
         ("nvidia-cutlass-dsl", "cutlass-dsl"), ("numpy", "numpy"))


def _version(dist):
    try:
        return md.version(dist)
    except md.PackageNotFoundError:
        return None


def versions() -> dict:
    from . import __version__
    v = {"mamba3-kernels": __version__, "python": platform.python_version()}
    for dist, label in DISTS:
        v[label] = _version(dist)
    return v


def gpu_info() -> str:
    try:
        import torch
        if not torch.cuda.is_available():
            return "none (no CUDA device visible)"
        p = torch.cuda.get_device_properties(0)
        return f"{p.name}, cc {p.major}.{p.minor}, {p.multi_processor_count} SMs, {p.total_memory / 2**30:.0f} GiB"
    except Exception as e:
        return f"unknown (torch: {e})"


def cmd_info(args) -> int:
    from . import backends_info
    print("mamba3-kernels environment")
    for k, v in versions().items():
        print(f"  {k:<16} {v if v else 'not installed'}")
    print(f"  {'gpu':<16} {gpu_info()}")
    print("backends")
    for name, (ok, why) in backends_info().items():
        print(f"  {name:<9} {'available' if ok else 'unavailable'}{': ' + why if why else ''}")
    return 0


# ----------------------------------------------------------------------------------------
# validate

def _oracle_section(report_rows, quick: bool):
    import numpy as np

    from .reference.selfcheck import self_check
    from .spec import Problem, spec_grid
    rng = np.random.default_rng()
    rows = []
    for spec in spec_grid():
        prob = Problem(1, 11, 4, 2, 4) if spec.varlen else Problem(2, 11, 4, 2, 2)
        rep = self_check(spec, prob, rng, lengths=[3, 0, 7, 1] if spec.varlen else None,
                         adjoint_check=not quick)
        worst = max(r.rel_l2 / r.bound_l2 for r in rep.rows)
        rows.append((spec.describe()[:70], len(rep.rows), rep.ok, worst))
        report_rows.extend([dict(section="oracle", **r.__dict__, ok=r.ok) for r in rep.rows])
    print("\noracle self-consistency (recurrent vs chunked, decode steps, halves, varlen, adjoint vs FD)")
    print(f"  {'spec':<72} {'checks':>6} {'worst/bound':>11}  ok")
    for d, n, ok, w in rows:
        print(f"  {d:<72} {n:>6} {w:11.1e}  {'yes' if ok else 'NO'}")
    return all(r[2] for r in rows)


def step_grid(on_gpu: bool):
    """(spec, problem, pool) cases for backend validation: every option at least once."""
    from .spec import Problem, ScanSpec
    N, P, H, B = (128, 64, 32, 17) if on_gpu else (16, 12, 4, 3)
    base = dict(d_state=N, head_dim=P, chunk_size=1, initial_states=True, final_states=True)
    cases = [
        (ScanSpec(**base, n_angles=N // 4, has_d=True, has_z=True, input_dtype="bfloat16",
                  state_dtype="float32"), Problem(B, 1, H, 1, B), None),
        (ScanSpec(**base, rank=2, n_angles=N // 2, pairing="half", has_d=True, has_z=True, has_mimo_v=True,
                  has_mimo_z=True, has_mimo_out=True, input_dtype="bfloat16", state_dtype="bfloat16"),
         Problem(B, 1, H, 2, B + 2), B + 2),
        (ScanSpec(**base, rank=2, n_angles=2, has_z=True, has_mimo_v=True, has_mimo_z=True,
                  has_mimo_out=True, output_mode="norm_reduce", input_dtype="float32"),
         Problem(B, 1, H, 2, B), None),
        (ScanSpec(**base, rank=3, n_angles=2, has_mimo_v=True, output_mode="per_rank",
                  discretization="euler", shared_angles=True, input_dtype="float32"),
         Problem(B, 1, H, 1, B), None),
    ]
    return cases


def _backend_section(report_rows, on_gpu: bool):
    import numpy as np

    from . import backends
    from .testing import run_step_backend, step_case
    rng = np.random.default_rng()
    print("\nbackends against the oracle (decode step; fresh inputs, outputs poisoned with NaN)")
    all_ok = True
    compile_only = []
    for name, (ok, why) in backends.availability().items():
        if not ok:
            print(f"  {name:<9} not run here: {why}")
            compile_only.append(name)
            continue
        mod = backends.get(name)
        for spec, prob, pool in step_grid(on_gpu):
            sup, swhy = mod.supports(spec, "step")
            if not sup:
                print(f"  {name:<9} skips a spec: {swhy}")
                continue
            case = step_case(spec, prob, rng, device="cuda" if on_gpu else "cpu", pool=pool)
            for inplace in (True, False):
                rep = run_step_backend(mod, case, inplace=inplace)
                all_ok &= rep.ok
                report_rows.extend([dict(section=f"step/{name}", **r.__dict__, ok=r.ok) for r in rep.rows])
                worst = max(r.rel_l2 / r.bound_l2 for r in rep.rows)
                print(f"  {name:<9} {case.label()[:60]:<60} {'inplace' if inplace else 'new    '} "
                      f"worst/bound {worst:8.1e}  {'ok' if rep.ok else 'FAIL'}")
                if not rep.ok:
                    print(rep.table())
    return all_ok, compile_only


def scan_grid(on_gpu: bool):
    """(label, spec, problem, varlen lengths) of the scan section: SISO with GQA, shared angles
    and all four states; MIMO R=2 with the fused norm; varlen with an empty sequence. Longer
    sequences on a GPU (several chunks and segments)."""
    from .spec import Problem, ScanSpec
    L = 300 if on_gpu else 37
    mimo = dict(has_mimo_v=True, has_mimo_z=True, has_mimo_out=True)
    siso = ScanSpec(d_state=32, head_dim=16, n_angles=8, has_d=True, has_z=True, shared_angles=True,
                    initial_states=True, final_states=True)
    return [
        ("siso gqa states", siso, Problem(2, L, 4, 2, 2), None),
        # no D with the norm: the pre-gate norm is scale-invariant, so dy is orthogonal to y and
        # dD = sum dy . vt cancels to nearly nothing where D vt dominates y (an ill-conditioned
        # gradient in exact math: 2-22 % rel_l2 at bf16 operands, upstream alike)
        ("mimo2 norm", ScanSpec(d_state=32, head_dim=16, rank=2, n_angles=8, pairing="half", has_d=False,
                                has_z=True, output_mode="norm_reduce", final_states=True, **mimo),
         Problem(1, L, 2, 1, 1), None),
        ("siso varlen", siso.replace(varlen=True), Problem(1, L, 2, 1, 3), [L // 3, 0, L - L // 3]),
    ]


def _scan_section(report_rows, on_gpu: bool):
    """The chunked scan through mamba3_kernels.scan: out, final states and every gradient vs the
    oracle (forward and adjoint), for the backends that implement it."""
    import numpy as np

    from . import backends
    from .scan_grad_testing import scan_grad_report
    rng = np.random.default_rng()
    print("\nchunked scan against the oracle (forward + every gradient; fresh inputs)")
    all_ok = True
    for name, (ok, why) in backends.availability().items():
        mod = backends.get(name)
        if not ok:
            continue
        for label, spec, prob, lens in scan_grid(on_gpu):
            sup, swhy = mod.supports(spec, "forward")
            if not sup:
                print(f"  {name:<9} {label:<18} not implemented: {swhy}")
                break
            rep = scan_grad_report(spec, prob, rng, device="cuda" if on_gpu else "cpu", lengths=lens,
                                   label=f"scan/{name} {label}", backend=name)
            all_ok &= rep.ok
            report_rows.extend([dict(section=f"scan/{name}", **r.__dict__, ok=r.ok) for r in rep.rows])
            fwd = [r for r in rep.rows if not r.name.startswith("grad.")]
            grd = [r for r in rep.rows if r.name.startswith("grad.")]
            wf = max(r.rel_l2 / r.bound_l2 for r in fwd)
            wg = max(r.rel_l2 / r.bound_l2 for r in grd)
            print(f"  {name:<9} {label:<18} L={prob.seqlen:<4} forward worst/bound {wf:8.1e}  "
                  f"{len(grd)} gradients worst/bound {wg:8.1e}  {'ok' if rep.ok else 'FAIL'}")
            if not rep.ok:
                print(rep.table())
    return all_ok


def tilelang_phase4_grid():
    """(label, spec, problem, varlen lengths) for the Triton forward with its phase 4 as the
    TileLang walk (backends/tilelang/scan_chunk_output.py: SISO bf16, N in {64, 128}, P = 64):
    GPU-sized, since the walk has no smaller form."""
    from .spec import Problem, ScanSpec
    siso = ScanSpec(d_state=128, head_dim=64, n_angles=32, has_d=True, has_z=True, shared_angles=True,
                    initial_states=True, final_states=True)
    return [("siso n128 states", siso, Problem(2, 700, 4, 1, 2), None),
            ("siso varlen", siso.replace(varlen=True), Problem(1, 700, 2, 1, 3), [300, 0, 400])]


def _tilelang_phase4_section(report_rows, on_gpu: bool):
    """The forward with OUT_IMPL "tilelang" (opt-in: slower than the Triton phase 4 on the H100)
    through mamba3_kernels.scan: out, final states and every gradient vs the oracle."""
    import numpy as np

    from . import backends
    from .backends.tilelang.scan_chunk_output import whole_chunks
    from .backends.triton import scan_fwd
    from .scan_grad_testing import scan_grad_report
    tl_ok, tl_why = backends.availability().get("tilelang", (False, "not registered"))
    tr_ok, tr_why = backends.availability().get("triton", (False, "not registered"))
    if not (on_gpu and tl_ok and tr_ok):
        why = "no GPU" if not on_gpu else (tl_why if not tl_ok else tr_why)
        print(f"  {'triton':<9} phase 4 in TileLang (OUT_IMPL) not run here: {why}")
        return True
    rng = np.random.default_rng()
    all_ok = True
    for label, spec, prob, lens in tilelang_phase4_grid():
        cfg = whole_chunks(scan_fwd.default_config(spec, prob))
        rep = scan_grad_report(spec, prob, rng, device="cuda", lengths=lens, label=f"scan/tilelang-phase4 {label}",
                               backend="triton", config=cfg)
        all_ok &= rep.ok
        report_rows.extend([dict(section="scan/triton+tilelang-phase4", **r.__dict__, ok=r.ok) for r in rep.rows])
        wf = max(r.rel_l2 / r.bound_l2 for r in rep.rows if not r.name.startswith("grad."))
        wg = max(r.rel_l2 / r.bound_l2 for r in rep.rows if r.name.startswith("grad."))
        print(f"  {'triton':<9} {label + ' (TileLang phase 4)':<34} L={prob.seqlen:<4} forward worst/bound "
              f"{wf:8.1e}  gradients worst/bound {wg:8.1e}  {'ok' if rep.ok else 'FAIL'}")
        if not rep.ok:
            print(rep.table())
    return all_ok


def _compile_section(names, report_rows):
    """sm_90a builds of the backends that cannot run here, each in its own process."""
    if not names:
        return True
    print("\nsm_90a compile of the backends that cannot run here (one process each)")
    ok_all = True
    for name in names:
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        t0 = time.time()
        p = subprocess.run([sys.executable, "-m", "mamba3_kernels.compile_check", name],
                           capture_output=True, text=True, env=env, timeout=1800)
        dt = time.time() - t0
        lines = (p.stdout.strip().splitlines() or ["(no output)"])
        status = "ok" if p.returncode == 0 else ("skipped" if p.returncode == 3 else "FAIL")
        ok_all &= p.returncode in (0, 3)
        print(f"  {name:<9} {status} in {dt:.0f} s: {lines[-1]}")
        if p.returncode not in (0, 3):
            print("    " + "\n    ".join((p.stderr or "").strip().splitlines()[-8:]))
        report_rows.append(dict(section=f"compile/{name}", ok=p.returncode in (0, 3), detail=lines[-1]))
    return ok_all


def cmd_validate(args) -> int:
    import torch
    on_gpu = torch.cuda.is_available()
    if not on_gpu and "triton" not in sys.modules:
        # on a CPU the Triton kernels execute under the interpreter (set before triton loads)
        os.environ.setdefault("TRITON_INTERPRET", "1")
    cmd_info(args)
    rows: list = []
    ok = _oracle_section(rows, args.quick)
    bok, compile_only = _backend_section(rows, on_gpu)
    sok = _scan_section(rows, on_gpu)
    sok = _tilelang_phase4_section(rows, on_gpu) and sok
    cok = _compile_section([] if args.no_compile else compile_only, rows)
    ok = ok and bok and sok and cok
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(versions=versions(), gpu=gpu_info(), ok=ok, rows=rows), f, indent=1, default=str)
        print(f"\nreport written to {args.json}")
    print(f"\nvalidate: {'PASS' if ok else 'FAIL'}")
    return 0 if ok else 1


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="mamba3-kernels", description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("info", help="versions, GPU and backend availability")
    p.set_defaults(func=cmd_info)
    p = sub.add_parser("validate", help="oracle self-check + every available backend vs the oracle")
    p.add_argument("--quick", action="store_true", help="skip the adjoint finite-difference checks")
    p.add_argument("--no-compile", action="store_true", help="skip sm_90a compiles of unavailable backends")
    p.add_argument("--json", help="write the full report as JSON here")
    p.set_defaults(func=cmd_validate)
    try:
        from .autotune import commands as tune_commands
    except Exception:  # the tuner is optional at import; `info` still works
        tune_commands = None
    if tune_commands is not None:
        tune_commands.add_parsers(sub)
    return ap


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
