"""What a Mamba-3 scan computes (ScanSpec) and how big it is (Problem), plus shape validation.

Pure Python: no torch, no numpy. The NumPy oracle and the torch API both validate their
arguments here, so the two accept exactly the same inputs and fail with the same messages.

Layout of every tensor (canonical form; SPEC §1, §6). S = number of sequences (B, or
len(cu_seqlens) - 1 with varlen, where B must be 1):

    q, k              (B, L, R, G, N)   the SISO short form (B, L, G, N) is accepted when R = 1
    v, z              (B, L, H, P)
    adt, dt, trap     (B, H, L)         trap is raw (pre-sigmoid); ignored (may be None) for euler
    q_bias, k_bias    (H, R, N)         or (H, N) when R = 1
    angles            (B, L, H, A)      per head, or (B, L, A) shared by all heads; raw rates
    d                 (H,)
    mimo_v, mimo_z, mimo_out (H, R, P)  each optional: absent means ones
    norm_weight       (H, P)            fused pre-gate RMSNorm (output_mode "norm_reduce")
    states            angle (S, H, A), ssm (S, H, P, N), k (S, R, H, N) [or (S, H, N) when R = 1],
                      v (S, H, P)
    cu_seqlens        (S + 1,) int, 0 = c_0 <= c_1 <= ... <= c_S = L
    out               (B, L, H, P), or (B, L, R, H, P) for output_mode "per_rank"

The decode step (one token) drops the L axis: q, k (B, R, G, N); v, z (B, H, P); adt, dt, trap
(B, H); angles (B, H, A) or (B, A); states with a leading pool axis M (= B unless
state_indices is given).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping, NamedTuple, Optional, Sequence

PAIRINGS = ("interleaved", "half")
DISCRETIZATIONS = ("trapezoidal", "euler")
OUTPUT_MODES = ("reduce", "per_rank", "norm_reduce")
DTYPES = ("float64", "float32", "bfloat16", "float16")
STATE_NAMES = ("angle", "ssm", "k", "v")


def bad_arg(arg: str, expected: Any, actual: Any) -> ValueError:
    """The one error format of the package: which argument, what was expected, what came."""
    return ValueError(f"{arg}: expected {expected}, got {actual}")


class States(NamedTuple):
    """The four recurrent states of a Mamba-3 layer (SPEC §2 'Final states')."""
    angle: Any  # (S, H, A)
    ssm: Any    # (S, H, P, N)
    k: Any      # (S, R, H, N)
    v: Any      # (S, H, P)


@dataclasses.dataclass(frozen=True)
class ScanSpec:
    """Everything that changes generated code. Frozen and hashable: a cache and dispatch key."""
    d_state: int                       # N (= headdim_qk)
    head_dim: int                      # P (= headdim_v)
    rank: int = 1                      # R, 1 = SISO
    n_angles: int = 0                  # A in [0, N/2]
    pairing: str = "interleaved"       # "interleaved" (2j, 2j+1) | "half" (j, j + N/2)
    discretization: str = "trapezoidal"  # "trapezoidal" | "euler" (lam = 1: Mamba-2's step)
    has_d: bool = False
    has_z: bool = False
    has_mimo_v: bool = False
    has_mimo_z: bool = False
    has_mimo_out: bool = False
    output_mode: str = "reduce"        # "reduce" | "per_rank" | "norm_reduce"
    norm_eps: float = 1e-5
    initial_states: bool = False
    final_states: bool = False
    varlen: bool = False
    shared_angles: bool = False        # angles (B, L, A) shared by all heads
    input_dtype: str = "bfloat16"
    state_dtype: str = "float32"
    chunk_size: int = 64

    def __post_init__(self):
        def need(ok, field, expected, actual):
            if not ok:
                raise bad_arg(f"ScanSpec.{field}", expected, actual)
        for f in ("d_state", "head_dim", "rank", "n_angles", "chunk_size"):
            v = getattr(self, f)
            need(isinstance(v, int) and not isinstance(v, bool), f, "an int", repr(v))
        for f in ("has_d", "has_z", "has_mimo_v", "has_mimo_z", "has_mimo_out",
                  "initial_states", "final_states", "varlen", "shared_angles"):
            need(isinstance(getattr(self, f), bool), f, "a bool", repr(getattr(self, f)))
        need(self.d_state >= 2 and self.d_state % 2 == 0, "d_state", "an even N >= 2", self.d_state)
        need(self.head_dim >= 1, "head_dim", "P >= 1", self.head_dim)
        need(self.rank >= 1, "rank", "R >= 1", self.rank)
        need(0 <= self.n_angles <= self.d_state // 2, "n_angles",
             f"A in [0, N/2] = [0, {self.d_state // 2}]", self.n_angles)
        need(self.pairing in PAIRINGS, "pairing", f"one of {PAIRINGS}", repr(self.pairing))
        need(self.discretization in DISCRETIZATIONS, "discretization",
             f"one of {DISCRETIZATIONS}", repr(self.discretization))
        need(self.output_mode in OUTPUT_MODES, "output_mode", f"one of {OUTPUT_MODES}",
             repr(self.output_mode))
        need(not (self.output_mode == "per_rank" and self.has_mimo_out), "has_mimo_out",
             "False with output_mode 'per_rank' (MIMO_Out would be unused)", True)
        need(not self.has_mimo_z or self.has_z, "has_mimo_z", "False when has_z is False", True)
        need(isinstance(self.norm_eps, float) and self.norm_eps > 0, "norm_eps", "a float > 0",
             repr(self.norm_eps))
        need(not self.shared_angles or self.n_angles > 0, "shared_angles",
             "False when n_angles == 0", True)
        need(self.input_dtype in DTYPES, "input_dtype", f"one of {DTYPES}", repr(self.input_dtype))
        need(self.state_dtype in DTYPES, "state_dtype", f"one of {DTYPES}", repr(self.state_dtype))
        c = self.chunk_size
        need(1 <= c <= 1024 and c & (c - 1) == 0, "chunk_size", "a power of two in [1, 1024]", c)

    @property
    def is_mimo(self) -> bool:
        return self.rank > 1

    @property
    def lam_is_one(self) -> bool:
        return self.discretization == "euler"

    def replace(self, **kw) -> "ScanSpec":
        return dataclasses.replace(self, **kw)

    def describe(self) -> str:
        """The spec in words, one sentence per aspect."""
        kind = f"MIMO rank {self.rank}" if self.is_mimo else "SISO"
        rope = ("no rotary angles" if self.n_angles == 0 else
                f"{self.n_angles} rotary angle(s) {'shared by all heads' if self.shared_angles else 'per head'}"
                f", {self.pairing} pairing")
        step = ("exponential-trapezoidal step (lam = sigmoid(trap))" if self.discretization == "trapezoidal"
                else "Euler step (lam = 1, Mamba-2 SSD)")
        proj = [n for n, on in (("MIMO_V", self.has_mimo_v), ("MIMO_Z", self.has_mimo_z),
                                ("MIMO_Out", self.has_mimo_out)) if on]
        out = {"reduce": "output reduced over ranks" + (" with MIMO_Out" if self.has_mimo_out else ""),
               "per_rank": "one output per rank",
               "norm_reduce": f"fused pre-gate RMSNorm (eps {self.norm_eps}) then reduced over ranks"}[self.output_mode]
        states = []
        if self.initial_states:
            states.append("initial states in")
        if self.final_states:
            states.append("final states out")
        parts = [
            f"{kind} Mamba-3 scan, N={self.d_state} (state), P={self.head_dim} (head dim)",
            rope, step,
            ("skip D" if self.has_d else "no D") + ", " + ("gate silu(Z)" if self.has_z else "no Z gate"),
            ("projections " + ", ".join(proj)) if proj else "no MIMO projections (ones)",
            out,
            ", ".join(states) if states else "zero initial states, no final states",
            "varlen (packed, cu_seqlens)" if self.varlen else "dense batch",
            f"inputs {self.input_dtype}, state {self.state_dtype}, chunk {self.chunk_size}",
        ]
        return "; ".join(parts) + "."


@dataclasses.dataclass(frozen=True)
class Problem:
    """Sizes that change only grids and tuning, never the generated code."""
    batch: int        # B
    seqlen: int       # L (packed total with varlen)
    nheads: int       # H
    ngroups: int      # G (Q/K heads)
    nseqs: int        # S

    def __post_init__(self):
        for f in ("batch", "seqlen", "nheads", "ngroups", "nseqs"):
            v = getattr(self, f)
            if not isinstance(v, int) or isinstance(v, bool) or v < 0:
                raise bad_arg(f"Problem.{f}", "an int >= 0", repr(v))
        if self.batch < 1 or self.nheads < 1 or self.ngroups < 1:
            raise bad_arg("Problem", "batch, nheads, ngroups >= 1",
                          (self.batch, self.nheads, self.ngroups))
        if self.nheads % self.ngroups:
            raise bad_arg("ngroups", f"a divisor of nheads H={self.nheads} (H % G == 0)", self.ngroups)

    def describe(self) -> str:
        return (f"B={self.batch} L={self.seqlen} H={self.nheads} G={self.ngroups} "
                f"sequences={self.nseqs}")


# ----------------------------------------------------------------------------------------
# shape resolution, shared by the oracle (numpy) and the API (torch)

def _shape(x) -> tuple:
    return tuple(int(s) for s in x.shape)


def dtype_name(x) -> str:
    s = str(x.dtype)
    return s.replace("torch.", "")


def _check_shape(name: str, x, expected: Sequence[int], alt: Optional[Sequence[int]] = None):
    got = _shape(x)
    if got == tuple(expected) or (alt is not None and got == tuple(alt)):
        return
    exp = str(tuple(expected)) + (f" or {tuple(alt)}" if alt is not None else "")
    raise bad_arg(name, f"shape {exp}", f"shape {got}")


def _ndim_check(name, x, allowed: Sequence[int], meaning: str):
    if not hasattr(x, "shape"):
        raise bad_arg(name, "an array/tensor", type(x).__name__)
    if len(x.shape) not in allowed:
        raise bad_arg(name, f"{' or '.join(str(a) for a in allowed)} dims {meaning}",
                      f"{len(x.shape)} dims, shape {_shape(x)}")


def check_cu_seqlens(values: Sequence[int], total_len: int, arg: str = "cu_seqlens") -> None:
    """0 = c_0 <= c_1 <= ... <= c_S = total_len (empty sequences allowed)."""
    vals = [int(v) for v in values]
    if len(vals) < 2:
        raise bad_arg(arg, "length S + 1 >= 2", len(vals))
    if vals[0] != 0:
        raise bad_arg(f"{arg}[0]", "0", vals[0])
    for i in range(1, len(vals)):
        if vals[i] < vals[i - 1]:
            raise bad_arg(arg, "non-decreasing values",
                          f"cu_seqlens[{i}]={vals[i]} < cu_seqlens[{i - 1}]={vals[i - 1]}")
    if vals[-1] != total_len:
        raise bad_arg(f"{arg}[-1]", f"the total length L={total_len}", vals[-1])


def _infer_output_mode(rank, mimo_out, norm_weight, output_mode):
    if output_mode is not None:
        return output_mode
    if norm_weight is not None:
        return "norm_reduce"
    if rank > 1 and mimo_out is None:
        return "per_rank"
    return "reduce"


def resolve_scan(q, k, v, adt, dt, trap, q_bias, k_bias, angles=None, d=None, z=None,
                 mimo_v=None, mimo_z=None, mimo_out=None, norm_weight=None,
                 initial_states=None, cu_seqlens=None, *, output_mode=None,
                 pairing="interleaved", discretization="trapezoidal", final_states=False,
                 norm_eps=1e-5, chunk_size=64, input_dtype=None, state_dtype="float32",
                 cu_seqlens_values: Optional[Sequence[int]] = None) -> tuple[ScanSpec, Problem]:
    """Validate the chunked-scan arguments and return the (ScanSpec, Problem) they describe.

    `cu_seqlens_values`: the host copy of cu_seqlens (the caller makes it; checked here).
    Output mode when not given: "norm_reduce" if norm_weight, else "per_rank" if R > 1 and no
    mimo_out, else "reduce".
    """
    _ndim_check("v", v, (4,), "(B, L, H, P)")
    B, L, H, P = _shape(v)
    _ndim_check("q", q, (4, 5), "(B, L, R, G, N) or (B, L, G, N)")
    if len(q.shape) == 5:
        R, G, N = _shape(q)[2:]
    else:
        R = 1
        G, N = _shape(q)[2:]
    qexp = (B, L, R, G, N)
    _check_shape("q", q, qexp, (B, L, G, N) if R == 1 else None)
    if N % 2:
        raise bad_arg("q", "an even state size N (last dim)", N)
    if H % G:
        raise bad_arg("q", f"a group count G dividing H={H} (H % G == 0)", f"G={G}")
    _check_shape("k", k, qexp, (B, L, G, N) if R == 1 else None)
    for name, x in (("adt", adt), ("dt", dt)):
        _ndim_check(name, x, (3,), "(B, H, L)")
        _check_shape(name, x, (B, H, L))
    if trap is not None:
        _ndim_check("trap", trap, (3,), "(B, H, L)")
        _check_shape("trap", trap, (B, H, L))
    elif discretization != "euler":
        raise bad_arg("trap", "a (B, H, L) tensor for the trapezoidal step", None)
    for name, x in (("q_bias", q_bias), ("k_bias", k_bias)):
        _ndim_check(name, x, (2, 3), "(H, R, N) or (H, N)")
        _check_shape(name, x, (H, R, N), (H, N) if R == 1 else None)
    shared = False
    A = 0
    if angles is not None:
        _ndim_check("angles", angles, (3, 4), "(B, L, H, A) or shared (B, L, A)")
        shared = len(angles.shape) == 3
        A = _shape(angles)[-1]
        _check_shape("angles", angles, (B, L, A) if shared else (B, L, H, A))
        if A > N // 2:
            raise bad_arg("angles", f"A <= N/2 = {N // 2} angles (last dim)", A)
        if A == 0:
            shared = False
    if d is not None:
        _check_shape("d", d, (H,))
    if z is not None:
        _check_shape("z", z, (B, L, H, P))
    for name, x in (("mimo_v", mimo_v), ("mimo_z", mimo_z), ("mimo_out", mimo_out)):
        if x is not None:
            _check_shape(name, x, (H, R, P))
    if mimo_z is not None and z is None:
        raise bad_arg("mimo_z", "None when z is None (it scales z)", "a tensor")
    mode = _infer_output_mode(R, mimo_out, norm_weight, output_mode)
    if mode == "norm_reduce":
        if norm_weight is None:
            raise bad_arg("norm_weight", "an (H, P) tensor with output_mode 'norm_reduce'", None)
        _check_shape("norm_weight", norm_weight, (H, P), (H * P,))
    elif norm_weight is not None:
        raise bad_arg("norm_weight", f"None with output_mode {mode!r}", "a tensor")
    if mode == "per_rank" and mimo_out is not None:
        raise bad_arg("mimo_out", "None with output_mode 'per_rank'", "a tensor")
    varlen = cu_seqlens is not None
    if varlen:
        _ndim_check("cu_seqlens", cu_seqlens, (1,), "(S + 1,)")
        if B != 1:
            raise bad_arg("v", "batch B = 1 with cu_seqlens (sequences packed along L)", f"B={B}")
        S = _shape(cu_seqlens)[0] - 1
        if S < 1:
            raise bad_arg("cu_seqlens", "length S + 1 >= 2", S + 1)
        if cu_seqlens_values is not None:
            check_cu_seqlens(cu_seqlens_values, L)
    else:
        S = B
        if L < 1:
            raise bad_arg("v", "sequence length L >= 1", L)
    if initial_states is not None:
        check_states("initial_states", initial_states, S, H, R, N, P, A)
    spec = ScanSpec(
        d_state=N, head_dim=P, rank=R, n_angles=A, pairing=pairing, discretization=discretization,
        has_d=d is not None, has_z=z is not None, has_mimo_v=mimo_v is not None,
        has_mimo_z=mimo_z is not None, has_mimo_out=mimo_out is not None, output_mode=mode,
        norm_eps=float(norm_eps), initial_states=initial_states is not None,
        final_states=bool(final_states), varlen=varlen, shared_angles=shared,
        input_dtype=input_dtype or dtype_name(v), state_dtype=state_dtype, chunk_size=chunk_size)
    return spec, Problem(batch=B, seqlen=L, nheads=H, ngroups=G, nseqs=S)


def check_states(arg: str, states, S: int, H: int, R: int, N: int, P: int, A: int) -> None:
    """Check a (angle, ssm, k, v) tuple against the sizes; S is the leading (sequence/pool) size."""
    if not isinstance(states, (tuple, list)) or len(states) != 4:
        raise bad_arg(arg, "a 4-tuple (angle, ssm, k, v)",
                      f"{type(states).__name__} of length {len(states) if hasattr(states, '__len__') else '?'}")
    ang, ssm, kst, vst = states
    for n, x in zip(STATE_NAMES, states):
        if x is None:
            raise bad_arg(f"{arg}.{n}", "a tensor (all four states or none)", None)
    _check_shape(f"{arg}.angle", ang, (S, H, A))
    _check_shape(f"{arg}.ssm", ssm, (S, H, P, N))
    _check_shape(f"{arg}.k", kst, (S, R, H, N), (S, H, N) if R == 1 else None)
    _check_shape(f"{arg}.v", vst, (S, H, P))


def resolve_step(q, k, v, adt, dt, trap, q_bias, k_bias, states, angles=None, d=None, z=None,
                 mimo_v=None, mimo_z=None, mimo_out=None, norm_weight=None, state_indices=None, *,
                 output_mode=None, pairing="interleaved", discretization="trapezoidal",
                 norm_eps=1e-5, input_dtype=None, state_dtype=None) -> tuple[ScanSpec, Problem]:
    """Validate the decode-step arguments (one token per sequence, SPEC §5).

    Returns (spec, problem) with problem.seqlen = 1 and problem.nseqs = the state pool size M.
    """
    _ndim_check("v", v, (3,), "(B, H, P)")
    B, H, P = _shape(v)
    _ndim_check("q", q, (3, 4), "(B, R, G, N) or (B, G, N)")
    if len(q.shape) == 4:
        R, G, N = _shape(q)[1:]
    else:
        R = 1
        G, N = _shape(q)[1:]
    _check_shape("q", q, (B, R, G, N), (B, G, N) if R == 1 else None)
    if N % 2:
        raise bad_arg("q", "an even state size N (last dim)", N)
    if H % G:
        raise bad_arg("q", f"a group count G dividing H={H} (H % G == 0)", f"G={G}")
    _check_shape("k", k, (B, R, G, N), (B, G, N) if R == 1 else None)
    for name, x in (("adt", adt), ("dt", dt)):
        _check_shape(name, x, (B, H))
    if trap is not None:
        _check_shape("trap", trap, (B, H))
    elif discretization != "euler":
        raise bad_arg("trap", "a (B, H) tensor for the trapezoidal step", None)
    for name, x in (("q_bias", q_bias), ("k_bias", k_bias)):
        _check_shape(name, x, (H, R, N), (H, N) if R == 1 else None)
    A = 0
    shared = False
    if angles is not None:
        _ndim_check("angles", angles, (2, 3), "(B, H, A) or shared (B, A)")
        shared = len(angles.shape) == 2
        A = _shape(angles)[-1]
        _check_shape("angles", angles, (B, A) if shared else (B, H, A))
        if A > N // 2:
            raise bad_arg("angles", f"A <= N/2 = {N // 2} angles (last dim)", A)
        if A == 0:
            shared = False
    if d is not None:
        _check_shape("d", d, (H,))
    if z is not None:
        _check_shape("z", z, (B, H, P))
    for name, x in (("mimo_v", mimo_v), ("mimo_z", mimo_z), ("mimo_out", mimo_out)):
        if x is not None:
            _check_shape(name, x, (H, R, P))
    if mimo_z is not None and z is None:
        raise bad_arg("mimo_z", "None when z is None (it scales z)", "a tensor")
    mode = _infer_output_mode(R, mimo_out, norm_weight, output_mode)
    if mode == "norm_reduce":
        if norm_weight is None:
            raise bad_arg("norm_weight", "an (H, P) tensor with output_mode 'norm_reduce'", None)
        _check_shape("norm_weight", norm_weight, (H, P), (H * P,))
    elif norm_weight is not None:
        raise bad_arg("norm_weight", f"None with output_mode {mode!r}", "a tensor")
    if mode == "per_rank" and mimo_out is not None:
        raise bad_arg("mimo_out", "None with output_mode 'per_rank'", "a tensor")
    if states is None:
        raise bad_arg("states", "a 4-tuple (angle, ssm, k, v): the step needs its states", None)
    if not isinstance(states, (tuple, list)) or len(states) != 4 or any(s is None for s in states):
        raise bad_arg("states", "a 4-tuple (angle, ssm, k, v) of tensors", repr(type(states)))
    M = _shape(states[1])[0] if len(states[1].shape) == 4 else -1
    if state_indices is not None:
        _check_shape("state_indices", state_indices, (B,))
    else:
        M = B
    check_states("states", states, M, H, R, N, P, A)
    spec = ScanSpec(
        d_state=N, head_dim=P, rank=R, n_angles=A, pairing=pairing, discretization=discretization,
        has_d=d is not None, has_z=z is not None, has_mimo_v=mimo_v is not None,
        has_mimo_z=mimo_z is not None, has_mimo_out=mimo_out is not None, output_mode=mode,
        norm_eps=float(norm_eps), initial_states=True, final_states=True, varlen=False,
        shared_angles=shared, input_dtype=input_dtype or dtype_name(v),
        state_dtype=state_dtype or dtype_name(states[1]), chunk_size=1)
    return spec, Problem(batch=B, seqlen=1, nheads=H, ngroups=G, nseqs=M)


def output_shape(spec: ScanSpec, problem: Problem) -> tuple:
    B, L, H, P = problem.batch, problem.seqlen, problem.nheads, spec.head_dim
    if spec.output_mode == "per_rank":
        return (B, L, spec.rank, H, P)
    return (B, L, H, P)


def spec_grid(small: bool = True) -> list[ScanSpec]:
    """A small grid of specs covering every option once or more (for `validate`)."""
    base = dict(d_state=8, head_dim=6, input_dtype="float64")
    out = [
        ScanSpec(**base),
        ScanSpec(**base, n_angles=2, has_d=True, has_z=True, initial_states=True, final_states=True),
        ScanSpec(**base, n_angles=4, pairing="half", discretization="euler", has_d=True),
        ScanSpec(**base, rank=2, n_angles=3, pairing="half", has_d=True, has_z=True, has_mimo_v=True,
                 has_mimo_z=True, has_mimo_out=True, final_states=True, initial_states=True),
        ScanSpec(**base, rank=3, n_angles=2, has_z=True, has_mimo_v=True, output_mode="per_rank",
                 shared_angles=True),
        ScanSpec(**base, rank=2, n_angles=2, has_z=True, has_mimo_v=True, has_mimo_z=True,
                 has_mimo_out=True, output_mode="norm_reduce", has_d=True, final_states=True),
        ScanSpec(**base, n_angles=2, varlen=True, initial_states=True, final_states=True, has_d=True),
    ]
    return out


def ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def next_pow2(x: int) -> int:
    return 1 if x <= 1 else 1 << math.ceil(math.log2(x))


def as_mapping(obj) -> Mapping:
    return obj if isinstance(obj, Mapping) else dataclasses.asdict(obj)
