"""Checking a candidate before it is timed, and the harness that runs candidates for an op.

A harness owns the inputs of one tuning run and does three things per candidate:

    compile(candidate)                 build it (backend.precompile if it has one, else one run);
                                       may be called from worker threads; raises on failure
    check(candidate) -> (ok, reason)   its result matches the oracle-validated reference on
                                       fresh inputs, and two runs on the same inputs are
                                       bitwise identical
    bench(candidate) -> timing.Bench   launch(i) on rotated input copies, for the timer

`StepHarness` (op "step") draws one fresh random case per tuning run (as
mamba3_kernels.testing.step_case does: the float64 oracle sees exactly the values the kernel
sees). Each run gets NaN-poisoned outputs (an unwritten element fails); the in-place run is
compared with the oracle (DESIGN.md bounds; for big batches the oracle runs on sampled rows
and every row is compared with the oracle-validated reference output, see StepHarness),
repeated and compared bitwise, and an out-of-place run is compared too. `make_harness(op, ...)` picks the harness of an op;
`register_harness(op, factory)` adds one (scan_harness: the chunked forward; scan_grad_harness:
its backward).
"""
from __future__ import annotations

import secrets
from typing import Callable, Optional

from .timing import Bench, l2_bytes, rotation_count

_HARNESSES: dict = {}


def register_harness(op: str, factory: Callable) -> None:
    """factory(spec, problem, device, seed) -> harness, for tune(op=...)."""
    _HARNESSES[op] = factory


def make_harness(op: str, spec, problem, device=None, seed: Optional[int] = None):
    if op not in _HARNESSES:
        raise ValueError(f"op: expected one of {tuple(sorted(_HARNESSES))} (the ops the tuner can run), got {op!r}")
    return _HARNESSES[op](spec, problem, device, seed)


OUT_OF_RESOURCES = ("out of resource", "outofresources", "too many resources", "out of memory")


def classify(exc: BaseException) -> str:
    """A short failure reason: 'out of resources: ...' or '<ExceptionType>: ...' (one line)."""
    msg = f"{type(exc).__name__}: {exc}".strip().replace("\n", " ")
    if len(msg) > 300:
        msg = msg[:297] + "..."
    low = msg.lower()
    if any(w in low for w in OUT_OF_RESOURCES):
        return "out of resources: " + msg
    return msg


def _mod(candidate):
    if candidate.module is not None:
        return candidate.module
    from mamba3_kernels import backends
    return backends.get(candidate.backend)


def _bits(x):
    import torch
    x = x.detach().contiguous().reshape(-1)
    return x.view(torch.uint8) if x.numel() else x


def bitwise_equal(a, b) -> bool:
    """Same shape, dtype and bytes (NaN == NaN if its bits agree)."""
    import torch
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    return bool(torch.equal(_bits(a), _bits(b)))


class Harness:
    """What every op's harness shares: the device, the backend entry point the op calls
    (`ENTRY`: "step", "forward" or "scan_grad"), runs with a sync, input sets rotated past L2 for the timer
    (`_first_set()` gives the first; the rest are deep copies), health, release. Subclasses
    set spec / problem / device / seed / reference and implement compile and check."""
    ENTRY = ""

    def _init_device(self, spec, problem, device, seed):
        import torch
        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.spec, self.problem, self.device = spec, problem, torch.device(device)
        self.seed = secrets.randbits(32) if seed is None else int(seed)
        self.reference = None            # (label, out, States) of the first passing candidate
        self._sets = None
        self.serial_builds = self.device.type != "cuda"   # the Triton interpreter is not thread-safe

    def _sync(self):
        import torch
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def _run(self, candidate, t):
        getattr(_mod(candidate), self.ENTRY)(self.spec, dict(candidate.config), t)
        self._sync()
        return t

    def device_context(self):
        """Make self.device current (tune() wraps its work in it; worker threads enter it too)."""
        import contextlib
        import torch
        return torch.cuda.device(self.device) if self.device.type == "cuda" else contextlib.nullcontext()

    def _first_set(self):
        raise NotImplementedError

    def _input_sets(self):
        if self._sets is None:
            import torch
            t0 = self._first_set()
            size = sum(x.numel() * x.element_size() for x in _tensors(t0))
            n = 2
            if self.device.type == "cuda":
                n = rotation_count(size, l2_bytes(self.device), torch.cuda.mem_get_info(self.device)[0])
            self._sets = [t0] + [_clone_bundle(t0) for _ in range(n - 1)]
        return self._sets

    def bench(self, candidate) -> Bench:
        sets = self._input_sets()
        fn, spec, cfg = getattr(_mod(candidate), self.ENTRY), self.spec, dict(candidate.config)
        return Bench(lambda i: fn(spec, cfg, sets[i]), n_inputs=len(sets), device=self.device,
                     label=candidate.label)

    def healthy(self):
        """(ok, reason): False once the CUDA context is broken (a sticky fault ends tuning)."""
        try:
            self._sync()
            return True, ""
        except Exception as e:  # noqa: BLE001
            return False, classify(e)

    def close(self):
        self._sets = None
        self.reference = None


class StepHarness(Harness):
    """Candidates of the decode step on one fresh random case (see the module docstring).

    Two ways to check, by batch size:
    * B <= check_rows (default 16): the float64 oracle on the whole case
      (mamba3_kernels.testing.step_case / compare_step), every output and state row.
    * larger B: the oracle on `check_rows` sampled rows (first, last, middle, padding slots,
      random ones; the step is independent per row) — that costs milliseconds where the whole
      oracle costs ~10 s at B = 256 — plus, on the device, every row of every output and state
      against the *reference output*: the output of the first candidate that passed the sampled
      oracle check (so an oracle-validated result), with twice the DESIGN.md bounds (both sit
      within one bound of the truth). Pool rows no state_index points at must stay bitwise
      unchanged in either mode.
    """
    op = "step"
    ENTRY = "step"

    def __init__(self, spec, problem, device=None, seed: Optional[int] = None, check_rows: int = 16):
        import numpy as np
        self._init_device(spec, problem, device, seed)
        if not isinstance(check_rows, int) or check_rows < 1:
            raise ValueError(f"check_rows: expected an int >= 1, got {check_rows!r}")
        pool = problem.nseqs if problem.nseqs > problem.batch else None
        rng = np.random.default_rng(self.seed)
        self.sampled = problem.batch > check_rows
        if self.sampled:
            self.case = _sampled_step_case(spec, problem, rng, self.device, pool, check_rows)
        else:
            from mamba3_kernels.testing import step_case
            self.case = step_case(spec, problem, rng, device=self.device, pool=pool)
        dt = spec.input_dtype
        if spec.state_dtype in ("bfloat16", "float16"):
            dt = "bfloat16"
        self.bound_dtype = dt            # as testing.compare_step chooses it

    # -- helpers ---------------------------------------------------------------------------
    def _fresh(self, inplace=True):
        from mamba3_kernels.testing import poisoned_step_tensors
        return poisoned_step_tensors(self.case, inplace)

    def _first_set(self):
        return self._fresh()

    def _oracle(self, t, label) -> Optional[str]:
        """None if t matches the oracle (whole case or sampled rows), else why not."""
        if self.sampled:
            rep = _compare_sampled(self.case, t, label, self.bound_dtype)
        else:
            from mamba3_kernels.testing import compare_step
            rep = compare_step(self.case, t, label)
        return None if rep.ok else _worst(rep)

    def _untouched(self, t) -> Optional[str]:
        """Pool rows outside state_indices must be bitwise what they were."""
        keep = getattr(self.case, "untouched", None)
        if keep is None:
            keep = _untouched_rows(self.case)
            self.case.untouched = keep
        if keep is None or not len(keep):
            return None
        import torch
        idx = torch.as_tensor(keep, device=self.device, dtype=torch.long)
        for name, x, y in zip(("state.angle", "state.ssm", "state.k", "state.v"), t.state_out,
                              self.case.args["states"]):
            if not bitwise_equal(x.index_select(0, idx), y.reshape(x.shape).index_select(0, idx)):
                return f"{name} changed in pool rows no state_index points at"
        return None

    # -- protocol --------------------------------------------------------------------------
    def compile(self, candidate) -> None:
        mod = _mod(candidate)
        pre = getattr(mod, "precompile", None)
        if pre is not None:
            pre(self.spec, self.problem, dict(candidate.config), "step", self.device)
        else:
            self._run(candidate, self._fresh())

    def check(self, candidate):
        a = self._run(candidate, self._fresh(inplace=True))
        why = self._oracle(a, candidate.label)
        if why:
            return False, "mismatch: " + why
        why = self._untouched(a)
        if why:
            return False, "mismatch: " + why
        if self.sampled and self.reference is not None:
            why = _compare_full(self.reference, a, self.bound_dtype)
            if why:
                return False, f"mismatch vs the reference output ({self.reference[0]}): {why}"
        b = self._run(candidate, self._fresh(inplace=True))
        for name, x, y in _pairs(a, b):
            if not bitwise_equal(x, y):
                return False, f"non-repeatable: {name} differs bitwise between two runs on the same inputs"
        c = self._run(candidate, self._fresh(inplace=False))
        why = self._oracle(c, candidate.label + " out-of-place")
        if why:
            return False, "mismatch (out-of-place): " + why
        if self.sampled:
            if self.reference is None:
                self.reference = (candidate.label, a.out, a.state_out)
            else:
                why = _compare_full(self.reference, c, self.bound_dtype)
                if why:
                    return False, f"mismatch (out-of-place) vs the reference output ({self.reference[0]}): {why}"
        return True, ""

    def bytes_per_set(self) -> int:
        """Bytes one step moves (all inputs read, states read and written, out written); for a
        state pool only the B touched rows count."""
        t = self._fresh()
        frac = self.problem.batch / max(1, self.problem.nseqs)
        n = 0
        for f in ("q", "k", "v", "z", "adt", "dt", "trap", "angles", "q_bias", "k_bias", "d", "mimo_v",
                  "mimo_z", "mimo_out", "norm_weight", "state_indices", "out"):
            x = getattr(t, f)
            if x is not None:
                n += x.numel() * x.element_size()
        for x in t.state_in:
            n += int(2 * frac * x.numel() * x.element_size())
        return n


# ----------------------------------------------------------------------------------------
# sampled-row oracle for big batches

class _SampledStepCase:
    """Like testing.StepCase, but the oracle ran only on `rows` (batch rows); `pool_rows` are
    the state rows those touch (= rows without a state pool)."""

    def __init__(self, spec, problem, args, rows, pool_rows, ref_out, ref_states):
        self.spec, self.problem, self.args = spec, problem, args
        self.rows, self.pool_rows, self.ref_out, self.ref_states = rows, pool_rows, ref_out, ref_states

    def label(self) -> str:
        return f"{self.problem.describe()} (oracle on {len(self.rows)} sampled rows)"


def _sampled_step_case(spec, problem, rng, device, pool, n_rows):
    import numpy as np
    import torch
    from mamba3_kernels import reference as ref
    from mamba3_kernels.reference.inputs import spec_options
    from mamba3_kernels.spec import States
    from mamba3_kernels.testing import step_inputs, to_numpy
    t = step_inputs(spec, problem, rng, device, pool)
    idx = None if t["state_indices"] is None else t["state_indices"].cpu().numpy()
    B = problem.batch
    pick = {0, B - 1, B // 2}
    if idx is not None:
        pick |= {int(i) for i in np.flatnonzero(idx < 0)}
    others = [i for i in rng.permutation(B) if i not in pick]
    rows = np.array(sorted(list(pick) + others[:max(0, n_rows - len(pick))]), dtype=np.int64)
    rt = torch.as_tensor(rows, device=device)
    seen = {}
    for n in ("q", "k", "v", "z", "adt", "dt", "trap", "angles"):
        seen[n] = None if t[n] is None else to_numpy(t[n].index_select(0, rt))
    for n in ("q_bias", "k_bias", "d", "mimo_v", "mimo_z", "mimo_out", "norm_weight"):
        seen[n] = to_numpy(t[n])
    if idx is None:
        pool_rows, seen["state_indices"] = rows, None
    else:
        sel = idx[rows]
        pool_rows = np.array(sorted(int(i) for i in sel if i >= 0), dtype=np.int64)
        pos = {int(p): j for j, p in enumerate(pool_rows)}
        seen["state_indices"] = np.array([pos[int(i)] if i >= 0 else -1 for i in sel], dtype=np.int32)
    pt = torch.as_tensor(pool_rows, device=device, dtype=torch.long)
    seen["states"] = States(*(to_numpy(x.index_select(0, pt)) for x in t["states"]))
    out, new = ref.step(**seen, **spec_options(spec))
    return _SampledStepCase(spec, problem, t, rows, pool_rows, out, new)


def _untouched_rows(case):
    """Pool rows no state_index points at (None without a pool)."""
    import numpy as np
    idx = case.args.get("state_indices")
    if idx is None:
        return None
    M = case.args["states"].ssm.shape[0]
    used = set(int(i) for i in idx.detach().cpu().numpy() if i >= 0)
    return np.array([m for m in range(M) if m not in used], dtype=np.int64)


def _compare_sampled(case, t, label, dtype):
    import torch
    from mamba3_kernels.reference.compare import Report, compare_outputs
    from mamba3_kernels.testing import to_numpy
    dev = t.out.device
    rt = torch.as_tensor(case.rows, device=dev)
    pt = torch.as_tensor(case.pool_rows, device=dev, dtype=torch.long)
    got_s = [to_numpy(x.index_select(0, pt)) for x in t.state_out]
    got = {"out": to_numpy(t.out.index_select(0, rt)), "state.angle": got_s[0], "state.ssm": got_s[1],
           "state.k": got_s[2].reshape(case.ref_states.k.shape), "state.v": got_s[3]}
    refd = {"out": case.ref_out, "state.angle": case.ref_states.angle, "state.ssm": case.ref_states.ssm,
            "state.k": case.ref_states.k, "state.v": case.ref_states.v}
    return Report(compare_outputs(label, got, refd, dtype=dtype))


def _torch_errors(x, r, angle: bool):
    """(rel_l2, rel_max) of x against r on the device, as reference.compare defines them."""
    import math
    import torch
    x, r = x.detach().to(torch.float64).reshape(-1), r.detach().to(torch.float64).reshape(-1)
    fin = torch.isfinite(r)
    if not bool(torch.isfinite(x[fin]).all()):
        return math.inf, math.inf
    if x.numel() == 0:
        return 0.0, 0.0
    if angle:
        two_pi = 2 * math.pi
        if bool((x < 0).any()) or bool((x >= two_pi + 1e-6).any()):
            return math.inf, math.inf
        d = torch.remainder((x - r).abs(), two_pi)
        e = float(torch.minimum(d, two_pi - d).max())
        return e, e
    diff = x - r
    den2, denm = float(torch.linalg.vector_norm(r)), float(r.abs().max())
    l2 = float(torch.linalg.vector_norm(diff))
    mx = float(diff.abs().max())
    return (l2 / den2 if den2 > 0 else l2), (mx / denm if denm > 0 else mx)


def _compare_full(reference, t, dtype, factor: float = 2.0) -> Optional[str]:
    """None if every row of t's outputs and states is within factor x the bounds of the
    reference candidate's, else the worst offenders."""
    from mamba3_kernels.reference.compare import BOUNDS
    _, ref_out, ref_states = reference
    b = BOUNDS[dtype]
    bad = []
    pairs = [("out", t.out, ref_out)] + list(zip(("state.angle", "state.ssm", "state.k", "state.v"),
                                                 t.state_out or (), ref_states or ()))
    for name, x, r in pairs:
        angle = name == "state.angle"
        l2, mx = _torch_errors(x, r, angle)
        lim_l2, lim_mx = (b["angle"], b["angle"]) if angle else (b["rel_l2"], b["rel_max"])
        if l2 > factor * lim_l2 or mx > factor * lim_mx:
            bad.append(f"{name} rel_l2={l2:.2e} rel_max={mx:.2e} (bounds {factor:g}x {lim_l2:.0e}/{lim_mx:.0e})")
    return "; ".join(bad) or None


def _tensors(t):
    import torch
    seen = set()
    for f in t.__dataclass_fields__:
        v = getattr(t, f)
        for x in (v if isinstance(v, tuple) else (v,)):
            if isinstance(x, torch.Tensor) and id(x) not in seen:
                seen.add(id(x))
                yield x


def _clone_bundle(t):
    """A deep copy of a StepTensors / ScanTensors, keeping state_out aliased to state_in when it
    was (either may be None in a ScanTensors)."""
    import dataclasses
    from mamba3_kernels.spec import States
    c = lambda x: None if x is None else x.clone()  # noqa: E731
    kw = {f: c(getattr(t, f)) for f in t.__dataclass_fields__ if f not in ("state_in", "state_out")}
    sin = None if t.state_in is None else States(*(c(x) for x in t.state_in))
    if t.state_out is None:
        sout = None
    else:
        sout = sin if t.state_out is t.state_in else States(*(c(x) for x in t.state_out))
    return dataclasses.replace(t, **kw, state_in=sin, state_out=sout)


def _pairs(a, b):
    yield "out", a.out, b.out
    for n, x, y in zip(("state.angle", "state.ssm", "state.k", "state.v"), a.state_out or (), b.state_out or ()):
        yield n, x, y


def _worst(rep) -> str:
    fs = rep.failures()
    parts = [f"{r.name} rel_l2={r.rel_l2:.2e} rel_max={r.rel_max:.2e} (bounds {r.bound_l2:.0e}/{r.bound_max:.0e})"
             for r in fs[:3]]
    return "; ".join(parts) + (f"; +{len(fs) - 3} more" if len(fs) > 3 else "")


register_harness("step", StepHarness)
from . import scan_harness  # noqa: E402,F401  (registers op "forward")
from . import scan_grad_harness  # noqa: E402,F401  (registers op "backward")
