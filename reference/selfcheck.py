"""The oracle checking itself: independent formulations that must agree (float64).

For one (spec, problem) `self_check` compares
- the recurrent loop with the chunked form (several chunk sizes, L not a multiple of any);
- L decode steps with the forward (same states carried token by token);
- two halves with state passing with the whole sequence (dense specs);
- a varlen call with one call per sequence (varlen specs; empty sequences included);
- the adjoint with central finite differences along a random direction, per input.
`mamba3-kernels validate` prints it while no kernel covers a mode, and tests/test_mutants.py
shows that deliberately wrong oracles fail it.
"""
from __future__ import annotations

import numpy as np

from mamba3_kernels.spec import Problem, ScanSpec, States

from . import adjoint, chunked, recurrent
from .compare import Report, Row, angle_error, rel_l2, rel_max
from .inputs import random_scan_inputs, spec_options

EXACT = 1e-10     # two float64 formulations of the same math
FD_BOUND = 1e-6   # adjoint vs central differences


def _rows(case, got, ref, bound=EXACT):
    out_g, st_g = got
    out_r, st_r = ref
    rows = [Row(case, "out", rel_l2(out_g, out_r), rel_max(out_g, out_r), bound, bound)]
    for n, g, r in zip(("state.angle", "state.ssm", "state.k", "state.v"), st_g, st_r):
        if n == "state.angle":
            e = angle_error(g, r)
            rows.append(Row(case, n, e, e, bound, bound))
        else:
            rows.append(Row(case, n, rel_l2(g, r), rel_max(g, r), bound, bound))
    return rows


def _dense_view(a: dict, sl: slice, init) -> dict:
    b = dict(a)
    for n in ("q", "k", "v", "z", "angles"):
        if a[n] is not None:
            b[n] = a[n][:, sl]
    for n in ("adt", "dt", "trap"):
        if a[n] is not None:
            b[n] = a[n][:, :, sl]
    b["initial_states"] = init
    b["cu_seqlens"] = None
    return b


def check_chunked(spec, a, opts, ref, case, chunk_sizes=(1, 4, 16)):
    rows = []
    for C in chunk_sizes:
        rows += _rows(f"{case} chunked C={C}", chunked.forward_chunked(**a, **opts, chunk_size=C), ref)
    return rows


def check_decode(spec, problem, a, opts, ref, case):
    """Token-by-token reference.step from the initial (or zero) states."""
    B, L, H = problem.batch, problem.seqlen, problem.nheads
    R, N, P, A = spec.rank, spec.d_state, spec.head_dim, spec.n_angles
    st = a["initial_states"] or States(np.zeros((B, H, A)), np.zeros((B, H, P, N)),
                                       np.zeros((B, R, H, N)), np.zeros((B, H, P)))
    outs = []
    q5 = np.asarray(a["q"]).reshape(B, L, R, -1, N)
    k5 = np.asarray(a["k"]).reshape(B, L, R, -1, N)
    for t in range(L):
        o, st = recurrent.step(
            q5[:, t], k5[:, t], a["v"][:, t], a["adt"][:, :, t], a["dt"][:, :, t],
            None if a["trap"] is None else a["trap"][:, :, t], a["q_bias"], a["k_bias"], st,
            angles=None if a["angles"] is None else a["angles"][:, t], d=a["d"],
            z=None if a["z"] is None else a["z"][:, t], mimo_v=a["mimo_v"], mimo_z=a["mimo_z"],
            mimo_out=a["mimo_out"], norm_weight=a["norm_weight"], **opts)
        outs.append(o)
    return _rows(f"{case} {L} decode steps", (np.stack(outs, axis=1), st), ref)


def check_halves(spec, problem, a, opts, ref, case):
    L = problem.seqlen
    h = L // 2
    if h == 0:
        return []
    o1, f1 = recurrent.forward(**_dense_view(a, slice(0, h), a["initial_states"]), **opts)
    o2, f2 = recurrent.forward(**_dense_view(a, slice(h, L), f1), **opts)
    return _rows(f"{case} halves {h}+{L - h}", (np.concatenate([o1, o2], axis=1), f2), ref)


def check_varlen(spec, problem, a, opts, ref, case):
    cu = np.asarray(a["cu_seqlens"]).astype(np.int64)
    outs, fins = [], []
    for i in range(len(cu) - 1):
        sl = slice(int(cu[i]), int(cu[i + 1]))
        init = None if a["initial_states"] is None else States(*(x[i:i + 1] for x in a["initial_states"]))
        if sl.stop > sl.start:
            o, f = recurrent.forward(**_dense_view(a, sl, init), **opts)
        else:  # empty sequence: no rows, states pass through (angle wrapped)
            o = np.zeros((1, 0) + ref[0].shape[2:])
            f = init or recurrent.external_states(recurrent.zero_states(
                1, problem.nheads, spec.rank, spec.d_state, spec.head_dim, spec.n_angles))
            f = States(np.mod(f.angle, 2 * np.pi), f.ssm, f.k, f.v)
        outs.append(o)
        fins.append(f)
    fin = States(*(np.concatenate([f[i] for f in fins], axis=0) for i in range(4)))
    return _rows(f"{case} varlen vs per-sequence", (np.concatenate(outs, axis=1), fin), ref)


def check_adjoint(spec, a, opts, rng, case, eps=1e-4):
    """<grad, u> vs central differences along a random direction u per input, Richardson-
    extrapolated ((4 D(eps/2) - D(eps)) / 3, error O(eps^4)) so truncation stays below round-off."""
    out, fin = recurrent.forward(**a, **opts)
    dout = rng.standard_normal(out.shape)
    dfin = States(*(rng.standard_normal(np.shape(x)) for x in fin))

    def loss(b):
        o, f = recurrent.forward(**b, **opts)
        # the final angle is wrapped into [0, 2 pi): a shift that carries it across 0 jumps it by
        # 2 pi, a jump the derivative does not see; unwrap it next to the base point's first
        ang = fin.angle + np.remainder(f.angle - fin.angle + np.pi, 2 * np.pi) - np.pi
        f = States(ang, f.ssm, f.k, f.v)
        return float(np.sum(o * dout) + sum(np.sum(x * g) for x, g in zip(f, dfin)))

    g = adjoint.backward(dout, dfin, **a, **opts)
    # FD round-off is ~1e-16 |loss| / eps: relative errors are taken against at least 1e-4 |loss|
    floor = 1e-4 * abs(loss(a)) + 1e-12
    rows = []
    for name, x in a.items():
        if x is None or name == "cu_seqlens":
            continue
        parts = list(range(4)) if name == "initial_states" else [None]
        for i in parts:
            base = x[i] if i is not None else x
            grad = g[name][i] if i is not None else g[name]
            u = rng.standard_normal(np.shape(base))

            def shifted(s):
                b = dict(a)
                if i is None:
                    b[name] = base + s * u
                else:
                    st = list(x)
                    st[i] = base + s * u
                    b[name] = States(*st)
                return b
            d1 = (loss(shifted(eps)) - loss(shifted(-eps))) / (2 * eps)
            d2 = (loss(shifted(eps / 2)) - loss(shifted(-eps / 2))) / eps
            fd = (4 * d2 - d1) / 3
            an = float(np.sum(grad * u))
            err = abs(fd - an) / max(abs(fd), abs(an), floor)
            label = name if i is None else f"{name}.{States._fields[i]}"
            rows.append(Row(f"{case} adjoint vs FD", f"d{label}", err, err, FD_BOUND, FD_BOUND))
    return rows


def self_check(spec: ScanSpec, problem: Problem, rng: np.random.Generator, lengths=None,
               adjoint_check: bool = True) -> Report:
    """All the consistency checks of the module docstring for one (spec, problem)."""
    a = random_scan_inputs(spec, problem, rng, lengths=lengths)
    opts = spec_options(spec)
    case = f"R{spec.rank} {spec.output_mode} {spec.pairing[:4]} {spec.discretization[:4]} L{problem.seqlen}"
    ref = recurrent.forward(**a, **opts)
    rep = Report(check_chunked(spec, a, opts, ref, case))
    if spec.varlen:
        rep.extend(check_varlen(spec, problem, a, opts, ref, case))
    else:
        rep.extend(check_decode(spec, problem, a, opts, ref, case))
        rep.extend(check_halves(spec, problem, a, opts, ref, case))
    if adjoint_check:
        rep.extend(check_adjoint(spec, a, opts, rng, case))
    return rep
