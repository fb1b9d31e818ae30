"""Forward phase 4 in TileLang: the chunk outputs of every segment, 64-token chunks, SISO.

The same computation as backends/triton/scan_chunk_output.py (its docstring has the math; SPEC
§8, reference/chunked.py `chunk_outputs`), laid out for Hopper: one program (two warpgroups, 256
threads) per (segment slot, head) walks its segment's chunks of C = 64 tokens (one wgmma M tile)
with the P x N state as an fp32 accumulator fragment, and `T.Pipelined` stages the next chunk's
q / k / v / z / scalar / angle tiles (TMA) while this one computes. The rotation of the shared
(grouped) q and k happens in the kernel, so no per-head rotated q / k is ever written: the
walk reads what the Triton phase 4 reads.

Per chunk (rows i = tokens, cs the in-chunk inclusive cumsum of adt, T its total, ell the
segment-relative angles: carry + the in-chunk inclusive cumsum of phi = pi tanh(raw) dt, the carry
wrapped into [0, 2 pi) after every chunk, as the Triton kernels do at their chunk length):

    qr, kr    = Rot(ell) (q + q_bias), Rot(ell) (k + k_bias)          (fp32, then bf16 operands)
    scores    = qr kr^T;  W_ij = e^{cs_i - cs_j} scale_j (i > j), gamma_i (i = j), 0 (i < j)
    y         = (scores o W) v + e^{cs_i} qr S^T + D v;   out = y silu(z)  (reduce / per_rank, R = 1)
    S        <- e^T S + (v e^{T - cs} scale)^T kr

The two cumsums (cs and the AP angle columns) are one Hillis-Steele scan over a [C, AP + 1]
shared tile (6 steps, exact fp32 adds); gamma and scale come from the scalar table of
`scan_common.scan_scalars_kernel` (gamma_t, beta_{t+1}, adt_t, dt_t per (b, h, t)), the next
token's beta masked here at the sequence's end. Rows past a sequence's end (a partial last
chunk) read zero scalars (masked where they are used), so they add nothing, and are not stored.

Grid: (segment slots, H); the slot table (`slot_table`) gives each slot's batch row, sequence end,
segment start, entry-state slot (phases 2-3, Triton; -1: none) and chunk count, in the Triton
forward's slot numbering. Entry states come in the segment's rotary frame (scan_state_passing).

Measured (H100, TileLang 0.1.15, bench/results/scan_fwd_tilelang_out_h100_*.json,
tilelang_fwd_walk_h100_*.json): correct (tests/test_tilelang_scan_fwd_gpu.py, 11/11; rel_l2 vs
float64 2.33-2.35e-3 on the bench shapes, as the Triton phase 4's 2.32-2.35e-3) but slower: SISO
B4 L4096 0.59 ms against the Triton phase 4's 0.356 (G8 N64 0.47 vs 0.28), hence opt-in
(scan_fwd OUT_IMPL). Where the time goes (ablations, `program(debug=...)`, us of 597): the
Hillis-Steele scan 152, weights 79, output 70, rotation 58, update 52, trig 20; without the
angle path 348, without every elementwise phase 159. Every phase is a shared-memory pass over
the tile with TileLang's per-element index arithmetic (1.6x the Triton loop's instructions per
token: IMAD / LEA / LOP3 ~40 % of them) at two warps per scheduler; doing the cumsums as one
tensor-core product (tri @ x, fp16 hi + lo splits) instead was slower still (645 us). What it
would take: register-resident tiles between the phases (fragments in a layout that keeps a rotary
pair in one thread), fewer passes over shared memory.

Scope (`supports`): R = 1, N in {64, 128}, P = 64, bf16 inputs, output modes reduce / per_rank
(norm_reduce and the MIMO projections stay Triton's), q / k / v / z contiguous.
"""
import functools

C = 64           # tokens per chunk: one wgmma M tile
THREADS = 256    # two warpgroups
STAGES = 2       # T.Pipelined stages
PI = 3.141592653589793
TWO_PI = 6.283185307179586
INV_TWO_PI = 0.15915494309189535


def angle_cols(A: int) -> int:
    """Angle columns the kernel computes: pow2(A), at least 8 (0 without angles)."""
    from . import pow2
    return 0 if A == 0 else max(8, pow2(A))


def supports(spec, contiguous: bool = True) -> tuple:
    """(ok, reason) for the walk's scope."""
    if spec.rank != 1:
        return False, f"rank {spec.rank}: the TileLang forward walk is SISO (R = 1)"
    if spec.d_state not in (64, 128) or spec.head_dim != 64:
        return False, (f"N={spec.d_state}, P={spec.head_dim}: the TileLang forward walk takes N in (64, 128) "
                       "(wgmma tiles of two warpgroups) and P = 64 (at P = 128 the fp32 state and outputs "
                       "overflow the registers: 136 B of stack)")
    if spec.input_dtype != "bfloat16":
        return False, f"{spec.input_dtype} inputs: the TileLang forward walk takes bf16"
    if spec.output_mode not in ("reduce", "per_rank"):
        return False, f"output_mode {spec.output_mode!r}: the TileLang forward walk has no fused norm"
    if spec.has_mimo_v or spec.has_mimo_z or spec.has_mimo_out:
        return False, "MIMO projections: the TileLang forward walk has none"
    if not contiguous:
        return False, "strided q / k / v / z: the TileLang forward walk reads contiguous tensors"
    return True, ""


def shared_bytes(N, P, A, has_z=True, ang_bytes=2, stages=STAGES) -> int:
    """The walk's shared memory (bytes, before TileLang's alignment): the staged tiles (q, k, v, z,
    scalars, angles) per stage, then the rotated q / k, the bf16 state, the weighted scores and
    v, the cumsum (cos / sin) tiles."""
    AP = angle_cols(A)
    staged = C * (4 * N + (4 if has_z else 2) * P + 16 + max(A, 8) * ang_bytes)
    return stages * staged + C * 4 * N + 2 * P * N + 2 * C * C + 2 * C * P + 8 * C * AP + 8 * C + 8 * AP + 8 * N


def default_stages(N, P, A=0, has_z=True, ang_bytes=2) -> int:
    """Pipeline stages: STAGES where they fit in the H100's shared memory per block (with 8 KB for
    alignment), else 1 (N = 128 with A = 64 fp32 angles)."""
    from .scan_bwd_core_chunk import SMEM_MAX
    return STAGES if shared_bytes(N, P, A, has_z, ang_bytes) + 8192 <= SMEM_MAX else 1


@functools.lru_cache(maxsize=None)
def program(N, P, A, shared_angles, half_pairing, has_d, has_z, has_entry, y_out, ang_dtype="bfloat16",
            threads=THREADS, stages=None, debug=()):
    """The walk's prim_func: grid (NSLOT, H). Its chunk loop is pipelined by hand: the TMA copies
    in stage 0, every other statement in stage 1 (TileLang's own planning also put the rotation
    and the cumsums, which read only staged tiles, in stage 0 and so double-buffered their
    outputs: 250 KB of shared memory). The statement count comes from a first, auto-planned
    trace of the same program. debug: names of phases to leave out (timing ablations only: the
    results are wrong): "scan", "trig", "rotate", "weights", "store", "update"."""
    if stages is None:
        stages = default_stages(N, P, A, has_z, 4 if ang_dtype == "float32" else 2)
    args = (N, P, A, shared_angles, half_pairing, has_d, has_z, has_entry, y_out, ang_dtype, threads, stages,
            frozenset(debug))
    if stages < 2:   # no prefetch: TileLang's own plan (its copies are TMA loads then)
        return _program(*args, None)
    n, ncopy = _pipeline_shape(_program(*args, None))
    return _program(*args, (list(range(n)), [0] * ncopy + [1] * (n - ncopy)))


def _pipeline_shape(prim) -> tuple:
    """(scheduled statements, leading copies) of the prim_func's one pipelined loop."""
    from tilelang import tvm
    tir = tvm.tirx
    loops = []
    tir.stmt_functor.post_order_visit(prim.body, lambda x: loops.append(x)
                                      if isinstance(x, tir.For) and "num_stages" in x.annotations else None)
    assert len(loops) == 1, f"expected one pipelined loop, found {len(loops)}"
    body = loops[0].body
    while not isinstance(body, tir.SeqStmt):
        body = body.body
    stmts = list(body.seq)
    ncopy = 0   # the leading binds and copies
    while ncopy < len(stmts) and (type(stmts[ncopy]).__name__ == "Bind" or (
            isinstance(stmts[ncopy], tir.Evaluate) and "copy" in str(stmts[ncopy]))):
        ncopy += 1
    # (a top-level `if` holding two loops counted as two statements in TileLang's planning: the
    # loop body has none)
    assert not any(isinstance(x, tir.IfThenElse) for x in stmts), "a top-level if in the pipelined loop"
    return len(stmts), ncopy


def _program(N, P, A, shared_angles, half_pairing, has_d, has_z, has_entry, y_out, ang_dtype, threads, stages,
             debug, schedule):
    import tilelang.language as T
    B, L, H, G, NSLOT = T.dynamic("B L H G NSLOT")
    # optional tensors get dims of their own, so a stand-in of any size passes the launch checks
    BZ, LZ, HZ, BA, LA, HA, HD, NE, HE, BY, LY, HY = T.dynamic("BZ LZ HZ BA LA HA HD NE HE BY LY HY")
    bf16, f32 = "bfloat16", "float32"
    NH = N // 2
    AP = angle_cols(A)
    ang_shape = (BA, LA, max(A, 1)) if shared_angles else (BA, LA, HA, max(A, 1))

    def cols(j):   # plain Python: the columns (c0, c1) of pair j
        return (j, j + NH) if half_pairing else (2 * j, 2 * j + 1)

    def fexp(x):   # ex2.approx-based exp (Triton's tl.exp is the same MUFU op)
        return T.call_extern(f32, "__expf", x)

    @T.macro
    def rotate(q_s, k_s, qr_s, kr_s, qb_s, kb_s, cos_s, sin_s):
        """qr, kr = Rot(ell)(q + q_bias), Rot(ell)(k + k_bias) as bf16 operands: one thread per
        rotated pair (j < A; both members and both tensors), then the pass-through columns."""
        if A > 0:
            for i, j in T.Parallel(C, A):
                c0, c1 = cols(j)
                c, sn = cos_s[i, j], sin_s[i, j]
                x0 = T.cast(q_s[i, c0], f32) + qb_s[c0]
                x1 = T.cast(q_s[i, c1], f32) + qb_s[c1]
                qr_s[i, c0] = T.cast(x0 * c - x1 * sn, bf16)
                qr_s[i, c1] = T.cast(x0 * sn + x1 * c, bf16)
                y0 = T.cast(k_s[i, c0], f32) + kb_s[c0]
                y1 = T.cast(k_s[i, c1], f32) + kb_s[c1]
                kr_s[i, c0] = T.cast(y0 * c - y1 * sn, bf16)
                kr_s[i, c1] = T.cast(y0 * sn + y1 * c, bf16)
        if half_pairing:   # pass-through columns [A, NH) and [NH + A, N)
            if A < NH:
                for i, u in T.Parallel(C, 2 * (NH - A)):
                    n = T.if_then_else(u < NH - A, A + u, NH + A + (u - (NH - A)))
                    qr_s[i, n] = T.cast(T.cast(q_s[i, n], f32) + qb_s[n], bf16)
                    kr_s[i, n] = T.cast(T.cast(k_s[i, n], f32) + kb_s[n], bf16)
        elif 2 * A < N:    # pass-through columns [2 A, N)
            for i, u in T.Parallel(C, N - 2 * A):
                qr_s[i, 2 * A + u] = T.cast(T.cast(q_s[i, 2 * A + u], f32) + qb_s[2 * A + u], bf16)
                kr_s[i, 2 * A + u] = T.cast(T.cast(k_s[i, 2 * A + u], f32) + kb_s[2 * A + u], bf16)

    @T.macro
    def scan_step(src, dst, csrc, cdst, d):
        # one Hillis-Steele step of the angle columns and (with column 0's threads) of cs
        if A > 0:
            for i, w in T.Parallel(C, AP):
                dst[i, w] = T.if_then_else(i >= d, src[i, w] + src[T.max(i - d, 0), w], src[i, w])
                if w == 0:
                    cdst[i] = T.if_then_else(i >= d, csrc[i] + csrc[T.max(i - d, 0)], csrc[i])
        else:
            for i in T.Parallel(C):
                cdst[i] = T.if_then_else(i >= d, csrc[i] + csrc[T.max(i - d, 0)], csrc[i])

    @T.prim_func
    def main(Q: T.Tensor((B, L, 1, G, N), bf16), K: T.Tensor((B, L, 1, G, N), bf16),
             V: T.Tensor((B, L, H, P), bf16), Z: T.Tensor((BZ, LZ, HZ, P), bf16),
             SC: T.Tensor((B, H, L, 4), f32), ANG: T.Tensor(ang_shape, ang_dtype),
             QB: T.Tensor((H, N), f32), KB: T.Tensor((H, N), f32), DV: T.Tensor((HD,), f32),
             SLOT: T.Tensor((NSLOT, 5), "int32"), ENT: T.Tensor((NE, HE, P, N), bf16),
             OUT: T.Tensor((B, L, H, P), bf16), YO: T.Tensor((BY, LY, HY, P), f32)):
        with T.Kernel(NSLOT, H, threads=threads) as (slot, h):
            q_s = T.alloc_shared([C, N], bf16)
            k_s = T.alloc_shared([C, N], bf16)
            v_s = T.alloc_shared([C, P], bf16)
            z_s = T.alloc_shared([C, P], bf16)
            sc_s = T.alloc_shared([C, 4], f32)     # gamma, beta of the next token, adt, dt
            a_s = T.alloc_shared([C, max(A, 8)], ang_dtype)
            qr_s = T.alloc_shared([C, N], bf16)
            kr_s = T.alloc_shared([C, N], bf16)
            st_s = T.alloc_shared([P, N], bf16)
            w_s = T.alloc_shared([C, C], bf16)
            vw_s = T.alloc_shared([C, P], bf16)
            cum_a = T.alloc_shared([C, max(AP, 1)], f32)   # the angle cumsum (ping-pong), then cos
            cum_b = T.alloc_shared([C, max(AP, 1)], f32)   # (ping-pong), then sin
            cs_a = T.alloc_shared([C], f32)                # the decay cumsum cs (ping-pong)
            cs_b = T.alloc_shared([C], f32)
            scl_s = T.alloc_shared([C], f32)                # scale_j per key
            wk_s = T.alloc_shared([C], f32)                 # e^{T - cs_j} scale_j
            carry_s = T.alloc_shared([max(AP, 1)], f32)    # the segment-relative angle entering the chunk
            nxt_s = T.alloc_shared([max(AP, 1)], f32)
            qb_s = T.alloc_shared([N], f32)
            kb_s = T.alloc_shared([N], f32)
            st = T.alloc_fragment([P, N], f32)
            sc = T.alloc_fragment([C, C], f32)
            y = T.alloc_fragment([C, P], f32)
            yi = T.alloc_fragment([C, P], f32)
            g = h // (H // G)
            # (the slot's values are read inline: values bound before this `if` were hoisted past
            # it by TileLang's warp specialisation in the backward walks)
            if SLOT[slot, 4] > 0:
                if has_entry:
                    for p, n in T.Parallel(P, N):
                        st[p, n] = T.if_then_else(SLOT[slot, 3] >= 0,
                                                  T.cast(ENT[T.max(SLOT[slot, 3], 0), h, p, n], f32), 0.0)
                else:
                    T.clear(st)
                for a in T.Parallel(max(AP, 1)):
                    carry_s[a] = 0.0
                for n in T.Parallel(N):
                    qb_s[n] = QB[h, n]
                    kb_s[n] = KB[h, n]
                for ci in (T.Pipelined(SLOT[slot, 4], num_stages=stages) if schedule is None else
                           T.Pipelined(SLOT[slot, 4], order=schedule[0], stage=schedule[1])):
                    b = SLOT[slot, 0]
                    eos = SLOT[slot, 1]
                    tc = SLOT[slot, 2] + ci * C
                    T.copy(Q[b, tc:tc + C, 0, g, :], q_s)
                    T.copy(K[b, tc:tc + C, 0, g, :], k_s)
                    T.copy(V[b, tc:tc + C, h, :], v_s)
                    if has_z:
                        T.copy(Z[b, tc:tc + C, h, :], z_s)
                    T.copy(SC[b, h, tc:tc + C, :], sc_s)
                    if A > 0:
                        if shared_angles:
                            T.copy(ANG[b, tc:tc + C, 0:A], a_s[:, 0:A])
                        else:
                            T.copy(ANG[b, tc:tc + C, h, 0:A], a_s[:, 0:A])
                    # the in-chunk inclusive cumsums of phi (angle columns) and adt; rows past the
                    # sequence's end (a partial last chunk: the next sequence's tokens, or TMA's zero
                    # fill past L) get zero scalars here and in scl_s, so they add nothing
                    if A > 0:
                        for i, w in T.Parallel(C, AP):
                            cum_a[i, w] = T.if_then_else(
                                (w < A) & (tc + i < eos), PI * T.tanh(T.cast(a_s[i, T.min(w, A - 1)], f32)) * sc_s[i, 3],
                                0.0)
                    for i in T.Parallel(C):
                        cs_a[i] = T.if_then_else(tc + i < eos, sc_s[i, 2], 0.0)
                    if "scan" not in debug:
                        scan_step(cum_a, cum_b, cs_a, cs_b, 1)   # Hillis-Steele, strides 1 .. 32: ends in *_a
                        scan_step(cum_b, cum_a, cs_b, cs_a, 2)
                        scan_step(cum_a, cum_b, cs_a, cs_b, 4)
                        scan_step(cum_b, cum_a, cs_b, cs_a, 8)
                        scan_step(cum_a, cum_b, cs_a, cs_b, 16)
                        scan_step(cum_b, cum_a, cs_b, cs_a, 32)
                    if A > 0 and "trig" not in debug:
                        for a in T.Parallel(AP):   # the next chunk's carry (wrapped), before cum_a is reused
                            e2 = carry_s[a] + cum_a[C - 1, a]
                            wr = e2 - TWO_PI * T.floor(e2 * INV_TWO_PI)
                            nxt_s[a] = T.if_then_else(wr < 0.0, wr + TWO_PI,
                                                      T.if_then_else(wr >= TWO_PI, wr - TWO_PI, wr))
                        for i, a in T.Parallel(C, AP):   # cos into cum_a (in place), sin into cum_b
                            e = cum_a[i, a] + carry_s[a]
                            r = e - TWO_PI * T.floor(e * INV_TWO_PI + 0.5)
                            cum_a[i, a] = T.call_extern(f32, "__cosf", r)   # MUFU (|r| <= pi: < 1e-6)
                            cum_b[i, a] = T.call_extern(f32, "__sinf", r)
                        for a in T.Parallel(AP):
                            carry_s[a] = nxt_s[a]
                    if "rotate" not in debug:
                        rotate(q_s, k_s, qr_s, kr_s, qb_s, kb_s, cum_a, cum_b)
                    for j in T.Parallel(C):   # per key: scale_j (beta of the next token masked at the end),
                        scl_s[j] = T.if_then_else(tc + j < eos, sc_s[j, 0], 0.0) + T.if_then_else(
                            tc + j + 1 < eos, sc_s[j, 1], 0.0)
                        wk_s[j] = fexp(cs_a[C - 1] - cs_a[j]) * scl_s[j]   # and its weight in the update
                    for p, n in T.Parallel(P, N):
                        st_s[p, n] = T.cast(st[p, n], bf16)
                    T.gemm(qr_s, st_s, yi, transpose_B=True, clear_accum=True)
                    T.gemm(qr_s, kr_s, sc, transpose_B=True, clear_accum=True)
                    if "weights" in debug:
                        T.copy(sc, w_s)
                    else:
                      for i, j in T.Parallel(C, C):  # noqa: E111
                        w_s[i, j] = T.cast(T.if_then_else(
                            i > j, sc[i, j] * fexp(T.min(cs_a[i] - cs_a[j], 0.0)) * scl_s[j],
                            T.if_then_else(i == j, sc[i, j] * sc_s[i, 0], 0.0)), bf16)
                    T.gemm(w_s, v_s, y, clear_accum=True)
                    for i, p in T.Parallel(C, P):
                        y[i, p] = y[i, p] + fexp(cs_a[i]) * yi[i, p]
                        if has_d:
                            y[i, p] = y[i, p] + DV[h] * T.cast(v_s[i, p], f32)
                    if y_out:
                        for i, p in T.Parallel(C, P):
                            if tc + i < eos:
                                YO[b, tc + i, h, p] = y[i, p]
                    for i, p in T.Parallel(C, P):
                        if tc + i < eos - (C if "store" in debug else 0) * L:   # (debug "store": never true)
                            if has_z:
                                zz = T.cast(z_s[i, p], f32)
                                OUT[b, tc + i, h, p] = T.cast(
                                    y[i, p] * T.call_extern(f32, "__fdividef", zz, 1.0 + fexp(-zz)), bf16)
                            else:
                                OUT[b, tc + i, h, p] = T.cast(y[i, p], bf16)
                    # the chunk's contribution to the state entering the next chunk
                    if "update" not in debug:
                        for j, p in T.Parallel(C, P):
                            vw_s[j, p] = T.cast(T.cast(v_s[j, p], f32) * wk_s[j], bf16)
                        for p, n in T.Parallel(P, N):
                            st[p, n] = st[p, n] * fexp(cs_a[C - 1])
                        T.gemm(vw_s, kr_s, st, transpose_A=True)

    return main


def spec_key(spec, has_entry: bool, y_out: bool, ang_dtype="bfloat16", has_d=None, has_z=None) -> dict:
    """The build key (program's arguments but threads / stages / debug) of a spec: has_d / has_z
    default to the spec's, ang_dtype is the angle tensor's dtype (bf16 stands in without angles)."""
    A = spec.n_angles
    return dict(N=spec.d_state, P=spec.head_dim, A=A, shared_angles=bool(spec.shared_angles) and A > 0,
                half_pairing=spec.pairing == "half", has_d=spec.has_d if has_d is None else has_d,
                has_z=spec.has_z if has_z is None else has_z, has_entry=has_entry, y_out=y_out,
                ang_dtype=ang_dtype if A else "bfloat16")


def key(spec, t, has_entry: bool, y_out: bool) -> dict:
    """The build key of a call on the bundle `t`."""
    adt = str(t.angles.dtype).replace("torch.", "") if spec.n_angles else "bfloat16"
    return spec_key(spec, has_entry, y_out, adt, has_d=t.d is not None, has_z=t.z is not None)


@functools.lru_cache(maxsize=None)
def build(arch: str, threads=THREADS, stages=None, debug=(), **k):
    """The compiled walk for `arch` (sm_90a: also on a machine without a GPU)."""
    import tilelang
    from tvm.target import Target
    target = {"kind": "cuda", "arch": arch}
    prog = program(threads=threads, stages=stages, debug=tuple(debug), **k)
    with Target(target):
        return tilelang.compile(prog, target=target, execution_backend="tvm_ffi")


def slot_table(B: int, L: int, seglen: int, split: int, nseg2_dense: int, cu_seqlens=None, device=None):
    """(NSLOT, 5) int32 per segment slot of the Triton forward's numbering (scan_bwd_core_chunk.
    slot_rows): batch row, sequence end, segment start, entry-state slot of phases 2-3 (their
    sub-segment `split` * segment of the sequence, in their numbering at seglen / split) and the
    slot's chunk count (0: a spare varlen slot). Built on the device (no host sync)."""
    import torch
    from .scan_bwd_core_chunk import slot_rows
    r = slot_rows(B, L, seglen, cu_seqlens, device)
    if cu_seqlens is None:
        first2 = r["b"] * nseg2_dense
    else:
        first2 = r["bos"] // (seglen // split) + r["seq"]
    eslot = first2 + r["seg"] * split
    nck = torch.clamp((r["eos"] - r["t0"]).clamp(min=0) + C - 1, max=seglen + C - 1) // C
    return torch.stack([r["b"], r["eos"], r["t0"], eslot, nck], 1).to(torch.int32).contiguous()


def whole_chunks(config: dict) -> dict:
    """A Triton forward config with OUT_IMPL "tilelang" and its segments (SEG chunks of CHUNK
    tokens) rounded up to whole 64-token chunks of the walk (`in_scope` refuses others)."""
    per = max(1, C // config["CHUNK"])
    return dict(config, OUT_IMPL="tilelang", SEG=-(-config["SEG"] // per) * per)


def in_scope(spec, t, seglen: int) -> tuple:
    """(ok, reason): `supports` for the bundle `t` (mamba3_kernels.scan_tensors.ScanTensors) and
    the forward's segment length (whole 64-token chunks)."""
    tensors = [t.q, t.k, t.v] + [x for x in (t.z, t.angles) if x is not None]
    ok, why = supports(spec, all(x.is_contiguous() for x in tensors))
    if ok and seglen % C:
        return False, f"segments of {seglen} tokens: the TileLang forward walk needs multiples of {C}"
    return ok, why


def plan_calls(spec, t, seglen: int, split: int, nseg2_dense: int, erel, y_out, out4, arch=None, stages=None):
    """The calls that replace the Triton phase 4: the scalar table (Triton, scan_common.
    scan_scalars_kernel) and the walk (a dict with `tilelang`, its build key, and `args`, the
    prim_func's parameters in order). erel: the entry states of phases 2-3 or None; y_out: the
    fp32 (B, L, 1, H, P) y or None; out4: the output (B, L, H, P) or (B, L, 1, H, P); stages:
    the chunk loop's pipeline (None: `default_stages`; 1: no prefetch)."""
    import torch
    import triton
    from mamba3_kernels.backends.triton import scan_common as com
    B, L, H, P = t.v.shape
    N = spec.d_state
    dev = t.v.device
    f32 = torch.float32
    sc = torch.empty((B, H, L, 4), dtype=f32, device=dev)
    nel = B * H * L
    trap = spec.discretization == "trapezoidal"
    scal = dict(name="scan_scalars", kernel=com.scan_scalars_kernel, run=L > 0,
                grid=(triton.cdiv(nel, 512),),
                args=[("adt_ptr", t.adt), ("dt_ptr", t.dt), ("trap_ptr", t.trap if trap else t.dt),
                      ("out_ptr", sc), ("n", nel), ("L", L)],
                constexprs=dict(TRAP=trap, BLOCK=512), num_warps=4, num_stages=1)
    if t.cu_seqlens is None:   # the dense table depends on sizes only: built once per shape
        slots = _dense_slots(B, L, seglen, split, nseg2_dense, str(dev))
    else:
        slots = slot_table(B, L, seglen, split, nseg2_dense, t.cu_seqlens, device=dev)
    if erel is None:
        ent = torch.empty((1, 1, P, N), dtype=torch.bfloat16, device=dev)
    else:
        ent = erel
    small = lambda *s, dt=f32: torch.empty(s, dtype=dt, device=dev)  # noqa: E731
    A = spec.n_angles
    if A:
        ang = t.angles
    else:
        ang = small(1, 1, 1, dt=torch.bfloat16) if spec.shared_angles else small(1, 1, 1, 1, dt=torch.bfloat16)
    k = key(spec, t, erel is not None, y_out is not None)
    walk = dict(name="tilelang_chunk_output", run=L > 0, tilelang=dict(k, arch=arch, stages=stages),
                args=[("Q", t.q), ("K", t.k), ("V", t.v), ("Z", t.v if t.z is None else t.z), ("SC", sc),
                      ("ANG", ang), ("QB", t.q_bias.view(H, N)), ("KB", t.k_bias.view(H, N)),
                      ("DV", small(1) if t.d is None else t.d), ("SLOT", slots), ("ENT", ent),
                      ("OUT", out4.view(B, L, H, P)),
                      ("YO", small(1, 1, 1, P) if y_out is None else y_out.view(B, L, H, P))])
    return [scal, walk]


@functools.lru_cache(maxsize=64)
def _dense_slots(B, L, seglen, split, nseg2_dense, device):
    return slot_table(B, L, seglen, split, nseg2_dense, None, device=device)


@functools.lru_cache(maxsize=None)
def _runs() -> tuple:
    """Whether TileLang can run here (the backend's `available`), asked once per process, not
    per launch."""
    from . import available
    return available()


def launch(c: dict) -> None:
    """Launch the walk of `plan_calls` (built for the current device on first use)."""
    from .step import arch_of
    ok, why = _runs()
    if not ok:
        raise RuntimeError(f"OUT_IMPL 'tilelang': TileLang cannot run here ({why})")
    k = dict(c["tilelang"])
    arch = k.pop("arch") or arch_of(c["args"][0][1].device.index)
    stages = k.pop("stages", None)
    build(arch, THREADS, stages, **k)(*[x for _, x in c["args"]])


def compile(spec, has_entry=True, y_out=False, arch: str = "sm_90a", threads=THREADS, stages=None,
            has_d=None, has_z=None, ang_dtype="bfloat16") -> dict:
    """Build the walk for `arch` without a GPU: {"name", "registers", "spills", "stack",
    "dynamic_smem", "source", "cubin_path"} (scan_bwd_core_chunk.compile's fields)."""
    from . import resource_usage
    from .scan_bwd_core_chunk import dynamic_smem
    from .step import find_cubin
    k = build(arch, threads, stages, **spec_key(spec, has_entry, y_out, ang_dtype, has_d, has_z))
    src = k.get_kernel_source()
    _, path = find_cubin(src, arch)
    res = {"name": "tilelang_chunk_output", "source": src, "cubin_path": path,
           "dynamic_smem": dynamic_smem(k.get_host_source())}
    res.update(resource_usage(path) if path else {})
    return res
