"""Torch-side argument checks and the canonical tensor bundles handed to backends.

The API validates shapes through spec.resolve_* (shared with the oracle), then here checks
dtype, device and strides, and builds `StepTensors`: canonical, contiguous tensors that every
backend's `step` takes. Nothing here writes to a user's tensor; errors name the argument,
the expected and the actual value.

Backend contract for `StepTensors` (decode step, SPEC §5):
    q, k        (B, R, G, N)  input dtype (bf16 / fp16 / fp32), contiguous
    v           (B, H, P)     input dtype;  z (B, H, P) input dtype or None
    adt, dt     (B, H)        fp32;  trap (B, H) fp32 raw (pre-sigmoid), None for euler
    angles      (B, H, A) per head or (B, A) shared (spec.shared_angles), fp32, or None (A = 0)
    q_bias, k_bias (H, R, N)  fp32
    d           (H,) fp32 or None
    mimo_v, mimo_z, mimo_out (H, R, P) fp32 or None (None = ones)
    norm_weight (H, P) fp32 or None
    state_in / state_out: States(angle (M, H, A) fp32, ssm (M, H, P, N) fp32 or bf16,
                k (M, R, H, N) fp32, v (M, H, P) input dtype); state_out may BE state_in
                (in place): a backend must be race-free under that aliasing.
    state_indices (B,) int32 or None: row b uses pool row state_indices[b]; < 0 = padding slot
                (output row written as zeros, no state row touched).
    out         (B, H, P), or (B, R, H, P) for output_mode "per_rank"; input dtype.
"""
from __future__ import annotations

import dataclasses
from typing import Optional

import torch

from .spec import ScanSpec, States, bad_arg

FLOAT_INPUTS = (torch.bfloat16, torch.float16, torch.float32)
STATE_DTYPES = (torch.float32, torch.bfloat16)
TORCH_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32,
                "float64": torch.float64}


@dataclasses.dataclass
class TokenTensors:
    """The per-token inputs and per-head parameters common to the step and the scan bundles."""
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    z: Optional[torch.Tensor]
    adt: torch.Tensor
    dt: torch.Tensor
    trap: Optional[torch.Tensor]
    angles: Optional[torch.Tensor]
    q_bias: torch.Tensor
    k_bias: torch.Tensor
    d: Optional[torch.Tensor]
    mimo_v: Optional[torch.Tensor]
    mimo_z: Optional[torch.Tensor]
    mimo_out: Optional[torch.Tensor]
    norm_weight: Optional[torch.Tensor]


@dataclasses.dataclass
class StepTensors(TokenTensors):
    """The decode step's bundle (contract in the module docstring)."""
    state_in: States
    state_out: States
    state_indices: Optional[torch.Tensor]
    out: torch.Tensor


def check_tensor(name: str, x, *, dtypes=None, device=None, contiguous=False):
    if not isinstance(x, torch.Tensor):
        raise bad_arg(name, "a torch.Tensor", type(x).__name__)
    if dtypes is not None and x.dtype not in dtypes:
        raise bad_arg(name, f"dtype in {[str(d).replace('torch.', '') for d in dtypes]}",
                      str(x.dtype).replace("torch.", ""))
    if device is not None and x.device != device:
        raise bad_arg(name, f"device {device}", f"device {x.device}")
    if contiguous and not x.is_contiguous():
        raise bad_arg(name, "a contiguous tensor", f"strides {tuple(x.stride())}")


def as_contiguous(x, dtype=None, shape=None):
    """x in `dtype`, contiguous, viewed as `shape`: x itself when it already is (the common
    case costs a few attribute reads), else a new tensor; never a write to the caller's."""
    if x is None:
        return None
    if dtype is not None and x.dtype != dtype:
        x = x.to(dtype)
    if not x.is_contiguous():
        x = x.contiguous()
    if shape is not None and x.dim() != len(shape):
        x = x.view(shape)
    return x


def output_tensor(out, shape: tuple, dtype, device) -> torch.Tensor:
    """A new output tensor, or the caller's `out` after checking its shape, dtype, device and layout."""
    if out is None:
        return torch.empty(shape, dtype=dtype, device=device)
    check_tensor("out", out, dtypes=(dtype,), device=device, contiguous=True)
    if tuple(out.shape) != tuple(shape):
        raise bad_arg("out", f"shape {tuple(shape)}", f"shape {tuple(out.shape)}")
    return out


def check_step(spec: ScanSpec, *, q, k, v, adt, dt, trap, q_bias, k_bias, states, angles, d, z,
               mimo_v, mimo_z, mimo_out, norm_weight, state_indices) -> None:
    """Dtypes, devices and strides of the step arguments (shapes: spec.resolve_step).

    States are the user's own tensors (updated in place), so they must already have the
    kernel's layout: contiguous, angle/k fp32, ssm fp32 or bf16, v in V's dtype."""
    dev = v.device
    check_tensor("v", v, dtypes=FLOAT_INPUTS)
    for name, x in (("q", q), ("k", k), ("z", z)):
        if x is not None:
            check_tensor(name, x, dtypes=(v.dtype,), device=dev)
    for name, x in (("adt", adt), ("dt", dt), ("trap", trap), ("angles", angles), ("q_bias", q_bias),
                    ("k_bias", k_bias), ("d", d), ("mimo_v", mimo_v), ("mimo_z", mimo_z),
                    ("mimo_out", mimo_out), ("norm_weight", norm_weight)):
        if x is not None:
            check_tensor(name, x, dtypes=(torch.float32, torch.bfloat16, torch.float16), device=dev)
    ang_s, ssm_s, k_s, v_s = states
    check_tensor("states.angle", ang_s, dtypes=(torch.float32,), device=dev, contiguous=True)
    check_tensor("states.ssm", ssm_s, dtypes=STATE_DTYPES, device=dev, contiguous=True)
    check_tensor("states.k", k_s, dtypes=(torch.float32,), device=dev, contiguous=True)
    check_tensor("states.v", v_s, dtypes=(v.dtype,), device=dev, contiguous=True)
    if state_indices is not None:
        check_tensor("state_indices", state_indices, dtypes=(torch.int32,), device=dev)


_STEP_FIELDS = ("q", "k", "v", "z", "adt", "dt", "trap", "angles", "q_bias", "k_bias", "d", "mimo_v",
                "mimo_z", "mimo_out", "norm_weight", "state_indices")


class StepBuilder:
    """Builds the backend bundle of checked step arguments. What each argument needs (nothing,
    a view to the canonical rank, a copy: contiguous / fp32) depends only on the shapes, dtypes
    and strides, so it is worked out once here and a builder serves every call whose tensors
    have the same (api.step keeps one per validated signature)."""

    def __init__(self, spec: ScanSpec, args: dict):
        v, q = args["v"], args["q"]
        B, H, P = v.shape
        R, G, N = spec.rank, q.shape[-2], spec.d_state
        f32 = torch.float32
        layout = dict.fromkeys(_STEP_FIELDS, (None, None))   # every field: at least contiguous
        layout.update(q=(None, (B, R, G, N)), k=(None, (B, R, G, N)), adt=(f32, None), dt=(f32, None),
                      trap=(f32, None), angles=(f32, None), q_bias=(f32, (H, R, N)),
                      k_bias=(f32, (H, R, N)), d=(f32, None), mimo_v=(f32, None), mimo_z=(f32, None),
                      mimo_out=(f32, None), norm_weight=(f32, (H, P)))
        self.convert = tuple((n, how) for n, how in layout.items()
                             if args[n] is not None and as_contiguous(args[n], *how) is not args[n])
        k_s = args["states"][2]
        self.k_state_shape = (k_s.shape[0], R, H, N) if k_s.dim() != 4 else None
        self.out_shape = (B, R, H, P) if spec.output_mode == "per_rank" else (B, H, P)
        self.out_dtype, self.device = v.dtype, v.device

    def __call__(self, args: dict, out=None, inplace: bool = True) -> StepTensors:
        f = {n: args[n] for n in _STEP_FIELDS}
        for n, how in self.convert:
            f[n] = as_contiguous(f[n], *how)
        ang_s, ssm_s, k_s, v_s = args["states"]
        if self.k_state_shape is not None:
            k_s = k_s.view(self.k_state_shape)
        st_in = States(ang_s, ssm_s, k_s, v_s)
        if inplace:
            st_out = st_in
        elif f["state_indices"] is None:
            st_out = States(*(torch.empty_like(x) for x in st_in))
        else:  # rows not in state_indices keep their values in the new pool
            st_out = States(*(x.clone() for x in st_in))
        out = output_tensor(out, self.out_shape, self.out_dtype, self.device)
        return StepTensors(**f, state_in=st_in, state_out=st_out, out=out)


def build_step(spec: ScanSpec, *, out=None, inplace: bool = True, **args) -> StepTensors:
    """The backend bundle from checked arguments: inputs made contiguous / cast to fp32 where the
    contract says so (copies, never in-place), the output and (out of place) new states."""
    return StepBuilder(spec, args)(args, out, inplace)


def prepare_step(spec: ScanSpec, *, out=None, inplace: bool = True, **args) -> StepTensors:
    """check_step, then build_step: the whole torch-side preparation of one decode step."""
    check_step(spec, **args)
    return build_step(spec, **args, out=out, inplace=inplace)
