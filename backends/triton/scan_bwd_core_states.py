"""Backward core, phases 1 and 2 (issue 5; SPEC §8, §9; reference/core_adjoint.py): the local
states of every segment, then the forward state passing and the reverse adjoint passing.

A segment is SEG consecutive chunks of C tokens of one sequence (SEGLEN = SEG * C tokens, the
last one of a sequence may be shorter); rows i = (token t, rank r), R ranks padded to RP rows.
With b the inclusive decay cumsum of adt inside the segment and T its total (b at its end):

  phase 1 (scan_bwd_core_local_kernel; role 0 / role 1 on grid axis 2)
    Lf = sum_j e^{T - b_j} vt_j ks_j^T     (forward local state: what the segment adds to S)
    Lb = sum_i e^{b_i}    dy_i qh_i^T      (local adjoint: what the segment's outputs add to
                                            the gradient of the state entering it)
  Lf walks the segment's chunks forwards, Lf <- e^{T_c} Lf + (vt e^{T_c - cs})^T ks; Lb walks
  them backwards, Lb <- e^{T_c} Lb + (dy e^{cs})^T qh (cs, T_c: in-chunk cumsum and total).
  Both roles write the segment's decay total T (tot[role]; summed in their own chunk order,
  and each read back by the same role of phase 2).

  phase 2 (scan_bwd_core_pass_kernel; role 0 / role 1 on grid axis 2), per sequence:
    role 0:  E_0 = S0 (or 0);  store ent_s = E_s;  E_{s+1} = e^{T_s} E_s + Lf_s
    role 1:  D = dS_final (or 0); for s = last .. 0: store dx_s = D (the adjoint at segment
             s's exit); D <- e^{T_s} D + Lb_s;  dS0 = D after segment 0.
  Unused work is skipped: Lf of a sequence's last segment (S_final itself is not needed: dadt
  takes its share through the chunk-level d T terms), Lb of its first segment without dS0.

Also the cs table (scan_bwd_core_cs_kernel): every chunk's in-chunk decay cumsum as one row, for
the TileLang walks (backends/tilelang/scan_bwd_core.py), which load it instead of summing adt.

Grids: phase 1 (H * cdiv(P, BP), segment slots, 2); phase 2 (H * cdiv(P, BP2), sequences, 2).
States are (slots, H, P, N) in the scratch dtype (row-major P x N), each program holding a
BP x pow2(N) fp32 tile.
"""
from __future__ import annotations

import triton
import triton.language as tl

from .scan_common import _cast, _locate


def local_grid(H: int, P: int, BP: int, nslots: int):
    return (H * triton.cdiv(P, BP), nslots, 2)


def pass_grid(H: int, P: int, BP: int, S: int):
    return (H * triton.cdiv(P, BP), S, 2)


def cs_grid(H: int, nslots: int):
    return (H, nslots)


@triton.jit
def _mma(a, b, acc, DT: tl.constexpr, DOT_F32: tl.constexpr, INTERP: tl.constexpr):
    """acc + a @ b, like scan_common._mm (operands rounded to DT, or 3xTF32 for fp32 inputs),
    with acc as the dot's accumulator (no second accumulator tile in registers)."""
    if DOT_F32:
        if INTERP:
            r = tl.dot(a.to(tl.float32), b.to(tl.float32), acc)
        else:
            r = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="tf32x3")
    else:
        if INTERP:
            r = tl.dot(_cast(a, DT, INTERP).to(tl.float32), _cast(b, DT, INTERP).to(tl.float32), acc)
        else:
            r = tl.dot(a.to(DT), b.to(DT), acc)
    return r


@triton.jit
def _update(xw, y, acc, DT: tl.constexpr, DOT_F32: tl.constexpr, INTERP: tl.constexpr, USPLIT: tl.constexpr):
    """acc + xw^T @ y, the state update with the decay-scaled fp32 rows xw (y exact in DT): with
    USPLIT xw is split into DT halves hi + lo (two products, fp32-accurate to ~2^-16), else
    rounded to DT once."""
    if USPLIT and not DOT_F32:
        hi = _cast(xw, DT, INTERP)
        acc = _mma(tl.trans(_cast(xw - hi.to(tl.float32), DT, INTERP)), y, acc, DT, DOT_F32, INTERP)
        r = _mma(tl.trans(hi), y, acc, DT, DOT_F32, INTERP)
    else:
        r = _mma(tl.trans(xw), y, acc, DT, DOT_F32, INTERP)
    return r


@triton.jit
def _chunk_decay(adt_ptr, bh, tc, eos, C: tl.constexpr, RP: tl.constexpr):
    """Per row (t, r) of the chunk [tc, tc + C): the inclusive in-chunk decay cumsum cs of its
    token, and the chunk's total T (rows past the sequence's end read adt = 0)."""
    rows = tl.arange(0, C * RP)
    tok = tc + rows // RP
    a = tl.load(adt_ptr + bh + tok, mask=(tok < eos) & ((rows % RP) == 0), other=0.0)
    return tl.cumsum(a, axis=0), tl.sum(a, axis=0)


@triton.jit
def scan_bwd_core_local_kernel(
    qh_ptr, ks_ptr, vt_ptr, dy_ptr, adt_ptr, cu_ptr, lf_ptr, lb_ptr, tot_ptr,
    L, H, S, NSEG, NSLOT,
    R: tl.constexpr, RP: tl.constexpr, N: tl.constexpr, NP: tl.constexpr, P: tl.constexpr,
    BP: tl.constexpr, C: tl.constexpr, SEG: tl.constexpr, VARLEN: tl.constexpr,
    NEED_FIRST: tl.constexpr, DOT_F32: tl.constexpr, INTERP: tl.constexpr, USPLIT: tl.constexpr,
):
    NPB: tl.constexpr = (P + BP - 1) // BP
    SEGLEN: tl.constexpr = SEG * C
    ROWS: tl.constexpr = C * RP
    DT = qh_ptr.dtype.element_ty
    pid0 = tl.program_id(0)
    slot = tl.program_id(1)
    role = tl.program_id(2)
    h = pid0 // NPB
    pb = pid0 % NPB
    b, _seq, seg, _bos, eos, t0 = _locate(slot, cu_ptr, S, L, NSEG, SEGLEN, VARLEN)
    keep = t0 < eos
    if role == 0:
        keep = keep & (t0 + SEGLEN < eos)
        x_ptr = vt_ptr
        y_ptr = ks_ptr
        o_ptr = lf_ptr
    else:
        if not NEED_FIRST:
            keep = keep & (seg > 0)
        x_ptr = dy_ptr
        y_ptr = qh_ptr
        o_ptr = lb_ptr
    if keep:
        nck = tl.minimum(tl.cdiv(eos - t0, C), SEG)
        rows = tl.arange(0, ROWS)
        rt = rows // RP
        rr = rows % RP
        n = tl.arange(0, NP)
        p = pb * BP + tl.arange(0, BP)
        bh = (b * H + h).to(tl.int64) * L
        acc = tl.zeros([BP, NP], dtype=tl.float32)
        ttot = 0.0
        for k in range(nck):
            ci = tl.where(role == 0, k, nck - 1 - k)
            tc = t0 + ci * C
            tok = tc + rt
            rmask = (tok < eos) & (rr < R)
            row = ((b.to(tl.int64) * L + tok) * R + rr) * H + h
            x = tl.load(x_ptr + row[:, None] * P + p[None, :], mask=rmask[:, None] & (p < P)[None, :],
                        other=0.0).to(tl.float32)
            y = tl.load(y_ptr + row[:, None] * N + n[None, :], mask=rmask[:, None] & (n < N)[None, :],
                        other=0.0)
            cs, T = _chunk_decay(adt_ptr, bh, tc, eos, C, RP)
            w = tl.where(role == 0, tl.exp(T - cs), tl.exp(cs))
            acc = _update(x * w[:, None], y, acc * tl.exp(T), DT, DOT_F32, INTERP, USPLIT)
            ttot += T
        off = (slot * H + h).to(tl.int64) * P * N + p[:, None] * N + n[None, :]
        tl.store(o_ptr + off, _cast(acc, o_ptr.dtype.element_ty, INTERP),
                 mask=(p < P)[:, None] & (n < N)[None, :])
        if pb == 0:
            tl.store(tot_ptr + (role * NSLOT + slot) * H + h, ttot)


@triton.jit
def scan_bwd_core_cs_kernel(adt_ptr, cu_ptr, cs_ptr, L, H, S, NSEG, C: tl.constexpr, SEG: tl.constexpr,
                            SEGP: tl.constexpr, VARLEN: tl.constexpr):
    """Every chunk's in-chunk inclusive decay cumsum as a table cs[slot * SEG + ci, h, 0:C], for
    walks that load it as one tile (the TileLang walks: a TMA copy, where an in-kernel cumsum
    costs a block-wide reduction per chunk): positions past the sequence's end repeat its
    total (adt = 0 there), so cs[..., C - 1] is the chunk's total T. Chunks past a sequence's
    end are left unwritten (no walk reads them). Grid (H, segment slots); a program's SEG
    chunks as one [SEGP, C] tile."""
    h = tl.program_id(0)
    slot = tl.program_id(1)
    b, _seq, _seg, _bos, eos, t0 = _locate(slot, cu_ptr, S, L, NSEG, SEG * C, VARLEN)
    ci = tl.arange(0, SEGP)
    tc = t0 + ci * C
    tok = tc[:, None] + tl.arange(0, C)[None, :]
    a = tl.load(adt_ptr + (b * H + h).to(tl.int64) * L + tok, mask=tok < eos, other=0.0)
    row = (slot * SEG + ci) * H + h
    tl.store(cs_ptr + row.to(tl.int64)[:, None] * C + tl.arange(0, C)[None, :], tl.cumsum(a, axis=1),
             mask=((ci < SEG) & (tc < eos))[:, None])


@triton.jit
def scan_bwd_core_pass_kernel(
    lf_ptr, lb_ptr, tot_ptr, cu_ptr, s0_ptr, dsf_ptr, ent_ptr, dx_ptr, ds0_ptr,
    L, H, NSEG, NSLOT,
    N: tl.constexpr, NP: tl.constexpr, P: tl.constexpr, BP: tl.constexpr, SEGLEN: tl.constexpr,
    VARLEN: tl.constexpr, HAS_S0: tl.constexpr, HAS_DSF: tl.constexpr, WANT_DS0: tl.constexpr,
    INTERP: tl.constexpr,
):
    NPB: tl.constexpr = (P + BP - 1) // BP
    pid0 = tl.program_id(0)
    seq = tl.program_id(1)
    role = tl.program_id(2)
    h = pid0 // NPB
    pb = pid0 % NPB
    if VARLEN:
        bos = tl.load(cu_ptr + seq)
        eos = tl.load(cu_ptr + seq + 1)
        start = bos // SEGLEN + seq
    else:
        bos = seq * 0
        eos = bos + L
        start = seq * NSEG
    nseg = tl.cdiv(eos - bos, SEGLEN)
    n = tl.arange(0, NP)
    p = pb * BP + tl.arange(0, BP)
    m = (p < P)[:, None] & (n < N)[None, :]
    tile = p[:, None] * N + n[None, :]
    sh = (seq * H + h).to(tl.int64) * P * N
    if role == 0:
        if HAS_S0:
            e = tl.load(s0_ptr + sh + tile, mask=m, other=0.0)
        else:
            e = tl.zeros([BP, NP], dtype=tl.float32)
        for s in range(nseg):
            base = ((start + s) * H + h).to(tl.int64) * P * N
            tl.store(ent_ptr + base + tile, _cast(e, ent_ptr.dtype.element_ty, INTERP), mask=m)
            if s + 1 < nseg:
                lf = tl.load(lf_ptr + base + tile, mask=m, other=0.0).to(tl.float32)
                e = e * tl.exp(tl.load(tot_ptr + (start + s) * H + h)) + lf
    else:
        if HAS_DSF:
            d = tl.load(dsf_ptr + sh + tile, mask=m, other=0.0)
        else:
            d = tl.zeros([BP, NP], dtype=tl.float32)
        for k in range(nseg):
            s = nseg - 1 - k
            base = ((start + s) * H + h).to(tl.int64) * P * N
            tl.store(dx_ptr + base + tile, _cast(d, dx_ptr.dtype.element_ty, INTERP), mask=m)
            use = s > 0
            if WANT_DS0:
                use = s >= 0
            if use:
                lb = tl.load(lb_ptr + base + tile, mask=m, other=0.0).to(tl.float32)
                d = d * tl.exp(tl.load(tot_ptr + (NSLOT + start + s) * H + h)) + lb
        if WANT_DS0:
            tl.store(ds0_ptr + sh + tile, d, mask=m)
