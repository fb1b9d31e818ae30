"""torch.autograd.Function behind `mamba3_kernels.scan` when an input requires grad (issue 5).

Forward: the Triton chunked forward (backends/triton/scan_fwd.py) on the validated bundle.
Saved for the backward: the inputs themselves, as the kernels read them
(mamba3_kernels.scan_tensors.ScanTensors: views of the caller's tensors unless a dtype or
stride had to be fixed), and with `save_y=True` (the default of mamba3_kernels.scan) the
per-rank y the output mode's adjoint needs (only with Z, MIMO_Out or the norm; SISO: phase 4
stores it besides out, in bf16 for 16-bit inputs (2 H P bytes per token; fp32 for fp32 inputs or
with bwd_config Y_DTYPE "float32"); MIMO: a per-rank pass in fp32, 4 R H P bytes per token, and out
from it).
`save_y=False` keeps no activation of its own and recomputes y in the backward by one extra
forward (less memory, one forward pass more). See bench/notes/scan_bwd.md for the bytes per token.

Outputs: out, and with final_states=True the four final states (angle, ssm, k, v), all
differentiable: their upstream gradients (None = 0) enter the backward at each sequence's last
token (K, V, angle) or as the final-state adjoint (SSM); an empty sequence passes them straight
to its initial-state gradients.

Backward: backends/triton/scan_bwd.py (first order only: a double backward raises). Deterministic (fixed-order reductions, no atomics): two
backward runs on the same inputs are bitwise equal. Gradients come in the inputs' shapes and
dtypes (a shared (B, L, A) angle tensor gets the head sum; (H, N) biases and SISO short-form
Q/K get their short forms back).
"""
from __future__ import annotations

import torch

from .scan_tensors import prepare_scan
from .spec import States

NAMES = ("q", "k", "v", "adt", "dt", "trap", "q_bias", "k_bias", "angles", "d", "z", "mimo_v",
         "mimo_z", "mimo_out", "norm_weight", "state_angle", "state_ssm", "state_k", "state_v",
         "cu_seqlens")
_BUNDLE = ("q", "k", "v", "z", "adt", "dt", "trap", "angles", "q_bias", "k_bias", "d", "mimo_v",
           "mimo_z", "mimo_out", "norm_weight", "cu_seqlens")


def flat_args(args: dict) -> list:
    """scan()'s tensor arguments in NAMES order (initial_states as its four tensors)."""
    st = args["initial_states"]
    out = [args[n] for n in NAMES[:15]]
    out += list(st) if st is not None else [None] * 4
    out.append(args["cu_seqlens"])
    return out


def unflat_args(flat) -> dict:
    """The inverse of flat_args: scan()'s keyword arguments from the NAMES-ordered tensors."""
    a = dict(zip(NAMES, flat))
    st = [a.pop(n) for n in NAMES[15:19]]
    a["initial_states"] = None if st[0] is None else States(*st)
    return a


class ScanFunction(torch.autograd.Function):

    @staticmethod
    def forward(ctx, meta, *flat):
        spec, problem, fwd_cfg, bwd_cfg, save_y, t = meta
        if t is None:   # the bundle of `flat` (api.scan passes the one it validated)
            t = prepare_scan(spec, problem, **unflat_args(flat))
        y = grad_forward(spec, problem, t, fwd_cfg, bwd_cfg, save_y)
        tensors = [getattr(t, n) for n in _BUNDLE]
        tensors += list(t.state_in) if t.state_in is not None else [None] * 4
        tensors.append(y)
        ctx.save_for_backward(*tensors)
        ctx.set_materialize_grads(False)   # unused outputs' grads stay None (no zero tensors)
        ctx.meta = (spec, problem, bwd_cfg, t.state_in is not None)
        ctx.shapes = [None if x is None else (tuple(x.shape), x.dtype) for x in flat]
        outs = (t.out,) + (tuple(t.state_out) if t.state_out is not None else ())
        return outs if len(outs) > 1 else outs[0]

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, *gouts):
        from .scan_tensors import ScanTensors
        spec, problem, bwd_cfg, has_init = ctx.meta
        saved = ctx.saved_tensors
        b = dict(zip(_BUNDLE, saved[:len(_BUNDLE)]))
        st = States(*saved[len(_BUNDLE):len(_BUNDLE) + 4]) if has_init else None
        t = ScanTensors(**b, state_in=st, out=None, state_out=None)
        grads = {"out": gouts[0], "_y": saved[-1]}
        if spec.final_states:
            grads.update(angle=gouts[1], ssm=gouts[2], k=gouts[3], v=gouts[4])
        flat = grad_backward(spec, problem, t, bwd_cfg, grads)
        res = [None]
        for i, (x, shp) in enumerate(zip(flat, ctx.shapes)):
            if x is None or shp is None or not ctx.needs_input_grad[i + 1]:
                res.append(None)
            else:
                res.append(x.reshape(shp[0]).to(shp[1]))
        return tuple(res)


def grad_forward(spec, problem, t, fwd_cfg, bwd_cfg, save_y):
    """The forward of the differentiable path on bundle `t`; returns the saved per-rank y or None."""
    from .backends.triton import scan_bwd, scan_fwd
    if save_y and scan_bwd.needs_y(spec):   # y once (kept), out from it: no extra pass
        return scan_bwd.forward_saving_y(spec, t, problem, fwd_cfg, bwd_cfg)
    scan_fwd.forward(spec, fwd_cfg, t)
    return None


def grad_backward(spec, problem, t, bwd_cfg, grads: dict) -> list:
    """Every input gradient in NAMES order (kernel layouts; None for absent inputs and
    cu_seqlens). `grads`: out, _y (the saved y or None) and, with final states, angle, ssm, k,
    v (None = 0)."""
    from .backends.triton import scan_bwd
    g = dict(grads)
    if g.get("out") is None:
        g["out"] = _zeros_out(spec, problem, t)
    if not spec.final_states:
        for key in ("angle", "ssm", "k", "v"):
            g.pop(key, None)
    res = scan_bwd.backward(spec, bwd_cfg, t, g, problem)
    return flat_args(dict(res, cu_seqlens=None))


def _zeros_out(spec, problem, t):
    from .spec import output_shape
    return torch.zeros(output_shape(spec, problem), dtype=t.v.dtype, device=t.v.device)


def scan_with_grad(spec, problem, args: dict, fwd_cfg: dict, bwd_cfg: dict, save_y: bool, bundle=None):
    """Run the differentiable scan; returns out, or (out, States) with final states. `bundle`:
    the ScanTensors of `args` when the caller already built (validated) it."""
    outs = ScanFunction.apply((spec, problem, fwd_cfg, bwd_cfg, save_y, bundle), *flat_args(args))
    if spec.final_states:
        return outs[0], States(*outs[1:])
    return outs
