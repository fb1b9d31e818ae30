"""The definition: Mamba-3 scan as a float64 time loop (SPEC §2, §3, §5, §7).

`forward` runs the recurrence token by token; `step` is one token of it with states in and
out (decode, SPEC §5, angle wrapped). Both go through `_token`, so the decode step and the
scan cannot drift apart. Per token, per value head h (group g = h // (H/G)), rank r:

    theta_t  = wrap(theta_{t-1} + pi tanh(angles_t) DT_t)
    qh, kh   = Rot(theta_t)(Q + Q_bias), Rot(theta_t)(K + K_bias)      (bias before rotation)
    vt_r     = V_t * MIMO_V_r
    S_t      = alpha S_{t-1} + beta sum_r vt_{t-1,r} kh_{t-1,r}^T + gamma sum_r vt_{t,r} kh_{t,r}^T
    y_{t,r}  = S_t qh_{t,r} + D vt_{t,r};  out = output mode of y (common.apply_output)

Varlen runs every sequence of `cu_seqlens` on its own, with its own states. An empty
sequence returns its initial states (angle wrapped) or zeros, and no output rows.
"""
from __future__ import annotations

import numpy as np

from mamba3_kernels.spec import ScanSpec, States, resolve_step

from .common import angle_increment, apply_output, bias_rotate, discretize, skip_term, wrap_angle
from .inputs import canonical, prepare_scan


class Params:
    """Per-head parameters of a segment, heads-first: (H, R, N) biases, (H, R, P) projections."""

    def __init__(self, spec: ScanSpec, c: dict):
        self.spec = spec
        self.qb, self.kb = c["q_bias"], c["k_bias"]
        self.d = c["d"][:, None, None]          # (H, 1, 1)
        self.mv, self.mz, self.mo = c["mimo_v"], c["mimo_z"], c["mimo_out"]
        self.w = c["norm_weight"][:, None, :]   # (H, 1, P)


def _token(spec: ScanSpec, p: Params, st, q, k, v, z, adt, dt, trap, ang, tape=None):
    """One step of the recurrence for X rows. q, k (X, H, R, N) already per value head;
    v, z (X, H, P); adt, dt, trap (X, H); ang (X, H, A); st = (theta, S, kprev, vprev) with
    S (X, H, P, N) and kprev (X, H, R, N). Returns (out, y, new state)."""
    theta0, S0, kprev, vprev = st
    theta = wrap_angle(theta0 + angle_increment(ang, dt))
    qp, qh = bias_rotate(q, p.qb, theta[:, :, None, :], spec.pairing)
    kp, kh = bias_rotate(k, p.kb, theta[:, :, None, :], spec.pairing)
    alpha, beta, gamma, lam = discretize(adt, dt, trap, spec.lam_is_one)
    vt = v[:, :, None, :] * p.mv
    vtp = vprev[:, :, None, :] * p.mv
    S = (alpha[..., None, None] * S0
         + beta[..., None, None] * np.einsum("xhrp,xhrn->xhpn", vtp, kprev)
         + gamma[..., None, None] * np.einsum("xhrp,xhrn->xhpn", vt, kh))
    y = np.einsum("xhpn,xhrn->xhrp", S, qh) + skip_term(p.d, v[:, :, None, :], vt)
    out = apply_output(spec.output_mode, y, z, p.mz, p.mo, p.w, spec.norm_eps)
    if tape is not None:
        tape.append(dict(theta=theta, qp=qp, kp=kp, qh=qh, kh=kh, alpha=alpha, beta=beta,
                         gamma=gamma, lam=lam, vt=vt, vtp=vtp, kprev=kprev, S0=S0, S=S, y=y))
    return out, y, (theta, S, kh, v)


def _heads(q, H):
    """(X, ..., R, G, N) -> (X, ..., H, R, N): each value head reads its group."""
    G = q.shape[-2]
    gidx = np.arange(H) // (H // G)
    return np.swapaxes(q[..., gidx, :], -2, -3)


def zero_states(X, H, R, N, P, A):
    return (np.zeros((X, H, A)), np.zeros((X, H, P, N)), np.zeros((X, H, R, N)), np.zeros((X, H, P)))


def internal_states(st: States):
    """External (S, R, H, N) K layout -> internal heads-first (S, H, R, N)."""
    return (st.angle, st.ssm, np.swapaxes(st.k, 1, 2), st.v)


def external_states(st) -> States:
    theta, S, kh, v = st
    return States(theta, S, np.swapaxes(kh, 1, 2), v)


def forward_segment(spec: ScanSpec, p: Params, seg: dict, st0, tape=None):
    """Run X equal-length segments: seg arrays with leading (X, L); st0 internal states.
    Returns out (X, L, H, P) [or (X, L, R, H, P)] and the internal final states."""
    X, L, H, P = seg["v"].shape
    q, k = _heads(seg["q"], H), _heads(seg["k"], H)       # (X, L, H, R, N)
    st = (wrap_angle(st0[0]),) + tuple(st0[1:])
    outs = []
    for t in range(L):
        o, _, st = _token(spec, p, st, q[:, t], k[:, t], seg["v"][:, t],
                          None if seg["z"] is None else seg["z"][:, t], seg["adt"][:, :, t],
                          seg["dt"][:, :, t], seg["trap"][:, :, t], seg["angles"][:, t], tape)
        outs.append(o if spec.output_mode != "per_rank" else np.swapaxes(o, 1, 2))
    shape = (X, 0) + ((spec.rank,) if spec.output_mode == "per_rank" else ()) + (H, P)
    out = np.stack(outs, axis=1) if outs else np.zeros(shape)
    return out, st


def segments(spec: ScanSpec, problem, c: dict, cu=None):
    """Yield (slice over L, batch rows, segment dict, internal initial states) per segment."""
    H, R, N, P, A = problem.nheads, spec.rank, spec.d_state, spec.head_dim, spec.n_angles
    keys_L1 = ("q", "k", "v", "z", "angles")       # L on axis 1
    keys_L2 = ("adt", "dt", "trap")                # L on axis 2
    if not spec.varlen:
        st = internal_states(c["states"]) if c["states"] is not None else zero_states(problem.batch, H, R, N, P, A)
        yield slice(None), {k: c[k] for k in keys_L1 + keys_L2}, st, slice(None)
        return
    for i in range(problem.nseqs):
        sl = slice(int(cu[i]), int(cu[i + 1]))
        seg = {k: (None if c[k] is None else c[k][:, sl]) for k in keys_L1}
        seg.update({k: c[k][:, :, sl] for k in keys_L2})
        if c["states"] is not None:
            st = tuple(x[i:i + 1] for x in internal_states(c["states"]))
        else:
            st = zero_states(1, H, R, N, P, A)
        yield sl, seg, st, slice(i, i + 1)


def forward(q, k, v, adt, dt, trap, q_bias, k_bias, angles=None, d=None, z=None, mimo_v=None,
            mimo_z=None, mimo_out=None, norm_weight=None, initial_states=None, cu_seqlens=None, *,
            output_mode=None, pairing="interleaved", discretization="trapezoidal", norm_eps=1e-5,
            return_final_states=True):
    """The oracle forward. Returns (out, States) (final states always computed; angle wrapped,
    K as (S, R, H, N)), or out alone when return_final_states is False."""
    args = dict(q=q, k=k, v=v, adt=adt, dt=dt, trap=trap, q_bias=q_bias, k_bias=k_bias,
                angles=angles, d=d, z=z, mimo_v=mimo_v, mimo_z=mimo_z, mimo_out=mimo_out,
                norm_weight=norm_weight, initial_states=initial_states, cu_seqlens=cu_seqlens)
    spec, problem, c, cu = prepare_scan(args, output_mode=output_mode, pairing=pairing,
                                        discretization=discretization, norm_eps=norm_eps)
    p = Params(spec, c)
    out_parts, finals = [], []
    for sl, seg, st0, _ in segments(spec, problem, c, cu):
        o, st = forward_segment(spec, p, seg, st0)
        out_parts.append(o)
        finals.append(st)
    out = np.concatenate(out_parts, axis=1)
    if not return_final_states:
        return out
    fin = external_states(tuple(np.concatenate([f[i] for f in finals], axis=0) for i in range(4)))
    return out, fin


def step(q, k, v, adt, dt, trap, q_bias, k_bias, states, angles=None, d=None, z=None,
         mimo_v=None, mimo_z=None, mimo_out=None, norm_weight=None, state_indices=None, *,
         output_mode=None, pairing="interleaved", discretization="trapezoidal", norm_eps=1e-5):
    """One decode token per row (SPEC §5). Returns (out, new States); the inputs are not
    modified. With state_indices, row b reads and writes pool row state_indices[b]; a negative
    index is a padding slot: its output row is 0 and no state row is touched."""
    args = dict(q=q, k=k, v=v, adt=adt, dt=dt, trap=trap, q_bias=q_bias, k_bias=k_bias,
                states=states, angles=angles, d=d, z=z, mimo_v=mimo_v, mimo_z=mimo_z,
                mimo_out=mimo_out, norm_weight=norm_weight, state_indices=state_indices)
    spec, problem = resolve_step(**args, output_mode=output_mode, pairing=pairing,
                                 discretization=discretization, norm_eps=norm_eps,
                                 input_dtype="float64", state_dtype="float64")
    c = canonical(spec, problem, args, step=True)
    p = Params(spec, c)
    B, H = problem.batch, problem.nheads
    pool = internal_states(c["states"])
    if state_indices is None:
        rows = np.arange(B)
    else:
        rows = np.asarray(state_indices).astype(np.int64)
        if np.any(rows >= problem.nseqs):
            raise ValueError(f"state_indices: expected values < pool size {problem.nseqs}, "
                             f"got max {int(rows.max())}")
    live = rows >= 0
    r = rows[live]
    st = tuple(x[r] for x in pool)
    sel = lambda x: None if x is None else x[live]
    o, _, new = _token(spec, p, st, _heads(sel(c["q"]), H), _heads(sel(c["k"]), H), sel(c["v"]),
                       sel(c["z"]), sel(c["adt"]), sel(c["dt"]), sel(c["trap"]), sel(c["angles"]))
    out_shape = (B,) + o.shape[1:]
    out = np.zeros(out_shape)
    out[live] = o
    if spec.output_mode == "per_rank":
        out = np.swapaxes(out, 1, 2)       # (B, R, H, P)
    new_pool = [x.copy() for x in pool]
    for i in range(4):
        new_pool[i][r] = new[i]
    return out, external_states(tuple(new_pool))
