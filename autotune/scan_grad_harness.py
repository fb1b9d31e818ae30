"""The tuner's harness for the chunked scan's backward (op "backward"): check and time backward
configs (backends/triton/scan_bwd.py `space`) through the public autograd path.

A candidate runs `backend.scan_grad(spec, config, job)`: `mamba3_kernels.scan` on the job's
leaves with `bwd_config=config`, then `torch.autograd.grad` of <dout, out> (+ <dfinal, final
states>) into `job.grads`. The forward runs in its own (tuned or default) config for every
candidate, so candidates differ in their backward alone; what is timed is forward + backward,
what a training step pays for the op.

Same protocol as check.StepHarness and scan_harness.ScanHarness (compile / check / bench). One
fresh random case per tuning run (scan_testing.scan_case: the float64 oracle sees exactly the
values the kernels see). A candidate passes when

1. on a *small case* (batch 1, L = min(L, small_len), the same heads / spec) every gradient,
   the initial states' included, is within the DESIGN.md gradient bound of the float64 adjoint
   (reference/adjoint.py) and finite;
2. on the *full case* every gradient is finite and within twice the bound of the *reference
   gradients* (those of the first candidate that passed 1 and 2; the oracle adjoint is a token
   loop, minutes at tuning sizes);
3. two runs on the same inputs give bitwise equal gradients (the backward is deterministic).

Timing: forward + backward on input sets rotated past L2 (one set when a single one is larger).
"""
from __future__ import annotations

from typing import Optional

from .check import Harness, _torch_errors, bitwise_equal, register_harness
from .scan_harness import small_and_full_cases
from .timing import l2_bytes, rotation_count


class GradJob:
    """One backward problem: the scan's inputs (float inputs and initial states as leaves), the
    output gradients, and after a run the input gradients (`grads`, name -> tensor)."""

    def __init__(self, spec, args: dict, rng=None, douts=None):
        import torch

        from mamba3_kernels.scan_grad_testing import GRADS, STATE_NAMES
        self.spec = spec
        self.args = {k: v for k, v in args.items()}
        self.names = [n for n in GRADS if self.args.get(n) is not None]
        if self.args.get("initial_states") is not None:
            self.names += [f"initial_states.{n}" for n in STATE_NAMES]
        if douts is None:   # drawn once, shaped like the outputs of a forward-only call
            with torch.no_grad():
                outs = self._outputs(self._call(self.args, None))
            douts = [torch.as_tensor(rng.standard_normal(tuple(o.shape))).to(o.dtype).to(o.device) for o in outs]
        self.douts = douts
        self.grads: Optional[dict] = None

    def _call(self, args, bwd_config):
        import mamba3_kernels as m3
        from mamba3_kernels.reference.inputs import spec_options
        return m3.scan(**args, **spec_options(self.spec), final_states=self.spec.final_states, bwd_config=bwd_config)

    def _outputs(self, res):
        return [res[0], *res[1]] if self.spec.final_states else [res]

    def leaves(self, args) -> list:
        out = [args[n] for n in self.names if not n.startswith("initial_states.")]
        if args.get("initial_states") is not None:
            out += list(args["initial_states"])
        return out

    def run(self, bwd_config: dict) -> None:
        """Forward + backward with the backward config `bwd_config`; the gradients to `grads`."""
        import torch

        from mamba3_kernels.spec import States
        args = dict(self.args)
        for n in self.names:
            if not n.startswith("initial_states."):
                args[n] = args[n].detach().requires_grad_(True)
        if args.get("initial_states") is not None:
            args["initial_states"] = States(*(x.detach().requires_grad_(True) for x in args["initial_states"]))
        with torch.enable_grad():
            outs = self._outputs(self._call(args, bwd_config))
            g = torch.autograd.grad(outs, self.leaves(args), self.douts, allow_unused=True)
        self.grads = dict(zip(self.names, g))

    def clone(self) -> "GradJob":
        from mamba3_kernels.spec import States
        c = lambda x: x.clone() if hasattr(x, "clone") else x  # noqa: E731
        args = {k: (States(*(c(x) for x in v)) if isinstance(v, States) else c(v)) for k, v in self.args.items()}
        return GradJob(self.spec, args, douts=[d.clone() for d in self.douts])

    def tensors(self):
        import torch
        for v in self.args.values():
            for x in (v if isinstance(v, tuple) else (v,)):
                if isinstance(x, torch.Tensor):
                    yield x


class ScanGradHarness(Harness):
    op = "backward"
    ENTRY = "scan_grad"

    def __init__(self, spec, problem, device=None, seed: Optional[int] = None, small_len: int = 48):
        import numpy as np

        from mamba3_kernels.reference import adjoint
        from mamba3_kernels.reference.inputs import spec_options
        from mamba3_kernels.scan_grad_testing import STATE_NAMES
        from mamba3_kernels.spec import States
        from mamba3_kernels.testing import to_numpy
        if not isinstance(small_len, int) or small_len < 1:
            raise ValueError(f"small_len: expected an int >= 1, got {small_len!r}")
        self._init_device(spec, problem, device, seed)
        rng = np.random.default_rng(self.seed)
        small, full = small_and_full_cases(spec, problem, rng, self.device, small_len)
        self.small = GradJob(spec, small.args, rng)
        d = [to_numpy(x) for x in self.small.douts]
        dfin = States(*d[1:]) if spec.final_states else None
        g = adjoint.backward(d[0], dfin, **small.seen, **spec_options(spec))
        g.update({f"initial_states.{n}": x for n, x in zip(STATE_NAMES, g.get("initial_states") or ())})
        self.small_ref = {n: g[n] for n in self.small.names}
        self.small_case = small
        self.full = GradJob(spec, full, rng)
        self.bound_dtype = spec.input_dtype
        self._spread = None

    # -- protocol -----------------------------------------------------------------------------
    def compile(self, candidate) -> None:
        """Both cases (Triton specialises integer arguments, so they may be two builds)."""
        self._run(candidate, self.small)
        self._run(candidate, self.full)

    def check(self, candidate):
        from mamba3_kernels.reference.compare import BOUNDS, Report, compare_outputs
        from mamba3_kernels.scan_testing import held_to_spread
        from mamba3_kernels.testing import to_numpy
        s = self._run(candidate, self.small)
        missing = [n for n in s.names if s.grads.get(n) is None]
        if missing:
            return False, f"no gradient reached {missing}"
        rep = Report(compare_outputs(candidate.label + " small case",
                                     {f"grad.{n}": to_numpy(s.grads[n]) for n in s.names},
                                     {f"grad.{n}": r for n, r in self.small_ref.items()},
                                     dtype=self.bound_dtype, kind="grad"))
        rep = Report(held_to_spread(rep.rows, self.bound_dtype, self.small_spread))   # the tests' same-precision bound
        if not rep.ok:
            fs = rep.failures()
            return False, "mismatch (small case vs the oracle adjoint): " + "; ".join(
                f"{r.name} rel_l2={r.rel_l2:.2e} (bound {r.bound_l2:.0e})" for r in fs[:3])
        a = {n: None if x is None else x.clone() for n, x in self._run(candidate, self.full).grads.items()}
        bound = BOUNDS[self.bound_dtype]["grad_rel_l2"]
        for n, x in a.items():
            if x is None or not bool(x.isfinite().all()):
                return False, f"{n}: missing or non-finite gradient on the full case"
            if self.reference is not None:
                l2, _ = _torch_errors(x, self.reference[1][n], False)
                if l2 > 2 * bound:
                    return False, (f"mismatch vs the reference gradients ({self.reference[0]}): {n} "
                                   f"rel_l2={l2:.2e} (2x bound {2 * bound:.0e})")
        b = self._run(candidate, self.full).grads
        for n, x in a.items():
            if not bitwise_equal(x, b[n]):
                return False, f"non-repeatable: grad {n} differs bitwise between two runs on the same inputs"
        if self.reference is None:
            self.reference = (candidate.label, a)
        return True, ""

    def small_spread(self) -> dict:
        """scan_grad_testing.gradient_spread of the small case (computed once: every candidate
        sees the same inputs)."""
        if self._spread is None:
            import numpy as np

            from mamba3_kernels.scan_grad_testing import gradient_spread
            from mamba3_kernels.spec import States
            from mamba3_kernels.testing import to_numpy
            d = self.small.douts
            dfin = States(*d[1:]) if self.spec.final_states else None
            self._spread = gradient_spread(self.small_case, to_numpy(d[0]), dfin,
                                           {f"grad.{n}": r for n, r in self.small_ref.items()},
                                           np.random.default_rng(self.seed))
        return self._spread

    def _input_sets(self):
        if self._sets is None:
            import torch
            n = 2
            if self.device.type == "cuda":
                n = rotation_count(self.bytes_per_set(), l2_bytes(self.device), torch.cuda.mem_get_info(self.device)[0])
            self._sets = [self.full] + [self.full.clone() for _ in range(n - 1)]
        return self._sets

    def bytes_per_set(self) -> int:
        return sum(x.numel() * x.element_size() for x in self.full.tensors())


register_harness("backward", ScanGradHarness)
