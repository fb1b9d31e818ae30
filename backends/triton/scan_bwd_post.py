"""Backward stages 5 and 6 of the chunked scan (SPEC §9.1; orchestrated by scan_bwd.py).

`post_kernel` grid (token blocks, G), token-parallel (one warp by default: scan_bwd.default_config). From the core's fp32 gradients of its
operands (dqh, dks, dvt) and the output stage's dy, per token t of head h (q' = Q + Q_bias,
k' = K + K_bias, kh = Rot(theta) k', M[r,r'] = q'_r . k'_r', W[r,r'] = dy_r . vt_r'):
    diagonal term y_r += gamma sum_r' M[r,r'] vt_r' and skip term y_r += D vt_r:
        dq'_r += gamma sum_r' W[r,r'] k'_r';   dk'_r' += gamma sum_r W[r,r'] q'_r
        dvt_r' += gamma sum_r M[r,r'] dy_r + D dy_r';  dgamma_t = sum M o W
        (dD = sum dy_r . vt_r comes from the output stage, from the fp32 dy)
    ks = kh * scale:  dkh = dks * scale (+ dK_final at a sequence's last token),
                      dscale_t = sum_r dks_r . kh_r
    rotation: dq' += Rot(-theta) dqh, dk' += Rot(-theta) dkh,
              dtheta_j = sum over ranks of dqh . (G_j qh) + dks . (G_j ks) (+ dK_final . (G_j kh)),
              G_j the generator of pair j: (G x)_c0 = -x_c1, (G x)_c1 = x_c0
    The dtheta terms read the qh and ks the core multiplied (the bf16 operands for 16-bit
    inputs), not the fp32 recomputation: the scores depend on angle differences only, so each
    (query t, key s) pair adds equal and opposite terms to dtheta_t and dtheta_s, which cancel
    in the reverse cumsum Gacc exactly only when both sides use the same operand values
    (with the fp32 values the rounding of the operands does not cancel and the angle gradient's
    error grows like sqrt(L): rel_l2 4e-2 at L = 512 with module-like bf16 inputs).
    RECOMPUTE (config POST_RECOMPUTE): instead of reading prep's per-head qh / ks, recompute
    them with prep's own arithmetic (the same helpers, the same rounding to the operand dtype),
    so the values are those the core multiplied, bit for bit (checked against the reading path
    on the CPU and the GPU), and 2 x 2N bytes less per (token, head, rank) are read.
    dV_t = sum_r dvt_r MIMO_V_r (+ dV_final at a sequence's last token)
The core's buffers (dqh, dks, dvt) and dy have RC = pow2(R) ranks (padded ranks ignored); dvt
comes as the core's NVP N-block partials (NVP, B, L, RC, H, P), summed here as it is loaded.
One program per (token block, Q/K group g) walks the group's H/G value heads in order and
accumulates dQ, dK of the group in place in its own rows (B, L, R, G, N): the final dQ/dK in the
input dtype when G = H, else an fp32 buffer cast by the orchestrator (deterministic: fixed head
order, no atomics). Also writes dV, per-token dtheta (B, L, H, A), dgamma and dscale
(B, H, L) fp32, and per-block partial sums of dQ_bias, dK_bias, dMIMO_V (nblk, H, R, .): fp32, or
bf16 for 16-bit inputs (scan_bwd.partials_dtype; summed in fp32 by the orchestrator).

`seq_bwd_kernel` grid (sequences x segments, H): walks one segment of a sequence backwards
chunk by chunk, from its carry-in Gacc (dTheta_final + the later segments' dtheta sums from
`seg_sum_kernel`, added up by the program itself: scan_bwd_prep._carry_in):
    dDT_t   = (dgamma_t + dscale_t) lam_t + dscale_{t-1} (1 - lam_t)      (SPEC §9.2 stage 4)
    dTrap_t = (dgamma_t + dscale_t - dscale_{t-1}) DT_t lam_t (1 - lam_t)
    (dscale_{-1} = 0; the first token also gets the initial states' pending term
     dpend0 (1 - lam_0), -dpend0 DT_0 lam_0 (1 - lam_0))
    Gacc_t  = dTheta_final + sum_{s >= t} dtheta_s (reverse cumsum carried across chunks, fp32)
    dAngles_t = Gacc_t pi DT_t (1 - tanh^2),  dDT_t += sum_j Gacc_t,j pi tanh,  dTheta_init = Gacc_0
"""
from __future__ import annotations

import triton
import triton.language as tl

from .scan_bwd_prep import (FAST_MATH, PI, _carry_in, _cast, _cos_sin, _ld, _ld_biased, _rotated,
                            _seg_bounds, _sigmoid, _store_pairs, _tanh)


@triton.jit
def _head_rows(theta_ptr, gamma_ptr, scale_ptr, v_ptr, m64, mm, vm, b, t, j, p, h, H, L, s_vb, s_vt, s_vh,
               A: tl.constexpr):
    """What post_kernel reads per token row of head h (m64 / b / t the rows' tokens): cos, sin
    of theta [ROWS, NHP] (1, 0 without angles), gamma and scale [ROWS], v [ROWS, PP] fp32, and
    the (b, h, t) index of the per-token scalars."""
    ROWS: tl.constexpr = m64.shape[0]
    NHP: tl.constexpr = j.shape[0]
    if A > 0:
        th = tl.load(theta_ptr + (m64[:, None] * H + h) * A + j[None, :],
                     mask=mm[:, None] & (j[None, :] < A), other=0.0)
        cs, sn = _cos_sin(th, FAST_MATH)
    else:
        cs = tl.full([ROWS, NHP], 1.0, tl.float32)
        sn = tl.zeros([ROWS, NHP], dtype=tl.float32)
    sidx = (b * H + h) * L + t
    gamma = tl.load(gamma_ptr + sidx, mask=mm, other=0.0)
    scale = tl.load(scale_ptr + sidx, mask=mm, other=0.0)
    v = tl.load(v_ptr + (b * s_vb + t * s_vt + h * s_vh)[:, None] + p[None, :], mask=vm, other=0.0).to(tl.float32)
    return cs, sn, gamma, scale, v, sidx


@triton.jit
def _as_stored(x0, x1, ptr, INTERP: tl.constexpr):
    """fp32 pair halves rounded to ptr's element type and back: the values a store to ptr and
    a load from it would give (post's RECOMPUTE path stands in for reading prep's qh / ks)."""
    ty: tl.constexpr = ptr.dtype.element_ty
    return _cast(x0, ty, INTERP).to(tl.float32), _cast(x1, ty, INTERP).to(tl.float32)


@triton.jit
def _store_halves(ptr, row, j, x0, x1, N: tl.constexpr, INTERP: tl.constexpr):
    """A partial row's pair halves x0, x1 [NHP] at ptr + row in the half layout (pair j's columns
    at j and N/2 + j, whatever the pairing: two contiguous stores; the orchestrator puts the
    summed rows back in the pairing's column order, scan_bwd._pair_order)."""
    ty: tl.constexpr = ptr.dtype.element_ty
    jm = j < N // 2
    tl.store(ptr + row + j, _cast(x0, ty, INTERP), mask=jm)
    tl.store(ptr + row + N // 2 + j, _cast(x1, ty, INTERP), mask=jm)


@triton.jit
def post_kernel(
    q_ptr, k_ptr, v_ptr, qb_ptr, kb_ptr, mv_ptr, d_ptr, theta_ptr, gamma_ptr, scale_ptr,
    qh_ptr, ks_ptr, dqh_ptr, dks_ptr, dvt_ptr, dy_ptr, last_ptr, dkf_ptr, dvf_ptr,
    dq_ptr, dk_ptr, dv_ptr, dth_ptr, dgam_ptr, dsc_ptr, pqb_ptr, pkb_ptr, pmv_ptr,
    s_qb, s_qt, s_qr, s_qg, s_kb, s_kt, s_kr, s_kg, s_vb, s_vt, s_vh, s_vpart,
    BL, L, H, G,
    R: tl.constexpr, RC: tl.constexpr, N: tl.constexpr, NHP: tl.constexpr, P: tl.constexpr,
    PP: tl.constexpr, A: tl.constexpr, BT: tl.constexpr, PAIR_HALF: tl.constexpr, NVP: tl.constexpr,
    HAS_MV: tl.constexpr, HAS_D: tl.constexpr, HAS_KF: tl.constexpr, HAS_VF: tl.constexpr, INTERP: tl.constexpr,
    RECOMPUTE: tl.constexpr,
):
    pid = tl.program_id(0)
    pid64 = pid.to(tl.int64)   # partial rows: nblk * H * R * N can pass 2^31 at ~4M tokens
    g = tl.program_id(1)
    HG = H // G
    m = pid * BT + tl.arange(0, BT)
    mm = m < BL
    m64 = m.to(tl.int64)
    b = m64 // L
    t = m64 % L
    j = tl.arange(0, NHP)
    p = tl.arange(0, PP)
    pm = p < P
    vm = mm[:, None] & pm[None, :]
    if HAS_KF or HAS_VF:
        seq_last = tl.load(last_ptr + m64, mask=mm, other=-1)
        is_last = seq_last >= 0
        sl = tl.where(is_last, seq_last, 0).to(tl.int64)
    # the heads of group g one after the other: dQ / dK of the group accumulate in place in
    # this program's own rows (fixed head order: deterministic, no atomics)
    for hh in range(HG):
        h = g * HG + hh
        acc = hh > 0
        # the previous head's dQ / dK stores, by whichever threads held them, visible to every
        # thread of the program before it reads them back (the load and store tiles need not
        # map elements to threads alike)
        tl.debug_barrier()
        cs, sn, gamma, scale, v, sidx = _head_rows(theta_ptr, gamma_ptr, scale_ptr, v_ptr, m64, mm, vm, b, t, j, p,
                                                   h, H, L, s_vb, s_vt, s_vh, A)
        if HAS_D:
            dd = tl.load(d_ptr + h)
        else:
            dd = 0.0
        dtheta = tl.zeros([BT, NHP], dtype=tl.float32)
        dscale = tl.zeros([BT], dtype=tl.float32)
        dgamma = tl.zeros([BT], dtype=tl.float32)
        dv = tl.zeros([BT, PP], dtype=tl.float32)
        for r in range(R):
            grow = ((m64 * R + r) * G + g) * N
            crow = ((m64 * RC + r) * H + h) * N
            d0, d1 = _ld(dqh_ptr, crow, mm, j, N, PAIR_HALF)
            # d<dqh, Rot(theta) q'>/dtheta = dqh . (G qh) with the qh the core multiplied (see doc)
            if RECOMPUTE:   # prep's arithmetic again, rounded as prep stored it: the same values
                u0, u1 = _ld_biased(q_ptr, b * s_qb + t * s_qt + r * s_qr + g * s_qg, mm, qb_ptr, h * R + r,
                                    j, N, PAIR_HALF)
                u0, u1 = _rotated(u0, u1, cs, sn, A)
                u0, u1 = _as_stored(u0, u1, qh_ptr, INTERP)
            else:
                u0, u1 = _ld(qh_ptr, crow, mm, j, N, PAIR_HALF)
            dtheta += d1 * u0 - d0 * u1
            e0 = d0 * cs + d1 * sn
            e1 = d1 * cs - d0 * sn
            dyr = tl.load(dy_ptr + ((m64 * RC + r) * H + h)[:, None] * P + p[None, :], mask=vm,
                          other=0.0).to(tl.float32)
            for r2 in range(R):
                if HAS_MV:
                    mv2 = tl.load(mv_ptr + (h * R + r2) * P + p, mask=pm, other=0.0)
                    w = tl.sum(dyr * v * mv2[None, :], axis=1) * gamma
                else:
                    w = tl.sum(dyr * v, axis=1) * gamma
                y0, y1 = _ld_biased(k_ptr, b * s_kb + t * s_kt + r2 * s_kr + g * s_kg, mm, kb_ptr,
                                    h * R + r2, j, N, PAIR_HALF)
                e0 += w[:, None] * y0
                e1 += w[:, None] * y1
            prow = ((pid64 * H + h) * R + r) * N
            _store_halves(pqb_ptr, prow, j, tl.sum(e0, axis=0), tl.sum(e1, axis=0), N, INTERP)
            a0, a1 = _ld(dq_ptr, grow, mm & acc, j, N, PAIR_HALF)
            _store_pairs(dq_ptr, grow, mm, j, e0 + a0, e1 + a1, N, N // 2, PAIR_HALF, INTERP)
        for r2 in range(R):
            x0, x1 = _ld_biased(k_ptr, b * s_kb + t * s_kt + r2 * s_kr + g * s_kg, mm, kb_ptr,
                                h * R + r2, j, N, PAIR_HALF)
            kh0, kh1 = _rotated(x0, x1, cs, sn, A)
            grow = ((m64 * R + r2) * G + g) * N
            crow = ((m64 * RC + r2) * H + h) * N
            f0, f1 = _ld(dks_ptr, crow, mm, j, N, PAIR_HALF)
            dscale += tl.sum(f0 * kh0 + f1 * kh1, axis=1)
            if RECOMPUTE:   # ks = kh * scale as prep stores it
                u0, u1 = _as_stored(kh0 * scale[:, None], kh1 * scale[:, None], ks_ptr, INTERP)
            else:
                u0, u1 = _ld(ks_ptr, crow, mm, j, N, PAIR_HALF)
            dtheta += f1 * u0 - f0 * u1
            d0 = f0 * scale[:, None]
            d1 = f1 * scale[:, None]
            if HAS_KF:
                g0, g1 = _ld(dkf_ptr, ((sl * R + r2) * H + h) * N, mm & is_last, j, N, PAIR_HALF)
                dtheta += g1 * kh0 - g0 * kh1
                d0 += g0
                d1 += g1
            e0 = d0 * cs + d1 * sn
            e1 = d1 * cs - d0 * sn
            vrow = ((m64 * RC + r2) * H + h)[:, None] * P + p[None, :]
            dvt = tl.load(dvt_ptr + vrow, mask=vm, other=0.0)
            for i in tl.static_range(1, NVP):   # the core's N-block partials of dvt
                dvt += tl.load(dvt_ptr + i * s_vpart + vrow, mask=vm, other=0.0)
            dy2 = tl.load(dy_ptr + vrow, mask=vm, other=0.0).to(tl.float32)
            if HAS_MV:
                mv2 = tl.load(mv_ptr + (h * R + r2) * P + p, mask=pm, other=0.0)
                vt2 = v * mv2[None, :]
            else:
                vt2 = v
            dvt += dd * dy2
            for r in range(R):
                y0, y1 = _ld_biased(q_ptr, b * s_qb + t * s_qt + r * s_qr + g * s_qg, mm, qb_ptr,
                                    h * R + r, j, N, PAIR_HALF)
                dyr = tl.load(dy_ptr + ((m64 * RC + r) * H + h)[:, None] * P + p[None, :], mask=vm,
                              other=0.0).to(tl.float32)
                mqk = tl.sum(y0 * x0 + y1 * x1, axis=1)
                w = tl.sum(dyr * vt2, axis=1)
                dgamma += mqk * w
                e0 += (gamma * w)[:, None] * y0
                e1 += (gamma * w)[:, None] * y1
                dvt += (gamma * mqk)[:, None] * dyr
            prow = ((pid64 * H + h) * R + r2) * N
            _store_halves(pkb_ptr, prow, j, tl.sum(e0, axis=0), tl.sum(e1, axis=0), N, INTERP)
            a0, a1 = _ld(dk_ptr, grow, mm & acc, j, N, PAIR_HALF)
            _store_pairs(dk_ptr, grow, mm, j, e0 + a0, e1 + a1, N, N // 2, PAIR_HALF, INTERP)
            if HAS_MV:
                dv += dvt * mv2[None, :]
                tl.store(pmv_ptr + ((pid64 * H + h) * R + r2) * P + p,
                         _cast(tl.sum(dvt * v, axis=0), pmv_ptr.dtype.element_ty, INTERP), mask=pm)
            else:
                dv += dvt
        if HAS_VF:
            dv += tl.load(dvf_ptr + (sl * H + h)[:, None] * P + p[None, :], mask=vm & is_last[:, None],
                          other=0.0)
        tl.store(dv_ptr + (m64 * H + h)[:, None] * P + p[None, :], _cast(dv, dv_ptr.dtype.element_ty, INTERP),
                 mask=vm)
        if A > 0:
            tl.store(dth_ptr + (m64[:, None] * H + h) * A + j[None, :], dtheta,
                     mask=mm[:, None] & (j[None, :] < A))
        tl.store(dgam_ptr + sidx, dgamma, mask=mm)
        tl.store(dsc_ptr + sidx, dscale, mask=mm)


@triton.jit
def seq_bwd_kernel(
    dt_ptr, trap_ptr, ang_ptr, cu_ptr, dgam_ptr, dsc_ptr, dth_ptr, tot_ptr, dthf_ptr, dpend_ptr,
    ddt_ptr, dtrap_ptr, dang_ptr, dthi_ptr,
    s_ab, s_at, s_ah, L, H, NSEG, SEGL,
    A: tl.constexpr, AP: tl.constexpr, BT: tl.constexpr, TRAP: tl.constexpr,
    VARLEN: tl.constexpr, HAS_INIT: tl.constexpr, HAS_DTHF: tl.constexpr, SB: tl.constexpr,
):
    pid = tl.program_id(0)
    h = tl.program_id(1)
    seq, k, b, t0, t1, s0, s1 = _seg_bounds(pid, NSEG, SEGL, cu_ptr, L, VARLEN)
    b64 = b.to(tl.int64)
    base = (b64 * H + h) * L
    j = tl.arange(0, AP)
    jm = j < A
    if A > 0:   # Gacc after the segment: dTheta_final + the later segments' dtheta sums
        carry = _carry_in(tot_ptr, dthf_ptr, seq, k, h, NSEG, H, j, jm, A, AP, SB, HAS_DTHF, True, False)
    if HAS_INIT:
        dpend = tl.load(dpend_ptr + seq * H + h)
    else:
        dpend = 0.0
    rows = tl.arange(0, BT)
    nch = tl.cdiv(s1 - s0, BT)
    for i in range(nch):
        t = s0 + (nch - 1 - i) * BT + rows
        tm = t < s1
        dg = tl.load(dgam_ptr + base + t, mask=tm, other=0.0)
        ds = tl.load(dsc_ptr + base + t, mask=tm, other=0.0)
        dt = tl.load(dt_ptr + base + t, mask=tm, other=0.0)
        first = t == t0
        if TRAP:
            dsp = tl.load(dsc_ptr + base + t - 1, mask=tm & (t > t0), other=0.0)
            lam = _sigmoid(tl.load(trap_ptr + base + t, mask=tm, other=0.0))
            dG = dg + ds
            dpd = tl.where(first, dpend, 0.0)
            ddt = dG * lam + (dsp + dpd) * (1.0 - lam)
            dtrap = (dG - dsp - dpd) * dt * lam * (1.0 - lam)
            tl.store(dtrap_ptr + base + t, dtrap, mask=tm)
        else:
            ddt = dg + ds
        if A > 0:
            am = tm[:, None] & jm[None, :]
            t64 = t.to(tl.int64)
            d = tl.load(dth_ptr + ((b64 * L + t64[:, None]) * H + h) * A + j[None, :], mask=am, other=0.0)
            incl = tl.cumsum(d, axis=0)
            tot = tl.sum(d, axis=0)
            rev = carry[None, :] + (tot[None, :] - incl) + d
            raw = tl.load(ang_ptr + b64 * s_ab + t64[:, None] * s_at + h * s_ah + j[None, :],
                          mask=am, other=0.0).to(tl.float32)
            th = _tanh(raw)
            tl.store(dang_ptr + ((b64 * L + t64[:, None]) * H + h) * A + j[None, :],
                     rev * PI * dt[:, None] * (1.0 - th * th), mask=am)
            ddt += tl.sum(tl.where(am, rev * PI * th, 0.0), axis=1)
            carry = carry + tot
        tl.store(ddt_ptr + base + t, ddt, mask=tm)
    if HAS_INIT and A > 0:
        if k == 0:
            tl.store(dthi_ptr + (seq * H + h) * A + j, carry, mask=jm)


def token_grid(BL: int, H: int, BT: int):
    return (triton.cdiv(max(BL, 1), BT), H)


