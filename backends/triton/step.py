"""Triton decode step: one Mamba-3 token per sequence (SPEC §5, with the math of §2 and §3).

Per batch row b and value head h (group g = h // (H/G)), ranks r = 0..R-1, reading pool row
i = state_indices[b] (or b):

    theta   = wrap(theta_i + pi tanh(angles[b, h]) dt)            into [0, 2 pi)
    qh_r    = Rot(theta)(q[b, r, g] + q_bias[h, r]),  kh_r likewise    (bias before rotation;
              pairs (2j, 2j+1) "interleaved" or (j, j + N/2) "half", j < A; others pass)
    lam     = sigmoid(trap) (trapezoidal) or 1 (euler)
    alpha   = exp(adt), beta = alpha dt (1 - lam), gamma = dt lam
    vt_r    = v * MIMO_V[h, r],  vtp_r = v_state_i * MIMO_V[h, r]
    S       = alpha S_i + beta sum_r vtp_r kprev_r^T + gamma sum_r vt_r kh_r^T     (P x N)
    y_r     = S qh_r + D vt_r
    out     = reduce:      sum_r y_r gate_r MIMO_Out_r
              norm_reduce: sum_r y_r rstd(y_r) W gate_r MIMO_Out_r
              per_rank:    y_r gate_r                      (gate_r = silu(z MIMO_Z_r), 1 without z)
    states  <- (theta, S, kh_r for all r, v)

A padding row (state_indices[b] < 0 or >= M) writes zeros to its output and touches no state.

Launch grid: NT programs per (b, h), pid = (b * H + h) * NT + t (the tiles of a head, then the
heads of a row, are neighbours, like their state rows). Program t owns the state rows
[t * ROWS, (t + 1) * ROWS) and walks them in ITERS tiles of BLOCK_P rows (a static loop):
the state tile is loaded in its own dtype (fp32 or bf16), updated in fp32 registers, used for
the R outputs and stored back. The decode step is memory bound (the state is read and written
once), so there is no tensor-core dot: the outer products and the S qh row sums are broadcast
multiplies and `tl.sum`.

Config knobs (backends/triton/__init__.py `space`): ROWS (rows per program: a whole head, or
a split of P over several programs, for parallelism and fewer registers), BLOCK_P (rows per
tile), num_warps, VEC (16-byte state accesses, see "Address columns" in the kernel),
PREFETCH (the next tile is loaded while this one is computed), DOT (below), PREC (DOT's
tl.dot input precision) and maxnreg (a register cap, passed to the launch). num_stages is unused.

DOT (the MIMO default when one program holds the whole head in one tile of >= 16 x 16): the
rank-2R update and the R row sums as two small tensor-core products per head,
    S' = alpha S + Cf @ Km   (Cf: P x 2R coefficients, Km: 2R x N rows kh_r, kprev_r)
    Y  = S' @ Qt             (Qt: N x R columns qh_r),
each padded to 16 (`_dot_head`). The broadcast path recomputes the rotated q/k rows of every
rank in every warp (H100, R=4: 3744 instructions per thread for 32 state elements, 172
registers, one CTA per SM); DOT builds them once per element of the small tiles (1824
instructions per thread for 64 elements, 168 registers, 3 CTAs per SM): R=4 B=64 fp32
141.6 -> 70.6 us (bench/notes/step.md). PREC: "tf32x3" (fp32 accuracy) when inputs and
state are fp32, else "tf32" (its ~5e-4 relative error is under the bf16 bounds).

Rotation without register shuffles: every state column n has a partner column (n ^ 1, or
n +- N/2) and an angle j(n); q and k are gathered twice (at n and at its partner) and
    qh[n] = q'[n] cos(theta_j) + sgn(n) q'[partner] sin(theta_j),  sgn = -1 on a pair's first
so the state tile stays contiguous and coalesced in both pairings.

In place (state_out is state_in) is race-free: a program owns its state rows (S and v): every
S element is read and rewritten by the data flow of one tile, v rows are written after a CTA
barrier that follows the tile loop. The shared per-head states kprev (R x N) and theta (A)
are read by all NT programs of a head: with NT = 1 they are written after that barrier; with
NT > 1 out of place, tile 0 writes them; with NT > 1 in place, each program, after the
barrier, increments an int32 arrival counter of its (b, h) with an acq_rel atomic, and the
one that sees NT - 1 (the last reader) writes them and resets the counter to 0 for the next
call (`counters`: a zeroed buffer per device and stream). Padding rows count in too but write
nothing.
"""
from __future__ import annotations

import triton
import triton.language as tl

MODES = {"reduce": 0, "per_rank": 1, "norm_reduce": 2}


def grid(batch: int, nheads: int, nt: int = 1):
    """nt programs per (batch row, value head), pid = (b * H + h) * nt + tile."""
    return (batch * nheads * nt,)


@triton.jit
def _sigmoid(x):
    return 1.0 / (1.0 + tl.exp(-x))


@triton.jit
def _wrap(x):
    """x - 2 pi floor(x / 2 pi), clamped into [0, 2 pi) against fp32 rounding."""
    y = x - 6.283185307179586 * tl.floor(x / 6.283185307179586)
    y = tl.where(y < 0.0, y + 6.283185307179586, y)
    return tl.where(y >= 6.283185307179586, y - 6.283185307179586, y)


@triton.jit
def _theta(ang_in_ptr, angles_ptr, row, b, h, dt, j, jmask, H, A: tl.constexpr,
           SHARED_ANG: tl.constexpr):
    """New angles theta[j] (j a tensor of angle indices, masked by jmask)."""
    th0 = tl.load(ang_in_ptr + (row * H + h) * A + j, mask=jmask, other=0.0)
    if SHARED_ANG:
        raw = tl.load(angles_ptr + b * A + j, mask=jmask, other=0.0)
    else:
        raw = tl.load(angles_ptr + (b * H + h) * A + j, mask=jmask, other=0.0)
    tanh = 2.0 * _sigmoid(2.0 * raw) - 1.0
    return _wrap(th0 + 3.141592653589793 * tanh * dt)


@triton.jit
def _rot_row(x_ptr, b_ptr, ncol, pcol, cs, sn, sgn, nmask):
    """Rotated, biased row: (x + bias)[n] cos + sgn (x + bias)[partner] sin, fp32."""
    x = tl.load(x_ptr + ncol, mask=nmask, other=0.0).to(tl.float32) + \
        tl.load(b_ptr + ncol, mask=nmask, other=0.0)
    xp = tl.load(x_ptr + pcol, mask=nmask, other=0.0).to(tl.float32) + \
        tl.load(b_ptr + pcol, mask=nmask, other=0.0)
    return x * cs + sgn * xp * sn


@triton.jit
def _tiles(q_b, k_b, kin_b, qb_ptr, kb_ptr, v_ptr, z_ptr, d_ptr, mv_ptr, mz_ptr, mo_ptr, w_ptr,
           v_in_ptr, s_in, s_out, out_ptr, x_bh, head, b64, h, H, G, P_OK, N_OK, dval,
           alpha, beta, gamma, eps, n, nmask, ncol, pcol, cs, sn, sgn, p_start,
           N: tl.constexpr, P: tl.constexpr, R: tl.constexpr, HAS_Z: tl.constexpr,
           HAS_MV: tl.constexpr, HAS_MZ: tl.constexpr, HAS_MO: tl.constexpr, MODE: tl.constexpr,
           BLOCK_P: tl.constexpr, ROWS: tl.constexpr, ITERS: tl.constexpr, PREFETCH: tl.constexpr):
    """The first version's data flow: this program's rows [p_start, p_start + ROWS) of the state
    in ITERS tiles of BLOCK_P rows, broadcast multiplies and row sums (no tensor cores)."""
    # ---- this program's rows [p_start, p_start + ROWS) of the state, in ITERS tiles ----------
    # (static loop). PREFETCH: the next tile's load is issued before this tile's math.
    pt = tl.arange(0, BLOCK_P)
    p_end = tl.minimum(P_OK, p_start + ROWS)   # rows this program may touch (padding: none)
    if PREFETCH:
        S_next = tl.load(s_in + (p_start + pt)[:, None] * N + ncol[None, :],
                         mask=((p_start + pt) < p_end)[:, None] & nmask[None, :], other=0.0)
    for it in tl.static_range(ITERS):
        p = p_start + it * BLOCK_P + pt
        pmask = p < P
        pok = p < p_end
        smask = pok[:, None] & nmask[None, :]
        soff = p[:, None] * N + ncol[None, :]
        if PREFETCH:
            S_raw = S_next
            if it + 1 < ITERS:
                pn = p + BLOCK_P
                S_next = tl.load(s_in + pn[:, None] * N + ncol[None, :],
                                 mask=(pn < p_end)[:, None] & nmask[None, :], other=0.0)
        else:
            S_raw = tl.load(s_in + soff, mask=smask, other=0.0)
        S = S_raw.to(tl.float32) * alpha
        v = tl.load(v_ptr + x_bh + p, mask=pmask, other=0.0).to(tl.float32)
        vp = tl.load(v_in_ptr + head * P + p, mask=pok, other=0.0).to(tl.float32)
        for r in tl.static_range(R):
            kh = _rot_row(k_b + r * G * N, kb_ptr + (h * R + r) * N, ncol, pcol, cs, sn, sgn, nmask)
            kp = tl.load(kin_b + r * H * N + ncol, mask=n < N_OK, other=0.0)
            if HAS_MV:
                mv = tl.load(mv_ptr + (h * R + r) * P + p, mask=pmask, other=0.0)
                S += (gamma * v * mv)[:, None] * kh[None, :] + (beta * vp * mv)[:, None] * kp[None, :]
            else:
                S += (gamma * v)[:, None] * kh[None, :] + (beta * vp)[:, None] * kp[None, :]
        tl.store(s_out + soff, S.to(s_out.dtype.element_ty), mask=smask)

        if HAS_Z:
            zv = tl.load(z_ptr + x_bh + p, mask=pmask, other=0.0).to(tl.float32)
        if MODE == 2:
            w = tl.load(w_ptr + h * P + p, mask=pmask, other=0.0)
        o = tl.zeros([BLOCK_P], tl.float32)
        for r in tl.static_range(R):
            qh = _rot_row(q_b + r * G * N, qb_ptr + (h * R + r) * N, ncol, pcol, cs, sn, sgn, nmask)
            vt = v
            if HAS_MV:
                vt = v * tl.load(mv_ptr + (h * R + r) * P + p, mask=pmask, other=0.0)
            y = tl.sum(S * qh[None, :], axis=1) + dval * vt
            if MODE == 2:  # fused pre-gate RMSNorm over the whole head (one tile covers P)
                ym = tl.where(pmask, y, 0.0)
                y = y * (1.0 / tl.sqrt(tl.sum(ym * ym) / P + eps)) * w
            if HAS_Z:
                zr = zv
                if HAS_MZ:
                    zr = zv * tl.load(mz_ptr + (h * R + r) * P + p, mask=pmask, other=0.0)
                y = y * zr * _sigmoid(zr)
            if MODE == 1:
                y = tl.where(p < P_OK, y, 0.0)
                tl.store(out_ptr + (b64 * R + r) * H * P + h * P + p,
                         y.to(out_ptr.dtype.element_ty), mask=pmask)
            else:
                if HAS_MO:
                    y = y * tl.load(mo_ptr + (h * R + r) * P + p, mask=pmask, other=0.0)
                o += y
        if MODE != 1:
            o = tl.where(p < P_OK, o, 0.0)
            tl.store(out_ptr + x_bh + p, o.to(out_ptr.dtype.element_ty), mask=pmask)



@triton.jit
def _dot_head(q_b, k_b, kin_b, qb_ptr, kb_ptr, v_ptr, z_ptr, d_ptr, mv_ptr, mz_ptr, mo_ptr, w_ptr,
              v_in_ptr, s_in, s_out, out_ptr, x_bh, head, b64, h, H, G, P_OK, N_OK, dval,
              alpha, beta, gamma, eps, n, nmask, ncol, pcol, cs, sn, sgn,
              N: tl.constexpr, P: tl.constexpr, R: tl.constexpr, HAS_Z: tl.constexpr,
              HAS_MV: tl.constexpr, HAS_MZ: tl.constexpr, HAS_MO: tl.constexpr, MODE: tl.constexpr,
              BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr, KD: tl.constexpr, RD: tl.constexpr,
              PREC: tl.constexpr):
    """The whole head (P x N) in one tile, the rank-2R update and the R row sums as two small
    matrix products (tensor cores; PREC "tf32x3" keeps fp32 accuracy, "tf32" for the bf16 bounds):
        S' = alpha S + Cf @ Km,   Cf (P x KD): column r < R gamma v mv_r, column R + r beta vprev mv_r
                                  Km (KD x N): row r < R kh_r, row R + r kprev_r  (other rows 0)
        Y  = S' @ Qt,             Qt (N x RD): column r < R qh_r                  (other columns 0)
    The rotation and the coefficients are computed once per element of these small tiles (no
    per-row replication), and the output modes work on the (P x RD) tile Y. Returns Km (its rows
    r < R are the new k state, stored after the CTA barrier)."""
    p = tl.arange(0, BLOCK_P)
    pmask = p < P
    pok = p < P_OK
    soff = p[:, None] * N + ncol[None, :]
    smask = pok[:, None] & nmask[None, :]
    S_raw = tl.load(s_in + soff, mask=smask, other=0.0)
    v = tl.load(v_ptr + x_bh + p, mask=pmask, other=0.0).to(tl.float32)
    vp = tl.load(v_in_ptr + head * P + p, mask=pok, other=0.0).to(tl.float32)

    # coefficients Cf (BLOCK_P x KD)
    c = tl.arange(0, KD)[None, :]
    rc = tl.where(c < R, c, c - R)
    cval = c < 2 * R
    cf = tl.where(c < R, (gamma * v)[:, None], (beta * vp)[:, None])
    if HAS_MV:
        cf = cf * tl.load(mv_ptr + (h * R + rc) * P + p[:, None], mask=pmask[:, None] & cval, other=0.0)
    cf = tl.where(cval, cf, 0.0)

    # K matrix Km (KD x BLOCK_N): rotated, biased k of this token, and the k state
    ck = tl.arange(0, KD)[:, None]
    rk = tl.where(ck < R, ck, ck - R)
    kcur = (ck < R) & nmask[None, :]
    x = tl.load(k_b + rk * (G * N) + ncol[None, :], mask=kcur, other=0.0).to(tl.float32) + \
        tl.load(kb_ptr + (h * R + rk) * N + ncol[None, :], mask=kcur, other=0.0)
    xp = tl.load(k_b + rk * (G * N) + pcol[None, :], mask=kcur, other=0.0).to(tl.float32) + \
        tl.load(kb_ptr + (h * R + rk) * N + pcol[None, :], mask=kcur, other=0.0)
    kh = x * cs[None, :] + sgn[None, :] * xp * sn[None, :]
    kprv = (ck >= R) & (ck < 2 * R) & (n < N_OK)[None, :]
    kp = tl.load(kin_b + rk * (H * N) + ncol[None, :], mask=kprv, other=0.0)
    Km = tl.where(ck < R, kh, kp)

    S = tl.dot(cf, Km, S_raw.to(tl.float32) * alpha, input_precision=PREC)   # alpha S accumulates
    tl.store(s_out + soff, S.to(s_out.dtype.element_ty), mask=smask)

    # Q matrix Qt (BLOCK_N x RD): rotated, biased q
    rq = tl.arange(0, RD)[None, :]
    qv = (rq < R) & nmask[:, None]
    xq = tl.load(q_b + rq * (G * N) + ncol[:, None], mask=qv, other=0.0).to(tl.float32) + \
        tl.load(qb_ptr + (h * R + rq) * N + ncol[:, None], mask=qv, other=0.0)
    xqp = tl.load(q_b + rq * (G * N) + pcol[:, None], mask=qv, other=0.0).to(tl.float32) + \
        tl.load(qb_ptr + (h * R + rq) * N + pcol[:, None], mask=qv, other=0.0)
    Qt = xq * cs[:, None] + sgn[:, None] * xqp * sn[:, None]
    Y = tl.dot(S, Qt, input_precision=PREC)          # (BLOCK_P x RD): y_r = S' qh_r

    # output modes on (BLOCK_P x RD)
    rv = rq < R
    m2 = pmask[:, None] & rv
    vt = v[:, None]
    if HAS_MV:
        vt = vt * tl.load(mv_ptr + (h * R + rq) * P + p[:, None], mask=m2, other=0.0)
    y = Y + dval * vt
    if MODE == 2:  # fused pre-gate RMSNorm per rank over the whole head
        ym = tl.where(m2, y, 0.0)
        rstd = 1.0 / tl.sqrt(tl.sum(ym * ym, axis=0) / P + eps)
        w = tl.load(w_ptr + h * P + p, mask=pmask, other=0.0)
        y = y * rstd[None, :] * w[:, None]
    if HAS_Z:
        zr = tl.load(z_ptr + x_bh + p, mask=pmask, other=0.0).to(tl.float32)[:, None]
        if HAS_MZ:
            zr = zr * tl.load(mz_ptr + (h * R + rq) * P + p[:, None], mask=m2, other=0.0)
        y = y * zr * _sigmoid(zr)
    if MODE == 1:
        y = tl.where(pok[:, None], y, 0.0)
        tl.store(out_ptr + (b64 * R + rq) * H * P + h * P + p[:, None],
                 y.to(out_ptr.dtype.element_ty), mask=m2)
    else:
        if HAS_MO:
            y = y * tl.load(mo_ptr + (h * R + rq) * P + p[:, None], mask=m2, other=0.0)
        o = tl.sum(tl.where(rv, y, 0.0), axis=1)
        o = tl.where(pok, o, 0.0)
        tl.store(out_ptr + x_bh + p, o.to(out_ptr.dtype.element_ty), mask=pmask)
    return Km


@triton.jit(do_not_specialize=["zero"])
def mamba3_step_kernel(
    q_ptr, k_ptr, v_ptr, z_ptr, adt_ptr, dt_ptr, trap_ptr, angles_ptr,
    qb_ptr, kb_ptr, d_ptr, mv_ptr, mz_ptr, mo_ptr, w_ptr,
    ang_in_ptr, ssm_in_ptr, k_in_ptr, v_in_ptr,
    ang_out_ptr, ssm_out_ptr, k_out_ptr, v_out_ptr,
    idx_ptr, out_ptr, cnt_ptr,
    H, G, M, eps, zero,
    N: tl.constexpr, P: tl.constexpr, R: tl.constexpr, A: tl.constexpr,
    HALF: tl.constexpr, EULER: tl.constexpr, HAS_D: tl.constexpr, HAS_Z: tl.constexpr,
    HAS_MV: tl.constexpr, HAS_MZ: tl.constexpr, HAS_MO: tl.constexpr, MODE: tl.constexpr,
    SHARED_ANG: tl.constexpr, HAS_IDX: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_A: tl.constexpr,
    ROWS: tl.constexpr, NT: tl.constexpr, ITERS: tl.constexpr, WRITER: tl.constexpr,
    VEC: tl.constexpr, PREFETCH: tl.constexpr,
    DOT: tl.constexpr = False, KD: tl.constexpr = 16, RD: tl.constexpr = 16, PREC: tl.constexpr = "tf32x3",
):
    tl.static_assert(MODE != 2 or NT * ITERS == 1, "norm_reduce needs the whole head in one tile")
    pid = tl.program_id(0)
    bh = pid // NT                      # (b, h) of this program; its P rows: tile t of NT
    t = pid - bh * NT
    b = bh // H
    h = bh - b * H
    g = h // (H // G)
    p_start = t * ROWS

    # ---- pool row (padding: idx < 0 or idx >= M) ------------------------------------------
    if HAS_IDX:
        idx = tl.load(idx_ptr + b)
        valid = (idx >= 0) & (idx < M)
        row = tl.where(valid, idx, 0).to(tl.int64)
    else:
        valid = b >= 0
        row = b.to(tl.int64)
    b64 = b.to(tl.int64)
    # validity as index limits (the interpreter cannot AND a scalar with a tensor mask)
    P_OK = tl.where(valid, P, 0)
    N_OK = tl.where(valid, N, 0)
    A_OK = tl.where(valid, A, 0)

    # ---- per-head scalars -------------------------------------------------------------------
    dt = tl.load(dt_ptr + b * H + h)
    alpha = tl.exp(tl.load(adt_ptr + b * H + h))
    if EULER:
        lam = 1.0
    else:
        lam = _sigmoid(tl.load(trap_ptr + b * H + h))
    beta = alpha * dt * (1.0 - lam)
    gamma = dt * lam
    if HAS_D:
        dval = tl.load(d_ptr + h)
    else:
        dval = 0.0

    # ---- rotation of state column n: partner column, angle, sign ---------------------------
    n = tl.arange(0, BLOCK_N)
    nmask = n < N
    if HALF:
        first = n < N // 2
        partner = tl.where(first, n + N // 2, n - N // 2)
        jn = tl.where(first, n, n - N // 2)
    else:
        first = (n % 2) == 0
        partner = tl.where(first, n + 1, n - 1)
        jn = n // 2
    sgn = tl.where(first, -1.0, 1.0)
    # Address columns. VEC: aligned, so the state tile is loaded in 16-byte vectors (and the
    # compiler converts the outer-product update into that layout). Not VEC: `zero` (a runtime
    # 0 the compiler cannot see) hides the alignment, so the state tile and the q/k rows share
    # one layout (a warp still covers 32 consecutive columns per access) and nothing
    # tile-sized is converted. Which is faster is a tuning question (config "VEC").
    if VEC:
        ncol = n
        pcol = partner
    else:
        ncol = n + zero
        pcol = partner + zero
    if A > 0:
        rmask = nmask & (jn < A_OK)
        th_n = _theta(ang_in_ptr, angles_ptr, row, b, h, dt, jn, rmask, H, A, SHARED_ANG)
        cs = tl.where(rmask, tl.cos(th_n), 1.0)
        sn = tl.where(rmask, tl.sin(th_n), 0.0)
    else:
        cs = tl.full([BLOCK_N], 1.0, tl.float32)
        sn = tl.full([BLOCK_N], 0.0, tl.float32)

    # ---- per-program base pointers (64-bit once; tile offsets stay 32-bit) -----------------
    head = row * H + h                       # pool row of this head (int64)
    s_in = ssm_in_ptr + head * (P * N)
    s_out = ssm_out_ptr + head * (P * N)
    x_bh = (b64 * H + h) * P                 # (b, h) row of v, z, out
    q_b = q_ptr + (b64 * R * G + g) * N      # rank r at + r * G * N
    k_b = k_ptr + (b64 * R * G + g) * N
    kin_b = k_in_ptr + (row * R * H + h) * N  # rank r at + r * H * N
    kout_b = k_out_ptr + (row * R * H + h) * N

    if DOT:
        # ---- the whole head as two small matrix products (tensor cores, see `_dot_head`) ----
        Kmat = _dot_head(
            q_b, k_b, kin_b, qb_ptr, kb_ptr, v_ptr, z_ptr, d_ptr, mv_ptr, mz_ptr, mo_ptr, w_ptr,
            v_in_ptr, s_in, s_out, out_ptr, x_bh, head, b64, h, H, G, P_OK, N_OK, dval,
            alpha, beta, gamma, eps, n, nmask, ncol, pcol, cs, sn, sgn,
            N, P, R, HAS_Z, HAS_MV, HAS_MZ, HAS_MO, MODE, BLOCK_P, BLOCK_N, KD, RD, PREC)
    else:
        _tiles(q_b, k_b, kin_b, qb_ptr, kb_ptr, v_ptr, z_ptr, d_ptr, mv_ptr, mz_ptr, mo_ptr, w_ptr,
               v_in_ptr, s_in, s_out, out_ptr, x_bh, head, b64, h, H, G, P_OK, N_OK, dval,
               alpha, beta, gamma, eps, n, nmask, ncol, pcol, cs, sn, sgn, p_start,
               N, P, R, HAS_Z, HAS_MV, HAS_MZ, HAS_MO, MODE, BLOCK_P, ROWS, ITERS, PREFETCH)

    # ---- this program's v rows, then the shared per-head states (kprev, theta) --------------
    # Every read of this program's state rows is before the barrier (in-place safe).
    tl.debug_barrier()
    p_end = tl.minimum(P_OK, p_start + ROWS)
    pv = p_start + tl.arange(0, ROWS)
    vv = tl.load(v_ptr + x_bh + pv, mask=pv < P, other=0.0)
    tl.store(v_out_ptr + head * P + pv, vv.to(v_out_ptr.dtype.element_ty), mask=pv < p_end)
    # kprev and theta are read by all NT programs of the head. WRITER 0: one program per head.
    # WRITER 1 (state_out is not state_in): tile 0 writes. WRITER 2 (in place): each program
    # counts itself in on an int32 arrival counter after its reads (barrier, then an acq_rel
    # atomic); the last to arrive writes the new shared states and resets the counter to 0.
    if WRITER == 2:
        cnt = tl.atomic_add(cnt_ptr + bh, 1, sem="acq_rel")
        last = cnt == NT - 1
        tl.store(cnt_ptr + bh, 0, mask=last)
        N_W = tl.where(last, N_OK, 0)
        A_W = tl.where(last, A_OK, 0)
    elif WRITER == 1:
        N_W = tl.where(t == 0, N_OK, 0)
        A_W = tl.where(t == 0, A_OK, 0)
    else:
        N_W = N_OK
        A_W = A_OK
    if A > 0:
        ja = tl.arange(0, BLOCK_A)
        amask = ja < A_W
        th = _theta(ang_in_ptr, angles_ptr, row, b, h, dt, ja, amask, H, A, SHARED_ANG)
        tl.store(ang_out_ptr + head * A + ja, th, mask=amask)
    if DOT:  # rows c < R of the K matrix are the new kh_r
        ck = tl.arange(0, KD)[:, None]
        tl.store(kout_b + ck * (H * N) + n[None, :], Kmat, mask=(ck < R) & (n < N_W)[None, :])
    else:
        for r in tl.static_range(R):
            kh = _rot_row(k_b + r * G * N, kb_ptr + (h * R + r) * N, ncol, pcol, cs, sn, sgn, nmask)
            tl.store(kout_b + r * H * N + ncol, kh, mask=n < N_W)


# ------------------------------------------------------------------------------------------
# Python wrapper

def rows_per_program(spec, config) -> int:
    """P rows of the state per program (config "ROWS"; absent: the whole head)."""
    PV = triton.next_power_of_2(spec.head_dim)
    return min(PV, int(config.get("ROWS", PV)))


def constexprs(spec, config) -> dict:
    """The kernel's compile-time parameters for a spec and a config. `_inplace` (set by
    `launch`) picks how the shared per-head states are written when a head is split."""
    N, P, A = spec.d_state, spec.head_dim, spec.n_angles
    rows = rows_per_program(spec, config)
    bp = min(int(config["BLOCK_P"]), rows)
    nt = -(-P // rows)
    iters = -(-min(rows, P) // bp)
    writer = 0 if nt == 1 else (2 if config.get("_inplace", True) else 1)
    PV, NB = triton.next_power_of_2(P), triton.next_power_of_2(N)
    R = spec.rank
    # DOT (config "DOT"; absent: on for MIMO): the whole head as two tensor-core products, when
    # one program holds the whole head in one tile and the tiles are >= 16 (tl.dot's minimum)
    dot = bool(config.get("DOT", R > 1)) and nt == 1 and iters == 1 and bp == PV and PV >= 16 and NB >= 16
    narrow = spec.input_dtype != "float32" or spec.state_dtype != "float32"
    prec = config.get("PREC") or ("tf32" if narrow else "tf32x3")
    return dict(
        N=N, P=P, R=spec.rank, A=A, HALF=spec.pairing == "half", EULER=spec.discretization == "euler",
        HAS_D=spec.has_d, HAS_Z=spec.has_z, HAS_MV=spec.has_mimo_v, HAS_MZ=spec.has_mimo_z,
        HAS_MO=spec.has_mimo_out, MODE=MODES[spec.output_mode], SHARED_ANG=spec.shared_angles,
        HAS_IDX=bool(config.get("_has_idx", False)),
        BLOCK_P=bp, BLOCK_N=triton.next_power_of_2(N), BLOCK_A=triton.next_power_of_2(max(A, 1)),
        ROWS=rows, NT=nt, ITERS=iters, WRITER=writer,
        VEC=bool(config.get("VEC", False)), PREFETCH=bool(config.get("PREFETCH", False)) and iters > 1,
        DOT=dot, KD=max(16, triton.next_power_of_2(2 * R)), RD=max(16, triton.next_power_of_2(R)), PREC=prec)


# Arrival counters of the in-place split path: int32, zero between calls (the last program of
# each head resets its own). One buffer per (device, stream), grown on demand; allocate it
# outside CUDA-graph capture (any earlier call with at least as many heads does).
_COUNTERS: dict = {}


def counters(device, n: int):
    import torch
    key = (str(device), torch.cuda.current_stream(device).cuda_stream if device.type == "cuda" else 0)
    buf = _COUNTERS.get(key)
    if buf is None or buf.numel() < n:
        buf = torch.zeros(max(n, 1024), dtype=torch.int32, device=device)
        _COUNTERS[key] = buf
    return buf


def _same(a, b) -> bool:
    return a.data_ptr() == b.data_ptr()


def launch(spec, config, t) -> None:
    """Run the kernel on a StepTensors bundle (writes t.out and t.state_out)."""
    B, H, P = t.v.shape
    G = t.q.shape[2]
    M = t.state_in.ssm.shape[0]
    fdummy = t.q_bias  # any fp32 tensor stands in for an absent optional one
    opt = lambda x: fdummy if x is None else x
    si, so = t.state_in, t.state_out
    ang_in = si.angle if spec.n_angles else fdummy
    ang_out = so.angle if spec.n_angles else fdummy
    idx = t.state_indices if t.state_indices is not None else t.dt
    # the shared states race only when written where they are read
    inplace = _same(si.k, so.k) or (spec.n_angles > 0 and _same(si.angle, so.angle))
    cfg = dict(config, _has_idx=t.state_indices is not None, _inplace=inplace)
    ce = constexprs(spec, cfg)
    cnt = counters(t.v.device, B * H) if ce["WRITER"] == 2 else t.state_indices
    if cnt is None:
        cnt = counters(t.v.device, 1)
    mamba3_step_kernel[grid(B, H, ce["NT"])](
        t.q, t.k, t.v, t.z if t.z is not None else t.v, t.adt, t.dt, opt(t.trap), opt(t.angles),
        t.q_bias, t.k_bias, opt(t.d), opt(t.mimo_v), opt(t.mimo_z), opt(t.mimo_out), opt(t.norm_weight),
        ang_in, si.ssm, si.k, si.v, ang_out, so.ssm, so.k, so.v,
        idx, t.out, cnt,
        H, G, M, float(spec.norm_eps), 0,
        **ce, num_warps=int(config.get("num_warps", 4)), num_stages=int(config.get("num_stages", 1)),
        **({"maxnreg": int(config["maxnreg"])} if config.get("maxnreg") else {}))
