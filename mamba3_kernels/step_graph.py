"""GraphedStep: a StepPlan's decode step captured once in a CUDA graph, replayed per token.

At small batch a decode step is bound by the host, not the GPU: on the lent H100's host a
single torch `add_` costs ~9 µs per call from Python, a DSL launch with ~25 tensor arguments
17-120 µs, while `CUDAGraph.replay()` of the whole step costs 5-8 µs (bench/step.py,
`graph_replay_call_us`). A GraphedStep owns static token buffers; the producer of the token
inputs writes into them (e.g. `torch.matmul(x, w, out=g.tokens.v)`, or `g.tokens.v.copy_(v)`)
and each call replays the captured step:

    plan = mamba3_kernels.StepPlan(q, k, v, adt, dt, trap, q_bias, k_bias, states, ...)
    g = plan.graphed()
    g.tokens.q.copy_(q_t); ...              # or let the projections write there
    out, states = g()                       # one replay; or g(q=q_t, k=k_t, ...) to copy first

Semantics are StepPlan's (in place only: the states are the plan's tensors, updated by every
replay). `out` is one static buffer, overwritten by the next call: consume or copy it first.
Token buffers are in the backends' canonical layout (StepTensors: q, k (B, R, G, N) in the
input dtype; adt, dt, trap (B, H) fp32, raw trap; angles fp32; v, z (B, H, P); state_indices
(B,) int32), created from the plan's first tokens. The warm-up (compiling the kernel) runs on
copies of the states, so building a GraphedStep never changes them. `capture=False` keeps the
static buffers but launches eagerly (any device; what the CPU tests exercise).
"""
from __future__ import annotations

import dataclasses
import types

import torch

from .plan import _TOKEN_ARGS as _TOKEN_FIELDS   # the per-token inputs a plan checks per call
from .spec import States, bad_arg


class GraphedStep:
    """A StepPlan's step on static token buffers, captured in a CUDA graph (module docstring)."""

    def __init__(self, plan, capture: bool = True):
        if not plan.inplace:
            raise bad_arg("plan", "a StepPlan with inplace=True (a graph updates fixed state tensors)",
                          "inplace=False")
        if capture and plan.device.type != "cuda":
            raise bad_arg("device", "a CUDA device for a captured step (capture=False runs eagerly)",
                          str(plan.device))
        self.plan = plan
        t = plan._t
        # static copies of the plan's current token tensors (canonical layout, never the caller's)
        self.tokens = types.SimpleNamespace(**{n: None if getattr(t, n) is None else getattr(t, n).clone()
                                                for n in _TOKEN_FIELDS})
        self.out = torch.empty_like(t.out)
        self._bundle = dataclasses.replace(t, **vars(self.tokens), out=self.out)
        self._graph = None
        if capture:
            self._capture()

    def _capture(self):
        plan, b = self.plan, self._bundle
        scratch = States(*(x.clone() for x in b.state_in))   # warm-up: compile on copies
        warm = dataclasses.replace(b, state_in=scratch, state_out=scratch, out=torch.empty_like(self.out))
        side = torch.cuda.Stream(device=plan.device)
        side.wait_stream(torch.cuda.current_stream(plan.device))
        with torch.cuda.stream(side):
            plan.backend.step(plan.spec, plan.config, warm)
        torch.cuda.current_stream(plan.device).wait_stream(side)
        torch.cuda.synchronize(plan.device)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g, stream=side):
            plan.backend.step(plan.spec, plan.config, b)
        self._graph = g

    def __call__(self, **tokens):
        """Copy any given token tensors into the static buffers, then run the step (a graph
        replay on the current stream, or eagerly with capture=False). Returns (out, States):
        the static output buffer and the plan's states."""
        for name, x in tokens.items():
            if name not in _TOKEN_FIELDS:
                raise bad_arg(name, f"one of the token inputs {_TOKEN_FIELDS}", "an unknown argument")
            dst = getattr(self.tokens, name)
            if dst is None:
                if x is not None:
                    raise bad_arg(name, "None (the plan was built without it)", "a tensor")
                continue
            shape, dtype = self.plan._expect[name]   # what the plan was built with
            if not isinstance(x, torch.Tensor) or x.shape not in (shape, dst.shape) or x.dtype != dtype \
                    or x.device != dst.device:
                got = (f"shape {tuple(x.shape)}, dtype {x.dtype}, device {x.device}" if isinstance(x, torch.Tensor)
                       else type(x).__name__)
                raise bad_arg(name, f"shape {tuple(shape)}, dtype {dtype}, device {dst.device} (as at plan "
                              "creation)", got)
        for name, x in tokens.items():   # every check first: nothing is written on an error
            if x is not None:
                dst = getattr(self.tokens, name)
                dst.copy_(x.reshape(dst.shape))
        if self._graph is not None:
            self._graph.replay()
        else:
            self.plan.backend.step(self.plan.spec, self.plan.config, self._bundle)
        return self.out, self._bundle.state_out
