"""The chunked form of the scan (SPEC §8), float64, phase by phase, to localise kernel bugs.

Same result as recurrent.forward, computed the way the kernels compute it. Each phase is a
function whose output a kernel's matching phase can be compared with:

1. `preprocess`: theta = wrap(theta_init + cumsum(pi tanh(raw) DT)) (a cumsum, not the
   recurrent's step-wise wrap), biased q', k', rotated qh, kh, vt = v MIMO_V,
   gamma = DT lam, shifted gamma' = DT_{t+1} (1 - lam_{t+1}) (0 at the last token),
   scale = gamma + gamma', the same-step diagonal QK = gamma (q'_r . k'_r') (pre-rotation).
2. `chunk_states`: per chunk, from zero, local = sum_j e^{T - cs_j} scale_j sum_r vt_j,r kh_j,r^T,
   with cs the in-chunk inclusive cumsum of ADT and T = cs at the chunk's last token.
3. `state_passing`: entry_0 = S_init + DT_0 (1 - lam_0) sum_r vt_init,r k_init,r^T (the pending
   beta term of the input states), entry_{c+1} = e^{T_c} entry_c + local_c.
4. `chunk_outputs`: y_i = e^{cs_i} entry qh_i + sum_{j<i in chunk} e^{cs_i - cs_j} scale_j
   (qh_i . kh_j) vt_j + sum_r' QK_i[r, r'] vt_i,r' + D vt_i; then the output mode.
The carried state is the recurrent state plus the next token's beta term not yet multiplied
by alpha (SPEC §8.1 'Chunk-state convention'); the final state equals S_{L-1} exactly since
gamma'_{L-1} = 0.
"""
from __future__ import annotations

import numpy as np

from .common import angle_increment, apply_output, discretize, rotate, wrap_angle
from .inputs import prepare_scan
from .recurrent import Params, _heads, external_states, segments


def preprocess(spec, p: Params, seg, st0) -> dict:
    """Phase 1 over X segments of length L; arrays time-major per segment: (X, L, H, ...)."""
    X, L, H, P = seg["v"].shape
    q, k = _heads(seg["q"], H), _heads(seg["k"], H)                 # (X, L, H, R, N)
    adt = np.swapaxes(seg["adt"], 1, 2)                              # (X, L, H)
    dt = np.swapaxes(seg["dt"], 1, 2)
    trap = np.swapaxes(seg["trap"], 1, 2)
    phi = angle_increment(seg["angles"], dt)                         # (X, L, H, A)
    theta = wrap_angle(st0[0][:, None] + np.cumsum(phi, axis=1))
    qp, kp = q + p.qb, k + p.kb
    qh = rotate(qp, theta[:, :, :, None, :], spec.pairing)
    kh = rotate(kp, theta[:, :, :, None, :], spec.pairing)
    _, _, gamma, lam = discretize(adt, dt, trap, spec.lam_is_one)
    pend = dt * (1 - lam)                                            # DT_t (1 - lam_t)
    gshift = np.zeros_like(gamma)
    gshift[:, :-1] = pend[:, 1:]
    vt = seg["v"][:, :, :, None, :] * p.mv                           # (X, L, H, R, P)
    qk = gamma[..., None, None] * np.einsum("xlhrn,xlhsn->xlhrs", qp, kp)
    return dict(theta=theta, qp=qp, kp=kp, qh=qh, kh=kh, vt=vt, adt=adt, gamma=gamma,
                gshift=gshift, scale=gamma + gshift, pend0=pend[:, 0] if L else None, qk=qk)


def chunk_bounds(L: int, C: int):
    return [(s, min(s + C, L)) for s in range(0, L, C)]


def chunk_states(pre: dict, C: int):
    """Phase 2: (local states (X, nC, H, P, N), chunk decay totals T (X, nC, H))."""
    X, L, H = pre["adt"].shape
    P, N = pre["vt"].shape[-1], pre["kh"].shape[-1]
    locs, tots = [], []
    for s, e in chunk_bounds(L, C):
        cs = np.cumsum(pre["adt"][:, s:e], axis=1)                   # (X, c, H)
        T = cs[:, -1]
        w = np.exp(T[:, None] - cs) * pre["scale"][:, s:e]           # (X, c, H)
        locs.append(np.einsum("xlh,xlhrp,xlhrn->xhpn", w, pre["vt"][:, s:e], pre["kh"][:, s:e]))
        tots.append(T)
    if not locs:
        return np.zeros((X, 0, H, P, N)), np.zeros((X, 0, H))
    return np.stack(locs, axis=1), np.stack(tots, axis=1)


def state_passing(spec, p: Params, pre: dict, st0, local, T):
    """Phase 3: entry states (X, nC, H, P, N) and the final state."""
    _, S0, k0, v0 = st0
    entry = S0.copy()
    if pre["pend0"] is not None:
        vt0 = v0[:, :, None, :] * p.mv                               # (X, H, R, P)
        entry = entry + pre["pend0"][..., None, None] * np.einsum("xhrp,xhrn->xhpn", vt0, k0)
    entries = []
    for c in range(local.shape[1]):
        entries.append(entry)
        entry = np.exp(T[:, c])[..., None, None] * entry + local[:, c]
    ent = np.stack(entries, axis=1) if entries else np.zeros(local.shape)
    return ent, entry


def chunk_outputs(spec, p: Params, pre: dict, entries, C: int):
    """Phase 4: per-rank y (X, L, H, R, P) before the output mode."""
    X, L, H = pre["adt"].shape
    ys = []
    for c, (s, e) in enumerate(chunk_bounds(L, C)):
        cs = np.cumsum(pre["adt"][:, s:e], axis=1)                   # (X, c, H)
        qh, kh, vt = pre["qh"][:, s:e], pre["kh"][:, s:e], pre["vt"][:, s:e]
        inter = np.exp(cs)[..., None, None] * np.einsum("xhpn,xlhrn->xlhrp", entries[:, c], qh)
        n = e - s
        mask = np.tril(np.ones((n, n)), -1)                           # strictly causal i > j
        decay = np.exp(cs[:, :, None, :] - cs[:, None, :, :]) * mask[None, :, :, None]  # (X, i, j, H)
        w = decay * pre["scale"][:, s:e][:, None]                     # scale_j
        scores = np.einsum("xihrn,xjhsn->xijhrs", qh, kh)
        intra = np.einsum("xijh,xijhrs,xjhsp->xihrp", w, scores, vt)
        diag = np.einsum("xlhrs,xlhsp->xlhrp", pre["qk"][:, s:e], vt)
        ys.append(inter + intra + diag + p.d[None, None] * vt)
    P = pre["vt"].shape[-1]
    return np.concatenate(ys, axis=1) if ys else np.zeros((X, 0, H, spec.rank, P))


def forward_chunked(q, k, v, adt, dt, trap, q_bias, k_bias, angles=None, d=None, z=None,
                    mimo_v=None, mimo_z=None, mimo_out=None, norm_weight=None, initial_states=None,
                    cu_seqlens=None, *, chunk_size=64, output_mode=None, pairing="interleaved",
                    discretization="trapezoidal", norm_eps=1e-5, return_phases=False):
    """The chunked-form forward: (out, States), plus a list of per-segment phase dicts."""
    args = dict(q=q, k=k, v=v, adt=adt, dt=dt, trap=trap, q_bias=q_bias, k_bias=k_bias,
                angles=angles, d=d, z=z, mimo_v=mimo_v, mimo_z=mimo_z, mimo_out=mimo_out,
                norm_weight=norm_weight, initial_states=initial_states, cu_seqlens=cu_seqlens)
    spec, problem, c, cu = prepare_scan(args, output_mode=output_mode, pairing=pairing,
                                        discretization=discretization, norm_eps=norm_eps, chunk_size=chunk_size)
    p = Params(spec, c)
    C = spec.chunk_size
    outs, finals, phases = [], [], []
    for sl, seg, st0, _ in segments(spec, problem, c, cu):
        X, L, H, P = seg["v"].shape
        pre = preprocess(spec, p, seg, st0)
        local, T = chunk_states(pre, C)
        entries, fin = state_passing(spec, p, pre, st0, local, T)
        y = chunk_outputs(spec, p, pre, entries, C)                  # (X, L, H, R, P)
        z_ = None if seg["z"] is None else seg["z"]
        o = apply_output(spec.output_mode, y, z_[:, :, :, :] if z_ is not None else None,
                         p.mz, p.mo, p.w, spec.norm_eps)
        if spec.output_mode == "per_rank":
            o = np.swapaxes(o, 2, 3)                                  # (X, L, R, H, P)
        outs.append(o)
        if L:
            finals.append((pre["theta"][:, -1], fin, pre["kh"][:, -1], seg["v"][:, -1]))
        else:
            finals.append((wrap_angle(st0[0]), st0[1], st0[2], st0[3]))
        phases.append(dict(pre=pre, local=local, T=T, entries=entries, y=y))
    out = np.concatenate(outs, axis=1)
    fin = external_states(tuple(np.concatenate([f[i] for f in finals], axis=0) for i in range(4)))
    return (out, fin, phases) if return_phases else (out, fin)
