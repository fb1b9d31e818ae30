"""torch.library registration of the decode step, so torch.compile traces it without a break.

    import mamba3_kernels.ops                     # registers torch.ops.mamba3.step_
    out = mamba3_kernels.ops.step(q, k, v, adt, dt, trap, q_bias, k_bias, states, angles=..., ...)

`step` here has the semantics of `mamba3_kernels.step` with `inplace=True` (the states are
updated in place and declared as mutated arguments) and returns `out` only. Under
torch.compile the op is opaque: its fake implementation gives the output's shape and dtype, and
the real one (validation, dispatch, the chosen backend's kernel) runs at execution time.
Argument errors are raised by the real implementation, i.e. when the compiled graph runs.
"""
from __future__ import annotations

from typing import Optional

import torch

from . import api
from .spec import States

_STATE_ARGS = ("angle_state", "ssm_state", "k_state", "v_state")


@torch.library.custom_op("mamba3::step_", mutates_args=_STATE_ARGS)
def _step_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, adt: torch.Tensor, dt: torch.Tensor,
             trap: Optional[torch.Tensor], q_bias: torch.Tensor, k_bias: torch.Tensor,
             angle_state: torch.Tensor, ssm_state: torch.Tensor, k_state: torch.Tensor,
             v_state: torch.Tensor, angles: Optional[torch.Tensor], d: Optional[torch.Tensor],
             z: Optional[torch.Tensor], mimo_v: Optional[torch.Tensor], mimo_z: Optional[torch.Tensor],
             mimo_out: Optional[torch.Tensor], norm_weight: Optional[torch.Tensor],
             state_indices: Optional[torch.Tensor], output_mode: str, pairing: str,
             discretization: str, norm_eps: float) -> torch.Tensor:
    out, _ = api.step(q, k, v, adt, dt, trap, q_bias, k_bias,
                      States(angle_state, ssm_state, k_state, v_state), angles=angles, d=d, z=z,
                      mimo_v=mimo_v, mimo_z=mimo_z, mimo_out=mimo_out, norm_weight=norm_weight,
                      state_indices=state_indices, output_mode=output_mode, pairing=pairing,
                      discretization=discretization, norm_eps=norm_eps, inplace=True,
                      validate=False)
    return out


@_step_op.register_fake
def _step_fake(q, k, v, adt, dt, trap, q_bias, k_bias, angle_state, ssm_state, k_state, v_state, angles,
               d, z, mimo_v, mimo_z, mimo_out, norm_weight, state_indices, output_mode, pairing,
               discretization, norm_eps):
    B, H, P = v.shape
    R = q.shape[1] if q.dim() == 4 else 1
    shape = (B, R, H, P) if output_mode == "per_rank" else (B, H, P)
    return v.new_empty(shape)


def _output_mode(q, mimo_out, norm_weight, output_mode):
    """The output mode `mamba3_kernels.step` would infer (the op needs it explicit)."""
    if output_mode is not None:
        return output_mode
    if norm_weight is not None:
        return "norm_reduce"
    R = q.shape[1] if q.dim() == 4 else 1
    return "per_rank" if R > 1 and mimo_out is None else "reduce"


def step(q, k, v, adt, dt, trap, q_bias, k_bias, states, angles=None, d=None, z=None, mimo_v=None,
         mimo_z=None, mimo_out=None, norm_weight=None, state_indices=None, *,
         output_mode: Optional[str] = None, pairing: str = "interleaved",
         discretization: str = "trapezoidal", norm_eps: float = 1e-5) -> torch.Tensor:
    """`mamba3_kernels.step(..., inplace=True)` as a torch.library op (torch.compile-safe); returns out."""
    return _step_op(q, k, v, adt, dt, trap, q_bias, k_bias, *states, angles, d, z, mimo_v, mimo_z,
                    mimo_out, norm_weight, state_indices,
                    _output_mode(q, mimo_out, norm_weight, output_mode), pairing, discretization,
                    float(norm_eps))
