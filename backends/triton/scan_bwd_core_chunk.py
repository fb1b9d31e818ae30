"""Backward core, phases 3 and 4 (issue 5; SPEC §8, §9; reference/core_adjoint.py): the
chunk-local gradients, walking each segment's chunks with a state in registers, and dadt.

Per chunk c of a segment (rows i = (t_i, r_i), cs the in-chunk inclusive decay cumsum, T its
total, S_c the state entering the chunk, D_c the adjoint of the state leaving it):

    Gm_ij = e^{cs_i - cs_j} (dy_i . vt_j)   for t_i > t_j, else 0     (strictly causal)
    A_ij  = e^{cs_i - cs_j} (qh_i . ks_j)   for t_i > t_j, else 0
    dqh_i = sum_j Gm_ij ks_j + e^{cs_i} S_c^T dy_i                       (kernel dq)
    dks_j = sum_i Gm_ij qh_i + e^{T - cs_j} D_c^T vt_j                   (kernel dkv)
    dvt_j = sum_i A_ij dy_i  + e^{T - cs_j} D_c ks_j                     (kernel dkv)

dadt, chunk-locally (S_c and D_c held fixed, the loss depends on the chunk's adt through cs,
and on T = cs_last also through S_{c+1} = e^T S_c + sum_j e^{T - cs_j} vt_j ks_j^T):

    d cs_i = qh_i . dqh_i - vt_i . dvt_i          (= row sum - column sum of the in-chunk
                                                     W = A o (dy vt^T), plus the two state terms)
    d T    = e^T <D_c, S_c> + X_c = <D_c, S_{c+1}>,   X_c = sum_j x_j,  x_j = vt_j . (e^{T - cs_j} D_c ks_j)
    dadt_u = sum_{t >= u in the chunk} d cs_t + d T                      (kernel dadt)

Only in-chunk sums: the sequence-long reverse cumsum of d cs (mathematically the same) cancels
catastrophically (its partial sums are O(1) differences of O(L) terms, and bf16 GEMM errors do
not cancel), so d T is computed from the states themselves. No program holds both S_c and D_c,
and storing every S_c (P x N per chunk) cost the walks a store and a load per chunk; instead
d T follows its own recurrence backwards over the segment's chunks. With D_{c-1} = e^{T_c} D_c +
Lb_c (Lb_c = sum_i e^{cs_i} dy_i qh_i^T):

    d T_{c-1} = <D_{c-1}, S_c> = e^{T_c} <D_c, S_c> + <Lb_c, S_c> = d T_c - X_c + Y_c,
    Y_c = sum_i qh_i . (e^{cs_i} S_c^T dy_i)         (the state terms of dq's d cs partials)

from d T_last = e^{T_last} <D_last, S_last> + X_last (dadt, from phase 2's exit adjoint D_last
and the last chunk's entry state S_last, which dq stores). X_c and Y_c are products with the
state / adjoint at the INTER precision (fp32-accurate by default), so the segment-long
recurrence adds errors of that size, not of bf16 GEMM size.

The dq kernel walks the segment forwards from its entry state (phase 2's ent; S_c <- e^T S_c +
(vt e^{T - cs})^T ks) and stores S_last; the dkv kernel walks it backwards from its
exit adjoint (phase 2's dx; D_{c-1} = e^T D_c + (dy e^{cs})^T qh).

Tiles: dq and dkv hold the whole P and a block of BN columns of N (state tile P x BN). Their
N-reducing outputs (dqh, dks) are per block; dvt and the d cs / d T partials reduce over N:
with one block (BN >= N: bf16 defaults at N <= 64, `default_config`) dkv writes dvt itself,
else per-block partials (scratch dvp) that the dadt kernel adds in a fixed order (no atomics),
as it adds the d cs partials of dq's blocks and the X_c partials of dkv's.

Grids: dq, dkv (H * cdiv(N, BN), segment slots); dadt (H, segment slots). Config FUSED: one
kernel dqkv runs both walks in each program, dq's then dkv's (it calls the two kernels' bodies
as device functions), same grid.
"""
from __future__ import annotations

import triton
import triton.language as tl

from .scan_bwd_core_states import _chunk_decay, _mma, _update
from .scan_common import _cast, _locate, _mm


def grid(H: int, D: int, BD: int, nslots: int):
    return (H * triton.cdiv(D, BD), nslots)


def dadt_grid(H: int, nslots: int):
    return (H, nslots)


@triton.jit
def _tile(ptr, row, rmask, cols, W: tl.constexpr):
    """Rows `row` (int64 row indices of a (.., W) tensor) at columns `cols`, zero-padded."""
    return tl.load(ptr + row[:, None] * W + cols[None, :], mask=rmask[:, None] & (cols < W)[None, :],
                   other=0.0)


@triton.jit
def _store_tile(ptr, row, rmask, cols, x, W: tl.constexpr):
    tl.store(ptr + row[:, None] * W + cols[None, :], x, mask=rmask[:, None] & (cols < W)[None, :])


@triton.jit
def _split(st, DT: tl.constexpr, INTERP: tl.constexpr, SPLIT: tl.constexpr):
    """With SPLIT: fp32 tile -> (hi, lo) in DT with hi + lo = st to about 2^-16 relative (bf16
    hi / lo halves); else (st, st), the state as it is (_mm_state rounds it once)."""
    if SPLIT:
        hi = _cast(st, DT, INTERP)
        lo = _cast(st - hi.to(tl.float32), DT, INTERP)
    else:
        hi = st
        lo = st
    return hi, lo


@triton.jit
def _mm_state(a, sh, sl, DT: tl.constexpr, DOT_F32: tl.constexpr, INTERP: tl.constexpr, SPLIT: tl.constexpr):
    """a @ state for an operand a that is exact in DT (loaded qh / ks / vt / dy) and the fp32
    carried state or adjoint: with SPLIT, two DT products on its (hi, lo) halves (fp32-accurate to
    ~2^-16, as a is exact); else one on the state rounded to DT (sh is the state itself then)."""
    r = _mm(a, sh, DT, DOT_F32, INTERP)
    if SPLIT:
        r = _mma(a, sl, r, DT, DOT_F32, INTERP)
    return r


@triton.jit
def _store_dcs(dcs_ptr, part, B, H, L, b, h, tc, eos, x, C: tl.constexpr, RP: tl.constexpr):
    """Per-row dcs [C * RP] summed over ranks into tokens [C] of scratch row (part, b, h)."""
    if RP == 1:
        xt = x
    else:
        xt = tl.sum(tl.reshape(x, [C, RP]), axis=1)
    tok = tc + tl.arange(0, C)
    base = ((part * B + b) * H + h).to(tl.int64) * L
    tl.store(dcs_ptr + base + tok, xt, mask=tok < eos)


@triton.jit
def scan_bwd_core_dq_kernel(
    qh_ptr, ks_ptr, vt_ptr, dy_ptr, adt_ptr, cu_ptr, ent_ptr, sx_ptr, dqh_ptr, dcs_ptr,
    B, L, H, S, NSEG,
    R: tl.constexpr, RP: tl.constexpr, N: tl.constexpr, NP: tl.constexpr, BN: tl.constexpr,
    P: tl.constexpr, PP: tl.constexpr, C: tl.constexpr, SEG: tl.constexpr, VARLEN: tl.constexpr,
    DOT_F32: tl.constexpr, INTERP: tl.constexpr, SPLIT: tl.constexpr, USPLIT: tl.constexpr,
):
    NNB: tl.constexpr = NP // BN
    SEGLEN: tl.constexpr = SEG * C
    ROWS: tl.constexpr = C * RP
    DT = qh_ptr.dtype.element_ty
    pid0 = tl.program_id(0)
    slot = tl.program_id(1)
    h = pid0 // NNB
    nb = pid0 % NNB
    b, _seq, _seg, _bos, eos, t0 = _locate(slot, cu_ptr, S, L, NSEG, SEGLEN, VARLEN)
    if t0 < eos:
        nck = tl.minimum(tl.cdiv(eos - t0, C), SEG)
        rows = tl.arange(0, ROWS)
        rt = rows // RP
        rr = rows % RP
        causal = rt[:, None] > rt[None, :]
        n = nb * BN + tl.arange(0, BN)
        p = tl.arange(0, PP)
        bh = (b * H + h).to(tl.int64) * L
        tile = p[:, None] * N + n[None, :]
        tmask = (p < P)[:, None] & (n < N)[None, :]
        st = tl.load(ent_ptr + (slot * H + h).to(tl.int64) * P * N + tile, mask=tmask, other=0.0).to(tl.float32)
        for ci in range(nck):
            # the last chunk's entry state S_last, for d T's boundary term (dadt). A store masked to
            # the last chunk, at the top of the body: after the loop (or at the bottom) it cost
            # ptxas ~50 registers (AOT, triton 3.6 and 3.9); the mask's tensor form is for the interpreter
            tl.store(sx_ptr + (slot * H + h).to(tl.int64) * P * N + tile, _cast(st, sx_ptr.dtype.element_ty, INTERP),
                     mask=tmask & (tl.full([1, 1], ci, tl.int32) == nck - 1))
            tc = t0 + ci * C
            tok = tc + rt
            rmask = (tok < eos) & (rr < R)
            row = ((b.to(tl.int64) * L + tok) * R + rr) * H + h
            v = _tile(vt_ptr, row, rmask, p, P)
            d = _tile(dy_ptr, row, rmask, p, P)
            kb = _tile(ks_ptr, row, rmask, n, N)
            qb = _tile(qh_ptr, row, rmask, n, N)
            cs, T = _chunk_decay(adt_ptr, bh, tc, eos, C, RP)
            dec = tl.where(causal, tl.exp(tl.minimum(cs[:, None] - cs[None, :], 0.0)), 0.0)
            gm = _mm(d, tl.trans(v), DT, DOT_F32, INTERP) * dec
            sh, sl = _split(st, DT, INTERP, SPLIT)
            inter = tl.exp(cs)[:, None] * _mm_state(d, sh, sl, DT, DOT_F32, INTERP, SPLIT)
            _store_tile(dqh_ptr, row, rmask, n, _mm(gm, kb, DT, DOT_F32, INTERP) + inter, N)
            # d cs: the state term qh_i . (e^{cs_i} S_c^T dy_i), this N block's share
            _store_dcs(dcs_ptr, nb, B, H, L, b, h, tc, eos, tl.sum(qb.to(tl.float32) * inter, axis=1), C, RP)
            vw = v.to(tl.float32) * tl.exp(T - cs)[:, None]
            st = _update(vw, kb, st * tl.exp(T), DT, DOT_F32, INTERP, USPLIT)


@triton.jit
def scan_bwd_core_dkv_kernel(
    qh_ptr, ks_ptr, vt_ptr, dy_ptr, adt_ptr, cu_ptr, dx_ptr, dks_ptr, dvp_ptr, dcs_ptr, dtc_ptr,
    B, L, H, S, NSEG, NCH, NROW,
    R: tl.constexpr, RP: tl.constexpr, N: tl.constexpr, NP: tl.constexpr, BN: tl.constexpr,
    P: tl.constexpr, PP: tl.constexpr, C: tl.constexpr, SEG: tl.constexpr, VARLEN: tl.constexpr,
    DOT_F32: tl.constexpr, INTERP: tl.constexpr, SPLIT: tl.constexpr, USPLIT: tl.constexpr,
):
    NNB: tl.constexpr = NP // BN
    SEGLEN: tl.constexpr = SEG * C
    ROWS: tl.constexpr = C * RP
    DT = qh_ptr.dtype.element_ty
    pid0 = tl.program_id(0)
    slot = tl.program_id(1)
    h = pid0 // NNB
    nb = pid0 % NNB
    b, _seq, _seg, _bos, eos, t0 = _locate(slot, cu_ptr, S, L, NSEG, SEGLEN, VARLEN)
    if t0 < eos:
        nck = tl.minimum(tl.cdiv(eos - t0, C), SEG)
        rows = tl.arange(0, ROWS)
        rt = rows // RP
        rr = rows % RP
        causal = rt[:, None] > rt[None, :]
        n = nb * BN + tl.arange(0, BN)
        p = tl.arange(0, PP)
        bh = (b * H + h).to(tl.int64) * L
        tile = p[:, None] * N + n[None, :]
        tmask = (p < P)[:, None] & (n < N)[None, :]
        st = tl.load(dx_ptr + (slot * H + h).to(tl.int64) * P * N + tile, mask=tmask, other=0.0).to(tl.float32)
        for k in range(nck):
            ci = nck - 1 - k
            cidx = (slot * SEG + ci) * H + h
            tc = t0 + ci * C
            tok = tc + rt
            rmask = (tok < eos) & (rr < R)
            row = ((b.to(tl.int64) * L + tok) * R + rr) * H + h
            v = _tile(vt_ptr, row, rmask, p, P)
            d = _tile(dy_ptr, row, rmask, p, P)
            qb = _tile(qh_ptr, row, rmask, n, N)
            kb = _tile(ks_ptr, row, rmask, n, N)
            cs, T = _chunk_decay(adt_ptr, bh, tc, eos, C, RP)
            dec = tl.where(causal, tl.exp(tl.minimum(cs[:, None] - cs[None, :], 0.0)), 0.0)
            sdv = _mm(d, tl.trans(v), DT, DOT_F32, INTERP)
            gm = sdv * dec
            sh, sl = _split(st, DT, INTERP, SPLIT)
            # the inter-chunk terms are the intra-chunk MMAs' accumulators. (Taking both inter-chunk
            # terms first, so that sh / sl die earlier, spilled dkv at R = 2 and 4 under triton 3.6.)
            inter = tl.exp(T - cs)[:, None] * _mm_state(v, sh, sl, DT, DOT_F32, INTERP, SPLIT)
            _store_tile(dks_ptr, row, rmask, n, _mma(tl.trans(gm), qb, inter, DT, DOT_F32, INTERP), N)
            # dvt (this N block's share: the whole dvt when one block holds N)
            a = _mm(qb, tl.trans(kb), DT, DOT_F32, INTERP) * dec
            interv = tl.exp(T - cs)[:, None] * _mm_state(kb, tl.trans(sh), tl.trans(sl), DT, DOT_F32, INTERP, SPLIT)
            # d cs (this N block's share): row sum - column sum of the in-chunk W = A o (dy vt^T) in
            # fp32 (the in-chunk reverse cumsum then telescopes exactly), minus the state term
            # x_j = vt_j . (e^{T - cs_j} D_c ks_j), whose chunk sum goes to d T
            x = tl.sum(v.to(tl.float32) * interv, axis=1)
            _store_tile(dvp_ptr, nb * NROW + row, rmask, p, _mma(tl.trans(a), d, interv, DT, DOT_F32, INTERP), P)
            w = a * sdv
            _store_dcs(dcs_ptr, NNB + nb, B, H, L, b, h, tc, eos, tl.sum(w, axis=1) - tl.sum(w, axis=0) - x, C, RP)
            tl.store(dtc_ptr + nb * NCH * H + cidx, tl.sum(x, axis=0))   # X_c (d T's recurrence, dadt)
            dw = d.to(tl.float32) * tl.exp(cs)[:, None]
            st = _update(dw, qb, st * tl.exp(T), DT, DOT_F32, INTERP, USPLIT)


@triton.jit
def scan_bwd_core_dqkv_kernel(
    qh_ptr, ks_ptr, vt_ptr, dy_ptr, adt_ptr, cu_ptr, ent_ptr, dx_ptr, sx_ptr, dqh_ptr, dks_ptr, dvp_ptr,
    dcs_ptr, dtc_ptr,
    B, L, H, S, NSEG, NCH, NROW,
    R: tl.constexpr, RP: tl.constexpr, N: tl.constexpr, NP: tl.constexpr, BN: tl.constexpr,
    P: tl.constexpr, PP: tl.constexpr, C: tl.constexpr, SEG: tl.constexpr, VARLEN: tl.constexpr,
    DOT_F32: tl.constexpr, INTERP: tl.constexpr, SPLIT: tl.constexpr, USPLIT: tl.constexpr,
):
    """dq's walk, then dkv's, in one program (config FUSED): the chunk tiles both load are
    still in L2 when the segment is short enough (SEG_SCALE < 1)."""
    scan_bwd_core_dq_kernel(qh_ptr, ks_ptr, vt_ptr, dy_ptr, adt_ptr, cu_ptr, ent_ptr, sx_ptr, dqh_ptr, dcs_ptr,
                            B, L, H, S, NSEG, R, RP, N, NP, BN, P, PP, C, SEG, VARLEN, DOT_F32, INTERP,
                            SPLIT, USPLIT)
    tl.debug_barrier()   # kept between the walks: without it the R = 4 build spilled 8 B (AOT, triton 3.9)
    scan_bwd_core_dkv_kernel(qh_ptr, ks_ptr, vt_ptr, dy_ptr, adt_ptr, cu_ptr, dx_ptr, dks_ptr, dvp_ptr,
                             dcs_ptr, dtc_ptr, B, L, H, S, NSEG, NCH, NROW, R, RP, N, NP, BN,
                             P, PP, C, SEG, VARLEN, DOT_F32, INTERP, SPLIT, USPLIT)


@triton.jit
def scan_bwd_core_dadt_kernel(
    dvp_ptr, dvt_ptr, dcs_ptr, dtc_ptr, dx_ptr, sx_ptr, adt_ptr, cu_ptr, dadt_ptr,
    B, L, H, S, NSEG, NCH, NROW,
    R: tl.constexpr, RP: tl.constexpr, N: tl.constexpr, NP: tl.constexpr, P: tl.constexpr, PP: tl.constexpr,
    C: tl.constexpr, SEG: tl.constexpr, NNB: tl.constexpr, VARLEN: tl.constexpr, SUM_DV: tl.constexpr = True,
    SEGP: tl.constexpr = 1,
):
    """Per segment: dvt = sum_nb dvp[nb] (when N is split in NNB > 1 blocks and SUM_DV), and
    dadt_u = sum_{t >= u in u's chunk} sum_parts dcs[part, t] + d T_c, with d T_c = <D_c, S_{c+1}>
    by its recurrence (module docstring) d T_{c-1} = d T_c - X_c + Y_c from d T_last =
    e^{T_last} <D_last, S_last> + X_last (X_c: dkv's dtc, summed over N blocks; Y_c: the chunk
    sum of dq's d cs parts), taken as a reverse cumsum over the segment's chunks, [SB, C] tiles
    of SB chunks at a time (a serial walk over the chunks took 74 us at SISO B4 L4096)."""
    SEGLEN: tl.constexpr = SEG * C
    ROWS: tl.constexpr = C * RP
    BPX: tl.constexpr = min(PP, max(1, 4096 // NP))
    SB: tl.constexpr = min(SEGP, max(1, 256 // C))   # chunks per tile (SEGP: pow2 >= SEG; 512 / 4096
    # tokens per tile spilled 8 B at 96 registers under 3.6, R 2 N 256: a ptxas quirk, not pressure)
    h = tl.program_id(0)
    slot = tl.program_id(1)
    b, _seq, _seg, _bos, eos, t0 = _locate(slot, cu_ptr, S, L, NSEG, SEGLEN, VARLEN)
    if t0 < eos:
        nck = tl.minimum(tl.cdiv(eos - t0, C), SEG)
        rows = tl.arange(0, ROWS)
        rt = rows // RP
        rr = rows % RP
        p = tl.arange(0, PP)
        # d T_last = e^{T_last} <D_last, S_last> + X_last (D_last: phase 2's exit adjoint dx;
        # S_last: the last chunk's entry state, stored by dq)
        tl_ = t0 + (nck - 1) * C + tl.arange(0, C)
        t_last = tl.sum(tl.load(adt_ptr + (b * H + h).to(tl.int64) * L + tl_, mask=tl_ < eos, other=0.0), axis=0)
        nn = tl.arange(0, NP)
        ds = 0.0
        for j in tl.static_range(0, PP, BPX):   # P in slices of at most 4096 elements
            pr = j + tl.arange(0, BPX)
            off = (slot * H + h).to(tl.int64) * P * N + pr[:, None] * N + nn[None, :]
            m2 = (pr < P)[:, None] & (nn < N)[None, :]
            ds += tl.sum(tl.sum(tl.load(dx_ptr + off, mask=m2, other=0.0).to(tl.float32)
                                * tl.load(sx_ptr + off, mask=m2, other=0.0).to(tl.float32), axis=1), axis=0)
        if NNB > 1 and SUM_DV:   # dvt from its N-block partials, chunk by chunk
            for ci in range(nck):
                tok = t0 + ci * C + rt
                rmask = (tok < eos) & (rr < R)
                row = ((b.to(tl.int64) * L + tok) * R + rr) * H + h
                dv = tl.zeros([ROWS, PP], dtype=tl.float32)
                for i in range(NNB):
                    dv += _tile(dvp_ptr, i * NROW + row, rmask, p, P)
                _store_tile(dvt_ptr, row, rmask, p, dv, P)
        # the segment's chunks SB at a time as [SB, C] tiles (256 tokens), last block first: the
        # d cs parts of dq (xq: the state terms qh_i . (e^{cs_i} S_c^T dy_i)) and of dkv (xk), X_c
        # (xc), Y_c - X_c (dlt), and d T_c = d T_last + sum_{c < c' <= last} (Y_c' - X_c') as a
        # reverse cumsum over chunks, carried from tile to tile in g
        g = tl.exp(t_last) * ds
        for i in range(NNB):
            g += tl.load(dtc_ptr + (i * NCH + slot * SEG + nck - 1) * H + h)   # + X_last: d T_last
        for kb in range(tl.cdiv(nck, SB)):
            ck = (tl.cdiv(nck, SB) - 1 - kb) * SB + tl.arange(0, SB)
            tt = t0 + ck[:, None] * C + tl.arange(0, C)[None, :]
            m = (ck < nck)[:, None] & (tt < eos)
            xq = tl.zeros([SB, C], dtype=tl.float32)
            xk = tl.zeros([SB, C], dtype=tl.float32)
            xc = tl.zeros([SB], dtype=tl.float32)
            for i in range(NNB):
                xq += tl.load(dcs_ptr + ((i * B + b) * H + h).to(tl.int64) * L + tt, mask=m, other=0.0)
                xk += tl.load(dcs_ptr + (((NNB + i) * B + b) * H + h).to(tl.int64) * L + tt, mask=m, other=0.0)
                xc += tl.load(dtc_ptr + (i * NCH + slot * SEG + ck) * H + h, mask=ck < nck, other=0.0)
            dlt = tl.sum(xq, axis=1) - xc
            dtc = g + tl.cumsum(dlt, axis=0, reverse=True) - dlt
            tl.store(dadt_ptr + (b * H + h).to(tl.int64) * L + tt,
                     tl.cumsum(xq + xk, axis=1, reverse=True) + dtc[:, None], mask=m)
            g += tl.sum(dlt, axis=0)
