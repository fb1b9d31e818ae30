"""Public torch entry points: `step` (decode, SPEC §5); `scan` arrives with the chunked kernels.

Validation order: shapes (spec.resolve_*, shared with the oracle), then dtypes, devices and
strides (tensors.prepare_*), then dispatch. Every check runs before any kernel, so on an
error nothing is written to the caller's tensors.
"""
from __future__ import annotations

from typing import Optional

import torch

from . import dispatch
from .spec import Problem, ScanSpec, States, bad_arg, resolve_step
from .tensors import prepare_step


def step(q, k, v, adt, dt, trap, q_bias, k_bias, states, angles=None, d=None, z=None,
         mimo_v=None, mimo_z=None, mimo_out=None, norm_weight=None, state_indices=None, *,
         output_mode: Optional[str] = None, pairing: str = "interleaved",
         discretization: str = "trapezoidal", norm_eps: float = 1e-5, inplace: bool = True,
         out: Optional[torch.Tensor] = None, backend: Optional[str] = None,
         config: Optional[dict] = None, validate: bool = True):
    """One decode token per sequence (SPEC §5): bias + rotation + angle update (wrapped mod
    2 pi) + trapezoidal step with the stored K/V states + D, Z, MIMO projections and output mode.

    Shapes: see mamba3_kernels.spec. `states` = (angle fp32 (M,H,A), ssm fp32|bf16 (M,H,P,N),
    k fp32 (M,R,H,N), v (M,H,P) in V's dtype); M = B, or the pool size with `state_indices`
    (B,) int32 (negative = padding slot: output row 0, state untouched).
    `inplace=True` updates `states` and returns them; else new state tensors are returned.
    `validate=False` skips the one host sync (the state_indices range check): use it inside
    CUDA graphs. Returns (out, States).
    """
    args = dict(q=q, k=k, v=v, adt=adt, dt=dt, trap=trap, q_bias=q_bias, k_bias=k_bias,
                states=states, angles=angles, d=d, z=z, mimo_v=mimo_v, mimo_z=mimo_z,
                mimo_out=mimo_out, norm_weight=norm_weight, state_indices=state_indices)
    spec, problem = resolve_step(**args, output_mode=output_mode, pairing=pairing,
                                 discretization=discretization, norm_eps=norm_eps)
    t = prepare_step(spec, **args, out=out, inplace=inplace)
    if validate and state_indices is not None and state_indices.numel():
        hi = int(state_indices.max())
        if hi >= problem.nseqs:
            raise bad_arg("state_indices", f"values < state pool size M={problem.nseqs} (negative = padding)",
                          f"max {hi}")
    mod, cfg, _ = dispatch.select("step", spec, problem, v.device, backend, config)
    mod.step(spec, cfg, t)
    return t.out, t.state_out
