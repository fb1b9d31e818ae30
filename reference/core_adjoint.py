"""The generic core of the scan backward (issue 5), float64: its forward and every gradient.

The scan backward is split into a token-parallel prep (rotation, biases, gamma/scale -> qh, ks,
vt), the output-mode backward (-> dy), this core, and a token-parallel post (diagonal terms,
inverse rotation, angles, dt/trap, GQA). The core is the strictly causal part of SPEC §2/§3/§8.
Per sequence and value head, rows i = (t, r) (token t, rank r), cs_t = sum_{u <= t} adt_u
(restarting at every sequence start):

    y[t,r]  = e^{cs_t} S0 qh[t,r] + sum_{s < t} sum_r' e^{cs_t - cs_s} (qh[t,r] . ks[s,r']) vt[s,r']
    S_final = e^{cs_{L-1}} S0 + sum_{s, r'} e^{cs_{L-1} - cs_s} vt[s,r'] ks[s,r']^T       (P x N)
    loss    = sum <dy, y> + <dS_final, S_final>

(strictly causal by token: no same-token terms, not even across ranks). Equivalently the
recurrence S_t = e^{adt_t} S_{t-1} + sum_r vt[t,r] ks[t,r]^T, y[t,r] = e^{adt_t} S_{t-1} qh[t,r].

Gradients (quadratic form; M[t,s] = e^{cs_t - cs_s} [s < t], expanded over ranks; A = (Q K^T) o M;
w_s = e^{cs_{L-1} - cs_s}; Q, K, V, dY the (L*R, .) row matrices):

    dV   = A^T dY + w o (K dSf^T)             dQ = ((dY V^T) o M) K + e^{cs} o (dY S0)
    dK   = ((dY V^T) o M)^T Q + w o (V dSf)   dS0 = sum_i e^{cs_t} dy_i qh_i^T + e^{cs_{L-1}} dSf
    dcs_t = sum_{r, s<t} W[(t,r),(s,.)] - sum_{r, u>t} W[(u,.),(t,r)] + e^{cs_t} sum_r dy[t,r] . S0 qh[t,r]
            - w_t sum_r vt[t,r] . dSf ks[t,r] + [t = L-1] (<dSf, S_final>)
    with W = (Q K^T) o (dY V^T) o M; dadt_u = sum_{t >= u} dcs_t (reverse cumsum).

Entry points: `core_forward` / `core_backward` on the kernel layouts (dense or varlen, see
`core_backward`'s docstring), `forward_seq` / `backward_seq` on one (sequence, head), and
`recurrent_seq` (the token loop, to check the quadratic form). Pure NumPy, no torch.
"""
from __future__ import annotations

import numpy as np


def _decay_mask(cs, R):
    """(L*R, L*R) matrix e^{cs_t - cs_s} for token t > token s, else 0."""
    L = cs.shape[0]
    tt = np.arange(L)
    diff = cs[:, None] - cs[None, :]
    m = np.where(tt[:, None] > tt[None, :], np.exp(np.where(tt[:, None] > tt[None, :], diff, 0.0)), 0.0)
    return np.kron(m, np.ones((R, R)))


def forward_seq(qh, ks, vt, adt, s0=None):
    """One (sequence, head): qh, ks (L, R, N); vt (L, R, P); adt (L,); s0 (P, N) or None.
    Returns y (L, R, P), s_final (P, N)."""
    L, R, N = qh.shape
    P = vt.shape[-1]
    s0 = np.zeros((P, N)) if s0 is None else np.asarray(s0, np.float64)
    if L == 0:
        return np.zeros((0, R, P)), s0.copy()
    cs = np.cumsum(adt)
    Q, K, V = qh.reshape(L * R, N), ks.reshape(L * R, N), vt.reshape(L * R, P)
    A = (Q @ K.T) * _decay_mask(cs, R)
    ecs = np.repeat(np.exp(cs), R)[:, None]
    y = A @ V + ecs * (Q @ s0.T)
    w = np.repeat(np.exp(cs[-1] - cs), R)[:, None]
    sf = np.exp(cs[-1]) * s0 + (w * V).T @ K
    return y.reshape(L, R, P), sf


def recurrent_seq(qh, ks, vt, adt, s0=None):
    """The token loop of the same forward (for the tests)."""
    L, R, N = qh.shape
    P = vt.shape[-1]
    S = np.zeros((P, N)) if s0 is None else np.array(s0, np.float64)
    y = np.zeros((L, R, P))
    for t in range(L):
        S = np.exp(adt[t]) * S
        y[t] = qh[t] @ S.T
        S = S + vt[t].T @ ks[t]
    return y, S


def backward_seq(qh, ks, vt, adt, dy, s0=None, dsf=None):
    """Gradients of <dy, y> + <dsf, S_final> for one (sequence, head). Returns dict dqh, dks
    (L, R, N), dvt (L, R, P), dadt (L,), ds0 (P, N)."""
    L, R, N = qh.shape
    P = vt.shape[-1]
    s0 = np.zeros((P, N)) if s0 is None else np.asarray(s0, np.float64)
    dsf = np.zeros((P, N)) if dsf is None else np.asarray(dsf, np.float64)
    if L == 0:
        return {"dqh": np.zeros((0, R, N)), "dks": np.zeros((0, R, N)), "dvt": np.zeros((0, R, P)),
                    "dadt": np.zeros(0), "ds0": dsf.copy()}
    cs = np.cumsum(adt)
    Q, K, V, dY = (qh.reshape(L * R, N), ks.reshape(L * R, N), vt.reshape(L * R, P),
                   dy.reshape(L * R, P))
    M = _decay_mask(cs, R)
    A = (Q @ K.T) * M
    G = (dY @ V.T) * M
    ecs = np.repeat(np.exp(cs), R)[:, None]
    w = np.repeat(np.exp(cs[-1] - cs), R)[:, None]
    dV = A.T @ dY + w * (K @ dsf.T)
    dQ = G @ K + ecs * (dY @ s0)
    dK = G.T @ Q + w * (V @ dsf)
    ds0 = (ecs * dY).T @ Q + np.exp(cs[-1]) * dsf
    W = A * (dY @ V.T)
    drow = W.sum(axis=1) - W.sum(axis=0)                       # per row i: +as query, -as key
    drow = drow + ecs[:, 0] * np.einsum("ip,pn,in->i", dY, s0, Q)
    drow = drow - w[:, 0] * np.einsum("ip,pn,in->i", V, dsf, K)
    dcs = drow.reshape(L, R).sum(axis=1)
    sf = np.exp(cs[-1]) * s0 + (w * V).T @ K
    dcs[-1] += np.sum(dsf * sf)
    dadt = np.cumsum(dcs[::-1])[::-1]
    return {"dqh": dQ.reshape(L, R, N), "dks": dK.reshape(L, R, N), "dvt": dV.reshape(L, R, P),
                "dadt": dadt, "ds0": ds0}


def _segments(L, cu_seqlens):
    if cu_seqlens is None:
        return [(0, L)]
    cu = np.asarray(cu_seqlens).astype(np.int64)
    return [(int(cu[i]), int(cu[i + 1])) for i in range(len(cu) - 1)]


def core_forward(qh, ks, vt, adt, s0=None, cu_seqlens=None):
    """Kernel layouts: qh, ks (B, L, R, H, N); vt (B, L, R, H, P); adt (B, H, L); s0 (B|S, H, P, N)
    or None; varlen: B == 1 and cu_seqlens (S+1,) with sequences packed along L.
    Returns y (B, L, R, H, P) and s_final (B|S, H, P, N), float64."""
    qh, ks, vt, adt = (np.asarray(x, np.float64) for x in (qh, ks, vt, adt))
    B, L, R, H, N = qh.shape
    P = vt.shape[-1]
    segs = _segments(L, cu_seqlens)
    y = np.zeros((B, L, R, H, P))
    sf = np.zeros((B if cu_seqlens is None else len(segs), H, P, N))
    for b in range(B):
        for si, (a, e) in enumerate(segs):
            x = b if cu_seqlens is None else si
            for h in range(H):
                st = None if s0 is None else np.asarray(s0[x, h], np.float64)
                yy, ss = forward_seq(qh[b, a:e, :, h], ks[b, a:e, :, h], vt[b, a:e, :, h],
                                     adt[b, h, a:e], st)
                y[b, a:e, :, h] = yy
                sf[x, h] = ss
    return y, sf


def core_backward(qh, ks, vt, adt, dy, s0=None, ds_final=None, cu_seqlens=None):
    """Gradients of loss = sum <dy, y> + <ds_final, s_final> of `core_forward` (same layouts;
    dy like vt, ds_final like s0, either may be None = 0). Returns dict(dqh, dks (B, L, R, H, N),
    dvt (B, L, R, H, P), dadt (B, H, L), ds0 (B|S, H, P, N)), float64."""
    qh, ks, vt, adt, dy = (np.asarray(x, np.float64) for x in (qh, ks, vt, adt, dy))
    B, L, _R, H, N = qh.shape
    P = vt.shape[-1]
    segs = _segments(L, cu_seqlens)
    out = {"dqh": np.zeros(qh.shape), "dks": np.zeros(qh.shape), "dvt": np.zeros(vt.shape),
               "dadt": np.zeros((B, H, L)), "ds0": np.zeros((B if cu_seqlens is None else len(segs), H, P, N))}
    for b in range(B):
        for si, (a, e) in enumerate(segs):
            x = b if cu_seqlens is None else si
            for h in range(H):
                g = backward_seq(qh[b, a:e, :, h], ks[b, a:e, :, h], vt[b, a:e, :, h], adt[b, h, a:e],
                                 dy[b, a:e, :, h], None if s0 is None else s0[x, h],
                                 None if ds_final is None else ds_final[x, h])
                out["dqh"][b, a:e, :, h] = g["dqh"]
                out["dks"][b, a:e, :, h] = g["dks"]
                out["dvt"][b, a:e, :, h] = g["dvt"]
                out["dadt"][b, h, a:e] = g["dadt"]
                out["ds0"][x, h] = g["ds0"]
    return out


def core_loss(qh, ks, vt, adt, dy, s0=None, ds_final=None, cu_seqlens=None):
    """The scalar loss whose gradients `core_backward` returns (for finite differences)."""
    y, sf = core_forward(qh, ks, vt, adt, s0, cu_seqlens)
    loss = float(np.sum(np.asarray(dy, np.float64) * y))
    if ds_final is not None:
        loss += float(np.sum(np.asarray(ds_final, np.float64) * sf))
    return loss
