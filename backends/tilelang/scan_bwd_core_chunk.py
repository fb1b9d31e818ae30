"""Backward core, phases 3 and 4 in TileLang: the dq and dkv walks (SISO), 64-token chunks.

The same computation as backends/triton/scan_bwd_core_chunk.py (its docstring has the math and
SPEC §8, §9; reference/core_adjoint.py the float64 form), laid out for Hopper: a chunk of C = 64
tokens is one wgmma M tile, a program is two warpgroups (256 threads), the state (dq) or adjoint
(dkv) of its (segment, head) is a P x N fp32 accumulator fragment, its bf16 hi / lo halves go
to shared memory for the products that read it (the Triton core's INTER / UPDATE fp32 splits),
and `T.Pipelined` stages the next chunk's qh / ks / vt / dy tiles while this one computes.
Per chunk c (cs the in-chunk inclusive cumsum of adt, T its total, rows past the sequence's end
zeroed as the Triton kernels' masked loads do):

  dq    gm = (dy vt^T) o e^{cs_i - cs_j}[i > j];  inter = e^{cs} dy S
        dqh = gm ks + inter;  d cs (dq's share) = qh . inter;  S <- e^T S + (vt e^{T - cs})^T ks
        the entry state of a segment's last chunk is stored (S_last: dadt's boundary term)
  dkv   sdv = dy vt^T;  a = (qh ks^T) o decay;  dks = (sdv o decay)^T qh + e^{T - cs} vt D
        interv = e^{T - cs} ks D^T;  dvt = a^T dy + interv;  x = rowsum(vt o interv)
        d cs (dkv's share) = rowsum(a o sdv) - colsum(a o sdv) - x;  X_c = sum x
        D <- e^T D + (dy e^{cs})^T qh

Measured standalone (bench/tilelang_dq_walk.py, H100, SISO B4 L4096 H32 N128 P64, 512-token
segments): dq 326 us vs the Triton kernel's 516, dkv 535 vs 736; errors vs float64 as the
Triton kernels' (1.4e-3 vs 1.2e-3 on dqh / dks / dvt).

Scope: R = 1, N and P in {64, 128} (the wgmma tiles of two warpgroups), one N block (NNB = 1:
dkv writes dvt whole), bf16 operands, the core's fp32 INTER / UPDATE precision. Grid: (segment
slots, H), slots as the Triton core's (`_locate`: dense b * NSEG + segment; varlen by a search of
cu_seqlens, one spare slot per sequence). The other core kernels (local, pass, dadt) stay
Triton's, run at CHUNK = 64 (`scan_bwd_core.py`, `core_backward_tilelang`), since the d cs shares
and X_c depend on the chunking. Shapes B, L, the slot count and S are dynamic (one build per
(H, N, P, SEG, varlen, threads, stages)).
"""
import functools

C = 64           # tokens per chunk: one wgmma M tile
THREADS = 256    # two warpgroups: 168 registers, no spill (dkv at 128 threads spills)
STAGES = 2       # T.Pipelined stages (3: 5 % slower in the standalone run)


def supports(R: int, N: int, P: int, dtype: str) -> tuple:
    """(ok, reason) for the walks' scope."""
    if R != 1:
        return False, f"rank {R}: the TileLang walks take R = 1 only"
    if N not in (64, 128) or P not in (64, 128):
        return False, (f"N={N}, P={P}: the TileLang walks take N, P in (64, 128) (the state's wgmma "
                       "tiles over two warpgroups; smaller need another warp partition)")
    if dtype != "bfloat16":
        return False, f"{dtype} operands: the TileLang walks take bf16"
    return True, ""


@functools.lru_cache(maxsize=None)
def dq_program(H, N, P, SEG, threads=THREADS, stages=STAGES):
    """The dq walk: grid (NSLOT, H); DCS is the core's d cs scratch (2, B, H, L), dq writes part 0."""
    import tilelang.language as T
    B, L, NSLOT = T.dynamic("B L NSLOT")
    bf16, f32 = "bfloat16", "float32"

    @T.prim_func
    def main(QH: T.Tensor((B, L, H, N), bf16), KS: T.Tensor((B, L, H, N), bf16),
             VT: T.Tensor((B, L, H, P), bf16), DY: T.Tensor((B, L, H, P), bf16),
             ADT: T.Tensor((B, H, L), f32), SLOT: T.Tensor((NSLOT, 3), "int32"),
             ENT: T.Tensor((NSLOT, H, P, N), f32), SX: T.Tensor((NSLOT, H, P, N), f32),
             DQH: T.Tensor((B, L, H, N), f32), DCS: T.Tensor((2, B, H, L), f32)):
        with T.Kernel(NSLOT, H, threads=threads) as (slot, h):
            q_s = T.alloc_shared([C, N], bf16)
            k_s = T.alloc_shared([C, N], bf16)
            v_s = T.alloc_shared([C, P], bf16)
            d_s = T.alloc_shared([C, P], bf16)
            cs_s = T.alloc_shared([C], f32)
            gm_s = T.alloc_shared([C, C], bf16)
            sh_s = T.alloc_shared([P, N], bf16)
            sl_s = T.alloc_shared([P, N], bf16)
            wh_s = T.alloc_shared([C, P], bf16)
            wl_s = T.alloc_shared([C, P], bf16)
            st = T.alloc_fragment([P, N], f32)
            gm = T.alloc_fragment([C, C], f32)
            tri = T.alloc_fragment([C, C], f32)
            csf = T.alloc_fragment([C], f32)
            acc = T.alloc_fragment([C, N], f32)
            prod = T.alloc_fragment([C, N], f32)
            dcs = T.alloc_fragment([C], f32)
            # (b, end, start) of the slot read inline: values bound before this `if` were
            # hoisted past it by TileLang's warp specialisation (the kernel compiled to nothing)
            if SLOT[slot, 2] < SLOT[slot, 1]:
                T.copy(ENT[slot, h, :, :], st)
                for ci in T.Pipelined(T.min(T.ceildiv(SLOT[slot, 1] - SLOT[slot, 2], C), SEG), num_stages=stages):
                    b = SLOT[slot, 0]
                    eos = SLOT[slot, 1]
                    nck = T.min(T.ceildiv(eos - SLOT[slot, 2], C), SEG)
                    tc = SLOT[slot, 2] + ci * C
                    T.copy(QH[b, tc:tc + C, h, :], q_s)
                    T.copy(KS[b, tc:tc + C, h, :], k_s)
                    T.copy(VT[b, tc:tc + C, h, :], v_s)
                    T.copy(DY[b, tc:tc + C, h, :], d_s)
                    if tc + C > eos:   # a sequence's partial last chunk: rows past its end are zero
                        for i, n in T.Parallel(C, N):
                            q_s[i, n] = T.if_then_else(tc + i < eos, q_s[i, n], T.cast(0, bf16))
                            k_s[i, n] = T.if_then_else(tc + i < eos, k_s[i, n], T.cast(0, bf16))
                        for i, p in T.Parallel(C, P):
                            v_s[i, p] = T.if_then_else(tc + i < eos, v_s[i, p], T.cast(0, bf16))
                            d_s[i, p] = T.if_then_else(tc + i < eos, d_s[i, p], T.cast(0, bf16))
                    # cs: the in-chunk inclusive cumsum of adt (0 past the end)
                    for i, j in T.Parallel(C, C):
                        tri[i, j] = T.if_then_else((j <= i) & (tc + j < eos), ADT[b, h, tc + j], 0.0)
                    T.reduce_sum(tri, csf, dim=1)
                    T.copy(csf, cs_s)
                    if ci == nck - 1:   # S_last, for dadt's boundary term
                        T.copy(st, SX[slot, h, :, :])
                    T.gemm(d_s, v_s, gm, transpose_B=True, clear_accum=True)
                    for i, j in T.Parallel(C, C):
                        gm[i, j] = T.if_then_else(i > j, gm[i, j] * T.exp(cs_s[i] - cs_s[j]), 0.0)
                    T.copy(gm, gm_s)
                    for p, n in T.Parallel(P, N):
                        sh_s[p, n] = T.cast(st[p, n], bf16)
                    for p, n in T.Parallel(P, N):
                        sl_s[p, n] = T.cast(st[p, n] - T.cast(sh_s[p, n], f32), bf16)
                    T.gemm(d_s, sh_s, acc, clear_accum=True)
                    T.gemm(d_s, sl_s, acc)
                    for i, n in T.Parallel(C, N):
                        acc[i, n] = acc[i, n] * T.exp(cs_s[i])
                    for i, n in T.Parallel(C, N):
                        prod[i, n] = acc[i, n] * T.cast(q_s[i, n], f32)
                    T.reduce_sum(prod, dcs, dim=1)
                    for i in T.Parallel(C):
                        if tc + i < eos:
                            DCS[0, b, h, tc + i] = dcs[i]
                    T.gemm(gm_s, k_s, acc)
                    for i, n in T.Parallel(C, N):
                        if tc + i < eos:
                            DQH[b, tc + i, h, n] = acc[i, n]
                    for i, p in T.Parallel(C, P):
                        wh_s[i, p] = T.cast(T.cast(v_s[i, p], f32) * T.exp(cs_s[C - 1] - cs_s[i]), bf16)
                    for i, p in T.Parallel(C, P):
                        wl_s[i, p] = T.cast(T.cast(v_s[i, p], f32) * T.exp(cs_s[C - 1] - cs_s[i])
                                            - T.cast(wh_s[i, p], f32), bf16)
                    for p, n in T.Parallel(P, N):
                        st[p, n] = st[p, n] * T.exp(cs_s[C - 1])
                    T.gemm(wh_s, k_s, st, transpose_A=True)
                    T.gemm(wl_s, k_s, st, transpose_A=True)

    return main


@functools.lru_cache(maxsize=None)
def dkv_program(H, N, P, SEG, threads=THREADS, stages=STAGES):
    """The dkv walk: grid (NSLOT, H); dkv writes part 1 of DCS and X_c into DTC (NCH, H)."""
    import tilelang.language as T
    B, L, NSLOT, NCH = T.dynamic("B L NSLOT NCH")
    bf16, f32 = "bfloat16", "float32"

    @T.prim_func
    def main(QH: T.Tensor((B, L, H, N), bf16), KS: T.Tensor((B, L, H, N), bf16),
             VT: T.Tensor((B, L, H, P), bf16), DY: T.Tensor((B, L, H, P), bf16),
             ADT: T.Tensor((B, H, L), f32), SLOT: T.Tensor((NSLOT, 3), "int32"),
             DX: T.Tensor((NSLOT, H, P, N), f32), DKS: T.Tensor((B, L, H, N), f32),
             DVT: T.Tensor((B, L, H, P), f32), DCS: T.Tensor((2, B, H, L), f32),
             DTC: T.Tensor((NCH, H), f32)):
        with T.Kernel(NSLOT, H, threads=threads) as (slot, h):
            q_s = T.alloc_shared([C, N], bf16)
            k_s = T.alloc_shared([C, N], bf16)
            v_s = T.alloc_shared([C, P], bf16)
            d_s = T.alloc_shared([C, P], bf16)
            cs_s = T.alloc_shared([C], f32)
            gm_s = T.alloc_shared([C, C], bf16)
            a_s = T.alloc_shared([C, C], bf16)
            sh_s = T.alloc_shared([P, N], bf16)
            sl_s = T.alloc_shared([P, N], bf16)
            wh_s = T.alloc_shared([C, P], bf16)
            wl_s = T.alloc_shared([C, P], bf16)
            r_s = T.alloc_shared([C], f32)
            c_s = T.alloc_shared([C], f32)
            x_s = T.alloc_shared([C], f32)
            st = T.alloc_fragment([P, N], f32)
            sdv = T.alloc_fragment([C, C], f32)
            am = T.alloc_fragment([C, C], f32)
            w = T.alloc_fragment([C, C], f32)
            tri = T.alloc_fragment([C, C], f32)
            csf = T.alloc_fragment([C], f32)
            accv = T.alloc_fragment([C, P], f32)
            acck = T.alloc_fragment([C, N], f32)
            xv = T.alloc_fragment([C, P], f32)
            x = T.alloc_fragment([C], f32)
            rs = T.alloc_fragment([C], f32)
            cl = T.alloc_fragment([C], f32)
            xs = T.alloc_fragment([1], f32)
            # (b, end, start) of the slot read inline: values bound before this `if` were
            # hoisted past it by TileLang's warp specialisation (the kernel compiled to nothing)
            if SLOT[slot, 2] < SLOT[slot, 1]:
                T.copy(DX[slot, h, :, :], st)
                for kk in T.Pipelined(T.min(T.ceildiv(SLOT[slot, 1] - SLOT[slot, 2], C), SEG), num_stages=stages):
                    b = SLOT[slot, 0]
                    eos = SLOT[slot, 1]
                    ci = T.min(T.ceildiv(eos - SLOT[slot, 2], C), SEG) - 1 - kk
                    tc = SLOT[slot, 2] + ci * C
                    T.copy(QH[b, tc:tc + C, h, :], q_s)
                    T.copy(KS[b, tc:tc + C, h, :], k_s)
                    T.copy(VT[b, tc:tc + C, h, :], v_s)
                    T.copy(DY[b, tc:tc + C, h, :], d_s)
                    if tc + C > eos:   # a sequence's partial last chunk: rows past its end are zero
                        for i, n in T.Parallel(C, N):
                            q_s[i, n] = T.if_then_else(tc + i < eos, q_s[i, n], T.cast(0, bf16))
                            k_s[i, n] = T.if_then_else(tc + i < eos, k_s[i, n], T.cast(0, bf16))
                        for i, p in T.Parallel(C, P):
                            v_s[i, p] = T.if_then_else(tc + i < eos, v_s[i, p], T.cast(0, bf16))
                            d_s[i, p] = T.if_then_else(tc + i < eos, d_s[i, p], T.cast(0, bf16))
                    for i, j in T.Parallel(C, C):
                        tri[i, j] = T.if_then_else((j <= i) & (tc + j < eos), ADT[b, h, tc + j], 0.0)
                    T.reduce_sum(tri, csf, dim=1)
                    T.copy(csf, cs_s)
                    for p, n in T.Parallel(P, N):
                        sh_s[p, n] = T.cast(st[p, n], bf16)
                    for p, n in T.Parallel(P, N):
                        sl_s[p, n] = T.cast(st[p, n] - T.cast(sh_s[p, n], f32), bf16)
                    T.gemm(d_s, v_s, sdv, transpose_B=True, clear_accum=True)
                    T.gemm(q_s, k_s, am, transpose_B=True, clear_accum=True)
                    for i, j in T.Parallel(C, C):
                        am[i, j] = T.if_then_else(i > j, am[i, j] * T.exp(cs_s[i] - cs_s[j]), 0.0)
                    for i, j in T.Parallel(C, C):
                        w[i, j] = am[i, j] * sdv[i, j]
                    for i, j in T.Parallel(C, C):
                        sdv[i, j] = T.if_then_else(i > j, sdv[i, j] * T.exp(cs_s[i] - cs_s[j]), 0.0)
                    T.copy(sdv, gm_s)
                    T.copy(am, a_s)
                    T.reduce_sum(w, rs, dim=1)
                    T.reduce_sum(w, cl, dim=0)
                    T.gemm(v_s, sh_s, acck, clear_accum=True)
                    T.gemm(v_s, sl_s, acck)
                    for j, n in T.Parallel(C, N):
                        acck[j, n] = acck[j, n] * T.exp(cs_s[C - 1] - cs_s[j])
                    T.gemm(gm_s, q_s, acck, transpose_A=True)
                    for j, n in T.Parallel(C, N):
                        if tc + j < eos:
                            DKS[b, tc + j, h, n] = acck[j, n]
                    T.gemm(k_s, sh_s, accv, transpose_B=True, clear_accum=True)
                    T.gemm(k_s, sl_s, accv, transpose_B=True)
                    for j, p in T.Parallel(C, P):
                        accv[j, p] = accv[j, p] * T.exp(cs_s[C - 1] - cs_s[j])
                    for j, p in T.Parallel(C, P):
                        xv[j, p] = accv[j, p] * T.cast(v_s[j, p], f32)
                    T.reduce_sum(xv, x, dim=1)
                    T.gemm(a_s, d_s, accv, transpose_A=True)
                    for j, p in T.Parallel(C, P):
                        if tc + j < eos:
                            DVT[b, tc + j, h, p] = accv[j, p]
                    T.copy(rs, r_s)   # (row / column sums and x come in different fragment layouts)
                    T.copy(cl, c_s)
                    T.copy(x, x_s)
                    for i in T.Parallel(C):
                        if tc + i < eos:
                            DCS[1, b, h, tc + i] = r_s[i] - c_s[i] - x_s[i]
                    T.reduce_sum(x, xs, dim=0)
                    DTC[slot * SEG + ci, h] = xs[0]
                    for i, p in T.Parallel(C, P):
                        wh_s[i, p] = T.cast(T.cast(d_s[i, p], f32) * T.exp(cs_s[i]), bf16)
                    for i, p in T.Parallel(C, P):
                        wl_s[i, p] = T.cast(T.cast(d_s[i, p], f32) * T.exp(cs_s[i]) - T.cast(wh_s[i, p], f32), bf16)
                    for p, n in T.Parallel(P, N):
                        st[p, n] = st[p, n] * T.exp(cs_s[C - 1])
                    T.gemm(wh_s, q_s, st, transpose_A=True)
                    T.gemm(wl_s, q_s, st, transpose_A=True)

    return main


@functools.lru_cache(maxsize=None)
def build(which: str, H: int, N: int, P: int, SEG: int, arch: str, threads=THREADS, stages=STAGES):
    """The compiled walk ('dq' or 'dkv') for `arch` (sm_90a: also on a machine without a GPU)."""
    import tilelang
    from tvm.target import Target
    target = {"kind": "cuda", "arch": arch}
    prog = (dq_program if which == "dq" else dkv_program)(H, N, P, SEG, threads, stages)
    with Target(target):
        return tilelang.compile(prog, target=target, execution_backend="tvm_ffi")


def slot_table(B: int, L: int, SEG: int, cu_seqlens=None, device=None):
    """(NSLOT, 3) int32 (batch row, sequence end, segment start) per segment slot, the Triton
    core's slot numbering (`scan_common._locate`): dense slot = b * cdiv(L, SEGLEN) + segment;
    varlen (B = 1) sequence i owns slots cu[i] // SEGLEN + i + [0, cdiv(len_i, SEGLEN)); a slot
    past its sequence's segments has start >= end (skipped). Built on the device (searchsorted,
    no host sync)."""
    import torch
    seglen = SEG * C
    if cu_seqlens is None:
        nseg = -(-L // seglen)
        s = torch.arange(B * nseg, device=device, dtype=torch.int64)
        return torch.stack([s // nseg, torch.full_like(s, L), (s % nseg) * seglen], 1).to(torch.int32).contiguous()
    cu = cu_seqlens.to(torch.int64)
    S = cu.shape[0] - 1
    s = torch.arange(L // seglen + S, device=cu.device, dtype=torch.int64)
    first = cu[:-1] // seglen + torch.arange(S, device=cu.device)
    seq = (torch.searchsorted(first, s, right=True) - 1).clamp(min=0)
    return torch.stack([torch.zeros_like(s), cu[seq + 1], cu[seq] + (s - first[seq]) * seglen], 1).to(torch.int32).contiguous()


def compile(which: str, H: int, N: int, P: int, SEG: int, arch: str = "sm_90a", threads=THREADS,
            stages=STAGES) -> dict:
    """Build a walk for `arch` without a GPU: {"name", "registers", "spills" (local bytes per
    thread), "stack", "source", "cubin_path"}."""
    from . import resource_usage
    from .step import find_cubin
    k = build(which, H, N, P, SEG, arch, threads, stages)
    src = k.get_kernel_source()
    _, path = find_cubin(src, arch)
    res = {"name": f"tilelang_core_{which}", "source": src, "cubin_path": path}
    res.update(resource_usage(path) if path else {})
    return res
