"""Backward core, phases 3 and 4 in TileLang: the dq and dkv walks, 64-row chunks.

The same computation as backends/triton/scan_bwd_core_chunk.py (its docstring has the math and
SPEC §8, §9; reference/core_adjoint.py the float64 form), laid out for Hopper: a chunk of C = 64
rows is one wgmma M tile (TOK = 64 / R tokens of R ranks each; the products do not care about
the order of rows as long as every operand and output of a kernel shares it: rows are
rank-major, each rank's tokens one copy), a program is two warpgroups (256
threads), the state (dq) or adjoint (dkv) of its (segment, head) is a P x N fp32 accumulator
fragment, its bf16 hi / lo halves go to shared memory for the products that read it (the Triton
core's INTER / UPDATE fp32 splits), and `T.Pipelined` stages the next chunk's qh / ks / vt / dy
tiles while this one computes. Per chunk c (cs the in-chunk inclusive cumsum of adt over tokens,
a row taking its token's, T the chunk's total, causal by token, rows past the sequence's end
zeroed as the Triton kernels' masked loads do):

  dq    gm = (dy vt^T) o e^{cs_i - cs_j}[t_i > t_j];  inter = e^{cs} dy S
        dqh = gm ks + inter;  d cs (dq's share, summed over a token's ranks) = qh . inter
        S <- e^T S + (vt e^{T - cs})^T ks
        the entry state of a segment's last chunk is stored (S_last: dadt's boundary term)
  dkv   sdv = dy vt^T;  a = (qh ks^T) o decay;  dks = (sdv o decay)^T qh + e^{T - cs} vt D
        interv = e^{T - cs} ks D^T;  dvt = a^T dy + interv;  x = rowsum(vt o interv)
        d cs (dkv's share) = rowsum(a o sdv) - colsum(a o sdv) - x;  X_c = sum x
        D <- e^T D + (dy e^{cs})^T qh

Measured (H100, bench/results/tilelang_walks_h100_6afcd7e.json, scan_bwd_core_tilelang_h100_*):
SISO B4 L4096 H32 N128 P64, 512-token segments: dq 351 us vs the Triton kernel's 512, dkv 549
vs 737; errors vs float64 as the Triton kernels' (1.4e-3 vs 1.2e-3 on dqh / dks / dvt). At
N = 64 dkv is slower than Triton's (469 vs 396 us). R > 1: per-rank copies lower to synchronous
loads (no TMA, no prefetch of the next chunk); dkv at R = 4 B4 L2048: 1160 vs 1505 us.

Scope: the core's rank count R in {1, 2, 4, 8} (pow2: the core pads R = 3 to 4), N and P in
{64, 128} (the wgmma tiles of two warpgroups), one N block (NNB = 1: dkv writes dvt whole), bf16
operands, the core's fp32 INTER / UPDATE precision. Grid: (segment slots, H), slots numbered as
the Triton core's (`slot_table`). The other core kernels (local, pass, dadt) stay Triton's, run
at CHUNK = TOK tokens (`scan_bwd_core.py`), since the d cs shares and X_c depend on the
chunking. B, L, H, the slot and chunk counts are dynamic (SEG, chunks per slot, is the chunk
count over the slot count): one build per (R, N, P, threads, stages).
"""
import functools

C = 64           # rows per chunk: one wgmma M tile
THREADS = 256    # two warpgroups: 168 registers, no spill (dkv at 128 threads spills)
STAGES = 2       # T.Pipelined stages (3: 5 % slower in the standalone run)
RANKS = (1, 2, 4, 8)
SMEM_MAX = 227 * 1024   # the H100's shared memory per block (dynamic, opted in)
CS_ROW = 32      # least floats per cs row in shared memory (TOK = 64 / R of them used): a TMA copy's shared
                 # destination must be 128-byte aligned, and the pipeline's second buffer starts
                 # one row on (16-float rows at R = 4 faulted: "misaligned shared address")


def default_stages(N: int, P: int) -> int:
    """Pipeline stages: STAGES, but 1 at N = P = 128, where two stages of the four tiles need
    239,360 B of shared memory (over SMEM_MAX: the launch fails)."""
    return 1 if N == 128 and P == 128 else STAGES


def tokens(R: int) -> int:
    """Tokens per chunk at rank count R."""
    return C // R


def _row_token(i, R: int):
    """Row i's token within the chunk: rows are rank-major (rank r's TOK tokens are rows
    r * TOK .. (r + 1) * TOK - 1, one copy per rank); the plain index at R = 1."""
    return i if R == 1 else i % tokens(R)


def _row_rank(i, R: int):
    """Row i's rank (see _row_token); 0 at R = 1."""
    return 0 if R == 1 else i // tokens(R)


def supports(R: int, N: int, P: int, dtype: str) -> tuple:
    """(ok, reason) for the walks' scope."""
    if R not in RANKS:
        return False, f"rank {R}: the TileLang walks take the core's R in {RANKS}"
    if N not in (64, 128) or P not in (64, 128):
        return False, (f"N={N}, P={P}: the TileLang walks take N, P in (64, 128) (the state's wgmma "
                       "tiles over two warpgroups; smaller need another warp partition)")
    if dtype != "bfloat16":
        return False, f"{dtype} operands: the TileLang walks take bf16"
    return True, ""


def _macros(T, R, TOK, N, P):
    """Trace-time helpers shared by the two walks: the chunk's tiles as [C, .] rows with the
    partial chunk's zeroing and cs per token, the state's bf16 split, the state update, d cs per
    token (a token's ranks summed)."""
    bf16 = "bfloat16"

    def tok(i):   # plain Python: row i's token (an index expression)
        return _row_token(i, R)

    @T.macro
    def load(X, b, tc, h, x_t):
        # the [C, W] tile: one bulk (TMA) copy of the chunk at R = 1, one copy per rank at R > 1
        # (lowered to plain loads: no prefetch). (T.copy calls in a plain Python helper are
        # dropped without a word: they must sit in the macro itself.) A chunk staged as
        # [TOK, R, W] by one TMA copy and read through a [C, W] view was tried for dq: TileLang
        # 0.1.15 kept one staging buffer under a 2-stage pipeline (no (ci & 1) offset: the next
        # chunk's copy raced the products; dq wrong at R = 4 on the H100 whenever a slot had
        # several chunks).
        if R == 1:
            T.copy(X[b, tc:tc + TOK, 0, h, :], x_t)
        else:
            for r in T.unroll(R):   # rank r's TOK tokens: rows r * TOK .. (r + 1) * TOK - 1
                T.copy(X[b, tc:tc + TOK, r, h, :], x_t[r * TOK:(r + 1) * TOK, :])

    @T.macro
    def zero_tail(q_s, k_s, v_s, d_s, tc, eos):
        for i, n in T.Parallel(C, N):
            q_s[i, n] = T.if_then_else(tc + tok(i) < eos, q_s[i, n], T.cast(0, bf16))
            k_s[i, n] = T.if_then_else(tc + tok(i) < eos, k_s[i, n], T.cast(0, bf16))
        for i, p in T.Parallel(C, P):
            v_s[i, p] = T.if_then_else(tc + tok(i) < eos, v_s[i, p], T.cast(0, bf16))
            d_s[i, p] = T.if_then_else(tc + tok(i) < eos, d_s[i, p], T.cast(0, bf16))

    @T.macro
    def chunk_in(QH, KS, VT, DY, CS, b, tc, eos, h, chunk, q_s, k_s, v_s, d_s, cs_s):
        """The chunk's four tiles (rows past the end zero) and its per-token cs (row `chunk` of
        the Triton cs table: a block-wide cumsum per chunk in the kernel cost the dq walk 56 %
        of its time on the H100)."""
        load(QH, b, tc, h, q_s)
        load(KS, b, tc, h, k_s)
        load(VT, b, tc, h, v_s)
        load(DY, b, tc, h, d_s)
        T.copy(CS[chunk, h, :], cs_s[0:TOK])
        if tc + TOK > eos:   # a sequence's partial last chunk: rows past its end are zero
            zero_tail(q_s, k_s, v_s, d_s, tc, eos)

    @T.macro
    def split(st, sh_s, sl_s):
        """The fp32 state / adjoint as bf16 hi + lo in shared memory (INTER's fp32-accurate split)."""
        for p, n in T.Parallel(P, N):
            sh_s[p, n] = T.cast(st[p, n], bf16)
        for p, n in T.Parallel(P, N):
            sl_s[p, n] = T.cast(st[p, n] - T.cast(sh_s[p, n], "float32"), bf16)

    def weighted(x_s, cs_s, i, p, reverse):   # plain Python: x_ip e^{cs_i} (reverse) or x_ip e^{T - cs_i}
        return T.cast(x_s[i, p], "float32") * T.exp(cs_s[tok(i)] if reverse else cs_s[TOK - 1] - cs_s[tok(i)])

    @T.macro
    def update(st, x_s, y_s, cs_s, wh_s, wl_s, reverse):
        """st <- e^T st + (x o w)^T y with w = e^{T - cs} (dq: x = vt, y = ks) or e^{cs} (dkv
        walking backwards: x = dy, y = qh), x o w split bf16 hi + lo (UPDATE's fp32 split)."""
        for i, p in T.Parallel(C, P):
            wh_s[i, p] = T.cast(weighted(x_s, cs_s, i, p, reverse), bf16)
        for i, p in T.Parallel(C, P):
            wl_s[i, p] = T.cast(weighted(x_s, cs_s, i, p, reverse) - T.cast(wh_s[i, p], "float32"), bf16)
        for p, n in T.Parallel(P, N):
            st[p, n] = st[p, n] * T.exp(cs_s[TOK - 1])
        T.gemm(wh_s, y_s, st, transpose_A=True)
        T.gemm(wl_s, y_s, st, transpose_A=True)

    def ranksum(rows_s, t):   # plain Python: the sum expression over a token's R rows
        return functools.reduce(lambda a, r: a + rows_s[r * TOK + t], range(1, R), rows_s[t])

    @T.macro
    def store_dcs(DCS, part, b, h, tc, eos, rows_s):
        for t in T.Parallel(TOK):
            if tc + t < eos:
                DCS[part, b, h, tc + t] = ranksum(rows_s, t)

    return chunk_in, split, update, store_dcs


@functools.lru_cache(maxsize=None)
def dq_program(R, N, P, threads=THREADS, stages=None):
    """The dq walk: grid (NSLOT, H); DCS is the core's d cs scratch (2, B, H, L), dq writes part 0."""
    import tilelang.language as T
    B, L, H, NSLOT, NCH = T.dynamic("B L H NSLOT NCH")
    bf16, f32 = "bfloat16", "float32"
    TOK = tokens(R)
    SEG = NCH // NSLOT   # chunks per slot: the cs table has NSLOT * SEG rows
    stages = default_stages(N, P) if stages is None else stages
    chunk_in, split, update, store_dcs = _macros(T, R, TOK, N, P)
    tok = functools.partial(_row_token, R=R)     # row -> token, rank
    rank = functools.partial(_row_rank, R=R)

    @T.prim_func
    def main(QH: T.Tensor((B, L, R, H, N), bf16), KS: T.Tensor((B, L, R, H, N), bf16),
             VT: T.Tensor((B, L, R, H, P), bf16), DY: T.Tensor((B, L, R, H, P), bf16),
             CS: T.Tensor((NCH, H, TOK), f32), SLOT: T.Tensor((NSLOT, 3), "int32"),
             ENT: T.Tensor((NSLOT, H, P, N), f32), SX: T.Tensor((NSLOT, H, P, N), f32),
             DQH: T.Tensor((B, L, R, H, N), f32), DCS: T.Tensor((2, B, H, L), f32)):
        with T.Kernel(NSLOT, H, threads=threads) as (slot, h):
            q_s = T.alloc_shared([C, N], bf16)   # the chunk's rows (see _row_token)
            k_s = T.alloc_shared([C, N], bf16)
            v_s = T.alloc_shared([C, P], bf16)
            d_s = T.alloc_shared([C, P], bf16)
            cs_s = T.alloc_shared([max(TOK, CS_ROW)], f32)   # (at least CS_ROW: see there)
            rows_s = T.alloc_shared([C], f32)
            gm_s = T.alloc_shared([C, C], bf16)
            sh_s = T.alloc_shared([P, N], bf16)
            sl_s = T.alloc_shared([P, N], bf16)
            wh_s = T.alloc_shared([C, P], bf16)
            wl_s = T.alloc_shared([C, P], bf16)
            st = T.alloc_fragment([P, N], f32)
            gm = T.alloc_fragment([C, C], f32)
            acc = T.alloc_fragment([C, N], f32)
            prod = T.alloc_fragment([C, N], f32)
            dcs = T.alloc_fragment([C], f32)
            # (b, end, start) of the slot read inline: values bound before this `if` were
            # hoisted past it by TileLang's warp specialisation (the kernel compiled to nothing)
            if SLOT[slot, 2] < SLOT[slot, 1]:
                T.copy(ENT[slot, h, :, :], st)
                for ci in T.Pipelined(T.min(T.ceildiv(SLOT[slot, 1] - SLOT[slot, 2], TOK), SEG), num_stages=stages):
                    b = SLOT[slot, 0]
                    eos = SLOT[slot, 1]
                    nck = T.min(T.ceildiv(eos - SLOT[slot, 2], TOK), SEG)
                    tc = SLOT[slot, 2] + ci * TOK
                    chunk_in(QH, KS, VT, DY, CS, b, tc, eos, h, slot * SEG + ci, q_s, k_s, v_s, d_s, cs_s)
                    if ci == nck - 1:   # S_last, for dadt's boundary term
                        T.copy(st, SX[slot, h, :, :])
                    T.gemm(d_s, v_s, gm, transpose_B=True, clear_accum=True)
                    for i, j in T.Parallel(C, C):
                        gm[i, j] = T.if_then_else(tok(i) > tok(j), gm[i, j] * T.exp(cs_s[tok(i)] - cs_s[tok(j)]), 0.0)
                    T.copy(gm, gm_s)
                    split(st, sh_s, sl_s)
                    T.gemm(d_s, sh_s, acc, clear_accum=True)
                    T.gemm(d_s, sl_s, acc)
                    for i, n in T.Parallel(C, N):
                        acc[i, n] = acc[i, n] * T.exp(cs_s[tok(i)])
                    for i, n in T.Parallel(C, N):
                        prod[i, n] = acc[i, n] * T.cast(q_s[i, n], f32)
                    T.reduce_sum(prod, dcs, dim=1)
                    T.copy(dcs, rows_s)
                    store_dcs(DCS, 0, b, h, tc, eos, rows_s)
                    T.gemm(gm_s, k_s, acc)
                    for i, n in T.Parallel(C, N):
                        if tc + tok(i) < eos:
                            DQH[b, tc + tok(i), rank(i), h, n] = acc[i, n]
                    update(st, v_s, k_s, cs_s, wh_s, wl_s, False)

    return main


@functools.lru_cache(maxsize=None)
def dkv_program(R, N, P, threads=THREADS, stages=None):
    """The dkv walk: grid (NSLOT, H); dkv writes part 1 of DCS and X_c into DTC (NCH, H)."""
    import tilelang.language as T
    B, L, H, NSLOT, NCH = T.dynamic("B L H NSLOT NCH")
    bf16, f32 = "bfloat16", "float32"
    TOK = tokens(R)
    SEG = NCH // NSLOT   # chunks per slot: the cs table has NSLOT * SEG rows
    stages = default_stages(N, P) if stages is None else stages
    chunk_in, split, update, store_dcs = _macros(T, R, TOK, N, P)
    tok = functools.partial(_row_token, R=R)     # row -> token, rank
    rank = functools.partial(_row_rank, R=R)

    @T.prim_func
    def main(QH: T.Tensor((B, L, R, H, N), bf16), KS: T.Tensor((B, L, R, H, N), bf16),
             VT: T.Tensor((B, L, R, H, P), bf16), DY: T.Tensor((B, L, R, H, P), bf16),
             CS: T.Tensor((NCH, H, TOK), f32), SLOT: T.Tensor((NSLOT, 3), "int32"),
             DX: T.Tensor((NSLOT, H, P, N), f32), DKS: T.Tensor((B, L, R, H, N), f32),
             DVT: T.Tensor((B, L, R, H, P), f32), DCS: T.Tensor((2, B, H, L), f32),
             DTC: T.Tensor((NCH, H), f32)):
        with T.Kernel(NSLOT, H, threads=threads) as (slot, h):
            q_s = T.alloc_shared([C, N], bf16)   # the chunk's rows (see _row_token)
            k_s = T.alloc_shared([C, N], bf16)
            v_s = T.alloc_shared([C, P], bf16)
            d_s = T.alloc_shared([C, P], bf16)
            cs_s = T.alloc_shared([max(TOK, CS_ROW)], f32)   # (at least CS_ROW: see there)
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
            accv = T.alloc_fragment([C, P], f32)
            acck = T.alloc_fragment([C, N], f32)
            xv = T.alloc_fragment([C, P], f32)
            x = T.alloc_fragment([C], f32)
            rs = T.alloc_fragment([C], f32)
            cl = T.alloc_fragment([C], f32)
            xs = T.alloc_fragment([1], f32)
            if SLOT[slot, 2] < SLOT[slot, 1]:   # (read inline: see dq_program)
                T.copy(DX[slot, h, :, :], st)
                for kk in T.Pipelined(T.min(T.ceildiv(SLOT[slot, 1] - SLOT[slot, 2], TOK), SEG), num_stages=stages):
                    b = SLOT[slot, 0]
                    eos = SLOT[slot, 1]
                    ci = T.min(T.ceildiv(eos - SLOT[slot, 2], TOK), SEG) - 1 - kk
                    tc = SLOT[slot, 2] + ci * TOK
                    chunk_in(QH, KS, VT, DY, CS, b, tc, eos, h, slot * SEG + ci, q_s, k_s, v_s, d_s, cs_s)
                    split(st, sh_s, sl_s)
                    T.gemm(d_s, v_s, sdv, transpose_B=True, clear_accum=True)
                    T.gemm(q_s, k_s, am, transpose_B=True, clear_accum=True)
                    for i, j in T.Parallel(C, C):
                        am[i, j] = T.if_then_else(tok(i) > tok(j), am[i, j] * T.exp(cs_s[tok(i)] - cs_s[tok(j)]), 0.0)
                    for i, j in T.Parallel(C, C):
                        w[i, j] = am[i, j] * sdv[i, j]
                    for i, j in T.Parallel(C, C):
                        sdv[i, j] = T.if_then_else(tok(i) > tok(j), sdv[i, j] * T.exp(cs_s[tok(i)] - cs_s[tok(j)]), 0.0)
                    T.copy(sdv, gm_s)
                    T.copy(am, a_s)
                    T.reduce_sum(w, rs, dim=1)
                    T.reduce_sum(w, cl, dim=0)
                    T.gemm(v_s, sh_s, acck, clear_accum=True)
                    T.gemm(v_s, sl_s, acck)
                    for j, n in T.Parallel(C, N):
                        acck[j, n] = acck[j, n] * T.exp(cs_s[TOK - 1] - cs_s[tok(j)])
                    T.gemm(gm_s, q_s, acck, transpose_A=True)
                    for j, n in T.Parallel(C, N):
                        if tc + tok(j) < eos:
                            DKS[b, tc + tok(j), rank(j), h, n] = acck[j, n]
                    T.gemm(k_s, sh_s, accv, transpose_B=True, clear_accum=True)
                    T.gemm(k_s, sl_s, accv, transpose_B=True)
                    for j, p in T.Parallel(C, P):
                        accv[j, p] = accv[j, p] * T.exp(cs_s[TOK - 1] - cs_s[tok(j)])
                    for j, p in T.Parallel(C, P):
                        xv[j, p] = accv[j, p] * T.cast(v_s[j, p], f32)
                    T.reduce_sum(xv, x, dim=1)
                    T.gemm(a_s, d_s, accv, transpose_A=True)
                    for j, p in T.Parallel(C, P):
                        if tc + tok(j) < eos:
                            DVT[b, tc + tok(j), rank(j), h, p] = accv[j, p]
                    T.copy(rs, r_s)   # (row / column sums and x come in different fragment layouts)
                    T.copy(cl, c_s)
                    T.copy(x, x_s)
                    for i in T.Parallel(C):
                        r_s[i] = r_s[i] - c_s[i] - x_s[i]
                    store_dcs(DCS, 1, b, h, tc, eos, r_s)
                    T.reduce_sum(x, xs, dim=0)
                    DTC[slot * SEG + ci, h] = xs[0]
                    update(st, d_s, q_s, cs_s, wh_s, wl_s, True)

    return main


@functools.lru_cache(maxsize=None)
def build(which: str, R: int, N: int, P: int, arch: str, threads=THREADS, stages=None):
    """The compiled walk ('dq' or 'dkv') for `arch` (sm_90a: also on a machine without a GPU)."""
    import tilelang
    from tvm.target import Target
    target = {"kind": "cuda", "arch": arch}
    prog = (dq_program if which == "dq" else dkv_program)(R, N, P, threads, stages)
    with Target(target):
        return tilelang.compile(prog, target=target, execution_backend="tvm_ffi")


def slot_rows(B: int, L: int, seglen: int, cu_seqlens=None, device=None) -> dict:
    """The segment slots of `seglen` tokens in the Triton kernels' numbering (`scan_common._locate`):
    int64 tensors b (batch row), seq, bos, eos (the sequence's start and end), t0 (the segment's
    start) and seg (its index in the sequence), one entry per slot. Dense: slot = b * cdiv(L,
    seglen) + segment; varlen (B = 1): sequence i owns slots cu[i] // seglen + i + [0, cdiv(len_i,
    seglen)); a slot past its sequence's segments has t0 >= eos. Built on the device
    (searchsorted, no host sync)."""
    import torch
    if cu_seqlens is None:
        nseg = -(-L // seglen)
        s = torch.arange(B * nseg, device=device, dtype=torch.int64)
        b, seg = s // nseg, s % nseg
        return dict(b=b, seq=b, bos=torch.zeros_like(s), eos=torch.full_like(s, L), t0=seg * seglen, seg=seg)
    cu = cu_seqlens.to(torch.int64)
    S = cu.shape[0] - 1
    s = torch.arange(L // seglen + S, device=cu.device, dtype=torch.int64)
    first = cu[:-1] // seglen + torch.arange(S, device=cu.device)
    seq = (torch.searchsorted(first, s, right=True) - 1).clamp(min=0)
    bos = cu[seq]
    seg = s - first[seq]
    return dict(b=torch.zeros_like(s), seq=seq, bos=bos, eos=cu[seq + 1], t0=bos + seg * seglen, seg=seg)


def slot_table(B: int, L: int, SEG: int, TOK: int, cu_seqlens=None, device=None):
    """(NSLOT, 3) int32 (batch row, sequence end, segment start) per segment slot (SEG chunks of
    TOK tokens; `slot_rows`)."""
    import torch
    r = slot_rows(B, L, SEG * TOK, cu_seqlens, device)
    return torch.stack([r["b"], r["eos"], r["t0"]], 1).to(torch.int32).contiguous()


def compile(which: str, R: int, N: int, P: int, arch: str = "sm_90a", threads=THREADS,
            stages=None) -> dict:
    """Build a walk for `arch` without a GPU: {"name", "registers", "spills" (local bytes per
    thread), "stack", "dynamic_smem" (bytes the launch asks for; None if not found), "source",
    "cubin_path"}."""
    from . import resource_usage
    from .step import find_cubin
    k = build(which, R, N, P, arch, threads, stages)
    src = k.get_kernel_source()
    _, path = find_cubin(src, arch)
    res = {"name": f"tilelang_core_{which}", "source": src, "cubin_path": path,
           "dynamic_smem": dynamic_smem(k.get_host_source())}
    res.update(resource_usage(path) if path else {})
    return res


def dynamic_smem(host_source: str):
    """The dynamic shared memory (bytes) a TileLang kernel's launch asks for, read from its tvm-ffi
    host code: the last integer packed before the call of main_kernel (after grid and block
    dims). None if the host code has another form."""
    import re
    i = host_source.find("TVMFFIFunctionCall(main_kernel_packed")
    vals = re.findall(r"v_int64\) = \(?\(int64_t\)(\d+)\)?;", host_source[:i]) if i >= 0 else []
    return int(vals[-2]) if len(vals) >= 2 and vals[-1] == "0" else None
