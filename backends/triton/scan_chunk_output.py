"""Phase 4 of the chunked scan (SPEC §8, reference/chunked.py `chunk_outputs`): the outputs of
every chunk of a segment, starting from the segment's entry state.

Per (segment slot, head, block of BP columns of P), the program loads the entry state Erel
(segment frame, see scan_state_passing.py) into fp32 registers and walks the segment's chunks.
Per chunk, with rows i = (token t_i, rank r_i) (SISO: one row per token), qr/kr rotated by the
segment-relative angles, vt = v MIMO_V, cs the in-chunk decay cumsum:

    scores_ij = qr_i . kr_j                                   (tensor-core dot, N as 2 x N/2)
    W_ij      = e^{cs_i - cs_j} scale_j   if t_i > t_j        (strictly causal, any ranks)
              = gamma_{t_i}               if t_i = t_j        (same-step diagonal: qr.kr of one
                                                               step equals q'.k', the rotation
                                                               cancels; all rank pairs)
              = 0                         otherwise
    y_i       = (scores o W) vt + e^{cs_i} qr_i Erel^T + D vt_i
    Erel     <- e^{T} Erel + (vt e^{T - cs} scale)^T kr    (the chunk's own contribution; the
                                                           state then enters the next chunk)

then the output mode of SPEC §3 (all per head, elementwise over P; gate = silu(z MIMO_Z)):
reduce (sum_r y_r gate_r MIMO_Out_r), norm_reduce (RMSNorm of each y_r over P, times W, then
as reduce; needs the whole head in one program: BP >= P) or per_rank (y_r gate_r).

Grid: (H * cdiv(P, BP), number of segment slots); heads vary fastest (shared Q/K in L2).
With STATE_SPLIT (ESPLIT) > 1 the entry states come per sub-segment of phases 2-3; a
segment's is that of its first sub-segment.
Registers: the N x BP (transposed) state (fp32), two N/2-wide pair halves of q and k per chunk, the
ROWS x ROWS scores and the ROWS x BP output tile (ROWS = C * pow2(R)). With PMAJOR the state is
held BP x N and the products are taken transposed (y^T = vt^T (sc o W)^T + e^{cs} S q^T, S += vw^T
k): P is the MMA's M, so the state stays a warpgroup-MMA accumulator / operand (MIMO's default;
scan_fwd.py). With ANG_TOK (MIMO) the angles are computed per token and broadcast to the rank
rows; with Y_OUT the per-rank y is also stored before the output mode (SISO save_y).
"""
from __future__ import annotations

import triton
import triton.language as tl

from .scan_common import (_angles_math, _angles_math_tok, _angles_raw, _bias_pairs, _cast, _cos_sin, _ell_raw,
                          _first_slot, _load_state, _locate, _mm, _pairs_math, _pairs_raw, _rotate, _scalars_math,
                          _scalars_raw, _sigmoid)

MODES = {"reduce": 0, "per_rank": 1, "norm_reduce": 2}


@triton.jit
def _mm3(a, b, DT: tl.constexpr, INTERP: tl.constexpr):
    """a @ b^T of fp32 tiles to about fp32 accuracy on 16-bit tensor cores: a = ah + al,
    b = bh + bl (16-bit splits), a b^T ~ ah bh^T + ah bl^T + al bh^T."""
    ah = _cast(a, DT, INTERP)
    al = _cast(a - ah.to(tl.float32), DT, INTERP)
    bh = _cast(b, DT, INTERP)
    bl = _cast(b - bh.to(tl.float32), DT, INTERP)
    return (_mm(ah, tl.trans(bh), DT, False, INTERP) + _mm(ah, tl.trans(bl), DT, False, INTERP)
            + _mm(al, tl.trans(bh), DT, False, INTERP))


def grid(H: int, P: int, BP: int, nslots: int):
    return (H * triton.cdiv(P, BP), nslots)


@triton.jit
def _loads(q_ptr, k_ptr, v_ptr, z_ptr, adt_ptr, dt_ptr, trap_ptr, ang_ptr, ell_ptr, q_base, k_base, v_base,
           z_base, bh, ang_base, s_qt, s_qr, s_kt, s_kr, s_vt, s_zt, s_at, tc, eos, rt, rr, j, p,
           R: tl.constexpr, N: tl.constexpr, NH: tl.constexpr, P: tl.constexpr, A: tl.constexpr,
           AP: tl.constexpr, C: tl.constexpr, RP: tl.constexpr, PAIR_HALF: tl.constexpr,
           TRAP: tl.constexpr, HAS_Z: tl.constexpr, ELL: tl.constexpr, GATES: tl.constexpr,
           SCAL: tl.constexpr, ANG_TOK: tl.constexpr = False):
    """Every global load of one chunk [tc, tc + C) (all masked past the sequence's end)."""
    tok = tc + rt
    rmask = (tok < eos) & (rr < R)
    tok64 = tok.to(tl.int64)
    q0r, q1r = _pairs_raw(q_ptr, q_base + tok64 * s_qt + rr * s_qr, rmask, j, N, NH, PAIR_HALF)
    k0r, k1r = _pairs_raw(k_ptr, k_base + tok64 * s_kt + rr * s_kr, rmask, j, N, NH, PAIR_HALF)
    vmask = rmask[:, None] & (p < P)[None, :]
    vr = tl.load(v_ptr + v_base + tok64[:, None] * s_vt + p[None, :], mask=vmask, other=0.0)
    if HAS_Z:
        zr = tl.load(z_ptr + z_base + tok64[:, None] * s_zt + p[None, :], mask=vmask, other=0.0)
    else:
        zr = vr
    if SCAL:
        sa, sdt, sdtn, str_, strn = _scalars_raw(adt_ptr, dt_ptr, trap_ptr, bh, tc, eos, C, RP, TRAP, GATES)
        if A > 0:
            if ELL:
                araw = _ell_raw(ell_ptr, bh, tc, eos, A, C, RP, j.shape[0])
            else:
                araw = _angles_raw(ang_ptr, ang_base, s_at, tc, eos, A, C, 1 if ANG_TOK else RP, AP)
        else:
            araw = sa
    else:  # placeholders (PREFETCH == 2 loads these in the chunk's own turn)
        sa = tc
        sdt = tc
        sdtn = tc
        str_ = tc
        strn = tc
        araw = tc
    return q0r, q1r, k0r, k1r, vr, zr, sa, sdt, sdtn, str_, strn, araw


@triton.jit
def scan_chunk_output_kernel(
    q_ptr, k_ptr, v_ptr, z_ptr, adt_ptr, dt_ptr, trap_ptr, ang_ptr, qb_ptr, kb_ptr, d_ptr,
    mv_ptr, mz_ptr, mo_ptr, w_ptr, erel_ptr, cu_ptr, out_ptr, ell_ptr, y_ptr,
    s_qb, s_qt, s_qr, s_qg, s_kb, s_kt, s_kr, s_kg, s_vb, s_vt, s_vh, s_zb, s_zt, s_zh,
    s_ab, s_at, s_ah,
    L, H, G, S, NSEG, NSEG2, eps,
    R: tl.constexpr, RP: tl.constexpr, N: tl.constexpr, NHP: tl.constexpr, P: tl.constexpr,
    BP: tl.constexpr, A: tl.constexpr, AP: tl.constexpr, C: tl.constexpr, SEG: tl.constexpr,
    PAIR_HALF: tl.constexpr, TRAP: tl.constexpr, HAS_D: tl.constexpr, HAS_Z: tl.constexpr,
    HAS_MV: tl.constexpr, HAS_MZ: tl.constexpr, HAS_MO: tl.constexpr, MODE: tl.constexpr,
    HAS_ENTRY: tl.constexpr, VARLEN: tl.constexpr, FAST_TRIG: tl.constexpr,
    DOT_F32: tl.constexpr, INTERP: tl.constexpr, PREFETCH: tl.constexpr, ELL: tl.constexpr,
    GATES: tl.constexpr, BIAS_RELOAD: tl.constexpr, EXACT_DIAG: tl.constexpr = False,
    ESPLIT: tl.constexpr = 1, PMAJOR: tl.constexpr = False, ANG_TOK: tl.constexpr = False,
    Y_OUT: tl.constexpr = False,
):
    NPB: tl.constexpr = (P + BP - 1) // BP
    SEGLEN: tl.constexpr = SEG * C
    NH: tl.constexpr = N // 2
    ROWS: tl.constexpr = C * RP
    DT = q_ptr.dtype.element_ty
    pid0 = tl.program_id(0)
    slot = tl.program_id(1)
    h = pid0 // NPB
    pb = pid0 % NPB
    b, seq, seg, bos, eos, t0 = _locate(slot, cu_ptr, S, L, NSEG, SEGLEN, VARLEN)
    if t0 < eos:
        g = h // (H // G)
        nck = tl.minimum(tl.cdiv(eos - t0, C), SEG)
        rows = tl.arange(0, ROWS)
        rt = rows // RP
        rr = rows % RP
        j = tl.arange(0, NHP)
        p = pb * BP + tl.arange(0, BP)
        pm = p < P
        rpm = (rr < R)[:, None] & pm[None, :]
        bh = (b * H + h).to(tl.int64) * L
        b64 = b.to(tl.int64)
        h64 = h.to(tl.int64)
        ang_base = b64 * s_ab + h64 * s_ah
        q_base = b64 * s_qb + g.to(tl.int64) * s_qg
        k_base = b64 * s_kb + g.to(tl.int64) * s_kg
        v_base = b64 * s_vb + h64 * s_vh
        z_base = b64 * s_zb + h64 * s_zh
        # MIMO projections (R x P per head) are re-read per chunk where used (L1 hits): held
        # in registers across the loop they would cost a ROWS x BP tile each
        prm = (h * R + rr)[:, None] * P + p[None, :]
        if MODE == 2:
            wn = tl.load(w_ptr + h * P + p, mask=pm, other=0.0)
        if HAS_D:
            dval = tl.load(d_ptr + h)
        # the state is kept transposed (N x P, pair halves): the inter-chunk dot reads it as
        # its B operand without a per-chunk transpose
        if HAS_ENTRY:
            # the entry states are per phase-2/3 sub-segment (ESPLIT of them per segment here)
            eslot = _first_slot(seq, bos, NSEG2, SEGLEN // ESPLIT, VARLEN) + seg * ESPLIT
            s0, s1 = _load_state(erel_ptr, (eslot * H + h).to(tl.int64) * P * N, p, j, P, N, NH,
                                 PAIR_HALF)
            if not PMAJOR:
                s0 = tl.trans(s0)
                s1 = tl.trans(s1)
        elif PMAJOR:
            s0 = tl.zeros([BP, NHP], dtype=tl.float32)
            s1 = tl.zeros([BP, NHP], dtype=tl.float32)
        else:
            s0 = tl.zeros([NHP, BP], dtype=tl.float32)
            s1 = tl.zeros([NHP, BP], dtype=tl.float32)
        carry = tl.zeros([AP], dtype=tl.float32)
        if not BIAS_RELOAD:
            qb0, qb1 = _bias_pairs(qb_ptr, h, R, RP, C, N, NH, NHP, PAIR_HALF)
            kb0, kb1 = _bias_pairs(kb_ptr, h, R, RP, C, N, NH, NHP, PAIR_HALF)
        ti = rt[:, None]
        tj = rt[None, :]
        # software pipelining by hand (see scan_chunk_state.py): with PREFETCH the loads of
        # chunk ci + 1 are issued before the math of chunk ci
        if PREFETCH:
            q0r, q1r, k0r, k1r, vr, zr, sa, sdt, sdtn, str_, strn, araw = _loads(
                q_ptr, k_ptr, v_ptr, z_ptr, adt_ptr, dt_ptr, trap_ptr, ang_ptr, ell_ptr, q_base, k_base,
                v_base, z_base, bh, ang_base, s_qt, s_qr, s_kt, s_kr, s_vt, s_zt, s_at, t0, eos, rt, rr, j,
                p, R, N, NH, P, A, AP, C, RP, PAIR_HALF, TRAP, HAS_Z and PREFETCH != 3, ELL, GATES, PREFETCH != 2,
                ANG_TOK)
        for ci in range(0, nck):
            tc = t0 + ci * C
            tok = tc + rt
            tok64 = tok.to(tl.int64)
            rmask = (tok < eos) & (rr < R)
            if BIAS_RELOAD:  # re-read per chunk (L1 hits): held across the loop they cost registers
                qb0, qb1 = _bias_pairs(qb_ptr, h, R, RP, C, N, NH, NHP, PAIR_HALF)
                kb0, kb1 = _bias_pairs(kb_ptr, h, R, RP, C, N, NH, NHP, PAIR_HALF)
            if PREFETCH:
                nq0, nq1, nk0, nk1, nv, nz, na, ndt, ndtn, ntr, ntrn, nang = _loads(
                    q_ptr, k_ptr, v_ptr, z_ptr, adt_ptr, dt_ptr, trap_ptr, ang_ptr, ell_ptr, q_base, k_base,
                    v_base, z_base, bh, ang_base, s_qt, s_qr, s_kt, s_kr, s_vt, s_zt, s_at, tc + C, eos,
                    rt, rr, j, p, R, N, NH, P, A, AP, C, RP, PAIR_HALF, TRAP, HAS_Z and PREFETCH != 3, ELL, GATES,
                    PREFETCH != 2, ANG_TOK)
                if PREFETCH == 3 and HAS_Z:  # z (needed last) in its turn, issued first
                    zr = tl.load(z_ptr + z_base + tok64[:, None] * s_zt + p[None, :],
                                 mask=rmask[:, None] & pm[None, :], other=0.0)
                if PREFETCH == 2:  # tiles only: the scalars and angles are loaded in their turn
                    xa, xdt, xdtn, xtr, xtrn = _scalars_raw(adt_ptr, dt_ptr, trap_ptr, bh, tc, eos, C, RP,
                                                            TRAP, GATES)
                    if A > 0:
                        if ELL:
                            xang = _ell_raw(ell_ptr, bh, tc, eos, A, C, RP, NHP)
                        else:
                            xang = _angles_raw(ang_ptr, ang_base, s_at, tc, eos, A, C, 1 if ANG_TOK else RP, AP)
                else:
                    xa, xdt, xdtn, xtr, xtrn, xang = sa, sdt, sdtn, str_, strn, araw
                dt, gamma, scale, cs, T, lead = _scalars_math(xa, xdt, xdtn, xtr, xtrn, C, RP, TRAP, GATES)
                q0, q1 = _pairs_math(q0r, q1r, rmask, qb0, qb1, j, NH)
                k0, k1 = _pairs_math(k0r, k1r, rmask, kb0, kb1, j, NH)
                if A > 0:
                    if ELL:
                        c, s = _cos_sin(xang, FAST_TRIG)
                    elif ANG_TOK:   # MIMO: once per token, broadcast to the rank rows
                        c, s, carry = _angles_math_tok(xang, dt_ptr, bh, tc, eos, carry, RP, NHP, FAST_TRIG)
                    else:
                        c, s, carry = _angles_math(xang, dt, carry, C, RP, NHP, FAST_TRIG)
            else:  # loads next to their uses (fewer live registers)
                sa, sdt, sdtn, str_, strn = _scalars_raw(adt_ptr, dt_ptr, trap_ptr, bh, tc, eos, C, RP, TRAP,
                                                         GATES)
                dt, gamma, scale, cs, T, lead = _scalars_math(sa, sdt, sdtn, str_, strn, C, RP, TRAP, GATES)
                q0r, q1r = _pairs_raw(q_ptr, q_base + tok64 * s_qt + rr * s_qr, rmask, j, N, NH, PAIR_HALF)
                q0, q1 = _pairs_math(q0r, q1r, rmask, qb0, qb1, j, NH)
                k0r, k1r = _pairs_raw(k_ptr, k_base + tok64 * s_kt + rr * s_kr, rmask, j, N, NH, PAIR_HALF)
                k0, k1 = _pairs_math(k0r, k1r, rmask, kb0, kb1, j, NH)
                if A > 0:
                    if ELL:
                        c, s = _cos_sin(_ell_raw(ell_ptr, bh, tc, eos, A, C, RP, NHP), FAST_TRIG)
                    elif ANG_TOK:
                        araw = _angles_raw(ang_ptr, ang_base, s_at, tc, eos, A, C, 1, AP)
                        c, s, carry = _angles_math_tok(araw, dt_ptr, bh, tc, eos, carry, RP, NHP, FAST_TRIG)
                    else:
                        araw = _angles_raw(ang_ptr, ang_base, s_at, tc, eos, A, C, RP, AP)
                        c, s, carry = _angles_math(araw, dt, carry, C, RP, NHP, FAST_TRIG)
                vr = tl.load(v_ptr + v_base + tok64[:, None] * s_vt + p[None, :],
                             mask=rmask[:, None] & pm[None, :], other=0.0)
            if EXACT_DIAG and not DOT_F32:
                # the same-step terms q'.k' in fp32 from the unrotated biased pairs: the bf16
                # rotated operands would lose them to cancellation where q'.k' << |q'||k'|, which
                # the pre-gate norm (scale-invariant) turns into O(1) output errors
                if RP == 1:
                    dsc = tl.sum(q0 * k0, axis=1) + tl.sum(q1 * k1, axis=1)
                    dsc = dsc[:, None]
                else:  # every rank pair of a step: three tensor-core products of bf16 hi/lo splits
                    dsc = _mm3(q0, k0, DT, INTERP) + _mm3(q1, k1, DT, INTERP)
            if A > 0:
                q0, q1 = _rotate(q0, q1, c, s)
                k0, k1 = _rotate(k0, k1, c, s)
            if not DOT_F32:  # dot operands in the input dtype from here on (half the registers)
                q0 = _cast(q0, DT, INTERP)
                q1 = _cast(q1, DT, INTERP)
                k0 = _cast(k0, DT, INTERP)
                k1 = _cast(k1, DT, INTERP)
            vmask = rmask[:, None] & pm[None, :]
            vt = vr
            if HAS_MV:
                mv = tl.load(mv_ptr + prm, mask=rpm, other=0.0)
                vt = _cast(vt.to(tl.float32) * mv, DT, INTERP)
            # intra-chunk: strictly causal decayed scores + the same-step diagonal
            sc = _mm(q0, tl.trans(k0), DT, DOT_F32, INTERP) + _mm(q1, tl.trans(k1), DT, DOT_F32, INTERP)
            if EXACT_DIAG and not DOT_F32:
                sc = tl.where(ti == tj, dsc, sc)
            diff = tl.minimum(cs[:, None] - cs[None, :], 0.0)
            wgt = tl.where(ti > tj, tl.exp(diff) * scale[None, :],
                           tl.where(ti == tj, gamma[:, None], 0.0))
            if PMAJOR:   # y^T = vt^T (sc o W)^T + e^{cs} S q^T: P rows, warpgroup MMAs on the S tile
                yt = _mm(tl.trans(vt), tl.trans(sc * wgt), DT, DOT_F32, INTERP)
                inter = _mm(s0, tl.trans(q0), DT, DOT_F32, INTERP) + _mm(s1, tl.trans(q1), DT, DOT_F32, INTERP)
                y = tl.trans(yt + tl.exp(cs)[None, :] * inter)
            else:
                y = _mm(sc * wgt, vt, DT, DOT_F32, INTERP)
                # inter-chunk: the carried state, decayed to each row's token
                inter = _mm(q0, s0, DT, DOT_F32, INTERP) + _mm(q1, s1, DT, DOT_F32, INTERP)
                y += tl.exp(cs)[:, None] * inter
            if HAS_D:
                y += dval * vt.to(tl.float32)
            if Y_OUT:   # the per-rank y before the output mode, fp32 (B, L, R, H, P): the backward's
                yrow = ((b64 * L + tok64) * R + rr) * H + h
                tl.store(y_ptr + yrow[:, None] * P + p[None, :], y, mask=rmask[:, None] & pm[None, :])
            # output mode
            if HAS_Z:
                if PREFETCH:
                    zz = zr.to(tl.float32)
                else:
                    zz = tl.load(z_ptr + z_base + tok64[:, None] * s_zt + p[None, :], mask=vmask,
                                 other=0.0).to(tl.float32)
                if HAS_MZ:
                    zz = zz * tl.load(mz_ptr + prm, mask=rpm, other=0.0)
                gate = zz * _sigmoid(zz)
            if MODE == 1:
                if HAS_Z:
                    y = y * gate
                orow = ((b64 * L + tok64) * R + rr) * H + h
                tl.store(out_ptr + orow[:, None] * P + p[None, :], _cast(y, out_ptr.dtype.element_ty, INTERP),
                         mask=vmask)
            else:
                if MODE == 2:
                    rstd = 1.0 / tl.sqrt(tl.sum(y * y, axis=1) / P + eps)
                    y = y * rstd[:, None] * wn[None, :]
                if HAS_Z:
                    y = y * gate
                if HAS_MO:
                    y = y * tl.load(mo_ptr + prm, mask=rpm, other=0.0)
                if RP == 1:
                    o = y
                else:
                    o = tl.sum(tl.reshape(y, [C, RP, BP]), axis=1)
                tokc = tc + tl.arange(0, C)
                orow = (b64 * L + tokc.to(tl.int64)) * H + h
                tl.store(out_ptr + orow[:, None] * P + p[None, :], _cast(o, out_ptr.dtype.element_ty, INTERP),
                         mask=(tokc < eos)[:, None] & pm[None, :])
            # the chunk's own contribution to the state entering the next chunk (also after
            # the segment's last chunk: unused there, but a conditional update would make the
            # compiler carry two copies of the state)
            wk = tl.exp(T - cs) * scale
            vw = vt.to(tl.float32) * wk[:, None]
            decay = tl.exp(T)
            if PMAJOR:
                s0 = s0 * decay + _mm(tl.trans(vw), k0, DT, DOT_F32, INTERP)
                s1 = s1 * decay + _mm(tl.trans(vw), k1, DT, DOT_F32, INTERP)
            else:
                s0 = s0 * decay + _mm(tl.trans(k0), vw, DT, DOT_F32, INTERP)
                s1 = s1 * decay + _mm(tl.trans(k1), vw, DT, DOT_F32, INTERP)
            if PREFETCH:
                q0r, q1r, k0r, k1r, vr, zr = nq0, nq1, nk0, nk1, nv, nz
                sa, sdt, sdtn, str_, strn, araw = na, ndt, ndtn, ntr, ntrn, nang


# ------------------------------------------------------------------------------------------
# norm_reduce for heads too big for one program (the N x P state and a whole head of P in
# registers spill): phase 4 writes the raw per-rank y (fp32 scratch (B, L, R, H, P), P split
# over programs) and this epilogue applies the RMSNorm, the gate and the rank reduction.

def norm_grid(B: int, L: int, H: int, BT: int):
    return (triton.cdiv(B * L, BT), H)


@triton.jit
def scan_norm_epilogue_kernel(
    y_ptr, z_ptr, mz_ptr, mo_ptr, w_ptr, out_ptr,
    s_zb, s_zt, s_zh, BL, L, H, eps,
    R: tl.constexpr, P: tl.constexpr, PP: tl.constexpr, BT: tl.constexpr,
    HAS_Z: tl.constexpr, HAS_MZ: tl.constexpr, HAS_MO: tl.constexpr, INTERP: tl.constexpr,
):
    """out[t, h] = sum_r rmsnorm(y[t, r, h]) W[h] silu(z[t, h] MIMO_Z[h, r]) MIMO_Out[h, r]."""
    tb = tl.program_id(0)
    h = tl.program_id(1)
    t = tb * BT + tl.arange(0, BT)           # flattened (b, l) rows
    p = tl.arange(0, PP)
    tm = t < BL
    m = tm[:, None] & (p < P)[None, :]
    t64 = t.to(tl.int64)
    wn = tl.load(w_ptr + h * P + p, mask=p < P, other=0.0)
    if HAS_Z:
        b = t64 // L
        zz0 = tl.load(z_ptr + b[:, None] * s_zb + (t64 - b * L)[:, None] * s_zt + h * s_zh + p[None, :],
                      mask=m, other=0.0).to(tl.float32)
    o = tl.zeros([BT, PP], dtype=tl.float32)
    for r in tl.static_range(R):
        y = tl.load(y_ptr + ((t64 * R + r) * H + h)[:, None] * P + p[None, :], mask=m, other=0.0)
        rstd = 1.0 / tl.sqrt(tl.sum(y * y, axis=1) / P + eps)
        y = y * rstd[:, None] * wn[None, :]
        if HAS_Z:
            zz = zz0
            if HAS_MZ:
                zz = zz * tl.load(mz_ptr + (h * R + r) * P + p, mask=p < P, other=0.0)[None, :]
            y = y * zz * _sigmoid(zz)
        if HAS_MO:
            y = y * tl.load(mo_ptr + (h * R + r) * P + p, mask=p < P, other=0.0)[None, :]
        o += y
    tl.store(out_ptr + (t64 * H + h)[:, None] * P + p[None, :], _cast(o, out_ptr.dtype.element_ty, INTERP),
             mask=m)
