"""Phase 2 of the chunked scan (SPEC §8, reference/chunked.py `chunk_states`): the local state
of every segment, from zero, in the segment's own rotary frame.

A segment is SEG consecutive chunks of C tokens of one sequence (SEGLEN = SEG * C tokens; the
last segment of a sequence may be shorter). For a segment starting at token t0 the kernel walks
its chunks in order and accumulates, in fp32 registers,

    Lrel  = sum_{t in segment} e^{cs_end - cs_t} scale_t sum_r vt_{t,r} kr_{t,r}^T     (P x N)
    kr_{t,r} = Rot(ell_t)(K_{t,r} + K_bias_r),   ell_t = sum_{t0 <= u <= t} phi_u   (relative)
    vt_{t,r} = V_t * MIMO_V_r

chunk by chunk: Lrel <- e^{T_c} Lrel + (vt * e^{T_c - cs} scale)^T kr (one tensor-core dot per
pair half), where cs is the in-chunk inclusive decay cumsum and T_c its total. With SEG = 1 this
is exactly reference.chunked.chunk_states expressed in the chunk's frame; in the absolute frame
L = Lrel Rot(theta0)^T, theta0 = the angle before the segment's first token.

Outputs per segment slot and head: Lrel (P x N, scratch dtype), the segment's decay total
T = sum adt (fp32) and its angle total Phi = wrap(sum phi) (A values, fp32). Without final
states the last segment of each sequence is skipped (its local state feeds nothing).

ESPLIT (the forward's STATE_SPLIT): phases 2 and 3 work on sub-segments, ESPLIT per phase-4
segment, so phase 2 has ESPLIT times the programs for the same work; phase 4 reads the entry
state of every ESPLIT-th sub-segment. Without final states the sub-segments of each sequence's
last phase-4 segment are skipped.

Grid: (H * cdiv(P, BP), number of segment slots); program (h, p-block, slot). Heads vary
fastest, so the heads of one segment (which share K with GQA) run together and K stays in L2.
"""
from __future__ import annotations

import triton
import triton.language as tl

from .scan_common import (_angles_ell, _angles_math, _angles_math_tok, _angles_raw, _bias_pairs, _cast, _locate,
                          _mm, _pairs_math, _pairs_raw, _rotate, _scalars_math, _scalars_raw, _store_ell,
                          _store_state, _widen)


def grid(H: int, P: int, BP: int, nslots: int):
    return (H * triton.cdiv(P, BP), nslots)


@triton.jit
def _loads(k_ptr, v_ptr, adt_ptr, dt_ptr, trap_ptr, ang_ptr, k_base, v_base, bh, ang_base, s_kt, s_kr,
           s_vt, s_at, tc, eos, rt, rr, j, p, R: tl.constexpr, N: tl.constexpr, NH: tl.constexpr,
           P: tl.constexpr, A: tl.constexpr, AP: tl.constexpr, C: tl.constexpr, RP: tl.constexpr,
           PAIR_HALF: tl.constexpr, TRAP: tl.constexpr, GATES: tl.constexpr, ANG_TOK: tl.constexpr = False):
    """Every global load of one chunk [tc, tc + C) (all masked past the sequence's end)."""
    tok = tc + rt
    rmask = (tok < eos) & (rr < R)
    tok64 = tok.to(tl.int64)
    k0r, k1r = _pairs_raw(k_ptr, k_base + tok64 * s_kt + rr * s_kr, rmask, j, N, NH, PAIR_HALF)
    vr = tl.load(v_ptr + v_base + tok64[:, None] * s_vt + p[None, :],
                 mask=rmask[:, None] & (p < P)[None, :], other=0.0)
    sa, sdt, sdtn, str_, strn = _scalars_raw(adt_ptr, dt_ptr, trap_ptr, bh, tc, eos, C, RP, TRAP, GATES)
    if A > 0:
        araw = _angles_raw(ang_ptr, ang_base, s_at, tc, eos, A, C, 1 if ANG_TOK else RP, AP)
    else:
        araw = sa
    return k0r, k1r, vr, sa, sdt, sdtn, str_, strn, araw


@triton.jit
def scan_chunk_state_kernel(
    k_ptr, v_ptr, adt_ptr, dt_ptr, trap_ptr, ang_ptr, kb_ptr, mv_ptr, cu_ptr,
    lrel_ptr, tot_ptr, phi_ptr, ell_ptr,
    s_kb, s_kt, s_kr, s_kg, s_vb, s_vt, s_vh, s_ab, s_at, s_ah,
    L, H, G, S, NSEG,
    R: tl.constexpr, RP: tl.constexpr, N: tl.constexpr, NHP: tl.constexpr, P: tl.constexpr,
    BP: tl.constexpr, A: tl.constexpr, AP: tl.constexpr, C: tl.constexpr, SEG: tl.constexpr,
    PAIR_HALF: tl.constexpr, TRAP: tl.constexpr, HAS_MV: tl.constexpr, VARLEN: tl.constexpr,
    FINAL: tl.constexpr, FAST_TRIG: tl.constexpr, DOT_F32: tl.constexpr, INTERP: tl.constexpr,
    PREFETCH: tl.constexpr, ELL: tl.constexpr, GATES: tl.constexpr, ESPLIT: tl.constexpr = 1,
    ANG_TOK: tl.constexpr = False,
):
    NPB: tl.constexpr = (P + BP - 1) // BP
    SEGLEN: tl.constexpr = SEG * C
    NH: tl.constexpr = N // 2
    ROWS: tl.constexpr = C * RP
    DT = k_ptr.dtype.element_ty
    pid0 = tl.program_id(0)
    slot = tl.program_id(1)
    h = pid0 // NPB
    pb = pid0 % NPB
    b, seq, seg, bos, eos, t0 = _locate(slot, cu_ptr, S, L, NSEG, SEGLEN, VARLEN)
    keep = t0 < eos
    need_state = t0 < eos
    if not FINAL:   # a later phase-4 segment needs this local state (ESPLIT: see the doc)
        need_state = bos + (seg // ESPLIT + 1) * (SEGLEN * ESPLIT) < eos
        if not ELL:
            keep = need_state
    if keep:
        g = h // (H // G)
        nck = tl.minimum(tl.cdiv(eos - t0, C), SEG)
        # with ELL every segment stores its angles for phase 4; a segment whose local state
        # feeds nothing (the last one without final states) walks the angles alone
        n_full = tl.where(need_state, nck, 0)
        rows = tl.arange(0, ROWS)
        rt = rows // RP
        rr = rows % RP
        j = tl.arange(0, NHP)
        p = pb * BP + tl.arange(0, BP)
        pm = p < P
        bh = (b * H + h).to(tl.int64) * L
        ang_base = b.to(tl.int64) * s_ab + h.to(tl.int64) * s_ah
        k_base = b.to(tl.int64) * s_kb + g.to(tl.int64) * s_kg
        v_base = b.to(tl.int64) * s_vb + h.to(tl.int64) * s_vh
        s0 = tl.zeros([BP, NHP], dtype=tl.float32)
        s1 = tl.zeros([BP, NHP], dtype=tl.float32)
        carry = tl.zeros([AP], dtype=tl.float32)
        kb0, kb1 = _bias_pairs(kb_ptr, h, R, RP, C, N, NH, NHP, PAIR_HALF)
        ttot = 0.0
        # software pipelining by hand: the loads of chunk ci + 1 are issued before the math of
        # chunk ci (the loop is latency-bound); PREFETCH=False loads each chunk in its turn
        if PREFETCH:
            k0r, k1r, vr, sa, sdt, sdtn, str_, strn, araw = _loads(
                k_ptr, v_ptr, adt_ptr, dt_ptr, trap_ptr, ang_ptr, k_base, v_base, bh, ang_base, s_kt,
                s_kr, s_vt, s_at, t0, eos, rt, rr, j, p, R, N, NH, P, A, AP, C, RP, PAIR_HALF, TRAP, GATES,
                ANG_TOK)
        for ci in range(0, n_full):
            tc = t0 + ci * C
            tok = tc + rt
            rmask = (tok < eos) & (rr < R)
            if PREFETCH:
                nk0, nk1, nv, na, ndt, ndtn, ntr, ntrn, nang = _loads(
                    k_ptr, v_ptr, adt_ptr, dt_ptr, trap_ptr, ang_ptr, k_base, v_base, bh, ang_base, s_kt,
                    s_kr, s_vt, s_at, tc + C, eos, rt, rr, j, p, R, N, NH, P, A, AP, C, RP, PAIR_HALF, TRAP,
                    GATES, ANG_TOK)
            else:  # loads next to their uses (fewer live registers)
                sa, sdt, sdtn, str_, strn = _scalars_raw(adt_ptr, dt_ptr, trap_ptr, bh, tc, eos, C, RP, TRAP,
                                                         GATES)
                k0r, k1r = _pairs_raw(k_ptr, k_base + tok.to(tl.int64) * s_kt + rr * s_kr, rmask, j, N, NH,
                                      PAIR_HALF)
                if A > 0:
                    araw = _angles_raw(ang_ptr, ang_base, s_at, tc, eos, A, C, 1 if ANG_TOK else RP, AP)
                vr = tl.load(v_ptr + v_base + tok.to(tl.int64)[:, None] * s_vt + p[None, :],
                             mask=rmask[:, None] & pm[None, :], other=0.0)
            dt, gamma, scale, cs, T, lead = _scalars_math(sa, sdt, sdtn, str_, strn, C, RP, TRAP, GATES)
            k0, k1 = _pairs_math(k0r, k1r, rmask, kb0, kb1, j, NH)
            if A > 0:
                if ELL:
                    ell, carry = _angles_ell(araw, dt, carry)
                    _store_ell(ell_ptr, bh, tc, eos, ell, A, C, RP)
                    c, s = _widen(ell, C, RP, NHP, FAST_TRIG)
                elif ANG_TOK:   # MIMO: once per token, broadcast to the rank rows
                    c, s, carry = _angles_math_tok(araw, dt_ptr, bh, tc, eos, carry, RP, NHP, FAST_TRIG)
                else:
                    c, s, carry = _angles_math(araw, dt, carry, C, RP, NHP, FAST_TRIG)
                k0, k1 = _rotate(k0, k1, c, s)
            if not DOT_F32:
                k0 = _cast(k0, DT, INTERP)
                k1 = _cast(k1, DT, INTERP)
            v = vr.to(tl.float32)
            if HAS_MV:
                v = v * tl.load(mv_ptr + (h * R + rr)[:, None] * P + p[None, :],
                                mask=(rr < R)[:, None] & pm[None, :], other=0.0)
            wk = tl.exp(T - cs) * scale
            vw = tl.trans(v * wk[:, None])
            decay = tl.exp(T)
            s0 = s0 * decay + _mm(vw, k0, DT, DOT_F32, INTERP)
            s1 = s1 * decay + _mm(vw, k1, DT, DOT_F32, INTERP)
            ttot += T
            if PREFETCH:
                k0r, k1r, vr, sa, sdt, sdtn, str_, strn, araw = nk0, nk1, nv, na, ndt, ndtn, ntr, ntrn, nang
        if ELL:
            if A > 0:
                for ci in range(n_full, nck):  # angles only
                    tc = t0 + ci * C
                    offs = tc + rt
                    dta = tl.load(dt_ptr + bh + offs, mask=offs < eos, other=0.0)
                    araw = _angles_raw(ang_ptr, ang_base, s_at, tc, eos, A, C, RP, AP)
                    ell, carry = _angles_ell(araw, dta, carry)
                    _store_ell(ell_ptr, bh, tc, eos, ell, A, C, RP)
        _store_state(lrel_ptr, (slot * H + h).to(tl.int64) * P * N, p, j, s0, s1, P, N, NH, PAIR_HALF,
                     INTERP)

        if pb == 0:
            tl.store(tot_ptr + slot * H + h, ttot)
            if A > 0:
                ja = tl.arange(0, AP)
                tl.store(phi_ptr + (slot * H + h) * A + ja, carry, mask=ja < A)
