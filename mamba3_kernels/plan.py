"""StepPlan: validate a decode step once, then run it with per-call checks of the token tensors only.

`mamba3_kernels.step` validates all ~20 arguments on every call (shapes, dtypes, devices,
strides, dispatch): tens of µs of Python. A serving loop calls the same step with the same
parameters and state tensors thousands of times; a plan binds those once:

    plan = mamba3_kernels.StepPlan(q, k, v, adt, dt, trap, q_bias, k_bias, states, angles=..., d=..., z=...)
    out, states = plan(q, k, v, adt, dt, trap, angles=angles, z=z)      # each token

Per call it checks only the per-token tensors (q, k, v, z, adt, dt, trap, angles,
state_indices) against the shapes, dtypes and device seen at construction, and launches. The
bound tensors (biases, D, MIMO projections, norm weight, states) are the plan's: update them
in place to change them (a plan keeps no copies of them, except fp32 casts of parameters given
in another dtype, made once). state_indices values are not range-checked per call (no host
sync): indices outside [0, M) are treated as padding slots by every backend.

`plan.graphed()` goes one step further for latency-bound loops: the step captured in a CUDA
graph on static token buffers, one replay per token (mamba3_kernels.step_graph).
"""
from __future__ import annotations

from typing import Optional

import torch

from . import dispatch
from .spec import States, bad_arg, resolve_step
from .tensors import prepare_step

_TOKEN_ARGS = ("q", "k", "v", "adt", "dt", "trap", "angles", "z", "state_indices")


class StepPlan:
    """A decode step bound to its parameters, states and backend (see the module docstring)."""

    def __init__(self, q, k, v, adt, dt, trap, q_bias, k_bias, states, angles=None, d=None, z=None,
                 mimo_v=None, mimo_z=None, mimo_out=None, norm_weight=None, state_indices=None, *,
                 output_mode: Optional[str] = None, pairing: str = "interleaved",
                 discretization: str = "trapezoidal", norm_eps: float = 1e-5, inplace: bool = True,
                 backend: Optional[str] = None, config: Optional[dict] = None,
                 autotune: Optional[bool] = None):
        args = dict(q=q, k=k, v=v, adt=adt, dt=dt, trap=trap, q_bias=q_bias, k_bias=k_bias,
                    states=states, angles=angles, d=d, z=z, mimo_v=mimo_v, mimo_z=mimo_z,
                    mimo_out=mimo_out, norm_weight=norm_weight, state_indices=state_indices)
        self.spec, self.problem = resolve_step(**args, output_mode=output_mode, pairing=pairing,
                                               discretization=discretization, norm_eps=norm_eps)
        self._t = prepare_step(self.spec, **args, inplace=inplace)
        self.inplace = inplace
        self.backend, self.config, self.source = dispatch.select(
            "step", self.spec, self.problem, v.device, backend, config, autotune)
        self.device = v.device
        self._expect = {n: None if args[n] is None else (args[n].shape, args[n].dtype)
                        for n in _TOKEN_ARGS}
        self._dev_index = v.get_device()
        t = self._t
        self._views = {"q": tuple(t.q.shape), "k": tuple(t.k.shape)}
        self._out_shape, self._out_dtype = tuple(t.out.shape), t.out.dtype

    def _take(self, name, x, f32=False, canon=None):
        exp = self._expect[name]
        if exp is None:
            if x is not None:
                raise bad_arg(name, "None (the plan was built without it)", "a tensor")
            return None
        if x is None:
            raise bad_arg(name, f"a tensor of shape {tuple(exp[0])} (the plan was built with it)", None)
        if x.shape != exp[0] or x.dtype != exp[1] or x.get_device() != self._dev_index:
            raise bad_arg(name, f"shape {tuple(exp[0])}, dtype {exp[1]}, device {self.device} (as at plan creation)",
                          f"shape {tuple(x.shape)}, dtype {x.dtype}, device {x.device}")
        if not x.is_contiguous():
            x = x.contiguous()
        if f32 and x.dtype != torch.float32:
            x = x.float()
        if canon is not None and x.dim() != len(canon):
            x = x.view(canon)
        return x

    def __call__(self, q, k, v, adt, dt, trap=None, angles=None, z=None, state_indices=None,
                 out: Optional[torch.Tensor] = None):
        """One decode token per row; returns (out, States). In place unless the plan says otherwise."""
        t = self._t
        t.q = self._take("q", q, canon=self._views["q"])
        t.k = self._take("k", k, canon=self._views["k"])
        t.v = self._take("v", v)
        t.z = self._take("z", z)
        t.adt = self._take("adt", adt, True)
        t.dt = self._take("dt", dt, True)
        t.trap = self._take("trap", trap, True)
        t.angles = self._take("angles", angles, True)
        t.state_indices = self._take("state_indices", state_indices)
        if out is None:
            out = torch.empty(self._out_shape, dtype=self._out_dtype, device=self.device)
        elif tuple(out.shape) != self._out_shape or out.dtype != self._out_dtype or not out.is_contiguous():
            raise bad_arg("out", f"a contiguous {self._out_dtype} tensor of shape {self._out_shape}",
                          f"{out.dtype} {tuple(out.shape)}")
        t.out = out
        if not self.inplace:
            src = t.state_in
            t.state_out = States(*((x.clone() if state_indices is not None else torch.empty_like(x)) for x in src))
        self.backend.step(self.spec, self.config, t)
        return t.out, t.state_out

    def graphed(self, capture: bool = True):
        """This step captured in a CUDA graph on static token buffers (mamba3_kernels.step_graph):
        the lowest host cost per token (one replay). Needs inplace=True; the plan's last tokens
        seed the buffers."""
        from .step_graph import GraphedStep
        return GraphedStep(self, capture=capture)
