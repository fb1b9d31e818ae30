"""The chunked scan as torch.library ops, so torch.compile (fullgraph too) treats it as opaque.

`mamba3_kernels.scan` routes here while Dynamo traces (torch.compiler.is_compiling()); eager
calls never do. Two ops:

    mamba3::scan_fwd   every scan() input, flattened, + the options  ->  out, the four final
                       states (empty (0,) tensors without final_states) and the saved per-rank y
                       (empty unless the backward will read it: save_y and an output mode with
                       Z, MIMO_Out or the norm)
    mamba3::scan_bwd   the upstream gradients, y and the same inputs  ->  one gradient per
                       tensor input, in its shape and dtype (empty (0,) for absent inputs)

`register_autograd` ties them together, so AOTAutograd traces a backward made of `scan_bwd`.
Both ops validate and dispatch in their real implementation, i.e. when the compiled graph runs
(as mamba3_kernels.ops.step does): argument errors surface at that point, with the same
messages as the eager call. Their fake implementations give the shapes from the inputs' shapes
and the options alone. `config` / `bwd_config` travel as JSON text. The forward is the
dispatched backend's when nothing requires grad, the Triton autograd path's otherwise
(the same kernels and configs as eager: results are bitwise equal to the eager call's).
"""
from __future__ import annotations

import json
from typing import Optional

import torch
from torch import Tensor

from .autograd import NAMES as INPUTS   # the ops' tensor inputs, in the autograd path's order
from .autograd import flat_args, unflat_args
from .spec import States, _infer_output_mode
from .tensors import TORCH_DTYPES


def _none_if_empty(x):
    return None if x is None or x.numel() == 0 and x.dim() == 1 else x


def _resolve(a: dict, opts: dict, validate: bool):
    from .spec import resolve_scan
    cu = a["cu_seqlens"]
    cu_vals = cu.detach().cpu().tolist() if validate and cu is not None else None
    return resolve_scan(**a, cu_seqlens_values=cu_vals, **opts)


def _spec_options(output_mode, pairing, discretization, final_states, norm_eps, chunk_size, state_dtype):
    return dict(output_mode=output_mode or None, pairing=pairing, discretization=discretization,
                final_states=final_states, norm_eps=norm_eps, chunk_size=chunk_size, state_dtype=state_dtype)


def _empty(like: Tensor) -> Tensor:
    return like.new_empty((0,))


# ----------------------------------------------------------------------------------------
# forward

@torch.library.custom_op("mamba3::scan_fwd", mutates_args=())
def scan_fwd(q: Tensor, k: Tensor, v: Tensor, adt: Tensor, dt: Tensor, trap: Optional[Tensor], q_bias: Tensor,
             k_bias: Tensor, angles: Optional[Tensor], d: Optional[Tensor], z: Optional[Tensor],
             mimo_v: Optional[Tensor], mimo_z: Optional[Tensor], mimo_out: Optional[Tensor],
             norm_weight: Optional[Tensor], state_angle: Optional[Tensor], state_ssm: Optional[Tensor],
             state_k: Optional[Tensor], state_v: Optional[Tensor], cu_seqlens: Optional[Tensor],
             output_mode: str, pairing: str, discretization: str, final_states: bool, norm_eps: float,
             chunk_size: int, state_dtype: str, backend: str, config: str, bwd_config: str, save_y: bool,
             for_grad: bool, validate: bool) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    from . import dispatch
    from .api import grad_configs
    from .autograd import grad_forward
    from .scan_tensors import prepare_scan
    a = unflat_args((q, k, v, adt, dt, trap, q_bias, k_bias, angles, d, z, mimo_v, mimo_z, mimo_out,
                     norm_weight, state_angle, state_ssm, state_k, state_v, cu_seqlens))
    opts = _spec_options(output_mode, pairing, discretization, final_states, norm_eps, chunk_size, state_dtype)
    spec, problem = _resolve(a, opts, validate)
    cfg = _json(config)
    t = prepare_scan(spec, problem, **a)
    y = None
    if for_grad:
        fwd_cfg, bcfg = grad_configs(spec, problem, v.device, backend or None, cfg, _json(bwd_config))
        y = grad_forward(spec, problem, t, fwd_cfg, bcfg, save_y)
    else:
        with torch.no_grad():
            mod, c, _ = dispatch.select("forward", spec, problem, v.device, backend or None, cfg)
            mod.forward(spec, c, t)
    st = tuple(t.state_out) if t.state_out is not None else tuple(_empty(v) for _ in range(4))
    return (t.out, *st, y if y is not None else _empty(v))


@scan_fwd.register_fake
def _scan_fwd_fake(q, k, v, adt, dt, trap, q_bias, k_bias, angles, d, z, mimo_v, mimo_z, mimo_out, norm_weight,
                   state_angle, state_ssm, state_k, state_v, cu_seqlens, output_mode, pairing, discretization,
                   final_states, norm_eps, chunk_size, state_dtype, backend, config, bwd_config, save_y,
                   for_grad, validate):
    B, L, H, P = v.shape
    R = q.shape[2] if q.dim() == 5 else 1
    N, A = q.shape[-1], (0 if angles is None else angles.shape[-1])
    S = B if cu_seqlens is None else cu_seqlens.shape[0] - 1
    mode = _infer_output_mode(R, mimo_out, norm_weight, output_mode or None)
    out = (B, L, R, H, P) if mode == "per_rank" else (B, L, H, P)
    f32 = torch.float32
    if final_states:
        st = (v.new_empty((S, H, A), dtype=f32), v.new_empty((S, H, P, N), dtype=TORCH_DTYPES[state_dtype]),
              v.new_empty((S, R, H, N), dtype=f32), v.new_empty((S, H, P)))
    else:
        st = tuple(v.new_empty((0,)) for _ in range(4))
    # scan_bwd.needs_y(spec), from the inputs (the fake has no spec)
    keeps_y = for_grad and save_y and (z is not None or mimo_out is not None or mode == "norm_reduce")
    y = v.new_empty((B, L, R, H, P), dtype=f32) if keeps_y else v.new_empty((0,))
    return (v.new_empty(out), *st, y)


# ----------------------------------------------------------------------------------------
# backward

@torch.library.custom_op("mamba3::scan_bwd", mutates_args=())
def scan_bwd(g_out: Optional[Tensor], g_angle: Optional[Tensor], g_ssm: Optional[Tensor],
             g_k: Optional[Tensor], g_v: Optional[Tensor], y: Tensor,
             q: Tensor, k: Tensor, v: Tensor, adt: Tensor, dt: Tensor, trap: Optional[Tensor], q_bias: Tensor,
             k_bias: Tensor, angles: Optional[Tensor], d: Optional[Tensor], z: Optional[Tensor],
             mimo_v: Optional[Tensor], mimo_z: Optional[Tensor], mimo_out: Optional[Tensor],
             norm_weight: Optional[Tensor], state_angle: Optional[Tensor], state_ssm: Optional[Tensor],
             state_k: Optional[Tensor], state_v: Optional[Tensor], cu_seqlens: Optional[Tensor],
             output_mode: str, pairing: str, discretization: str, final_states: bool, norm_eps: float,
             chunk_size: int, state_dtype: str, backend: str, config: str, bwd_config: str) -> list[Tensor]:
    from .api import grad_configs
    from .autograd import grad_backward
    from .scan_tensors import prepare_scan
    flat = (q, k, v, adt, dt, trap, q_bias, k_bias, angles, d, z, mimo_v, mimo_z, mimo_out, norm_weight,
            state_angle, state_ssm, state_k, state_v, cu_seqlens)
    a = unflat_args(flat)
    opts = _spec_options(output_mode, pairing, discretization, final_states, norm_eps, chunk_size, state_dtype)
    spec, problem = _resolve(a, opts, validate=False)   # the forward checked these very inputs
    t = prepare_scan(spec, problem, **a, outputs=False)
    _, bcfg = grad_configs(spec, problem, v.device, backend or None, _json(config), _json(bwd_config))
    grads = {"out": g_out, "_y": _none_if_empty(y), "angle": g_angle, "ssm": g_ssm, "k": g_k, "v": g_v}
    g = grad_backward(spec, problem, t, bcfg, grads)
    return [_empty(v) if x is None else gx.reshape(x.shape).to(x.dtype) if gx is not None else torch.zeros_like(x)
            for x, gx in zip(flat, g)]


@scan_bwd.register_fake
def _scan_bwd_fake(g_out, g_angle, g_ssm, g_k, g_v, y, *rest):
    flat = rest[:len(INPUTS)]
    v = flat[2]
    return [v.new_empty((0,)) if x is None else torch.empty_like(x) for x in flat]


# ----------------------------------------------------------------------------------------
# autograd

_OPTS = ("output_mode", "pairing", "discretization", "final_states", "norm_eps", "chunk_size", "state_dtype",
         "backend", "config", "bwd_config")


def _setup_context(ctx, inputs, output):
    flat = inputs[:len(INPUTS)]
    ctx.opts = dict(zip(_OPTS, inputs[len(INPUTS):len(INPUTS) + len(_OPTS)]))
    ctx.save_for_backward(*flat, output[5])


def _backward(ctx, g_out, g_angle, g_ssm, g_k, g_v, g_y):
    saved = ctx.saved_tensors
    flat, y = saved[:len(INPUTS)], saved[len(INPUTS)]
    if not ctx.opts["final_states"]:
        g_angle = g_ssm = g_k = g_v = None
    grads = scan_bwd(g_out, g_angle, g_ssm, g_k, g_v, y, *flat, **ctx.opts)
    res = [None if x is None or not x.is_floating_point() else gx for x, gx in zip(flat, grads)]
    return (*res, *([None] * 13))


scan_fwd.register_autograd(_backward, setup_context=_setup_context)


def _json(text: str):
    return json.loads(text) if text else None


def scan(args: dict, *, output_mode, pairing, discretization, final_states, norm_eps, chunk_size, state_dtype,
         backend, config, bwd_config, save_y, validate):
    """api.scan under torch.compile: one scan_fwd op (differentiable through scan_bwd)."""
    flat = flat_args(args)
    for_grad = torch.is_grad_enabled() and any(isinstance(x, Tensor) and x.requires_grad for x in flat)
    outs = scan_fwd(*flat, output_mode or "", pairing, discretization, bool(final_states), float(norm_eps),
                    int(chunk_size), state_dtype, backend or "", json.dumps(config) if config else "",
                    json.dumps(bwd_config) if bwd_config else "", bool(save_y), for_grad, bool(validate))
    if final_states:
        return outs[0], States(*outs[1:5])
    return outs[0]
