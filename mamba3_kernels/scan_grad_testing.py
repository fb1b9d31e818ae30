"""Conformance of the scan's autograd path: outputs, final states and every gradient of
`mamba3_kernels.scan` against the float64 oracle (reference/recurrent.py forward, reference/
adjoint.py backward, SPEC §9.1) on exactly the values the kernels saw.

`scan_grad_report(spec, problem, rng, ...)` draws a fresh case (scan_testing.scan_case), makes
every float input and initial state a leaf, runs the scan (final states too, when the spec has
them) and a backward of a random <dout, out> + <dfinal, final states>, and returns a Report with
rows for out, the final states (DESIGN.md forward bounds) and every gradient (named
"grad.<input>", "grad.initial_states.<state>"; the gradient bound). Used by `mamba3-kernels
validate` and the tests.
"""
from __future__ import annotations

import numpy as np
import torch

from .reference import adjoint
from .reference.compare import Report, compare_outputs
from .reference.inputs import spec_options
from .scan_testing import scan_case
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
    got, ref = {"out": to_numpy(out)}, {"out": case.ref_out}
    if fin is not None:
        for i, nm in enumerate(STATE_NAMES):
            got[f"state.{nm}"] = to_numpy(fin[i]).reshape(case.ref_states[i].shape)
            ref[f"state.{nm}"] = case.ref_states[i]
    rows = compare_outputs(label, got, ref, dtype="bfloat16" if spec.state_dtype != "float32" else dt)
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
        g_got[f"grad.{n}"] = to_numpy(x.grad)
        g_ref[f"grad.{n}"] = grads[n]
    if st is not None:
        for i, nm in enumerate(STATE_NAMES):
            g = st[i].grad
            if g is None:
                raise AssertionError(f"grad.initial_states.{nm}: no gradient reached the input")
            g_got[f"grad.initial_states.{nm}"] = to_numpy(g)
            g_ref[f"grad.initial_states.{nm}"] = grads["initial_states"][i]
    rows += compare_outputs(label, g_got, g_ref, dtype=dt, kind="grad")
    return Report(rows)
