"""Conformance harness: run a backend on fresh random inputs and compare with the oracle.

Used by the tests, `mamba3-kernels validate` and the autotuner's checks. The oracle always
sees the exact values the kernel saw (after rounding to the input / state dtypes); outputs
are poisoned with NaN before the kernel runs, so an unwritten element fails the comparison.
"""
from __future__ import annotations

import dataclasses
from typing import Optional

import numpy as np
import torch

from . import reference as ref
from .reference.compare import Report, compare_outputs
from .reference.inputs import random_step_inputs, spec_options
from .spec import Problem, ScanSpec, States, resolve_step
from .tensors import TORCH_DTYPES, StepTensors, prepare_step



def to_torch(x, dtype, device):
    return None if x is None else torch.as_tensor(np.asarray(x), dtype=torch.float64).to(dtype).to(device)


def to_numpy(x):
    return None if x is None else x.detach().to(torch.float64).cpu().numpy()


@dataclasses.dataclass
class Case:
    """A conformance case: the user-facing tensors, what the kernel sees, the oracle's answer."""
    spec: ScanSpec
    problem: Problem
    args: dict            # torch tensors, as a user would pass them
    seen: dict            # float64 numpy copies of exactly what the kernel sees
    ref_out: np.ndarray
    ref_states: States


@dataclasses.dataclass
class StepCase(Case):

    def label(self) -> str:
        s = self.spec
        return (f"R{s.rank} N{s.d_state} P{s.head_dim} A{s.n_angles}{s.pairing[0]} "
                f"B{self.problem.batch} H{self.problem.nheads} G{self.problem.ngroups} "
                f"{s.input_dtype[:4]}/{s.state_dtype[:4]}{' D' if s.has_d else ''}{' Z' if s.has_z else ''}"
                f"{' pool' if self.args.get('state_indices') is not None else ''} {s.output_mode}")


def step_inputs(spec: ScanSpec, problem: Problem, rng: np.random.Generator, device="cpu",
                pool: Optional[int] = None) -> dict:
    """Torch arguments of `mamba3_kernels.step` for a random decode case: inputs in
    spec.input_dtype, parameters fp32, states (angle fp32, ssm spec.state_dtype, k fp32, v input)."""
    a = random_step_inputs(spec, problem, rng, pool=pool)
    idt, sdt = TORCH_DTYPES[spec.input_dtype], TORCH_DTYPES[spec.state_dtype]
    f32 = torch.float32
    t = {}
    for n in ("q", "k", "v", "z"):
        t[n] = to_torch(a[n], idt, device)
    for n in ("adt", "dt", "trap", "angles", "q_bias", "k_bias", "d", "mimo_v", "mimo_z", "mimo_out",
              "norm_weight"):
        t[n] = to_torch(a[n], f32, device)
    st = a["states"]
    t["states"] = States(to_torch(st.angle, f32, device), to_torch(st.ssm, sdt, device),
                         to_torch(st.k, f32, device), to_torch(st.v, idt, device))
    t["state_indices"] = None if a["state_indices"] is None else \
        torch.as_tensor(a["state_indices"], dtype=torch.int32, device=device)
    return t


def step_case(spec: ScanSpec, problem: Problem, rng: np.random.Generator, device="cpu",
              pool: Optional[int] = None) -> StepCase:
    """A decode-step case with the oracle's answer computed on exactly the values the kernel sees."""
    t = step_inputs(spec, problem, rng, device, pool)
    seen = {n: (to_numpy(x) if isinstance(x, torch.Tensor) else x) for n, x in t.items() if n != "states"}
    seen["states"] = States(*(to_numpy(x) for x in t["states"]))
    seen["state_indices"] = None if t["state_indices"] is None else t["state_indices"].cpu().numpy()
    out, new = ref.step(**seen, **spec_options(spec))
    return StepCase(spec, problem, t, seen, out, new)


def poisoned_step_tensors(case: StepCase, inplace: bool) -> StepTensors:
    """The backend bundle with out (and non-in-place fresh states) filled with NaN. In-place
    works on clones of the case's states, so the case can be rerun."""
    args = dict(case.args)
    args["states"] = States(*(x.clone() for x in args["states"]))
    spec, _ = resolve_step(**args, output_mode=case.spec.output_mode, pairing=case.spec.pairing,
                           discretization=case.spec.discretization, norm_eps=case.spec.norm_eps)
    t = prepare_step(spec, **args, inplace=inplace)
    t.out.fill_(float("nan"))
    if not inplace and args["state_indices"] is None:
        for x in t.state_out:
            x.fill_(float("nan"))
    return t


def compare_step(case: StepCase, t: StepTensors, label: str = "") -> Report:
    """Rows for out and the four new states; untouched pool rows must be bitwise unchanged."""
    got_states = States(*(to_numpy(x) for x in t.state_out))
    got = {"out": to_numpy(t.out), "state.angle": got_states.angle, "state.ssm": got_states.ssm,
           "state.k": got_states.k.reshape(case.ref_states.k.shape), "state.v": got_states.v}
    refd = {"out": case.ref_out, "state.angle": case.ref_states.angle, "state.ssm": case.ref_states.ssm,
            "state.k": case.ref_states.k, "state.v": case.ref_states.v}
    # the bound follows the coarser of input and state precision
    dt = case.spec.input_dtype
    if case.spec.state_dtype in ("bfloat16", "float16"):
        dt = "bfloat16"
    rep = Report(compare_outputs(label or case.label(), got, refd, dtype=dt))
    return rep


def run_step_backend(backend, case: StepCase, config: Optional[dict] = None, inplace: bool = True) -> Report:
    """Run `backend` (module or name) on the case with poisoned outputs and compare."""
    from . import backends
    mod = backends.get(backend) if isinstance(backend, str) else backend
    cfg = config if config is not None else mod.default_config(case.spec, case.problem, "step")
    t = poisoned_step_tensors(case, inplace)
    mod.step(case.spec, cfg, t)
    if t.out.is_cuda:
        torch.cuda.synchronize()
    return compare_step(case, t, f"{mod.NAME} {case.label()}{' inplace' if inplace else ''}")
