"""Backward stage 2 of the chunked scan: the output mode's adjoint (SPEC §3 output modes,
§9.1 last line; reference/common.apply_output_adjoint), token-parallel.

`output_bwd_kernel` grid (token blocks, H). Per token t, rank r of head h, with the per-rank
y[t,r] (the scan before the output mode, D and diagonal terms included; fp32, recomputed by
the orchestrator), dO the upstream gradient, u = Z * MIMO_Z[r], gate = silu(u) (1 without Z):
    reduce       o = sum_r y_r gate_r mo_r:        dy_r = dO gate_r mo_r,  dgate_r = dO y_r mo_r
    per_rank     o_r = y_r gate_r:                 dy_r = dO_r gate_r,     dgate_r = dO_r y_r
    norm_reduce  n_r = y_r rstd_r W, o = sum_r n_r gate_r mo_r:
                 dn = dO gate mo, dy = rstd (dn W - xhat mean_p(dn W xhat)), dgate = dO n mo
    dZ = sum_r dgate_r silu'(u_r) mz_r
Parameter gradients leave as one fp32 partial sum per (token block, head) (deterministic;
the orchestrator sums the blocks): dMIMO_Z, dMIMO_Out (nblk, H, R, P), dNormW (nblk, H, P),
and dD (nblk, H) = sum over tokens, ranks, p of dy vt (vt = V MIMO_V_r): taken here from the
fp32 dy, before dy is rounded to the core's operand dtype. dD is a sum of terms of both signs
that can cancel to far below their size, so the bf16 rounding of dy (2^-9 per term) became
errors of several % of dD on some draws (H100 grid, R8 N32 P32 L65: 2.8e-2 > 2e-2); from fp32
dy the terms carry ~1e-7.
dy is laid out with RC = pow2(R) ranks (the core's operand layout; padded ranks stay zero).
y is read only when a term needs it (NEED_Y: Z, MIMO_Out or the norm).
"""
from __future__ import annotations

import triton
import triton.language as tl

from .scan_bwd_prep import _cast, _row_tile, _sigmoid

MODES = {"reduce": 0, "per_rank": 1, "norm_reduce": 2}


@triton.jit
def _token_block(pid, BT: tl.constexpr, BL, P: tl.constexpr, PP: tl.constexpr):
    """Program pid's BT flat tokens (int64, mask) and the P columns (index, mask, 2-D mask)."""
    m = pid * BT + tl.arange(0, BT)
    mm = m < BL
    p = tl.arange(0, PP)
    pm = p < P
    return m.to(tl.int64), mm, p, pm, mm[:, None] & pm[None, :]


@triton.jit
def output_bwd_kernel(
    y_ptr, do_ptr, z_ptr, mz_ptr, mo_ptr, w_ptr, v_ptr, mv_ptr,
    dy_ptr, dz_ptr, pmz_ptr, pmo_ptr, pw_ptr, pd_ptr,
    s_zb, s_zt, s_zh, s_vb, s_vt, s_vh, BL, L, H, eps,
    R: tl.constexpr, RC: tl.constexpr, P: tl.constexpr, PP: tl.constexpr, BT: tl.constexpr, MODE: tl.constexpr,
    HAS_Z: tl.constexpr, HAS_MZ: tl.constexpr, HAS_MO: tl.constexpr, NEED_Y: tl.constexpr,
    HAS_D: tl.constexpr, HAS_MV: tl.constexpr, INTERP: tl.constexpr,
):
    pid = tl.program_id(0)
    h = tl.program_id(1)
    m64, mm, p, pm, msk = _token_block(pid, BT, BL, P, PP)
    if MODE != 1:
        do = tl.load(do_ptr + (m64 * H + h)[:, None] * P + p[None, :], mask=msk, other=0.0).to(tl.float32)
    b = m64 // L
    t = m64 % L
    if HAS_D:   # dD = sum dy . vt from the fp32 dy (see the module docstring)
        v = tl.load(v_ptr + (b * s_vb + t * s_vt + h * s_vh)[:, None] + p[None, :], mask=msk,
                    other=0.0).to(tl.float32)
        dd = tl.zeros([BT], dtype=tl.float32)
    if HAS_Z:
        zz = tl.load(z_ptr + (b * s_zb + t * s_zt + h * s_zh)[:, None] + p[None, :], mask=msk,
                     other=0.0).to(tl.float32)
        dz = tl.zeros([BT, PP], dtype=tl.float32)
    if MODE == 2:
        w = _row_tile(w_ptr + h * P, p, pm, m64)
        dw = tl.zeros([PP], dtype=tl.float32)
    DYT = dy_ptr.dtype.element_ty
    for r in range(R):
        row = ((m64 * R + r) * H + h)[:, None] * P + p[None, :]
        drow = ((m64 * RC + r) * H + h)[:, None] * P + p[None, :]
        if MODE == 1:
            do = tl.load(do_ptr + row, mask=msk, other=0.0).to(tl.float32)
        if NEED_Y:   # fp32, or the bf16 y SISO's save_y keeps (scan_bwd.saved_y_dtype)
            y = tl.load(y_ptr + row, mask=msk, other=0.0).to(tl.float32)
        prow = (pid * H + h) * R + r
        if HAS_MO:
            mo = _row_tile(mo_ptr + (h * R + r) * P, p, pm, m64)
        else:
            mo = 1.0
        if HAS_Z:
            if HAS_MZ:
                mz = _row_tile(mz_ptr + (h * R + r) * P, p, pm, m64)
            else:
                mz = 1.0
            u = zz * mz
            sg = _sigmoid(u)
            gate = u * sg
        else:
            gate = 1.0
        if MODE == 0:
            dy = do * gate * mo
            if HAS_Z:
                dgate = do * y * mo
            if HAS_MO:
                tl.store(pmo_ptr + prow * P + p, tl.sum(do * y * gate, axis=0), mask=pm)
        elif MODE == 1:
            dy = do * gate
            if HAS_Z:
                dgate = do * y
        else:
            rstd = 1.0 / tl.sqrt(tl.sum(y * y, axis=1) / P + eps)
            xhat = y * rstd[:, None]
            n = xhat * w
            dn = do * gate * mo
            if HAS_Z:
                dgate = do * n * mo
            if HAS_MO:
                tl.store(pmo_ptr + prow * P + p, tl.sum(do * n * gate, axis=0), mask=pm)
            dnw = dn * w
            dw += tl.sum(dn * xhat, axis=0)
            dy = rstd[:, None] * (dnw - xhat * (tl.sum(dnw * xhat, axis=1) / P)[:, None])
        tl.store(dy_ptr + drow, _cast(dy, DYT, INTERP), mask=msk)
        if HAS_D:
            if HAS_MV:
                dd += tl.sum(dy * v * _row_tile(mv_ptr + (h * R + r) * P, p, pm, m64), axis=1)
            else:
                dd += tl.sum(dy * v, axis=1)
        if HAS_Z:
            du = dgate * sg * (1.0 + u * (1.0 - sg))
            dz += du * mz
            if HAS_MZ:
                tl.store(pmz_ptr + prow * P + p, tl.sum(du * zz, axis=0), mask=pm)
    if HAS_Z:
        DZT = dz_ptr.dtype.element_ty
        tl.store(dz_ptr + (m64 * H + h)[:, None] * P + p[None, :], _cast(dz, DZT, INTERP), mask=msk)
    if MODE == 2:
        tl.store(pw_ptr + (pid * H + h) * P + p, dw, mask=pm)
    if HAS_D:
        tl.store(pd_ptr + pid * H + h, tl.sum(dd, axis=0))


def grid(BL: int, H: int, BT: int):
    return (triton.cdiv(max(BL, 1), BT), H)


@triton.jit
def output_fwd_kernel(
    y_ptr, z_ptr, mz_ptr, mo_ptr, w_ptr, out_ptr,
    s_zb, s_zt, s_zh, BL, L, H, eps,
    R: tl.constexpr, P: tl.constexpr, PP: tl.constexpr, BT: tl.constexpr, MODE: tl.constexpr,
    HAS_Z: tl.constexpr, HAS_MZ: tl.constexpr, HAS_MO: tl.constexpr, INTERP: tl.constexpr,
):
    """The output mode itself (SPEC §3) on the per-rank y, for scan(..., save_y=True) with R > 1:
    the forward computes y once (per-rank pass, kept for the backward) and out from it here (for
    R = 1 phase 4 stores y besides out instead: scan_bwd.forward_saving_y says why)."""
    pid = tl.program_id(0)
    h = tl.program_id(1)
    m64, mm, p, pm, msk = _token_block(pid, BT, BL, P, PP)
    if HAS_Z:
        b = m64 // L
        t = m64 % L
        zz = tl.load(z_ptr + (b * s_zb + t * s_zt + h * s_zh)[:, None] + p[None, :], mask=msk,
                     other=0.0).to(tl.float32)
    if MODE == 2:
        w = _row_tile(w_ptr + h * P, p, pm, m64)
    acc = tl.zeros([BT, PP], dtype=tl.float32)
    OT = out_ptr.dtype.element_ty
    for r in range(R):
        row = ((m64 * R + r) * H + h)[:, None] * P + p[None, :]
        y = tl.load(y_ptr + row, mask=msk, other=0.0)
        if HAS_MO:
            mo = _row_tile(mo_ptr + (h * R + r) * P, p, pm, m64)
        else:
            mo = 1.0
        if HAS_Z:
            if HAS_MZ:
                u = zz * _row_tile(mz_ptr + (h * R + r) * P, p, pm, m64)
            else:
                u = zz
            gate = u * _sigmoid(u)
        else:
            gate = 1.0
        if MODE == 1:
            tl.store(out_ptr + row, _cast(y * gate, OT, INTERP), mask=msk)
        elif MODE == 0:
            acc += y * gate * mo
        else:
            rstd = 1.0 / tl.sqrt(tl.sum(y * y, axis=1) / P + eps)
            acc += y * rstd[:, None] * w * gate * mo
    if MODE != 1:
        tl.store(out_ptr + (m64 * H + h)[:, None] * P + p[None, :], _cast(acc, OT, INTERP), mask=msk)
