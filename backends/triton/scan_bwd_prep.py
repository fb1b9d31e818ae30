"""Backward stages 1 and 3 of the chunked scan (SPEC §9.1; orchestrated by scan_bwd.py).

`seq_fwd_kernel`   grid (sequences x segments, H): walks one segment of one sequence of one
                   head chunk by chunk (from its carry-in angle: `seg_sum_kernel` sums each
                   segment, the orchestrator scans the sums) and writes the per-token scalars
                   of the forward's phase 1 that the backward reuses (fp32):
                     theta[t]  = wrap(theta_init + sum_{u<=t} pi tanh(Angles_u) DT_u)  (B,L,H,A)
                     gamma[t]  = DT_t lam_t                                             (B,H,L)
                     scale[t]  = gamma_t + DT_{t+1} (1 - lam_{t+1}) (0 past the seq's end) (B,H,L)
                     pend0     = DT_0 (1 - lam_0) of the sequence's first token (0 if empty) (S,H)
                   (the angle cumsum is the one sequential part; the loop carries it wrapped;
                   segments make it parallel: B=1 L=16384 ran 32 programs one token block at a
                   time).
`prep_kernel`      grid token blocks x H, heads fastest (HEADS_FAST: a group's Q / K read once from
                   HBM) or (token blocks, H): the GEMM operands of the core backward, token-parallel,
                   in the operand dtype (bf16 for 16-bit inputs, fp32 for fp32 inputs):
                     qh[t,r] = Rot(theta_t)(Q[t,r,g(h)] + Q_bias[h,r])                 (B,L,R,H,N)
                     ks[t,r] = Rot(theta_t)(K[t,r,g(h)] + K_bias[h,r]) * scale_t        (B,L,R,H,N)
                     vt[t,r] = V[t,h] * MIMO_V[h,r]                                       (B,L,R,H,P)
                   (laid out with RC = pow2(R) ranks, the core's layout; padded ranks stay zero;
                   no vt store when it would copy v: SISO without MIMO_V, v already contiguous
                   in the operand dtype, so the core reads v itself, VT_OUT=False)

Pairs: a row of N columns is handled as two tiles of the pairs' members, x0[j] = x[c0(j)],
x1[j] = x[c1(j)], j < N/2, with (c0, c1) = (2j, 2j+1) (interleaved) or (j, j + N/2) (half);
pairs j >= A have angle 0. `_cast` (round-to-nearest bf16 in the interpreter too), `_wrap` and
`_cos_sin` (MUFU approximations of the wrapped angle on the GPU) come from the forward's
scan_common.py; the sigmoid here is the exact one (the forward's uses
rcp.approx on the GPU).
"""
from __future__ import annotations

import triton
import triton.language as tl

from .scan_common import (FAST_MATH, _cast, _cos_sin, _pair_cols, _pairs_raw, _rotate,  # noqa: F401  (post and
                          _row_tile, _store_pairs, _wrap)  # output import from here)

PI = tl.constexpr(3.141592653589793)


@triton.jit
def _sigmoid(x):
    """Exact 1 / (1 + e^-x) (scan_common's forward one uses rcp.approx on the GPU)."""
    return 1.0 / (1.0 + tl.exp(-x))


@triton.jit
def _tanh(x):
    return 2.0 * _sigmoid(2.0 * x) - 1.0


@triton.jit
def _ld(ptr, row, rmask, j, N: tl.constexpr, PAIR_HALF: tl.constexpr):
    """Rows at row [BT] (int64 element offsets) as fp32 pair halves [BT, NHP]; 0 where masked."""
    x0, x1 = _pairs_raw(ptr, row, rmask, j, N, N // 2, PAIR_HALF)
    return x0.to(tl.float32), x1.to(tl.float32)


@triton.jit
def _ld_biased(ptr, row, rmask, bias_ptr, bias_row, j, N: tl.constexpr, PAIR_HALF: tl.constexpr):
    """x + bias as fp32 pair halves (x: rows at row [BT]; bias: row `bias_row` of bias_ptr, N wide)."""
    x0, x1 = _ld(ptr, row, rmask, j, N, PAIR_HALF)
    c0, c1 = _pair_cols(j, N, PAIR_HALF)
    jm = j < N // 2
    if PAIR_HALF:   # contiguous halves: as tiles (scan_common._row_tile)
        b0 = _row_tile(bias_ptr + bias_row * N, c0, jm, row)
        b1 = _row_tile(bias_ptr + bias_row * N, c1, jm, row)
    else:           # strided (even / odd columns): the 1-D load already has the broadcast's layout
        b0 = tl.load(bias_ptr + bias_row * N + c0, mask=jm, other=0.0).to(tl.float32)[None, :]
        b1 = tl.load(bias_ptr + bias_row * N + c1, mask=jm, other=0.0).to(tl.float32)[None, :]
    return x0 + b0, x1 + b1


@triton.jit
def _rotated(x0, x1, cs, sn, A: tl.constexpr):
    """Rot(theta) x on pairs with angles (A > 0), x itself without: the core's operands qh / ks
    (before the scale) as prep stores them and post recomputes them (POST_RECOMPUTE), one code
    path so both give the same bits."""
    if A > 0:
        x0, x1 = _rotate(x0, x1, cs, sn)
    return x0, x1


@triton.jit
def _seq_bounds(seq, cu_ptr, L, VARLEN: tl.constexpr):
    """(batch row, first token, end token) of sequence `seq` (dense: row = seq, [0, L))."""
    if VARLEN:
        b = seq * 0
        t0 = tl.load(cu_ptr + seq)
        t1 = tl.load(cu_ptr + seq + 1)
    else:
        b = seq
        t0 = seq * 0
        t1 = t0 + L
    return b, t0, t1


@triton.jit
def _seg_bounds(pid, NSEG, SEGL, cu_ptr, L, VARLEN: tl.constexpr):
    """Program pid = seq * NSEG + k of a per-sequence stage run in segments of SEGL tokens:
    (seq, k, batch row, the sequence's [t0, t1), the segment's [s0, s1) (empty past the end))."""
    seq = pid // NSEG
    k = pid % NSEG
    b, t0, t1 = _seq_bounds(seq, cu_ptr, L, VARLEN)
    s0 = tl.minimum(t0 + k * SEGL, t1)
    s1 = tl.minimum(s0 + SEGL, t1)
    return seq, k, b, t0, t1, s0, s1


@triton.jit
def seg_sum_kernel(
    x_ptr, dt_ptr, cu_ptr, tot_ptr, s_xb, s_xt, s_xh, L, H, NSEG, SEGL,
    A: tl.constexpr, AP: tl.constexpr, BT: tl.constexpr, VARLEN: tl.constexpr, ANGLES: tl.constexpr,
):
    """Per (sequence, segment, head): the sum over the segment's tokens of the per-token angle
    increment pi tanh(Angles_t) DT_t (ANGLES) or of dtheta_t (B, L, H, A) -> tot (S*NSEG, H, A).
    Each segment's program of the walks below takes its carry-in from them (`_carry_in`), so the
    per-sequence walks run one program per segment instead of per sequence."""
    pid = tl.program_id(0)
    h = tl.program_id(1)
    seq, k, b, t0, t1, s0, s1 = _seg_bounds(pid, NSEG, SEGL, cu_ptr, L, VARLEN)
    b64 = b.to(tl.int64)
    j = tl.arange(0, AP)
    jm = j < A
    acc = tl.zeros([AP], dtype=tl.float32)
    rows = tl.arange(0, BT)
    for c in range(s0, s1, BT):
        t = c + rows
        tm = t < s1
        am = tm[:, None] & jm[None, :]
        t64 = t.to(tl.int64)
        x = tl.load(x_ptr + b64 * s_xb + t64[:, None] * s_xt + h * s_xh + j[None, :], mask=am,
                    other=0.0).to(tl.float32)
        if ANGLES:   # kept wrapped like the walk's carry (fp32 sums of radians stay small)
            dt = tl.load(dt_ptr + (b64 * H + h) * L + t, mask=tm, other=0.0)
            acc = _wrap(acc + tl.sum(_tanh(x) * dt[:, None] * PI, axis=0))
        else:
            acc += tl.sum(x, axis=0)
    tl.store(tot_ptr + (pid * H + h) * A + j, acc, mask=jm)


@triton.jit
def _carry_in(tot_ptr, init_ptr, seq, k, h, NSEG, H, j, jm, A: tl.constexpr, AP: tl.constexpr,
              SB: tl.constexpr, HAS_INIT: tl.constexpr, REVERSE: tl.constexpr, WRAP: tl.constexpr):
    """Segment k's carry-in [AP] fp32 from its sequence's per-segment sums tot (S * NSEG, H, A)
    (`seg_sum_kernel`): init (S, H, A) if HAS_INIT plus the sum over the earlier segments (the
    later ones with REVERSE), in float64, in one fixed order (deterministic), wrapped into
    [0, 2 pi) with WRAP. Each segment's program reads its sequence's NSEG rows of A floats, SB
    rows per load (one load at the usual NSEG <= SB): no separate scan over segments (that was
    ~6 torch kernels each way)."""
    acc = tl.zeros([AP], dtype=tl.float64)
    if HAS_INIT:
        acc += tl.load(init_ptr + (seq * H + h) * A + j, mask=jm, other=0.0).to(tl.float64)
    rows = tl.arange(0, SB)
    for c in range(0, NSEG, SB):
        kk = c + rows
        if REVERSE:
            sel = (kk > k) & (kk < NSEG)
        else:
            sel = kk < k
        x = tl.load(tot_ptr + ((seq * NSEG + kk)[:, None] * H + h) * A + j[None, :],
                    mask=sel[:, None] & jm[None, :], other=0.0)
        acc += tl.sum(x.to(tl.float64), axis=0)
    if WRAP:
        two_pi = 6.283185307179586
        acc = acc - two_pi * tl.floor(acc / two_pi)
        acc = tl.where(acc < 0.0, acc + two_pi, acc)
        acc = tl.where(acc >= two_pi, acc - two_pi, acc)
    return acc.to(tl.float32)


@triton.jit
def seq_fwd_kernel(
    dt_ptr, trap_ptr, ang_ptr, tot_ptr, init_ptr, cu_ptr,
    theta_ptr, gamma_ptr, scale_ptr, pend_ptr,
    s_ab, s_at, s_ah, L, H, NSEG, SEGL,
    A: tl.constexpr, AP: tl.constexpr, BT: tl.constexpr, TRAP: tl.constexpr,
    VARLEN: tl.constexpr, HAS_TINIT: tl.constexpr, SB: tl.constexpr,
):
    pid = tl.program_id(0)
    h = tl.program_id(1)
    seq, k, b, t0, t1, s0, s1 = _seg_bounds(pid, NSEG, SEGL, cu_ptr, L, VARLEN)
    b64 = b.to(tl.int64)
    base = (b64 * H + h) * L
    j = tl.arange(0, AP)
    jm = j < A
    if A > 0:   # the angle before the segment, wrapped (theta_init + the earlier segments' sums)
        carry = _carry_in(tot_ptr, init_ptr, seq, k, h, NSEG, H, j, jm, A, AP, SB, HAS_TINIT, False, True)
    rows = tl.arange(0, BT)
    for c in range(s0, s1, BT):
        t = c + rows
        tm = t < s1
        tn = tm & ((t + 1) < t1)
        dt = tl.load(dt_ptr + base + t, mask=tm, other=0.0)
        dtn = tl.load(dt_ptr + base + t + 1, mask=tn, other=0.0)
        if TRAP:
            lam = _sigmoid(tl.load(trap_ptr + base + t, mask=tm, other=0.0))
            lamn = _sigmoid(tl.load(trap_ptr + base + t + 1, mask=tn, other=0.0))
            gamma = dt * lam
            scale = gamma + dtn * (1.0 - lamn)
        else:
            gamma = dt
            scale = dt
        tl.store(gamma_ptr + base + t, gamma, mask=tm)
        tl.store(scale_ptr + base + t, scale, mask=tm)
        if A > 0:
            am = tm[:, None] & jm[None, :]
            t64 = t.to(tl.int64)
            raw = tl.load(ang_ptr + b64 * s_ab + t64[:, None] * s_at + h * s_ah + j[None, :],
                          mask=am, other=0.0).to(tl.float32)
            phi = PI * _tanh(raw) * dt[:, None]
            cs = tl.cumsum(phi, axis=0)
            th = _wrap(carry[None, :] + cs)
            tl.store(theta_ptr + ((b64 * L + t64[:, None]) * H + h) * A + j[None, :], th, mask=am)
            carry = _wrap(carry + tl.sum(phi, axis=0))
    # the pending beta term of the initial states: DT_0 (1 - lam_0) of a non-empty sequence
    if k == 0:
        nonempty = t1 > t0
        dt0 = tl.load(dt_ptr + base + t0, mask=nonempty, other=0.0)
        if TRAP:
            lam0 = _sigmoid(tl.load(trap_ptr + base + t0, mask=nonempty, other=0.0))
            pend = dt0 * (1.0 - lam0)
        else:
            pend = dt0 * 0.0
        tl.store(pend_ptr + seq * H + h, pend)


@triton.jit
def prep_kernel(
    q_ptr, k_ptr, v_ptr, qb_ptr, kb_ptr, mv_ptr, theta_ptr, scale_ptr,
    qh_ptr, ks_ptr, vt_ptr,
    s_qb, s_qt, s_qr, s_qg, s_kb, s_kt, s_kr, s_kg, s_vb, s_vt, s_vh,
    BL, L, H, G,
    R: tl.constexpr, RC: tl.constexpr, N: tl.constexpr, NHP: tl.constexpr, P: tl.constexpr,
    PP: tl.constexpr, A: tl.constexpr, BT: tl.constexpr, PAIR_HALF: tl.constexpr,
    HAS_MV: tl.constexpr, INTERP: tl.constexpr, HEADS_FAST: tl.constexpr, VT_OUT: tl.constexpr = True,
):
    if HEADS_FAST:   # 1-D grid, heads fastest: a token block's H programs run together (Q / K from L2)
        pid = tl.program_id(0) // H
        h = tl.program_id(0) % H
    else:            # grid (token blocks, H)
        pid = tl.program_id(0)
        h = tl.program_id(1)
    g = h // (H // G)
    m = pid * BT + tl.arange(0, BT)
    mm = m < BL
    m64 = m.to(tl.int64)
    b = m64 // L
    t = m64 % L
    j = tl.arange(0, NHP)
    if A > 0:
        th = tl.load(theta_ptr + (m64[:, None] * H + h) * A + j[None, :],
                     mask=mm[:, None] & (j[None, :] < A), other=0.0)
        cs, sn = _cos_sin(th, FAST_MATH)
    else:
        cs, sn = 0.0, 0.0   # unused: _rotated leaves the pairs as they are without angles
    scale = tl.load(scale_ptr + (b * H + h) * L + t, mask=mm, other=0.0)
    p = tl.arange(0, PP)
    pm = p < P
    vm = mm[:, None] & pm[None, :]
    if VT_OUT:
        v = tl.load(v_ptr + (b * s_vb + t * s_vt + h * s_vh)[:, None] + p[None, :], mask=vm,
                    other=0.0).to(tl.float32)
    for r in tl.static_range(R):
        q0, q1 = _ld_biased(q_ptr, b * s_qb + t * s_qt + r * s_qr + g * s_qg, mm, qb_ptr, h * R + r,
                            j, N, PAIR_HALF)
        k0, k1 = _ld_biased(k_ptr, b * s_kb + t * s_kt + r * s_kr + g * s_kg, mm, kb_ptr, h * R + r,
                            j, N, PAIR_HALF)
        q0, q1 = _rotated(q0, q1, cs, sn, A)
        k0, k1 = _rotated(k0, k1, cs, sn, A)
        orow = ((m64 * RC + r) * H + h) * N
        _store_pairs(qh_ptr, orow, mm, j, q0, q1, N, N // 2, PAIR_HALF, INTERP)
        _store_pairs(ks_ptr, orow, mm, j, k0 * scale[:, None], k1 * scale[:, None], N, N // 2, PAIR_HALF, INTERP)
        if VT_OUT:   # (else the core reads v itself as vt: SISO, no MIMO_V, v the operand tensor)
            if HAS_MV:
                vt = v * _row_tile(mv_ptr + (h * R + r) * P, p, pm, m)
            else:
                vt = v
            tl.store(vt_ptr + ((m64 * RC + r) * H + h)[:, None] * P + p[None, :],
                     _cast(vt, vt_ptr.dtype.element_ty, INTERP), mask=vm)
