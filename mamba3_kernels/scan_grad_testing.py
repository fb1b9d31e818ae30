"""Conformance of the scan's autograd path: outputs, final states and every gradient of
`mamba3_kernels.scan` against the float64 oracle (reference/recurrent.py forward, reference/
adjoint.py backward, SPEC §9.1) on exactly the values the kernels saw.

`scan_grad_report(spec, problem, rng, ...)` draws a fresh case (scan_testing.scan_case), makes
every float input and initial state a leaf, runs the scan (final states too, when the spec has
them) and a backward of a random <dout, out> + <dfinal, final states>, and returns a Report with
rows for out, the final states (DESIGN.md forward bounds) and every gradient (named
"grad.<input>", "grad.initial_states.<state>"; the gradient bound). With 16-bit inputs a row over
its fixed bound is held to FLOOR_FACTOR x the oracle's same-precision spread instead where that
is larger (scan_testing.roundoff_spread for out and the states, `gradient_spread` here for the
gradients). `scan_grad_case` also returns the case. Used by `mamba3-kernels validate`, the tests
and bench/scan_grad_sweep.py.
"""
from __future__ import annotations

import numpy as np
import torch

from .reference import adjoint
from .reference.compare import Report, compare_outputs, rel_l2, rel_max
from .reference.inputs import spec_options
from .scan_testing import ScanCase, compare_results, held_to_spread, perturbed, scan_case
from .spec import States
from .testing import to_numpy

GRADS = ("q", "k", "v", "adt", "dt", "trap", "q_bias", "k_bias", "angles", "d", "z", "mimo_v",
         "mimo_z", "mimo_out", "norm_weight")
STATE_NAMES = ("angle", "ssm", "k", "v")


def _leaf(x):
    return x.detach().clone().requires_grad_(True)


def _random_like(rng, x):
    return torch.as_tensor(rng.standard_normal(tuple(x.shape))).to(x.dtype).to(x.device)


def scan_grad_report(spec, problem, rng: np.random.Generator, device="cpu", lengths=None,
                     short_forms: bool = False, label: str = "", **scan_kw) -> Report:
    """Rows for out, the final states and every gradient (see the module docstring).
    scan_kw go to mamba3_kernels.scan (backend=, config=, bwd_config=, save_y=)."""
    return scan_grad_case(spec, problem, rng, device, lengths, short_forms, label, **scan_kw)[0]


def scan_grad_case(spec, problem, rng: np.random.Generator, device="cpu", lengths=None,
                   short_forms: bool = False, label: str = "", **scan_kw) -> tuple:
    """(Report, ScanCase): scan_grad_report and the case it drew."""
    import mamba3_kernels as m3
    case = scan_case(spec, problem, rng, device=device, lengths=lengths, short_forms=short_forms)
    label = label or case.label()
    args = dict(case.args)
    leaves = {}
    for n in GRADS:
        if args.get(n) is not None:
            args[n] = leaves[n] = _leaf(args[n])
    st = args["initial_states"]
    if st is not None:
        st = args["initial_states"] = States(*(_leaf(x) for x in st))
    res = m3.scan(**args, **spec_options(spec), final_states=spec.final_states, **scan_kw)
    out, fin = res if spec.final_states else (res, None)
    dt = spec.input_dtype
    rows = compare_results(case, out, fin, label).rows
    dout = _random_like(rng, out)
    loss = (out.double() * dout.double()).sum()
    dfin = None
    if fin is not None:
        dfin = States(*(_random_like(rng, x) for x in fin))
        loss = loss + sum((f.double() * d.double()).sum() for f, d in zip(fin, dfin))
    loss.backward()
    grads = adjoint.backward(to_numpy(dout), None if dfin is None else States(*(to_numpy(x) for x in dfin)),
                             **case.seen, **spec_options(spec))
    g_got, g_ref = {}, {}
    for n, x in leaves.items():
        if x.grad is None:
            raise AssertionError(f"grad.{n}: no gradient reached the input")
        if x.grad.shape != x.shape or x.grad.dtype != x.dtype:
            raise AssertionError(f"grad.{n}: {tuple(x.grad.shape)} {x.grad.dtype}, input {tuple(x.shape)} {x.dtype}")
        g_got[f"grad.{n}"] = to_numpy(x.grad)
        g_ref[f"grad.{n}"] = grads[n]
    if st is not None:
        for i, nm in enumerate(STATE_NAMES):
            g = st[i].grad
            if g is None:
                raise AssertionError(f"grad.initial_states.{nm}: no gradient reached the input")
            if g.shape != st[i].shape:
                raise AssertionError(f"grad.initial_states.{nm}: {tuple(g.shape)}, state {tuple(st[i].shape)}")
            g_got[f"grad.initial_states.{nm}"] = to_numpy(g)
            g_ref[f"grad.initial_states.{nm}"] = grads["initial_states"][i]
    g_rows = held_to_spread(compare_outputs(label, g_got, g_ref, dtype=dt, kind="grad"), dt,
                            lambda: gradient_spread(case, to_numpy(dout), dfin, g_ref, rng))
    return Report(rows + g_rows), case


# The gradients' same-precision spread: scan_testing.roundoff_spread applied to the adjoint. With
# the fused pre-gate norm (scale-invariant), dy is orthogonal to y: dQ at a token whose pre-norm y
# is small (a sequence's first tokens, where q'.k' nearly cancels) and dADT where a large initial
# state dominates y are differences of large terms, and the bf16 operands' rounding (the
# forward's y and the core's, upstream's precision) leaves 1-5 % there: one such token put dQ of
# a 29-token case at 2.27e-2. So a gradient over the fixed bound passes only if the oracle itself
# moves by at least 1 / FLOOR_FACTOR of the kernel's error when its inputs q, k, v and the
# upstream gradient are perturbed by one unit roundoff of the input dtype (relative, Gaussian;
# the largest change over three draws). On well-conditioned inputs that spread is ~2-5e-3, so the
# effective bound stays the fixed one there; a wrong kernel (errors of order 1) fails either way.

def gradient_spread(case: ScanCase, dout, dfin, g_ref: dict, rng: np.random.Generator, draws: int = 3) -> dict:
    """{"grad.<name>": (rel_l2, rel_max), the largest change of the oracle's gradient over `draws`
    perturbations of q, k, v and dout by one unit roundoff of the input dtype}."""
    dfin_np = None if dfin is None else States(*(to_numpy(x) for x in dfin))
    opts = spec_options(case.spec)
    spread = dict.fromkeys(g_ref, (0.0, 0.0))
    for _ in range(draws):
        seen = perturbed(dict(case.seen, dout=dout), case.spec.input_dtype, rng, ("q", "k", "v", "dout"))
        alt = adjoint.backward(seen.pop("dout"), dfin_np, **seen, **opts)
        got = {f"grad.{n}": x for n, x in alt.items() if n != "initial_states" and x is not None}
        if alt.get("initial_states") is not None:
            got.update({f"grad.initial_states.{nm}": x for nm, x in zip(STATE_NAMES, alt["initial_states"])})
        for n in g_ref:
            e = (rel_l2(got[n], g_ref[n]), rel_max(got[n], g_ref[n]))
            spread[n] = tuple(max(a, b) for a, b in zip(spread[n], e))
    return spread
