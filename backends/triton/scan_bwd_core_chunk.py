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
    d T    = e^T <D_c, S_c> + sum_j ks_j . (e^{T - cs_j} D_c^T vt_j)
    dadt_u = sum_{t >= u in the chunk} d cs_t + d T                      (kernel dadt)

Only in-chunk sums: the sequence-long reverse cumsum of d cs (mathematically the same) cancels
catastrophically (its partial sums are O(1) differences of O(L) terms, and bf16 GEMM errors do
not cancel), so d T is computed from the states themselves.

The dq kernel walks the segment forwards from its entry state (phase 2's ent; S_c <- e^T S_c +
(vt e^{T - cs})^T ks) and writes every chunk's entry state S_c (scratch sch); the dkv kernel
walks it backwards from its exit adjoint (phase 2's dx; D_{c-1} = e^T D_c + (dy e^{cs})^T qh)
and reads S_c for d T.

Tiles: dq and dkv hold the whole P and a block of BN columns of N (state tile P x BN). Their
N-reducing outputs (dqh, dks) are per block; dvt and the d cs / d T partials reduce over N:
with one block (BN >= N, the default up to P x N = 64 x 128 for bf16) dkv writes dvt itself,
else per-block partials (scratch dvp) that the dadt kernel adds in a fixed order (no atomics),
as it adds the d cs partials of dq's blocks and the d T partials of dkv's.

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
    qh_ptr, ks_ptr, vt_ptr, dy_ptr, adt_ptr, cu_ptr, ent_ptr, sch_ptr, dqh_ptr, dcs_ptr,
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
            tl.store(sch_ptr + ((slot * SEG + ci) * H + h).to(tl.int64) * P * N + tile,
                     _cast(st, sch_ptr.dtype.element_ty, INTERP), mask=tmask)
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
    qh_ptr, ks_ptr, vt_ptr, dy_ptr, adt_ptr, cu_ptr, dx_ptr, sch_ptr, dks_ptr, dvp_ptr, dcs_ptr, dtc_ptr,
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
            # <D_c, S_c> first, before the chunk's other tiles are live (registers)
            cidx = (slot * SEG + ci) * H + h
            sc = tl.load(sch_ptr + cidx.to(tl.int64) * P * N + tile, mask=tmask, other=0.0).to(tl.float32)
            xds = tl.sum(tl.sum(st * sc, axis=1), axis=0)
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
            inter = tl.exp(T - cs)[:, None] * _mm_state(v, sh, sl, DT, DOT_F32, INTERP, SPLIT)
            _store_tile(dks_ptr, row, rmask, n, _mm(tl.trans(gm), qb, DT, DOT_F32, INTERP) + inter, N)
            # dvt (this N block's share: the whole dvt when one block holds N)
            a = _mm(qb, tl.trans(kb), DT, DOT_F32, INTERP) * dec
            interv = tl.exp(T - cs)[:, None] * _mm_state(kb, tl.trans(sh), tl.trans(sl), DT, DOT_F32, INTERP, SPLIT)
            _store_tile(dvp_ptr, nb * NROW + row, rmask, p, _mm(tl.trans(a), d, DT, DOT_F32, INTERP) + interv, P)
            # d cs (this N block's share): row sum - column sum of the in-chunk W = A o (dy vt^T) in
            # fp32 (the in-chunk reverse cumsum then telescopes exactly), minus the state term
            # x_j = vt_j . (e^{T - cs_j} D_c ks_j), whose chunk sum goes to d T
            w = a * sdv
            x = tl.sum(v.to(tl.float32) * interv, axis=1)
            _store_dcs(dcs_ptr, NNB + nb, B, H, L, b, h, tc, eos, tl.sum(w, axis=1) - tl.sum(w, axis=0) - x, C, RP)
            dtc = tl.exp(T) * xds + tl.sum(x, axis=0)
            tl.store(dtc_ptr + nb * NCH * H + cidx, dtc)
            dw = d.to(tl.float32) * tl.exp(cs)[:, None]
            st = _update(dw, qb, st * tl.exp(T), DT, DOT_F32, INTERP, USPLIT)


@triton.jit
def scan_bwd_core_dqkv_kernel(
    qh_ptr, ks_ptr, vt_ptr, dy_ptr, adt_ptr, cu_ptr, ent_ptr, dx_ptr, sch_ptr, dqh_ptr, dks_ptr, dvp_ptr,
    dcs_ptr, dtc_ptr,
    B, L, H, S, NSEG, NCH, NROW,
    R: tl.constexpr, RP: tl.constexpr, N: tl.constexpr, NP: tl.constexpr, BN: tl.constexpr,
    P: tl.constexpr, PP: tl.constexpr, C: tl.constexpr, SEG: tl.constexpr, VARLEN: tl.constexpr,
    DOT_F32: tl.constexpr, INTERP: tl.constexpr, SPLIT: tl.constexpr, USPLIT: tl.constexpr,
):
    """dq's walk, then dkv's, in one program (config FUSED): the chunk entry states S_c that
    the first walk writes and the second reads, and the chunk tiles both load, are still in
    L2 when the segment is short enough (SEG_SCALE < 1)."""
    scan_bwd_core_dq_kernel(qh_ptr, ks_ptr, vt_ptr, dy_ptr, adt_ptr, cu_ptr, ent_ptr, sch_ptr, dqh_ptr, dcs_ptr,
                            B, L, H, S, NSEG, R, RP, N, NP, BN, P, PP, C, SEG, VARLEN, DOT_F32, INTERP,
                            SPLIT, USPLIT)
    tl.debug_barrier()   # this program's S_c stores visible to all its threads before the reads
    scan_bwd_core_dkv_kernel(qh_ptr, ks_ptr, vt_ptr, dy_ptr, adt_ptr, cu_ptr, dx_ptr, sch_ptr, dks_ptr, dvp_ptr,
                             dcs_ptr, dtc_ptr, B, L, H, S, NSEG, NCH, NROW, R, RP, N, NP, BN, P, PP, C, SEG,
                             VARLEN, DOT_F32, INTERP, SPLIT, USPLIT)


@triton.jit
def scan_bwd_core_dadt_kernel(
    dvp_ptr, dvt_ptr, dcs_ptr, dtc_ptr, cu_ptr, dadt_ptr,
    B, L, H, S, NSEG, NCH, NROW,
    R: tl.constexpr, RP: tl.constexpr, P: tl.constexpr, PP: tl.constexpr, C: tl.constexpr,
    SEG: tl.constexpr, NNB: tl.constexpr, VARLEN: tl.constexpr, SUM_DV: tl.constexpr = True,
):
    """Per chunk: dvt = sum_nb dvp[nb] (when N is split in NNB > 1 blocks and SUM_DV), and
    dadt_u = sum_{t >= u in u's chunk} sum_parts dcs[part, t] + sum_nb dtc[nb, chunk]."""
    SEGLEN: tl.constexpr = SEG * C
    ROWS: tl.constexpr = C * RP
    h = tl.program_id(0)
    slot = tl.program_id(1)
    b, _seq, _seg, _bos, eos, t0 = _locate(slot, cu_ptr, S, L, NSEG, SEGLEN, VARLEN)
    if t0 < eos:
        nck = tl.minimum(tl.cdiv(eos - t0, C), SEG)
        rows = tl.arange(0, ROWS)
        rt = rows // RP
        rr = rows % RP
        p = tl.arange(0, PP)
        for ci in range(nck):
            tc = t0 + ci * C
            if NNB > 1 and SUM_DV:
                tok = tc + rt
                rmask = (tok < eos) & (rr < R)
                row = ((b.to(tl.int64) * L + tok) * R + rr) * H + h
                dv = tl.zeros([ROWS, PP], dtype=tl.float32)
                for i in range(NNB):
                    dv += _tile(dvp_ptr, i * NROW + row, rmask, p, P)
                _store_tile(dvt_ptr, row, rmask, p, dv, P)
            x = tl.zeros([C], dtype=tl.float32)
            tt = tc + tl.arange(0, C)
            m = tt < eos
            for i in range(2 * NNB):
                x += tl.load(dcs_ptr + ((i * B + b) * H + h).to(tl.int64) * L + tt, mask=m, other=0.0)
            dtc = 0.0
            for i in range(NNB):
                dtc += tl.load(dtc_ptr + (i * NCH + slot * SEG + ci) * H + h)
            tl.store(dadt_ptr + (b * H + h).to(tl.int64) * L + tt, tl.cumsum(x, axis=0, reverse=True) + dtc,
                     mask=m)
