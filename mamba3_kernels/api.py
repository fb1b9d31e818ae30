"""Public torch entry points: `step` (decode, SPEC §5) and `scan` (the chunked forward, SPEC §8).

Validation order: shapes (spec.resolve_*, shared with the oracle), then dtypes, devices and
strides (tensors.prepare_*), then dispatch. Every check runs before any kernel, so on an
error nothing is written to the caller's tensors.
"""
from __future__ import annotations

from typing import Optional

import torch

from . import dispatch
from .autotune import autotune_requested
from .scan_tensors import prepare_scan
from .spec import bad_arg, resolve_scan, resolve_step
from .tensors import StepBuilder, check_step

_validated: dict = {}
_VALIDATED_MAX = 256


def _signature(values, options: tuple):
    """(shape, strides, dtype, device) of every tensor argument, flattened, plus the options;
    None when an argument is not a tensor / tuple of tensors (the full checks then report it)."""
    sig = [options]
    add = sig.append
    for x in values:
        if x is None:
            add(None)
        elif isinstance(x, torch.Tensor):
            sig += (x.shape, x.stride(), x.dtype, x.device)
        elif isinstance(x, tuple):
            add(len(x))
            for y in x:
                if not isinstance(y, torch.Tensor):
                    return None
                sig += (y.shape, y.stride(), y.dtype, y.device)
        else:
            return None
    return tuple(sig)


class _Verdict:
    """What the checks concluded for one signature: the spec and problem, how to build the
    backend bundle, and the dispatch decision (re-taken when dispatch.generation moves)."""
    __slots__ = ("spec", "problem", "build", "choice", "generation")

    def __init__(self, spec, problem, build):
        self.spec, self.problem, self.build = spec, problem, build
        self.choice, self.generation = None, -1


def step(q, k, v, adt, dt, trap, q_bias, k_bias, states, angles=None, d=None, z=None,
         mimo_v=None, mimo_z=None, mimo_out=None, norm_weight=None, state_indices=None, *,
         output_mode: Optional[str] = None, pairing: str = "interleaved",
         discretization: str = "trapezoidal", norm_eps: float = 1e-5, inplace: bool = True,
         out: Optional[torch.Tensor] = None, backend: Optional[str] = None,
         config: Optional[dict] = None, validate: bool = True, autotune: Optional[bool] = None):
    """One decode token per sequence (SPEC §5): bias + rotation + angle update (wrapped mod
    2 pi) + trapezoidal step with the stored K/V states + D, Z, MIMO projections and output mode.

    Shapes: see mamba3_kernels.spec. `states` = (angle fp32 (M,H,A), ssm fp32|bf16 (M,H,P,N),
    k fp32 (M,R,H,N), v (M,H,P) in V's dtype); M = B, or the pool size with `state_indices`
    (B,) int32 (negative = padding slot: output row 0, state untouched).
    `inplace=True` updates `states` and returns them; else new state tensors are returned.
    `validate=False` skips the one host sync (the state_indices range check): use it inside
    CUDA graphs. `autotune=True` (or MAMBA3_AUTOTUNE=1) tunes on a cache miss (never inside
    graph capture). Returns (out, States).

    The checks are a pure function of every tensor's (shape, strides, dtype, device) and the
    options, so a call whose tensors match an earlier valid call's reuses that verdict, its
    bundle recipe and its dispatch decision (bench/host_overhead.py); a latency-bound loop
    can also bind everything but the token tensors once with mamba3_kernels.StepPlan.
    """
    args = dict(q=q, k=k, v=v, adt=adt, dt=dt, trap=trap, q_bias=q_bias, k_bias=k_bias,
                states=states, angles=angles, d=d, z=z, mimo_v=mimo_v, mimo_z=mimo_z,
                mimo_out=mimo_out, norm_weight=norm_weight, state_indices=state_indices)
    key = _signature(args.values(), (output_mode, pairing, discretization, norm_eps))
    hit = _validated.get(key) if key is not None else None
    if hit is None:
        spec, problem = resolve_step(**args, output_mode=output_mode, pairing=pairing,
                                     discretization=discretization, norm_eps=norm_eps)
        check_step(spec, **args)
        hit = _Verdict(spec, problem, StepBuilder(spec, args))
        if key is not None:
            if len(_validated) >= _VALIDATED_MAX:
                _validated.clear()
            _validated[key] = hit
    t = hit.build(args, out, inplace)
    if validate and state_indices is not None and state_indices.numel():
        hi = int(state_indices.max())
        if hi >= hit.problem.nseqs:
            raise bad_arg("state_indices", f"values < state pool size M={hit.problem.nseqs} (negative = padding)",
                          f"max {hi}")
    if config is not None:   # an explicit config: nothing to remember
        mod, cfg, _ = dispatch.select("step", hit.spec, hit.problem, v.device, backend, config, autotune)
    else:
        choice = hit.choice
        tune = autotune_requested(autotune)
        if choice is None or hit.generation != dispatch.generation or choice[0] != (backend, tune):
            gen = dispatch.generation
            mod, cfg, _ = dispatch.select("step", hit.spec, hit.problem, v.device, backend, None, tune)
            hit.choice, hit.generation = ((backend, tune), mod, cfg), gen
        else:
            mod, cfg = choice[1], choice[2]
    mod.step(hit.spec, cfg, t)
    return t.out, t.state_out


def scan(q, k, v, adt, dt, trap, q_bias, k_bias, angles=None, d=None, z=None, mimo_v=None,
         mimo_z=None, mimo_out=None, norm_weight=None, initial_states=None, cu_seqlens=None, *,
         output_mode: Optional[str] = None, pairing: str = "interleaved",
         discretization: str = "trapezoidal", final_states: bool = False, norm_eps: float = 1e-5,
         chunk_size: int = 64, state_dtype: str = "float32", out: Optional[torch.Tensor] = None,
         backend: Optional[str] = None, config: Optional[dict] = None, validate: bool = True,
         bwd_config: Optional[dict] = None, save_y: bool = True):
    """The chunked Mamba-3 scan over whole sequences (prefill; SPEC §2, §3, §7, §8).

    Shapes (mamba3_kernels.spec): q, k (B, L, R, G, N) or (B, L, G, N) for R = 1; v, z
    (B, L, H, P); adt, dt, trap (B, H, L) (trap raw, pre-sigmoid; None for
    discretization="euler"); q_bias, k_bias (H, R, N) or (H, N); angles (B, L, H, A) per head or
    (B, L, A) shared by all heads (raw rates; A <= N/2); d (H,); mimo_v, mimo_z, mimo_out
    (H, R, P) (None = ones); norm_weight (H, P) selects the fused pre-gate RMSNorm;
    initial_states = (angle (S,H,A), ssm (S,H,P,N), k (S,R,H,N), v (S,H,P)) or None;
    cu_seqlens (S + 1,) int32 prefix sums with B = 1 (packed sequences, empty ones allowed).
    q, k, v, z share one dtype (bf16, fp16 or fp32); parameters and states may be any float
    dtype (read as fp32; state v in V's dtype).

    Returns out (B, L, H, P) (or (B, L, R, H, P) for output_mode "per_rank"), and with
    final_states=True also States(angle fp32 (S,H,A) wrapped into [0, 2 pi), ssm
    (S,H,P,N) in `state_dtype`, k fp32 (S,R,H,N) rotated and biased, v (S,H,P) in V's dtype):
    feeding them back as initial_states continues the sequence exactly.

    Differentiable: with grad enabled and an input requiring grad, the call goes through
    mamba3_kernels.autograd.ScanFunction (Triton forward and backward; out and the final states
    are differentiable outputs; every float input gets its gradient, deterministically).
    `bwd_config` is the backward's config (backends/triton/scan_bwd.py: overrides of its
    default; None = the tuning cache's choice for op "backward", else the default);
    `save_y` (default True): the forward keeps the per-rank y (SISO with 16-bit inputs bf16, 2 H P
    bytes per token; otherwise fp32, 4 R H P; only where the output mode reads it: Z, MIMO_Out or
    the norm) for the backward;
    `save_y=False` keeps nothing but the inputs and recomputes y in the backward (one more
    forward pass: 0.3-0.9 ms more fwd+bwd at the H100 benchmark shapes). With
    nothing requiring grad (or under torch.no_grad()) the forward-only path runs, at no extra cost.
    `chunk_size` is recorded in the spec (the oracle's chunked form uses it); the Triton
    forward picks its own chunk and segment lengths from its config (results do not depend on
    them beyond rounding). `validate=False` skips the one host sync (checking the cu_seqlens
    values): use it inside CUDA graphs. Inputs are never written to; a tensor the kernels
    cannot read as it is (a last dim that is not unit-stride, a dtype cast) is copied.

    Under torch.compile the call is one opaque torch.library op (mamba3_kernels.scan_op,
    differentiable, fullgraph-safe); its checks run when the compiled graph runs.
    """
    args = dict(q=q, k=k, v=v, adt=adt, dt=dt, trap=trap, q_bias=q_bias, k_bias=k_bias,
                angles=angles, d=d, z=z, mimo_v=mimo_v, mimo_z=mimo_z, mimo_out=mimo_out,
                norm_weight=norm_weight, initial_states=initial_states, cu_seqlens=cu_seqlens)
    if torch.compiler.is_compiling():   # traced as one opaque op (mamba3_kernels.scan_op)
        from . import scan_op
        res = scan_op.scan(args, output_mode=output_mode, pairing=pairing, discretization=discretization,
                           final_states=final_states, norm_eps=norm_eps, chunk_size=chunk_size,
                           state_dtype=state_dtype, backend=backend, config=config, bwd_config=bwd_config,
                           save_y=save_y, validate=validate)
        if out is None:
            return res
        y = res[0] if final_states else res
        if tuple(out.shape) != tuple(y.shape) or out.dtype != y.dtype:
            raise bad_arg("out", f"a {y.dtype} tensor of shape {tuple(y.shape)}", f"{out.dtype} {tuple(out.shape)}")
        out.copy_(y)
        return (out, res[1]) if final_states else out
    cu_vals = None
    if validate and cu_seqlens is not None and isinstance(cu_seqlens, torch.Tensor):
        cu_vals = cu_seqlens.detach().cpu().tolist()
    spec, problem = resolve_scan(**args, output_mode=output_mode, pairing=pairing,
                                 discretization=discretization, final_states=final_states,
                                 norm_eps=norm_eps, chunk_size=chunk_size, state_dtype=state_dtype,
                                 cu_seqlens_values=cu_vals)
    if torch.is_grad_enabled() and any(
            isinstance(y, torch.Tensor) and y.requires_grad
            for x in args.values() for y in (x if isinstance(x, (tuple, list)) else (x,))):
        return _scan_grad(spec, problem, args, out, backend, config, bwd_config, save_y)
    with torch.no_grad():
        t = prepare_scan(spec, problem, **args, out=out)
        mod, cfg, _ = dispatch.select("forward", spec, problem, v.device, backend, config)
        mod.forward(spec, cfg, t)
    if final_states:
        return t.out, t.state_out
    return t.out


def grad_configs(spec, problem, device, backend, config, bwd_config):
    """(forward config, backward config) of the differentiable path (also the compiled one's,
    mamba3_kernels.scan_op); raises if the Triton backward cannot take the call."""
    if backend not in (None, "triton"):
        raise bad_arg("backend", "None or 'triton' when an input requires grad (the backward is "
                      "Triton's)", repr(backend))
    from . import backends
    from .backends.triton import scan_bwd, scan_fwd
    ok, why = backends.get("triton").supports(spec, "backward")
    if not ok:
        raise ValueError(f"spec: expected one the Triton backward supports, got one it does not ({why})")
    if config is not None:
        fwd_cfg = dict(config)
    else:   # the forward-only path's choice (tuning cache or default) when it is Triton's
        mod, cfg, _ = dispatch.select("forward", spec, problem, device, None, None)
        fwd_cfg = dict(cfg) if getattr(mod, "NAME", None) == "triton" else scan_fwd.default_config(spec, problem)
    if bwd_config is not None:   # overrides of the default
        bcfg = dict(scan_bwd.default_config(spec, problem), **bwd_config)
    else:   # the tuning cache's choice (op "backward": `mamba3-kernels tune --op backward`) or the default
        mod, cfg, _ = dispatch.select("backward", spec, problem, device, None, None)
        bcfg = dict(cfg) if getattr(mod, "NAME", None) == "triton" else scan_bwd.default_config(spec, problem)
    scan_bwd.check_config(spec, bcfg)
    return fwd_cfg, bcfg


def _scan_grad(spec, problem, args, out, backend, config, bwd_config, save_y):
    """The differentiable path (mamba3_kernels.autograd): Triton forward and backward."""
    if out is not None:
        raise bad_arg("out", "None when an input requires grad (the autograd path allocates its "
                      "outputs)", "a tensor")
    from .autograd import scan_with_grad
    fwd_cfg, bcfg = grad_configs(spec, problem, args["v"].device, backend, config, bwd_config)
    # dtype / device / stride checks before anything runs (nothing is written on an error)
    t = prepare_scan(spec, problem, **args, out=None)
    return scan_with_grad(spec, problem, args, fwd_cfg, bcfg, bool(save_y), bundle=t)
