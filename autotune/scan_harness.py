"""The tuner's harness for the chunked scan forward (op "forward"): check and time candidates.

Same protocol as check.StepHarness (compile / check / bench). One fresh random case per tuning
run, drawn as mamba3_kernels.scan_testing draws them (the float64 oracle sees exactly the values
the kernel sees). The whole problem is too long for the oracle at tuning sizes (B=4, L=4096,
H=32 is minutes of NumPy), so a candidate passes when

1. on a *small case* (batch 1, L = min(L, small_len), the same heads/groups/spec) every output
   and final state matches the oracle within the DESIGN.md bounds, with NaN-poisoned outputs;
2. on the *full case* its output over the first `prefix_len` tokens of batch row 0 matches the
   oracle run on just that prefix (dense layouts; causality makes the prefix exact), and every
   element of out and the final states matches the *reference output* -- the full-case result
   of the first candidate that passed 1 and 2 -- within twice the bounds (both lie within one
   bound of the truth where the oracle can see them);
3. two runs on the same inputs are bitwise identical.

Timing: `forward` on input sets rotated so the working set exceeds L2 (one set when a single
one is already larger than the L2 cache, as the tuning shapes are).
"""
from __future__ import annotations

from typing import Optional

from .check import Harness, _compare_full, _pairs, _tensors, _worst, bitwise_equal, register_harness


class ScanHarness(Harness):
    op = "forward"
    ENTRY = "forward"

    def __init__(self, spec, problem, device=None, seed: Optional[int] = None, small_len: int = 160,
                 prefix_len: int = 192):
        import numpy as np

        for name, v in (("small_len", small_len), ("prefix_len", prefix_len)):
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"{name}: expected an int >= 1, got {v!r}")
        self._init_device(spec, problem, device, seed)
        rng = np.random.default_rng(self.seed)
        self.small, self.args = small_and_full_cases(spec, problem, rng, self.device, small_len)
        self.prefix = None if spec.varlen else self._prefix_oracle(min(problem.seqlen, prefix_len))
        dt = spec.input_dtype
        if spec.state_dtype in ("bfloat16", "float16"):
            dt = "bfloat16"
        self.bound_dtype = dt

    # -- the oracle on a prefix of batch row 0 --------------------------------------------------
    def _prefix_oracle(self, n: int):
        from mamba3_kernels import reference as ref
        from mamba3_kernels.reference.inputs import spec_options
        from mamba3_kernels.spec import States
        from mamba3_kernels.testing import to_numpy
        a = self.args
        seen = {}
        for k, x in a.items():
            if x is None or k in ("initial_states", "cu_seqlens"):
                continue
            if k in ("q", "k", "v", "z", "angles"):
                x = x[:1, :n]
            elif k in ("adt", "dt", "trap"):
                x = x[:1, :, :n]
            seen[k] = to_numpy(x)
        st = a.get("initial_states")
        seen["initial_states"] = None if st is None else States(*(to_numpy(x[:1]) for x in st))
        seen["cu_seqlens"] = None
        for k in ("z", "angles", "trap", "d", "mimo_v", "mimo_z", "mimo_out", "norm_weight"):
            seen.setdefault(k, None)
        out, _ = ref.forward(**seen, **spec_options(self.spec))
        return n, out

    # -- helpers ------------------------------------------------------------------------------
    def _bundle(self, args):
        from mamba3_kernels.scan_tensors import prepare_scan
        t = prepare_scan(self.spec, self.problem if args is self.args else self.small.problem, **args)
        t.out.fill_(float("nan"))
        if t.state_out is not None:
            for x in t.state_out:
                x.fill_(float("nan"))
        return t

    def _check_prefix(self, t) -> Optional[str]:
        if self.prefix is None:
            return None
        from mamba3_kernels.reference.compare import Report, compare_outputs
        from mamba3_kernels.testing import to_numpy
        n, ref_out = self.prefix
        got = to_numpy(t.out[:1, :n])
        rep = Report(compare_outputs("prefix", {"out": got}, {"out": ref_out}, dtype=self.bound_dtype))
        return None if rep.ok else _worst(rep)

    def _first_set(self):
        return self._bundle(self.args)

    # -- protocol -----------------------------------------------------------------------------
    def compile(self, candidate) -> None:
        """Run on both cases: Triton specialises integer arguments (== 1, multiples of 16), so
        the small and the full case may be two builds; both belong in the build stage."""
        self._run(candidate, self._bundle(self.small.args))
        self._run(candidate, self._bundle(self.args))

    def check(self, candidate):
        from mamba3_kernels.scan_testing import compare_scan
        s = self._run(candidate, self._bundle(self.small.args))
        rep = compare_scan(self.small, s, candidate.label + " small case")
        if not rep.ok:
            return False, "mismatch (small case vs the oracle): " + _worst(rep)
        a = self._run(candidate, self._bundle(self.args))
        why = self._check_prefix(a)
        if why:
            return False, "mismatch (prefix of the full case vs the oracle): " + why
        if self.reference is not None:
            why = _compare_full(self.reference, a, self.bound_dtype)
            if why:
                return False, f"mismatch vs the reference output ({self.reference[0]}): {why}"
        b = self._run(candidate, self._bundle(self.args))
        for name, x, y in _pairs(a, b):
            if not bitwise_equal(x, y):
                return False, f"non-repeatable: {name} differs bitwise between two runs on the same inputs"
        if self.reference is None:
            self.reference = (candidate.label, a.out, a.state_out)
        return True, ""

    def bytes_per_set(self) -> int:
        t = self._bundle(self.args)
        return sum(x.numel() * x.element_size() for x in _tensors(t))


def small_and_full_cases(spec, problem, rng, device, small_len: int):
    """(small case, full-case inputs) of one tuning run: a scan_testing.scan_case of batch 1 and
    L = min(L, small_len) (varlen: the first three of the full case's sequence lengths, each cut
    to small_len) for the oracle, and scan_inputs of the whole problem."""
    from mamba3_kernels.scan_testing import scan_case, scan_inputs
    from mamba3_kernels.spec import Problem
    if spec.varlen:
        lens = _split_lengths(problem.seqlen, problem.nseqs, rng)
        small_lens = [min(n, small_len) for n in lens[:3]]
        small = Problem(1, sum(small_lens), problem.nheads, problem.ngroups, len(small_lens))
        return (scan_case(spec, small, rng, device=device, lengths=small_lens),
                scan_inputs(spec, problem, rng, device=device, lengths=lens))
    small = Problem(1, min(problem.seqlen, small_len), problem.nheads, problem.ngroups, 1)
    return scan_case(spec, small, rng, device=device), scan_inputs(spec, problem, rng, device=device)


def _split_lengths(total: int, n: int, rng) -> list:
    """n sequence lengths summing to total (one of them empty when n > 2: varlen edge case)."""
    if n <= 1:
        return [total]
    cuts = sorted(rng.integers(0, total + 1, size=n - 1).tolist())
    lens = [b - a for a, b in zip([0] + cuts, cuts + [total])]
    if n > 2 and 0 not in lens:
        i = int(rng.integers(0, n))
        j = (i + 1) % n
        lens[j] += lens[i]
        lens[i] = 0
    return lens


register_harness("forward", ScanHarness)
