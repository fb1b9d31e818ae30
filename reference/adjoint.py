"""Every gradient of the scan by the reverse-time adjoint loop (SPEC §9.1), float64.

`backward(dout, dfinal, **forward arguments)` returns the gradient of
    loss = <dout, out> + <dfinal.angle, theta_final> + <dfinal.ssm, S_final>
           + <dfinal.k, K_final> + <dfinal.v, V_final>
with respect to every tensor input (the mod 2 pi of the angles has derivative 1). It re-runs
the recurrent forward with a tape, then walks time backwards. Per token t (rank sums implied):

    Hb += dy_t qh_t^T                         (Hb = dL/dS_t)
    dqh_t = S_t^T dy_t;   dvt_t = D dy_t + gamma Hb kh_t;   dkh_t += gamma Hb^T vt_t
    dgamma = vt_t^T Hb kh_t;  dbeta = vt_{t-1}^T Hb kh_{t-1}
    dvt_{t-1} = beta Hb kh_{t-1};  dkh_{t-1} += beta Hb^T vt_{t-1}
    dADT = alpha <Hb, S_{t-1}> + beta dbeta;  dDT += dbeta alpha (1 - lam) + dgamma lam
    dTrap = (dgamma - dbeta alpha) DT lam (1 - lam);   Hb <- alpha Hb
then un-rotate (dq' = Rot(-theta) dqh), angle pair derivatives, and the reverse cumsum of the
angle gradients into dAngles and dDT. Returns a dict keyed like the forward's arguments
(None where the input was None), each gradient in the shape the input was given in.
"""
from __future__ import annotations

import numpy as np

from mamba3_kernels.spec import States

from .common import apply_output_adjoint, reduce_to, rotate, rotate_dtheta
from .inputs import prepare_scan
from .recurrent import Params, external_states, forward_segment, segments


def _segment_backward(spec, p: Params, seg, st0, dout, dfin):
    """Adjoint of one batch of equal-length segments. dout (X, L, H, P) [or (X, L, R, H, P)];
    dfin internal-layout final-state grads (each may be None). Returns a dict of grads."""
    tape = []
    forward_segment(spec, p, seg, st0, tape)
    X, L, H, P = seg["v"].shape
    R, N, A = spec.rank, spec.d_state, spec.n_angles
    G = seg["q"].shape[-2]
    dang_f, dssm_f, dk_f, dv_f = dfin
    Hb = np.zeros((X, H, P, N)) if dssm_f is None else dssm_f.copy()
    dk_carry = np.zeros((X, H, R, N)) if dk_f is None else dk_f.copy()
    dv_carry = np.zeros((X, H, P)) if dv_f is None else dv_f.copy()
    gacc = np.zeros((X, H, A)) if dang_f is None else dang_f.copy()
    g = dict(
        q=np.zeros(seg["q"].shape), k=np.zeros(seg["k"].shape), v=np.zeros((X, L, H, P)),
        adt=np.zeros((X, H, L)), dt=np.zeros((X, H, L)), trap=np.zeros((X, H, L)),
        angles=np.zeros((X, L, H, A)), z=None if seg["z"] is None else np.zeros((X, L, H, P)),
        q_bias=np.zeros((H, R, N)), k_bias=np.zeros((H, R, N)), d=np.zeros(H),
        mimo_v=np.zeros((H, R, P)), mimo_z=np.zeros((H, R, P)), mimo_out=np.zeros((H, R, P)),
        norm_weight=np.zeros((H, 1, P)))
    for t in range(L - 1, -1, -1):
        e = tape[t]
        z_t = None if seg["z"] is None else seg["z"][:, t]
        do = dout[:, t]
        if spec.output_mode == "per_rank":
            do = np.swapaxes(do, 1, 2)                                  # (X, H, R, P)
        dy, dz, dmz, dmo, dw = apply_output_adjoint(spec.output_mode, e["y"], z_t, p.mz, p.mo, p.w,
                                                    spec.norm_eps, do)
        if dz is not None:
            g["z"][:, t] = dz
            g["mimo_z"] += dmz
        if dmo is not None:
            g["mimo_out"] += dmo
        if dw is not None:
            g["norm_weight"] += dw
        Hb = Hb + np.einsum("xhrp,xhrn->xhpn", dy, e["qh"])
        dqh = np.einsum("xhpn,xhrp->xhrn", e["S"], dy)
        g["d"] += np.einsum("xhrp,xhrp->h", dy, e["vt"])
        gam, bet, alp, lam = e["gamma"], e["beta"], e["alpha"], e["lam"]
        Hk = np.einsum("xhpn,xhrn->xhrp", Hb, e["kh"])
        dvt = p.d * dy + gam[..., None, None] * Hk
        dkh = dk_carry + gam[..., None, None] * np.einsum("xhpn,xhrp->xhrn", Hb, e["vt"])
        dgamma = np.einsum("xhrp,xhrp->xh", e["vt"], Hk)
        Hkp = np.einsum("xhpn,xhrn->xhrp", Hb, e["kprev"])
        dbeta = np.einsum("xhrp,xhrp->xh", e["vtp"], Hkp)
        dvtp = bet[..., None, None] * Hkp
        dk_carry = bet[..., None, None] * np.einsum("xhpn,xhrp->xhrn", Hb, e["vtp"])
        dt_t = seg["dt"][:, :, t]
        g["adt"][:, :, t] = alp * np.einsum("xhpn,xhpn->xh", Hb, e["S0"]) + bet * dbeta
        g["dt"][:, :, t] += dbeta * alp * (1 - lam) + dgamma * lam
        if not spec.lam_is_one:
            g["trap"][:, :, t] = (dgamma - dbeta * alp) * dt_t * lam * (1 - lam)
        Hb = alp[..., None, None] * Hb
        v_t = seg["v"][:, t]
        g["v"][:, t] = dv_carry + np.sum(dvt * p.mv, axis=2)
        g["mimo_v"] += reduce_to(dvt * v_t[:, :, None, :], (H, R, P))
        vprev = e["vtp"]  # vprev * mv; recover the mv grad from dvtp and raw vprev
        raw_vprev = st0[3] if t == 0 else seg["v"][:, t - 1]
        g["mimo_v"] += reduce_to(dvtp * raw_vprev[:, :, None, :], (H, R, P))
        dv_carry = np.sum(dvtp * p.mv, axis=2)
        # rotation and biases
        th = e["theta"][:, :, None, :]
        dqp = rotate(dqh, th, spec.pairing, inverse=True)
        dkp = rotate(dkh, th, spec.pairing, inverse=True)
        dtheta = (rotate_dtheta(e["qp"], dqh, th, spec.pairing).sum(axis=2)
                  + rotate_dtheta(e["kp"], dkh, th, spec.pairing).sum(axis=2))
        g["q_bias"] += dqp.sum(axis=0)
        g["k_bias"] += dkp.sum(axis=0)
        g["q"][:, t] = _to_groups(dqp, G)
        g["k"][:, t] = _to_groups(dkp, G)
        gacc = gacc + dtheta
        raw = seg["angles"][:, t]
        th_ = np.tanh(raw)
        g["angles"][:, t] = gacc * np.pi * dt_t[..., None] * (1 - th_ * th_)
        g["dt"][:, :, t] += np.sum(gacc * np.pi * th_, axis=-1)
        del vprev
    dinit = (gacc, Hb, dk_carry, dv_carry)
    return g, dinit


def _to_groups(dx, G):
    """(X, H, R, N) per value head -> (X, R, G, N) summed over each group's heads."""
    X, H, R, N = dx.shape
    return dx.reshape(X, G, H // G, R, N).sum(axis=2).transpose(0, 2, 1, 3)


def backward(dout, dfinal=None, *, q, k, v, adt, dt, trap, q_bias, k_bias, angles=None, d=None,
             z=None, mimo_v=None, mimo_z=None, mimo_out=None, norm_weight=None, initial_states=None,
             cu_seqlens=None, output_mode=None, pairing="interleaved", discretization="trapezoidal",
             norm_eps=1e-5):
    """Gradients of <dout, out> + <dfinal, final states> w.r.t. every input (see module doc).
    dfinal: States of four gradients (any may be None) or None."""
    args = dict(q=q, k=k, v=v, adt=adt, dt=dt, trap=trap, q_bias=q_bias, k_bias=k_bias,
                angles=angles, d=d, z=z, mimo_v=mimo_v, mimo_z=mimo_z, mimo_out=mimo_out,
                norm_weight=norm_weight, initial_states=initial_states, cu_seqlens=cu_seqlens)
    spec, problem, c, cu = prepare_scan(args, output_mode=output_mode, pairing=pairing,
                                        discretization=discretization, norm_eps=norm_eps)
    p = Params(spec, c)
    B, L, H, P = problem.batch, problem.seqlen, problem.nheads, spec.head_dim
    R, N, A, S = spec.rank, spec.d_state, spec.n_angles, problem.nseqs
    dout = np.asarray(dout, dtype=np.float64)
    if dfinal is None:
        dfinal = States(None, None, None, None)
    dfin_full = (None if dfinal.angle is None else np.asarray(dfinal.angle, np.float64),
                 None if dfinal.ssm is None else np.asarray(dfinal.ssm, np.float64),
                 None if dfinal.k is None else np.swapaxes(np.asarray(dfinal.k, np.float64).reshape(S, R, H, N), 1, 2),
                 None if dfinal.v is None else np.asarray(dfinal.v, np.float64))
    total = None
    dinits = []
    for sl, seg, st0, rows in segments(spec, problem, c, cu):
        dfin = tuple(None if x is None else x[rows] for x in dfin_full)
        g, dinit = _segment_backward(spec, p, seg, st0, dout[:, sl], dfin)
        dinits.append(dinit)
        if total is None:
            total = {n: (None if x is None else np.zeros_like(x)) for n, x in g.items()}
            total.update(q=np.zeros_like(c["q"]), k=np.zeros_like(c["k"]), v=np.zeros((B, L, H, P)),
                         adt=np.zeros((B, H, L)), dt=np.zeros((B, H, L)), trap=np.zeros((B, H, L)),
                         angles=np.zeros((B, L, H, A)),
                         z=None if c["z"] is None else np.zeros((B, L, H, P)))
        for n in ("q", "k", "v", "angles", "z"):
            if g[n] is not None:
                total[n][:, sl] = g[n]
        for n in ("adt", "dt", "trap"):
            total[n][:, :, sl] = g[n]
        for n in ("q_bias", "k_bias", "d", "mimo_v", "mimo_z", "mimo_out", "norm_weight"):
            total[n] += g[n]
    dinit = external_states(tuple(np.concatenate([di[i] for di in dinits], axis=0) for i in range(4)))
    return _shape_like(args, spec, total, dinit)


def _shape_like(args, spec, total, dinit):
    """Gradients in the shapes the inputs came in; None for absent inputs."""
    out = {}
    for n in ("q", "k", "v", "adt", "dt", "trap", "q_bias", "k_bias", "d", "z", "mimo_v", "mimo_z",
              "mimo_out", "norm_weight"):
        x = args[n]
        out[n] = None if x is None else total[n].reshape(np.shape(x))
    if args["angles"] is None:
        out["angles"] = None
    elif spec.shared_angles:
        out["angles"] = total["angles"].sum(axis=2)
    else:
        out["angles"] = total["angles"]
    st = args["initial_states"]
    out["initial_states"] = None if st is None else States(
        dinit.angle, dinit.ssm, dinit.k.reshape(np.shape(st[2])), dinit.v)
    out["cu_seqlens"] = None
    return out
