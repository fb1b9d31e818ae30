"""Torch-side checks of the chunked scan's arguments and the canonical bundle `ScanTensors`.

The scan's analogue of tensors.py (the decode step's). `api.scan` validates shapes through
spec.resolve_scan (shared with the oracle), then `prepare_scan` here checks dtypes, devices
and strides and builds the bundle every backend's `forward` takes. Nothing here writes to a
user's tensor: a tensor the kernels cannot read as it is becomes a new tensor (a copy), and
the outputs are always new tensors (or the caller's `out`, checked).

Backend contract for `ScanTensors` (SPEC §2, §3, §7; layouts of mamba3_kernels/spec.py):
    q, k        (B, L, R, G, N)  input dtype (bf16 / fp16 / fp32); any strides with the last
                                 dim unit-stride (views of a fused projection are not copied)
    v, z        (B, L, H, P)     input dtype, last dim unit-stride; z None without the gate
    adt, dt     (B, H, L)        fp32 contiguous;  trap (B, H, L) fp32 raw, None for euler
    angles      (B, L, H, A) per head or (B, L, A) shared (spec.shared_angles), last dim
                unit-stride, float dtype as given (read as fp32), or None (A = 0)
    q_bias, k_bias (H, R, N)     fp32 contiguous
    d           (H,) fp32 or None
    mimo_v, mimo_z, mimo_out (H, R, P) fp32 or None (None = ones)
    norm_weight (H, P) fp32 or None
    cu_seqlens  (S + 1,) int32 contiguous or None
    state_in    States(angle (S, H, A) fp32, ssm (S, H, P, N) fp32, k (S, R, H, N) fp32,
                v (S, H, P) input dtype), all contiguous, or None (zero initial states)
    out         (B, L, H, P), or (B, L, R, H, P) for output_mode "per_rank"; input dtype,
                contiguous
    state_out   States like state_in (ssm in spec.state_dtype) or None (no final states)
"""
from __future__ import annotations

import dataclasses
from typing import Optional

import torch

from .spec import Problem, ScanSpec, States, output_shape
from .tensors import FLOAT_INPUTS, TORCH_DTYPES, TokenTensors, as_contiguous, check_tensor, output_tensor


@dataclasses.dataclass
class ScanTensors(TokenTensors):
    """The chunked scan's bundle (contract in the module docstring)."""
    cu_seqlens: Optional[torch.Tensor]
    state_in: Optional[States]
    out: torch.Tensor
    state_out: Optional[States]


def _unit_last(x):
    """x itself when its last dim is unit-stride (or of size 1), else a contiguous copy."""
    if x is None:
        return None
    if x.shape[-1] == 1 or x.stride(-1) == 1:
        return x
    return x.contiguous()


def prepare_scan(spec: ScanSpec, problem: Problem, *, q, k, v, adt, dt, trap, q_bias, k_bias,
                 angles=None, d=None, z=None, mimo_v=None, mimo_z=None, mimo_out=None,
                 norm_weight=None, initial_states=None, cu_seqlens=None,
                 out: Optional[torch.Tensor] = None, outputs: bool = True) -> ScanTensors:
    """Check dtypes, devices and strides of the scan arguments (shapes were checked by
    spec.resolve_scan) and build the backend bundle with fresh output tensors (none with
    outputs=False: a backward's view of the forward's inputs)."""
    dev = v.device
    check_tensor("v", v, dtypes=FLOAT_INPUTS)
    for name, x in (("q", q), ("k", k), ("z", z)):
        if x is not None:
            check_tensor(name, x, dtypes=(v.dtype,), device=dev)
    small = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
    for name, x in (("adt", adt), ("dt", dt), ("trap", trap), ("angles", angles),
                    ("q_bias", q_bias), ("k_bias", k_bias), ("d", d), ("mimo_v", mimo_v),
                    ("mimo_z", mimo_z), ("mimo_out", mimo_out), ("norm_weight", norm_weight)):
        if x is not None:
            check_tensor(name, x, dtypes=small, device=dev)
    if cu_seqlens is not None:
        check_tensor("cu_seqlens", cu_seqlens, dtypes=(torch.int32, torch.int64), device=dev)
    H, P = problem.nheads, spec.head_dim
    R, N, S, A = spec.rank, spec.d_state, problem.nseqs, spec.n_angles
    f32 = torch.float32
    st_in = None
    if initial_states is not None:
        names = ("initial_states.angle", "initial_states.ssm", "initial_states.k", "initial_states.v")
        for name, x in zip(names, initial_states):
            check_tensor(name, x, dtypes=small, device=dev)
        a0, s0, k0, v0 = initial_states
        st_in = States(as_contiguous(a0, f32), as_contiguous(s0, f32), as_contiguous(k0, f32).view(S, R, H, N), as_contiguous(v0, v.dtype))
    out = output_tensor(out, output_shape(spec, problem), v.dtype, dev) if outputs else None
    st_out = None
    if spec.final_states and outputs:
        sdt = TORCH_DTYPES[spec.state_dtype]
        st_out = States(torch.empty((S, H, A), dtype=f32, device=dev),
                        torch.empty((S, H, P, N), dtype=sdt, device=dev),
                        torch.empty((S, R, H, N), dtype=f32, device=dev),
                        torch.empty((S, H, P), dtype=v.dtype, device=dev))
    # q, k: (B, L, G, N) short form -> (B, L, 1, G, N) view (no copy)
    q5 = _unit_last(q)
    k5 = _unit_last(k)
    if q5.dim() == 4:
        q5 = q5.unsqueeze(2)
    if k5.dim() == 4:
        k5 = k5.unsqueeze(2)
    return ScanTensors(
        q=q5, k=k5, v=_unit_last(v), z=_unit_last(z),
        adt=as_contiguous(adt, f32), dt=as_contiguous(dt, f32), trap=as_contiguous(trap, f32) if spec.discretization == "trapezoidal" else None,
        angles=_unit_last(angles) if A else None,
        q_bias=as_contiguous(q_bias, f32).view(H, R, N), k_bias=as_contiguous(k_bias, f32).view(H, R, N), d=as_contiguous(d, f32),
        mimo_v=as_contiguous(mimo_v, f32), mimo_z=as_contiguous(mimo_z, f32), mimo_out=as_contiguous(mimo_out, f32),
        norm_weight=None if norm_weight is None else as_contiguous(norm_weight, f32).view(H, P),
        cu_seqlens=None if cu_seqlens is None else as_contiguous(cu_seqlens, torch.int32),
        state_in=st_in, out=out, state_out=st_out)
