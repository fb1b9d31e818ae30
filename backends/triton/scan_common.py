"""Phase 1 of the chunked scan (SPEC §8, reference/chunked.py `preprocess`), as @triton.jit
helpers that the three forward kernels call on the fly for one chunk, plus the segment map.

Almost nothing of phase 1 is written to global memory in the forward: every kernel that needs
a chunk's rotated q/k, decays and angles recomputes them from the inputs (cheaper than a round
trip through HBM). The exception (config GATES, the default) is scan_gates_kernel: gamma and
beta per (b, h, t), 8 bytes per token and head, so the chunk loops spend no sigmoid on them. `scan_preprocess.py`'s debug kernel calls the same helpers and writes them
out, so phase 1 can be checked alone against reference.chunked.preprocess.

Per token t of a chunk (masked tokens t >= end of sequence read as dt = adt = 0, so they add
nothing and leave the decay cumsum flat):
    lam_t    = sigmoid(trap_t) (trapezoidal) or 1 (euler)
    gamma_t  = dt_t lam_t;  gamma'_t = dt_{t+1} (1 - lam_{t+1}) (0 at the sequence's last token,
               read across chunk and segment boundaries);  scale_t = gamma_t + gamma'_t
    cs_t     = inclusive cumsum of adt inside the chunk
    phi_t,j  = pi tanh(raw_t,j) dt_t;  ell_t = carry + inclusive cumsum of phi inside the chunk
Rotations use angles relative to the start of the segment (`ell`, carried across the chunks of
a segment, wrapped into [0, 2 pi) at every chunk): scores qh.kh only depend on angle
differences, and the absolute frame is restored by the state passing kernel (one rotation per
segment of the carried P x N state; see scan_state_passing.py).

Pair layout ("split halves"): a q/k/state row of N columns is handled as two tiles of the
pair's first and second members, x0[j] = x[c0(j)], x1[j] = x[c1(j)] for pairs j < N/2, with
c0, c1 = (2j, 2j+1) for the interleaved pairing and (j, j + N/2) for the half pairing. A
rotation is then elementwise on (x0, x1); dot products over N are two dots over N/2. Pairs
j >= A have angle 0 (cos 1, sin 0). Tiles are padded to NHP = max(16, pow2(N/2)) columns.

Row layout (MIMO, R ranks padded to RP = pow2(R)): a chunk of C tokens is C * RP rows,
row i = token (i // RP), rank (i % RP) (the TileLang "fused rows"); padded ranks are zero.

Each helper comes as a load part (`*_raw`) and a math part, so the kernels' chunk loops can
issue the next chunk's loads before the current chunk's math (software pipelining by hand:
the loops are latency-bound, and Triton's pipeliner only prefetches loads that feed dots).
"""
from __future__ import annotations

import triton
import triton.language as tl

from . import _interpret

PI = tl.constexpr(3.141592653589793)
# MUFU approximations (rcp.approx) on the GPU; the interpreter has no inline asm. Like
# TRITON_INTERPRET itself this is fixed when the module is imported.
FAST_MATH = tl.constexpr(not _interpret())
TWO_PI = tl.constexpr(6.283185307179586)


@triton.jit
def _rcp(x, FAST: tl.constexpr = FAST_MATH):
    """1 / x: rcp.approx.ftz.f32 on the GPU (one MUFU op, < 1 ulp), exact in the interpreter."""
    if FAST:
        r = tl.inline_asm_elementwise("rcp.approx.ftz.f32 $0, $1;", "=r,r", [x], dtype=tl.float32,
                                      is_pure=True, pack=1)
    else:
        r = 1.0 / x
    return r


@triton.jit
def _sigmoid(x, FAST: tl.constexpr = FAST_MATH):
    # 1 / (1 + e^-x): ex2 + rcp (two MUFU ops); e^-x = inf for x << 0 gives rcp(inf) = 0
    return _rcp(1.0 + tl.exp(-x), FAST)


@triton.jit
def _tanh(x):
    # accurate to fp32 rounding (no tanh.approx: angle errors accumulate over the sequence)
    return 2.0 * _sigmoid(2.0 * x) - 1.0


@triton.jit
def _wrap(x):
    """x - 2 pi floor(x / 2 pi), clamped into [0, 2 pi) against fp32 rounding."""
    two_pi: tl.constexpr = 6.283185307179586
    inv: tl.constexpr = 0.15915494309189535
    y = x - two_pi * tl.floor(x * inv)
    y = tl.where(y < 0.0, y + two_pi, y)
    return tl.where(y >= two_pi, y - two_pi, y)


@triton.jit
def _cos_sin(x, FAST: tl.constexpr):
    """cos, sin of x (fp32). FAST: reduce into [-pi, pi] then the MUFU approximations
    (|error| < 1e-6 there); else the accurate library functions (interpreter)."""
    if FAST:
        two_pi: tl.constexpr = 6.283185307179586
        inv: tl.constexpr = 0.15915494309189535
        r = x - two_pi * tl.floor(x * inv + 0.5)
        c = tl.inline_asm_elementwise("cos.approx.f32 $0, $1;", "=r,r", [r], dtype=tl.float32,
                                      is_pure=True, pack=1)
        s = tl.inline_asm_elementwise("sin.approx.f32 $0, $1;", "=r,r", [r], dtype=tl.float32,
                                      is_pure=True, pack=1)
    else:
        c = tl.cos(x)
        s = tl.sin(x)
    return c, s


@triton.jit
def _cast(x, ty: tl.constexpr, INTERP: tl.constexpr):
    """x.to(ty) with round-to-nearest-even. The interpreter truncates fp32 -> bf16 (the GPU
    rounds to nearest even), which biases every rounding error; there bf16 is rounded here."""
    if INTERP and ty == tl.bfloat16:
        i = x.to(tl.float32).to(tl.int32, bitcast=True)
        i = (i + 0x7FFF + ((i >> 16) & 1)) & -65536
        r = i.to(tl.float32, bitcast=True).to(tl.bfloat16)
    else:
        r = x.to(ty)
    return r


@triton.jit
def _mm(a, b, DT: tl.constexpr, DOT_F32: tl.constexpr, INTERP: tl.constexpr):
    """a @ b with fp32 accumulation, operands rounded to DT first (the input dtype: bf16 or
    fp16); fp32 inputs (DOT_F32) use 3xTF32 on the GPU. The interpreter multiplies 16-bit
    operands wrongly (triton#11584): there the rounded operands are multiplied in fp32."""
    if DOT_F32:
        if INTERP:
            r = tl.dot(a.to(tl.float32), b.to(tl.float32))
        else:
            r = tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="tf32x3")
    else:
        if INTERP:
            r = tl.dot(_cast(a, DT, INTERP).to(tl.float32), _cast(b, DT, INTERP).to(tl.float32))
        else:
            r = tl.dot(a.to(DT), b.to(DT))
    return r


@triton.jit
def _pair_cols(j, N: tl.constexpr, PAIR_HALF: tl.constexpr):
    """Column indices (c0, c1) of pair j."""
    if PAIR_HALF:
        c0 = j
        c1 = j + N // 2
    else:
        c0 = 2 * j
        c1 = 2 * j + 1
    return c0, c1


@triton.jit
def _first_slot(seq, bos, NSEG, SEGLEN: tl.constexpr, VARLEN: tl.constexpr):
    """The slot of a sequence's first segment in _locate's layout (dense: seq * NSEG; varlen:
    bos // SEGLEN + seq)."""
    if VARLEN:
        first = bos // SEGLEN + seq
    else:
        first = seq * NSEG
    return first


@triton.jit
def _locate(slot, cu_ptr, S, L, NSEG, SEGLEN: tl.constexpr, VARLEN: tl.constexpr):
    """Segment slot -> (batch row b, sequence, segment index, sequence start, sequence end,
    segment start). Dense: slot = b * NSEG + segment. Varlen (B = 1): sequence i owns slots
    cu[i] // SEGLEN + i + [0, cdiv(len_i, SEGLEN)) (one spare slot per sequence makes the
    ranges disjoint; SPEC §7); a slot past its sequence's segments has seg_start >= end."""
    if VARLEN:
        lo = 0
        hi = S - 1
        while lo < hi:
            mid = (lo + hi + 1) // 2
            st = tl.load(cu_ptr + mid) // SEGLEN + mid
            if st <= slot:
                lo = mid
            else:
                hi = mid - 1
        seq = lo
        bos = tl.load(cu_ptr + seq)
        eos = tl.load(cu_ptr + seq + 1)
        seg = slot - (bos // SEGLEN + seq)
        b = seq * 0
    else:
        seq = slot // NSEG
        seg = slot % NSEG
        b = seq
        bos = seq * 0
        eos = bos + L
    t0 = bos + seg * SEGLEN
    return b, seq, seg, bos, eos, t0


@triton.jit
def _scalars_raw(adt_ptr, dt_ptr, trap_ptr, base, tc, eos, C: tl.constexpr, RP: tl.constexpr,
                 TRAP: tl.constexpr, GATES: tl.constexpr = False):
    """The loads of _chunk_scalars (issued a chunk ahead by the software-pipelined loops):
    per row, adt, dt, dt of the next token, raw trap and raw trap of the next token. With
    GATES (trapezoidal only) trap_ptr is the (B, H, L, 2) output of scan_gates_kernel: tr is
    gamma = dt lam of the row's token and trn beta = dt (1 - lam) of the next token (no dtn)."""
    rows = tl.arange(0, C * RP)
    offs = tc + rows // RP
    m = offs < eos
    mn = (offs + 1) < eos
    adt = tl.load(adt_ptr + base + offs, mask=m, other=0.0)
    dt = tl.load(dt_ptr + base + offs, mask=m, other=0.0)
    if TRAP:
        if GATES:
            dtn = dt
            tr = tl.load(trap_ptr + 2 * (base + offs), mask=m, other=0.0)
            trn = tl.load(trap_ptr + 2 * (base + offs) + 3, mask=mn, other=0.0)
        else:
            dtn = tl.load(dt_ptr + base + offs + 1, mask=mn, other=0.0)
            tr = tl.load(trap_ptr + base + offs, mask=m, other=0.0)
            trn = tl.load(trap_ptr + base + offs + 1, mask=mn, other=0.0)
    else:
        dtn = tl.load(dt_ptr + base + offs + 1, mask=mn, other=0.0)
        tr = dt
        trn = dtn
    return adt, dt, dtn, tr, trn


@triton.jit
def _scalars_math(adt, dt, dtn, tr, trn, C: tl.constexpr, RP: tl.constexpr, TRAP: tl.constexpr,
                  GATES: tl.constexpr = False):
    """Per row i = (token t_i, rank r_i): (dt, gamma, scale, cs, T, lead) [C * RP],
    lead = (r_i == 0); cs is the inclusive decay cumsum of the row's token and T the chunk's
    decay total. Every rank row reads its token's values itself (L1 hits): no per-token ->
    per-row reshapes, which cost many registers for MIMO."""
    rows = tl.arange(0, C * RP)
    lead = (rows % RP) == 0
    if TRAP:
        if GATES:
            gamma = tr
            scale = tr + trn
        else:
            lam = _sigmoid(tr)
            lamn = _sigmoid(trn)
            gamma = dt * lam
            scale = gamma + dtn * (1.0 - lamn)
    else:
        gamma = dt
        scale = dt
    adt_lead = tl.where(lead, adt, 0.0)
    cs = tl.cumsum(adt_lead, axis=0)
    T = tl.sum(adt_lead, axis=0)
    return dt, gamma, scale, cs, T, lead


@triton.jit
def scan_gates_kernel(dt_ptr, trap_ptr, out_ptr, n, BLOCK: tl.constexpr):
    """Phase 1 prologue (config GATES): per (b, h, t) of the (B, H, L) inputs,
    out[..., 0] = gamma = dt lam and out[..., 1] = beta = dt (1 - lam), lam = sigmoid(trap),
    so the chunk loops load two weights instead of dt, trap and their next-token values and
    spend no sigmoid (their per-row vectors live in several register layouts there)."""
    i = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m = i < n
    dt = tl.load(dt_ptr + i, mask=m, other=0.0)
    lam = _sigmoid(tl.load(trap_ptr + i, mask=m, other=0.0))
    g = dt * lam
    tl.store(out_ptr + 2 * i, g, mask=m)
    tl.store(out_ptr + 2 * i + 1, dt - g, mask=m)


@triton.jit
def scan_scalars_kernel(adt_ptr, dt_ptr, trap_ptr, out_ptr, n, L, TRAP: tl.constexpr, BLOCK: tl.constexpr):
    """The scalar table of the TileLang phase 4 (backends/tilelang/scan_chunk_output.py): per
    (b, h, t) of the (B, H, L) inputs, out[..., :] = (gamma_t, beta_{t+1}, adt_t, dt_t), with
    gamma = dt lam, beta = dt - gamma (scan_gates_kernel's values, bit for bit), beta_{t+1} = 0 at
    t = L - 1 (the walk masks it at every sequence's end); euler: (dt_t, 0, adt_t, dt_t). One
    16-byte row per token: one TMA tile per chunk."""
    i = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m = i < n
    dt = tl.load(dt_ptr + i, mask=m, other=0.0)
    adt = tl.load(adt_ptr + i, mask=m, other=0.0)
    if TRAP:
        g = dt * _sigmoid(tl.load(trap_ptr + i, mask=m, other=0.0))
        mn = m & ((i % L) + 1 < L)
        dtn = tl.load(dt_ptr + i + 1, mask=mn, other=0.0)
        gn = dtn * _sigmoid(tl.load(trap_ptr + i + 1, mask=mn, other=0.0))
        bn = dtn - gn
    else:
        g = dt
        bn = dt * 0.0
    u = tl.arange(0, 4)[None, :]
    row = tl.where(u == 0, g[:, None], tl.where(u == 1, bn[:, None], tl.where(u == 2, adt[:, None], dt[:, None])))
    tl.store(out_ptr + 4 * i[:, None] + u, row, mask=m[:, None])


@triton.jit
def _chunk_scalars(adt_ptr, dt_ptr, trap_ptr, base, tc, eos, C: tl.constexpr, RP: tl.constexpr,
                   TRAP: tl.constexpr):
    """_scalars_math of _scalars_raw for the chunk [tc, tc + C) (base: the (b, h) row of the
    (B, H, L) tensors)."""
    adt, dt, dtn, tr, trn = _scalars_raw(adt_ptr, dt_ptr, trap_ptr, base, tc, eos, C, RP, TRAP)
    return _scalars_math(adt, dt, dtn, tr, trn, C, RP, TRAP)


@triton.jit
def _angles_raw(ang_ptr, ang_base, s_at, tc, eos, A: tl.constexpr, C: tl.constexpr,
                RP: tl.constexpr, AP: tl.constexpr):
    """Raw angle rates [C * RP, AP] of the rows' tokens (rank-0 rows only; others 0)."""
    rows = tl.arange(0, C * RP)
    offs = tc + rows // RP
    j = tl.arange(0, AP)
    m = ((offs < eos) & ((rows % RP) == 0))[:, None] & (j < A)[None, :]
    return tl.load(ang_ptr + ang_base + offs[:, None].to(tl.int64) * s_at + j[None, :], mask=m,
                   other=0.0).to(tl.float32)


@triton.jit
def _angles_ell(raw, dt, carry):
    """The segment-relative angles ell [C * RP, AP] of each row's token (carry + inclusive
    cumsum of phi inside the chunk) and the new carry (wrapped ell after the chunk's last
    token). dt per row (_scalars_math); raw is 0 on rows of ranks > 0 (counted once)."""
    phi = PI * _tanh(raw) * dt[:, None]
    ell = tl.cumsum(phi, axis=0) + carry[None, :]
    new_carry = _wrap(carry + tl.sum(phi, axis=0))
    return ell, new_carry


@triton.jit
def _ell_raw(ell_ptr, bh, tc, eos, A: tl.constexpr, C: tl.constexpr, RP: tl.constexpr,
             NHP: tl.constexpr):
    """The stored angles ell (phase 2, config ELL) of the rows' tokens, loaded straight at the
    pair-half width NHP: pairs j >= A read 0 (cos 1, sin 0), so no widening is needed."""
    rows = tl.arange(0, C * RP)
    offs = tc + rows // RP
    j = tl.arange(0, NHP)
    m = (offs < eos)[:, None] & (j < A)[None, :]
    return tl.load(ell_ptr + (bh + offs)[:, None] * A + j[None, :], mask=m, other=0.0)


@triton.jit
def _store_ell(ell_ptr, bh, tc, eos, ell, A: tl.constexpr, C: tl.constexpr, RP: tl.constexpr):
    """Store the chunk's angles ell [C * RP, AP] (rank-0 rows) at (bh + t) * A + j."""
    AP: tl.constexpr = ell.shape[1]
    rows = tl.arange(0, C * RP)
    offs = tc + rows // RP
    j = tl.arange(0, AP)
    m = ((offs < eos) & ((rows % RP) == 0))[:, None] & (j < A)[None, :]
    tl.store(ell_ptr + (bh + offs)[:, None] * A + j[None, :], ell, mask=m)


@triton.jit
def _angles_math(raw, dt, carry, C: tl.constexpr, RP: tl.constexpr, NHP: tl.constexpr,
                 FAST: tl.constexpr):
    """cos, sin [C * RP, NHP] of the segment-relative angles ell of each row's token, and the
    new carry (wrapped ell after the chunk's last token). dt per row (_scalars_math). carry
    [AP]: the AP = carry.shape[0] first pairs (AP >= A, a power of two >= 16) are computed, the
    other pairs get cos 1, sin 0 (the trig work scales with A, not N)."""
    ell, new_carry = _angles_ell(raw, dt, carry)
    c, s = _widen(ell, C, RP, NHP, FAST)
    return c, s, new_carry


@triton.jit
def _widen(ell, C: tl.constexpr, RP: tl.constexpr, NHP: tl.constexpr, FAST: tl.constexpr):
    """cos, sin [C * RP, NHP] of ell [C * RP, AP], pairs j >= AP padded with cos 1, sin 0."""
    AP: tl.constexpr = ell.shape[1]
    c, s = _cos_sin(ell, FAST)
    if AP < NHP:
        K: tl.constexpr = NHP // AP
        first = (tl.arange(0, K) == 0)[None, :, None]
        c = tl.reshape(tl.where(first, c[:, None, :], 1.0), [C * RP, NHP])
        s = tl.reshape(tl.where(first, s[:, None, :], 0.0), [C * RP, NHP])
    return c, s


@triton.jit
def _angles_math_tok(raw, dt_ptr, bh, tc, eos, carry, RP: tl.constexpr, NHP: tl.constexpr, FAST: tl.constexpr):
    """_angles_math for MIMO computed once per token and broadcast to its rank rows: raw [C, AP]
    (_angles_raw with RP = 1), the tokens' dt read from dt_ptr (the (B, H, L) row bh). cos, sin
    [C * RP, NHP] and the new carry; the same values as the per-row path (rank rows > 0 add 0
    there), with 1 / RP of the tanh, cumsum and trig work."""
    C: tl.constexpr = raw.shape[0]
    tok = tc + tl.arange(0, C)
    dt = tl.load(dt_ptr + bh + tok, mask=tok < eos, other=0.0)
    c, s, new_carry = _angles_math(raw, dt, carry, C, 1, NHP, FAST)   # per token: [C, NHP]
    c = tl.reshape(tl.broadcast_to(c[:, None, :], [C, RP, NHP]), [C * RP, NHP])
    s = tl.reshape(tl.broadcast_to(s[:, None, :], [C, RP, NHP]), [C * RP, NHP])
    return c, s, new_carry


@triton.jit
def _chunk_angles(ang_ptr, ang_base, s_at, tc, eos, dt, carry, lead, A: tl.constexpr,
                  C: tl.constexpr, RP: tl.constexpr, NHP: tl.constexpr, FAST: tl.constexpr):
    """_angles_math of _angles_raw for the chunk [tc, tc + C)."""
    AP: tl.constexpr = carry.shape[0]
    raw = _angles_raw(ang_ptr, ang_base, s_at, tc, eos, A, C, RP, AP)
    return _angles_math(raw, dt, carry, C, RP, NHP, FAST)


@triton.jit
def _bias_pairs(bias_ptr, h, R: tl.constexpr, RP: tl.constexpr, C: tl.constexpr, N: tl.constexpr,
                NH: tl.constexpr, NHP: tl.constexpr, PAIR_HALF: tl.constexpr):
    """The head's bias as pair halves, broadcastable to the chunk's rows: [1, NHP] (SISO) or
    [C * RP, NHP] (row (t, r) reads rank r); padded ranks are 0."""
    j = tl.arange(0, NHP)
    c0, c1 = _pair_cols(j, N, PAIR_HALF)
    if RP == 1:
        b0 = tl.load(bias_ptr + h * N + c0, mask=j < NH, other=0.0)[None, :]
        b1 = tl.load(bias_ptr + h * N + c1, mask=j < NH, other=0.0)[None, :]
    else:
        r = tl.arange(0, RP)
        m = (r < R)[:, None] & (j < NH)[None, :]
        off = (h * R + r)[:, None] * N
        b0 = tl.load(bias_ptr + off + c0[None, :], mask=m, other=0.0)
        b1 = tl.load(bias_ptr + off + c1[None, :], mask=m, other=0.0)
        b0 = tl.reshape(tl.broadcast_to(b0[None, :, :], [C, RP, NHP]), [C * RP, NHP])
        b1 = tl.reshape(tl.broadcast_to(b1[None, :, :], [C, RP, NHP]), [C * RP, NHP])
    return b0, b1


@triton.jit
def _pairs_raw(ptr, row_off, rmask, j, N: tl.constexpr, NH: tl.constexpr, PAIR_HALF: tl.constexpr):
    """The raw (input dtype) pair halves (x0, x1) [ROWS, NHP] of the rows at row_off [ROWS]
    (int64 element offsets). Loads are contiguous along the row (vectorised): the half pairing
    reads two contiguous halves, the interleaved pairing one [ROWS, 2 NHP] tile split into even
    and odd columns in registers."""
    NHP: tl.constexpr = j.shape[0]
    if PAIR_HALF:
        m = rmask[:, None] & (j < NH)[None, :]
        x0 = tl.load(ptr + row_off[:, None] + j[None, :], mask=m, other=0.0)
        x1 = tl.load(ptr + row_off[:, None] + (j + N // 2)[None, :], mask=m, other=0.0)
    else:
        cols = tl.arange(0, 2 * NHP)
        mm = rmask[:, None] & (cols < N)[None, :]
        x = tl.load(ptr + row_off[:, None] + cols[None, :], mask=mm, other=0.0)
        x0, x1 = tl.split(tl.reshape(x, [x.shape[0], NHP, 2]))
    return x0, x1


@triton.jit
def _pairs_math(x0, x1, rmask, b0, b1, j, NH: tl.constexpr):
    """Biased fp32 pair halves (x + bias). Padded pairs and padded ranks are 0 (x and the bias
    load 0 there); rows past the sequence's end hold the bias alone: they are never stored, and
    every product that could carry them into a stored value has a factor that is 0 on them
    (v, dt, gamma and scale load 0 past the end), so no select is spent on them."""
    return x0.to(tl.float32) + b0, x1.to(tl.float32) + b1


@triton.jit
def _load_pairs(ptr, row_off, rmask, b0, b1, j, N: tl.constexpr, NH: tl.constexpr,
                PAIR_HALF: tl.constexpr):
    """Biased rows (x + bias) as fp32 pair halves (x0, x1) [ROWS, NHP]; masked rows are 0."""
    x0, x1 = _pairs_raw(ptr, row_off, rmask, j, N, NH, PAIR_HALF)
    return _pairs_math(x0, x1, rmask, b0, b1, j, NH)


@triton.jit
def _rotate(x0, x1, c, s):
    """Rot(theta) on pairs: (x0 c - x1 s, x0 s + x1 c)."""
    return x0 * c - x1 * s, x0 * s + x1 * c


@triton.jit
def _row_tile(ptr, cols, cmask, rows):
    """The row ptr[cols] (a per-head weight or bias row) as a [ROWS, C] fp32 tile whose rows are
    all that row (rows [ROWS]: any int tensor of the tile's rows; every row loads the same addresses,
    L1 hits). For a contiguous row, a 1-D load gets a vectorised layout of its own and its
    broadcast against [ROWS, C] tiles goes through shared memory (a CTA barrier each); as a tile
    it takes the tiles' layout (MIMO prep: 19 -> 0 barriers, AOT 3.6). Not for strided rows
    (interleaved pair columns): those 1-D loads already have the broadcast's layout."""
    return tl.load(ptr + cols[None, :] + (rows * 0)[:, None], mask=cmask[None, :], other=0.0).to(tl.float32)


@triton.jit
def _store_pairs(ptr, row_off, rmask, j, x0, x1, N: tl.constexpr, NH: tl.constexpr, PAIR_HALF: tl.constexpr,
                 INTERP: tl.constexpr):
    """Store fp32 pair halves (x0, x1) [ROWS, NHP] as rows at row_off [ROWS] (int64 element
    offsets) in ptr's dtype; the mirror of _pairs_raw (contiguous, vectorised stores: the
    interleaved pairing joins even / odd columns into one row tile in registers)."""
    ty: tl.constexpr = ptr.dtype.element_ty
    if PAIR_HALF:
        m = rmask[:, None] & (j < NH)[None, :]
        tl.store(ptr + row_off[:, None] + j[None, :], _cast(x0, ty, INTERP), mask=m)
        tl.store(ptr + row_off[:, None] + (j + N // 2)[None, :], _cast(x1, ty, INTERP), mask=m)
    else:
        NHP: tl.constexpr = j.shape[0]
        cols = tl.arange(0, 2 * NHP)
        m = rmask[:, None] & (cols < N)[None, :]
        x = tl.reshape(tl.join(_cast(x0, ty, INTERP), _cast(x1, ty, INTERP)), [x0.shape[0], 2 * NHP])
        tl.store(ptr + row_off[:, None] + cols[None, :], x, mask=m)


@triton.jit
def _load_state(ptr, base, p, j, P: tl.constexpr, N: tl.constexpr, NH: tl.constexpr,
                PAIR_HALF: tl.constexpr):
    """A (BP x N) block of a P x N state at ptr + base (row-major, natural column order) as
    pair halves (S0, S1) [BP, NHP] fp32."""
    s0, s1 = _pairs_raw(ptr, base + p.to(tl.int64) * N, p < P, j, N, NH, PAIR_HALF)
    return s0.to(tl.float32), s1.to(tl.float32)


@triton.jit
def _store_state(ptr, base, p, j, s0, s1, P: tl.constexpr, N: tl.constexpr, NH: tl.constexpr,
                 PAIR_HALF: tl.constexpr, INTERP: tl.constexpr):
    _store_pairs(ptr, base + p.to(tl.int64) * N, p < P, j, s0, s1, N, NH, PAIR_HALF, INTERP)
