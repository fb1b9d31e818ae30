"""Argument handling for the oracle: canonical float64 views and random test inputs.

`canonical` turns user arguments (any array-likes, SISO short forms allowed) into float64
arrays of the canonical layout of mamba3_kernels/spec.py, filling absent projections with
ones. `random_scan_inputs` / `random_step_inputs` draw realistic, never-zero inputs for a
(spec, problem): fresh values on every call, as the project's correctness rules ask.
"""
from __future__ import annotations

import numpy as np

from mamba3_kernels.spec import Problem, ScanSpec, States

SCAN_ARGS = ("q", "k", "v", "adt", "dt", "trap", "q_bias", "k_bias", "angles", "d", "z",
             "mimo_v", "mimo_z", "mimo_out", "norm_weight", "initial_states", "cu_seqlens")
STEP_ARGS = ("q", "k", "v", "adt", "dt", "trap", "q_bias", "k_bias", "states", "angles", "d", "z",
             "mimo_v", "mimo_z", "mimo_out", "norm_weight", "state_indices")


def f64(x):
    return None if x is None else np.asarray(x, dtype=np.float64)


def spec_options(spec: ScanSpec) -> dict:
    """The keyword options that, with the tensors, reproduce `spec` through resolve_scan."""
    return dict(output_mode=spec.output_mode, pairing=spec.pairing,
                discretization=spec.discretization, norm_eps=spec.norm_eps)


def canonical(spec: ScanSpec, problem: Problem, a: dict, step: bool = False) -> dict:
    """float64 arrays in canonical layout; heads-first per-token layouts are left to the callers."""
    R, H, P, N, A = spec.rank, problem.nheads, spec.head_dim, spec.d_state, spec.n_angles
    c = {}
    qshape = (problem.batch, R, problem.ngroups, N) if step else \
        (problem.batch, problem.seqlen, R, problem.ngroups, N)
    c["q"] = f64(a["q"]).reshape(qshape)
    c["k"] = f64(a["k"]).reshape(qshape)
    c["v"] = f64(a["v"])
    c["adt"], c["dt"] = f64(a["adt"]), f64(a["dt"])
    c["trap"] = f64(a.get("trap")) if a.get("trap") is not None else np.zeros_like(c["dt"])
    c["q_bias"] = f64(a["q_bias"]).reshape(H, R, N)
    c["k_bias"] = f64(a["k_bias"]).reshape(H, R, N)
    ang = a.get("angles")
    if ang is None:
        lead = c["v"].shape[:-1]
        c["angles"] = np.zeros(lead + (0,))
    else:
        ang = f64(ang)
        if spec.shared_angles:  # (B, [L,] A) -> broadcast over heads
            ang = np.broadcast_to(ang[..., None, :], ang.shape[:-1] + (H, A))
        c["angles"] = ang
    c["d"] = f64(a.get("d")) if a.get("d") is not None else np.zeros(H)
    c["z"] = f64(a.get("z"))
    for n in ("mimo_v", "mimo_z", "mimo_out"):
        c[n] = f64(a.get(n)) if a.get(n) is not None else np.ones((H, R, P))
    nw = a.get("norm_weight")
    c["norm_weight"] = f64(nw).reshape(H, P) if nw is not None else np.ones((H, P))
    st = a.get("initial_states") if not step else a.get("states")
    if st is not None:
        S = f64(st[1]).shape[0]
        c["states"] = States(f64(st[0]), f64(st[1]), f64(st[2]).reshape(S, R, H, N), f64(st[3]))
    else:
        c["states"] = None
    return c


# ----------------------------------------------------------------------------------------
# random inputs

def _dt(rng, shape, lo=1e-2, hi=0.5):
    return np.exp(rng.uniform(np.log(lo), np.log(hi), size=shape))


def random_scan_inputs(spec: ScanSpec, problem: Problem, rng: np.random.Generator,
                       lengths=None, short_forms: bool = False) -> dict:
    """Random arguments for the chunked scan. With spec.varlen, `lengths` gives the sequences
    (default: S random lengths summing to problem.seqlen). Values are O(1), DT in [0.01, 0.5],
    ADT = -U[0.2, 3] DT, raw trap ~ N(0, 1.5), raw angles ~ N(0, 1): angles wrap within a few steps.
    """
    B, L, H, G = problem.batch, problem.seqlen, problem.nheads, problem.ngroups
    R, N, P, A = spec.rank, spec.d_state, spec.head_dim, spec.n_angles
    S = problem.nseqs
    a = {}
    qshape = (B, L, G, N) if (short_forms and R == 1) else (B, L, R, G, N)
    a["q"] = rng.standard_normal(qshape)
    a["k"] = rng.standard_normal(qshape)
    a["v"] = rng.standard_normal((B, L, H, P))
    dt = _dt(rng, (B, H, L))
    a["dt"] = dt
    a["adt"] = -rng.uniform(0.2, 3.0, size=(B, H, L)) * dt
    a["trap"] = 1.5 * rng.standard_normal((B, H, L)) if spec.discretization == "trapezoidal" else None
    bshape = (H, N) if (short_forms and R == 1) else (H, R, N)
    a["q_bias"] = 0.5 * rng.standard_normal(bshape)
    a["k_bias"] = 0.5 * rng.standard_normal(bshape)
    if A:
        a["angles"] = rng.standard_normal((B, L, A) if spec.shared_angles else (B, L, H, A))
    else:
        a["angles"] = None
    a["d"] = rng.standard_normal(H) if spec.has_d else None
    a["z"] = rng.standard_normal((B, L, H, P)) if spec.has_z else None
    a["mimo_v"] = (1 + 0.5 * rng.standard_normal((H, R, P))) if spec.has_mimo_v else None
    a["mimo_z"] = (1 + 0.5 * rng.standard_normal((H, R, P))) if spec.has_mimo_z else None
    a["mimo_out"] = rng.standard_normal((H, R, P)) / R if spec.has_mimo_out else None
    a["norm_weight"] = (1 + 0.3 * rng.standard_normal((H, P))) if spec.output_mode == "norm_reduce" else None
    a["initial_states"] = random_states(rng, S, H, R, N, P, A, short_forms) if spec.initial_states else None
    if spec.varlen:
        if lengths is None:
            cuts = np.sort(rng.integers(0, L + 1, size=S - 1))
            lengths = np.diff(np.concatenate([[0], cuts, [L]]))
        lengths = np.asarray(lengths, dtype=np.int64)
        assert lengths.sum() == L and len(lengths) == S, "lengths must sum to L, one per sequence"
        a["cu_seqlens"] = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
    else:
        a["cu_seqlens"] = None
    return a


def random_states(rng, S, H, R, N, P, A, short_forms=False):
    kshape = (S, H, N) if (short_forms and R == 1) else (S, R, H, N)
    return States(rng.uniform(0, 2 * np.pi, size=(S, H, A)), 0.5 * rng.standard_normal((S, H, P, N)),
                  rng.standard_normal(kshape), rng.standard_normal((S, H, P)))


def random_step_inputs(spec: ScanSpec, problem: Problem, rng: np.random.Generator,
                       pool: int = None) -> dict:
    """Random arguments for one decode step; `pool` > B draws a state pool and state_indices
    (one of them -1, a padding slot, when B > 1)."""
    B, H, G = problem.batch, problem.nheads, problem.ngroups
    R, N, P, A = spec.rank, spec.d_state, spec.head_dim, spec.n_angles
    one = random_scan_inputs(spec.replace(varlen=False, initial_states=False),
                             Problem(B, 1, H, G, B), rng)
    a = {n: (None if one[n] is None else one[n]) for n in ("q_bias", "k_bias", "d", "mimo_v", "mimo_z",
                                                             "mimo_out", "norm_weight")}
    a["q"], a["k"] = one["q"][:, 0], one["k"][:, 0]
    a["v"] = one["v"][:, 0]
    a["z"] = None if one["z"] is None else one["z"][:, 0]
    for n in ("adt", "dt"):
        a[n] = one[n][:, :, 0]
    a["trap"] = None if one["trap"] is None else one["trap"][:, :, 0]
    if A:
        a["angles"] = one["angles"][:, 0]
    else:
        a["angles"] = None
    M = pool or B
    a["states"] = random_states(rng, M, H, R, N, P, A)
    if pool:
        idx = rng.permutation(M)[:B].astype(np.int32)
        if B > 1:
            idx[rng.integers(B)] = -1
        a["state_indices"] = idx
    else:
        a["state_indices"] = None
    return a


def prepare_scan(args: dict, *, output_mode=None, pairing="interleaved", discretization="trapezoidal",
                 norm_eps=1e-5, chunk_size=64):
    """The oracle entry points' common prologue: validate `args` (the forward's tensor
    arguments by name), then return (spec, problem, canonical float64 arrays, host cu_seqlens)."""
    from mamba3_kernels.spec import resolve_scan
    cu = None if args.get("cu_seqlens") is None else np.asarray(args["cu_seqlens"]).astype(np.int64)
    spec, problem = resolve_scan(**args, output_mode=output_mode, pairing=pairing,
                                 discretization=discretization, norm_eps=norm_eps, chunk_size=chunk_size,
                                 input_dtype="float64", cu_seqlens_values=cu)
    return spec, problem, canonical(spec, problem, args), cu
