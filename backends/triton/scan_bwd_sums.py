"""Backward stage 7's two large fixed-order sums (orchestrated by scan_bwd.py), in place of torch's
reductions, which ran at ~1.7-2.0 TB/s on the H100 for these layouts (bench/notes/scan_bwd.md,
session 19):

  `block_sums`  the per-token-block partial rows of dQ_bias and dK_bias (one buffer, Z = 2) or
                dMIMO_V that post writes, (Z, nblk, H, R, .) -> their sums over blocks (Z, H, R,
                .), fp32. Grid (column blocks, row splits, Z): each program adds a fixed range
                of rows in order into [BR, BC] fp32 accumulators; torch adds the NSPLIT split
                sums (a few hundred KB) in a fixed order.
  `head_sum`    the per-head dAngles (B, L, H, A) of shared angles -> (B, L, A): one program per
                token block walks the heads in order.

Both deterministic (no atomics; every sum's order is fixed by the grid), fp32 accumulation.
H100 (SISO B4 L4096, fwd+bwd graph profile): the bias sums 80 -> 59 us (torch's two bf16 reductions
vs one block_sums launch), the head sum 34 -> 24 us; fwd+bwd -0.3 to -0.9 % on five bench shapes
(bench/results/scan_bwd_ab_sums_h100.json, config SUMS "torch" vs the default). Standalone
(do_bench, L2 flushed) the block sums are within noise of torch's (65-90 vs 84 us; the launch
constants below are the best of a 54-point sweep there, BLOCK_R 16 -> 32 after it).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import _pow2

BLOCK_C = 128      # columns per block_sums program
BLOCK_R = 32       # rows per step of a block_sums program
ROWS_PER = 512     # rows per block_sums program (row splits = cdiv(rows, ROWS_PER))
HEAD_BT = 16       # tokens per head_sum program


@triton.jit
def block_sums_kernel(x_ptr, out_ptr, ROWS, COLS, NSPLIT, RPP: tl.constexpr, BR: tl.constexpr,
                      BC: tl.constexpr):
    pc = tl.program_id(0)
    ps = tl.program_id(1)
    pz = tl.program_id(2).to(tl.int64)
    cols = pc * BC + tl.arange(0, BC)
    cm = cols < COLS
    base = x_ptr + pz * ROWS * COLS
    r0 = ps * RPP
    acc = tl.zeros([BR, BC], dtype=tl.float32)
    for i in range(0, RPP, BR):
        rows = r0 + i + tl.arange(0, BR)
        m = (rows < ROWS)[:, None] & cm[None, :]
        acc += tl.load(base + rows.to(tl.int64)[:, None] * COLS + cols[None, :], mask=m, other=0.0).to(tl.float32)
    tl.store(out_ptr + (pz * NSPLIT + ps) * COLS + cols, tl.sum(acc, axis=0), mask=cm)


def block_sums_call(x: torch.Tensor, part: torch.Tensor) -> dict:
    """The launch of block_sums_kernel adding x (Z, nblk, ...) into part (Z, NSPLIT, cols)."""
    Z, rows, cols, nsplit = x.shape[0], x.shape[1], x.shape[2:].numel(), part.shape[1]
    return dict(name="bwd_block_sums", kernel=block_sums_kernel, grid=(triton.cdiv(cols, BLOCK_C), nsplit, Z),
                args=[("x_ptr", x), ("out_ptr", part), ("ROWS", rows), ("COLS", cols), ("NSPLIT", nsplit)],
                constexprs=dict(RPP=ROWS_PER, BR=BLOCK_R, BC=BLOCK_C), num_warps=4)


def split_buffer(x: torch.Tensor) -> torch.Tensor:
    """block_sums' fp32 per-split sums (Z, NSPLIT, cols) for x (Z, nblk, ...)."""
    return torch.empty((x.shape[0], triton.cdiv(x.shape[1], ROWS_PER), x.shape[2:].numel()), dtype=torch.float32,
                       device=x.device)


def block_sums(x: torch.Tensor, launch) -> list:
    """x (Z, nblk, ...) contiguous, any float dtype -> [x[z].sum(0) in fp32 for z < Z]: Z tensors of
    block partials summed over their blocks in one launch (`launch`: scan_bwd.launch). The Z sums are
    separate tensors (no shared storage: they leave the backward's custom op as distinct outputs)."""
    Z, rows, shape = x.shape[0], x.shape[1], x.shape[2:]
    if rows == 0 or shape.numel() == 0 or Z == 0:
        return [torch.zeros(shape, dtype=torch.float32, device=x.device) for _ in range(Z)]
    part = split_buffer(x)
    launch(block_sums_call(x.contiguous(), part))
    return [part[z].sum(0).view(shape) for z in range(Z)]


@triton.jit
def head_sum_kernel(x_ptr, out_ptr, BL, H, A: tl.constexpr, AP: tl.constexpr, BT: tl.constexpr):
    pid = tl.program_id(0)
    t = (pid * BT + tl.arange(0, BT)).to(tl.int64)
    a = tl.arange(0, AP)
    m = (t < BL)[:, None] & (a < A)[None, :]
    acc = tl.zeros([BT, AP], dtype=tl.float32)
    for h in range(H):
        acc += tl.load(x_ptr + (t[:, None] * H + h) * A + a[None, :], mask=m, other=0.0)
    tl.store(out_ptr + t[:, None] * A + a[None, :], acc, mask=m)


def head_sum_call(x: torch.Tensor, out: torch.Tensor) -> dict:
    """The launch of head_sum_kernel adding x (B, L, H, A) over H into out (B, L, A)."""
    B, L, H, A = x.shape
    return dict(name="bwd_head_sum", kernel=head_sum_kernel, grid=(triton.cdiv(max(B * L, 1), HEAD_BT),),
                args=[("x_ptr", x), ("out_ptr", out), ("BL", B * L), ("H", H)],
                constexprs=dict(A=A, AP=_pow2(A), BT=HEAD_BT), num_warps=4)


def head_sum(x: torch.Tensor, launch) -> torch.Tensor:
    """x (B, L, H, A) fp32 contiguous -> x.sum(2) (B, L, A), heads added in order."""
    B, L, H, A = x.shape
    out = torch.empty((B, L, A), dtype=torch.float32, device=x.device)
    if B * L and A:
        launch(head_sum_call(x, out))
    return out
