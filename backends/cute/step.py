"""CuTe DSL decode step: one token per sequence, the whole of SPEC §5 in one kernel.

What it computes (the oracle is `reference.recurrent.step`, SPEC §2/§3/§5), per row b, value
head h (Q/K group g = h // (H/G)), pool row m = state_indices[b] (or b), ranks r < R:

    theta'  = wrap(theta + pi * tanh(angles) * dt)              into [0, 2 pi)     (A angles)
    qh_r    = Rot(theta')(q_r + q_bias_r),  kh_r = Rot(theta')(k_r + k_bias_r)
              pairs (2j, 2j+1) "interleaved" or (j, j + N/2) "half"; dims of pairs j >= A pass
    lam     = sigmoid(trap) (trapezoidal) or 1 (euler)
    alpha   = exp(adt),  beta = alpha * dt * (1 - lam),  gamma = dt * lam
    S'      = alpha S + sum_r (beta vprev*mv_r) kprev_r^T + (gamma v*mv_r) kh_r^T    (P x N)
    y_r     = S' qh_r + D v*mv_r
    out     = reduce:      sum_r y_r * silu(z*mz_r) * mo_r
              per_rank:    y_r * silu(z*mz_r)                        (B, R, H, P)
              norm_reduce: sum_r y_r rstd_r w * silu(z*mz_r) * mo_r,  rstd_r = rsqrt(mean_p y_r^2 + eps)
    new states: angle theta', ssm S', k kh_r (all ranks), v (raw v).
A padding row (state_indices[b] < 0 or >= M) writes zeros to its output and touches no state.
Upstream's CuTe step (SPEC §6.4) does only the S update and output; we fuse bias, rotation and
the angle update too, bound-check every P and N, and accept any G | H.

Launch: grid (H, B), one CTA of `num_warps` warps per (b, h). The whole (b, h) lives in one CTA,
so the shared kprev / angle / vprev are read and re-written by the same CTA: with in-place
states (state_out is state_in) every element is read before any thread writes it (the
writes of the small states come after a CTA barrier, the ssm elements are read and written by
the same thread). The fused RMSNorm needs the whole P row too.

Thread layout of the ssm tile: `lanes_per_row` (L) consecutive lanes share a state row; each
lane owns vectors of `vec` columns (16 B by default) at vector index c + L*j, j < cv; the
CTA covers RP = threads / L rows per pass and a chunk of `tile_p` rows per prefetch (rows
p = chunk * tile_p + row_group + RP * i). The state loads of chunk 0 are issued first, before
the prologue (angles, biases, rotation, which go through shared memory), so the prologue's
latency hides under the state traffic; the next chunk is prefetched while a chunk computes.
y_r = S' qh_r is reduced over the L lanes of a row with butterfly shuffles.

Programmatic dependent launch (config `pdl`, opt-in): the kernel is launched with
programmaticStreamSerializationAllowed, so it may be scheduled while the previous kernel of the
stream finishes; its first instruction is `griddepcontrol.wait` (the previous grid complete and
its memory visible) before any global read, so every input, state and parameter written by
earlier kernels is seen as without it. After that wait it lets the next kernel launch
(`griddepcontrol.launch_dependents`). H100, B = 1 (bench/results/step_pdl_*_h100_a3c9546.json):
steps back to back in a CUDA graph 3.8 -> 3.1 us (R = 1 fp32), 4.3 -> 3.7 (R = 4 fp32): each
step's launch overlaps the previous step; but with an ordinary kernel before every step (a
decode loop: the projections write the token) 0.1-0.2 us slower, so it is off by default and
not a tuning candidate (the tuner times steps back to back, the setting where it wins). For
streams whose previous kernel triggers its dependents (PDL-aware producers) or consecutive
steps.

Python wrapper: `run(spec, config, tensors)`. Kernels are compiled once per
(spec, config, H, G, state_indices?, ssm alignment) with the batch and pool sizes symbolic
(B and M never recompile) and called through TVM-FFI (`--enable-tvm-ffi`) with the torch
tensors directly (stream = torch's current stream).
"""
from __future__ import annotations

import math

import cutlass
import cutlass.cute as cute
from cutlass import Float32, const_expr

from mamba3_kernels.spec import ScanSpec

_PI = math.pi
_TWO_PI = 2.0 * math.pi
_INV_TWO_PI = 1.0 / (2.0 * math.pi)

CUTE_DTYPES = {"float32": cutlass.Float32, "bfloat16": cutlass.BFloat16, "float16": cutlass.Float16}
_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _pow2_floor(x: int) -> int:
    return 1 << (max(int(x), 1).bit_length() - 1)


# ------------------------------------------------------------------------------------------
# configuration: knobs, their validation and the derived tile geometry

CONFIG_KEYS = ("num_warps", "lanes_per_row", "vec", "tile_p")
# optional: "min_ctas" (> 1: ptxas caps the registers so that many CTAs fit on an SM,
# `minctasm`; absent or 0: no cap); "pdl" (bool, absent: False): programmatic dependent launch


def max_vec(spec: ScanSpec, align_bytes: int = 16) -> int:
    """Widest vector (elements) that divides N and fits 16 B and the ssm pointers' alignment."""
    eb = _BYTES[spec.state_dtype]
    return math.gcd(spec.d_state, max(1, min(16, align_bytes) // eb))


def geometry(spec: ScanSpec, cfg: dict, align_bytes: int = 16) -> dict:
    """Derived tile sizes of a config; raises ValueError naming the bad knob."""
    N, P = spec.d_state, spec.head_dim
    nw = int(cfg["num_warps"])
    if nw not in (1, 2, 4, 8, 16):
        raise ValueError(f"num_warps: expected one of 1, 2, 4, 8, 16, got {nw}")
    T = 32 * nw
    vec = min(int(cfg["vec"]), max_vec(spec, align_bytes))
    if vec < 1 or N % vec:
        raise ValueError(f"vec: expected a divisor of N={N}, got {cfg['vec']}")
    nv = N // vec
    L = int(cfg["lanes_per_row"])
    if L not in (1, 2, 4, 8, 16, 32):
        raise ValueError(f"lanes_per_row: expected a power of two <= 32, got {L}")
    L = min(L, _pow2_floor(nv))             # never more lanes than vectors in a row
    cv = _cdiv(nv, L)
    RP = T // L
    if not isinstance(cfg.get("pdl", False), bool):
        raise ValueError(f"pdl: expected True or False, got {cfg['pdl']!r}")
    tile_p = int(cfg["tile_p"])
    if tile_p < 1:
        raise ValueError(f"tile_p: expected >= 1, got {tile_p}")
    rpt = max(1, _cdiv(min(tile_p, P), RP))  # rows per thread per chunk
    tile_p = rpt * RP
    return dict(T=T, num_warps=nw, vec=vec, nv=nv, L=L, cv=cv, RP=RP, rpt=rpt, tile_p=tile_p,
                nch=_cdiv(P, tile_p))


def smem_bytes(spec: ScanSpec, cfg: dict) -> int:
    """Shared memory of one CTA (cos/sin, theta, qh/kh/kprev, the per-row coefficients, y, and
    the norm's partial sums), each buffer 16-byte aligned."""
    R, N, P, A = spec.rank, spec.d_state, spec.head_dim, spec.n_angles
    a16 = lambda n: -(-4 * n // 16) * 16
    return (2 * a16(N // 2) + a16(max(A, 1)) + 3 * a16(R * N) + 3 * a16(R * P)
            + a16(int(cfg["num_warps"]) * R))


def default_config(spec: ScanSpec, batch_heads: int = 0, sms: int = 132) -> dict:
    """16-byte vectors, 8 lanes per state row (16 for rows of >= 64 vectors, and for SISO with
    N >= 128), up to 4 warps (fewer when P is small), and the whole P x N tile in one chunk when that is <= 64 fp32
    values per thread, else chunks of <= 32 (double-buffered). MIMO with a 2-byte state:
    8-byte vectors and a register cap for 4 CTAs per SM (min_ctas). MIMO with an fp32 state and
    B * H CTAs that make one wave at 4 CTAs per SM but not at the default's 3 (batch_heads in
    (3 sms, 4 sms]; 0: unknown): 4 lanes per row, which fits in 128 registers (no spill)."""
    P = spec.head_dim
    vec = max_vec(spec)
    capped = spec.rank > 1 and spec.state_dtype != "float32"
    if capped:
        vec = min(vec, 4)   # 8-byte vectors: the fp32 geometry, 126 registers, no spill under the cap
    nv = spec.d_state // vec
    L = 16 if nv >= 64 else min(8, _pow2_floor(nv))
    if spec.rank == 1 and spec.d_state >= 128 and nv >= 16:
        # SISO: 16 lanes per row. H100, H=32 N=128 P=64 (results/step_lanes_h100_9e722ff.json),
        # fp32 state B = 64 / 256 / 1024: 51.5 -> 50.6, 193.2 -> 189.9, 753.7 -> 743.2 us
        # (upstream's kernel 53.3 / 192.3 / 747.4), bf16 state 102.3 -> 100.8 at B = 256; a tie
        # at B <= 16. MIMO keeps 8 (16 lanes: +12-14 % at B >= 64).
        L = 16
    if spec.rank > 1 and not capped and L == 8 and 3 * sms < batch_heads <= 4 * sms:
        # one wave instead of 1.3: H100, R=4 H=32 N=128 P=64, B=16 (512 CTAs): 18.6 -> 16.8 us
        # (upstream's kernel 16.5); at B = 1 it is slower (4.3 -> 5.4), at B >= 64 a tie
        # (results/step_l4_h100_3f10749.json)
        L = 4
    cv = _cdiv(nv, L)
    nw = min(4, _pow2_floor(_cdiv(P * L, 32)))
    RP = 32 * nw // L
    f = cv * vec
    rpt = _cdiv(P, RP)
    if rpt * f > 64:
        rpt = max(1, 32 // f)
    cfg = {"num_warps": nw, "lanes_per_row": L, "vec": vec, "tile_p": rpt * RP}
    if capped:
        # MIMO with a 2-byte state: 4 CTAs per SM (registers capped at 128; with 8-byte vectors
        # the kernel fits in 126, no spill). H100, R=4 H=32 N=128 P=64, bf16 state
        # (results/step_variants_h100_call{1,2}.json): B=64 41.3 -> 35.5 us, B=256 135.0 ->
        # 118.9, B=1024 511 -> 451 (16-byte vectors + cap: 126-130 / 471-483). With an fp32
        # state the cap loses 1-5 %, so fp32 keeps 147 registers and 3 CTAs per SM.
        cfg["min_ctas"] = 4
    return cfg


def config_space(spec: ScanSpec) -> list:
    """The tuning knobs: warps {2,4,8} x lanes per row {4,8,16,32} x rows per chunk (the whole
    P when that is <= 64 fp32 state values per thread, and half of that as a double-buffered
    chunk), 16-byte vectors; deduplicated by the derived geometry (and register cap), the
    default first (with its min_ctas, then the same geometry without it; MIMO with an fp32
    state: the default, then the same geometry capped for 4 CTAs per SM). No `pdl` candidates:
    the tuner times steps back to back, where PDL wins and a decode loop does not (module doc)."""
    out, seen = [], set()
    vec = max_vec(spec)
    P = spec.head_dim
    cands = [default_config(spec)]
    for nw in (2, 4, 8):
        for L in (4, 8, 16, 32):
            g = geometry(spec, {"num_warps": nw, "lanes_per_row": L, "vec": vec, "tile_p": P})
            f = g["cv"] * g["vec"]
            full = _cdiv(P, g["RP"])
            for rpt in (full, full // 2):
                if rpt >= 1 and rpt * f * (1 if rpt == full else 2) <= 64:
                    cands.append({"num_warps": nw, "lanes_per_row": g["L"], "vec": vec, "tile_p": rpt * g["RP"]})
    d = cands[0]
    if d.get("min_ctas"):   # the default's geometry without the register cap, as a candidate too
        cands.insert(1, {k: v for k, v in d.items() if k != "min_ctas"})
    elif spec.rank > 1:   # fp32-state MIMO: the default with the 4-CTA cap (one wave of 512 CTAs
        cands.insert(1, dict(d, min_ctas=4))   # at B = 16, H = 32; not yet timed at small B)
    for cfg in cands:
        g = geometry(spec, cfg)
        key = (g["T"], g["L"], g["vec"], g["tile_p"], cfg.get("min_ctas", 0))
        if key in seen:
            continue
        seen.add(key)
        c = {"num_warps": g["num_warps"], "lanes_per_row": g["L"], "vec": g["vec"], "tile_p": g["tile_p"]}
        if cfg.get("min_ctas"):
            c["min_ctas"] = cfg["min_ctas"]
        out.append(c)
    return out


# ------------------------------------------------------------------------------------------
# the kernel

class Mamba3StepKernel:
    """One compiled decode step for a (spec, config, H, G, has_state_indices, ssm alignment)."""

    def __init__(self, spec: ScanSpec, cfg: dict, nheads: int, ngroups: int, has_idx: bool,
                 align_bytes: int = 16):
        geo = geometry(spec, cfg, align_bytes)
        self.spec = spec
        self.N, self.P, self.R, self.A = spec.d_state, spec.head_dim, spec.rank, spec.n_angles
        self.NH = spec.d_state // 2
        self.interleaved = spec.pairing == "interleaved"
        self.euler = spec.discretization == "euler"
        self.mode = spec.output_mode
        self.eps = float(spec.norm_eps)
        self.H, self.G = int(nheads), int(ngroups)
        self.HG = self.H // self.G
        self.has_idx = bool(has_idx)
        self.in_dtype = CUTE_DTYPES[spec.input_dtype]
        self.st_dtype = CUTE_DTYPES[spec.state_dtype]
        self.align_bytes = int(align_bytes)
        for k, v in geo.items():
            setattr(self, k, v)
        self.min_ctas = int(cfg.get("min_ctas", 0) or 0)
        self.pdl = bool(cfg.get("pdl", False))

    # ---------------------------------------------------------------- host side (jit)
    @cute.jit
    def __call__(self, mQ: cute.Tensor, mK: cute.Tensor, mV: cute.Tensor, mZ, mAdt: cute.Tensor,
                 mDt: cute.Tensor, mTrap, mAng, mQb: cute.Tensor, mKb: cute.Tensor, mD, mMv, mMz,
                 mMo, mW, mAngIn, mSsmIn: cute.Tensor, mKIn: cute.Tensor, mVIn: cute.Tensor,
                 mAngOut, mSsmOut: cute.Tensor, mKOut: cute.Tensor, mVOut: cute.Tensor, mIdx,
                 mOut: cute.Tensor, stream):
        self.kernel(mQ, mK, mV, mZ, mAdt, mDt, mTrap, mAng, mQb, mKb, mD, mMv, mMz, mMo, mW,
                    mAngIn, mSsmIn, mKIn, mVIn, mAngOut, mSsmOut, mKOut, mVOut, mIdx, mOut).launch(
            grid=[self.H, mV.shape[0], 1], block=[self.T, 1, 1], stream=stream, use_pdl=self.pdl,
            **self._occupancy())

    def _occupancy(self) -> dict:
        """Launch attributes of the register cap (min_ctas > 1): minctasm. The carveout is given
        so the DSL does not query a device for it (an AOT build has none); 25 % of the SM's
        shared memory holds far more than min_ctas CTAs of this kernel (a few KB each)."""
        if self.min_ctas <= 1:
            return {}
        return dict(min_blocks_per_mp=self.min_ctas, preferred_smem_carveout=25)

    # ---------------------------------------------------------------- device side
    # Bounds tests are written `static or dynamic` with a plain Python bool first, never
    # `const_expr(static) or dynamic`: quack (imported by other CuTe kernels in a process)
    # rewrites that form process-wide in a way this kernel's variables do not survive
    # (tests/test_cute_step_compile.py::test_no_mixed_constexpr_if).
    @cute.kernel
    def kernel(self, mQ: cute.Tensor, mK: cute.Tensor, mV: cute.Tensor, mZ, mAdt: cute.Tensor,
               mDt: cute.Tensor, mTrap, mAng, mQb: cute.Tensor, mKb: cute.Tensor, mD, mMv, mMz,
               mMo, mW, mAngIn, mSsmIn: cute.Tensor, mKIn: cute.Tensor, mVIn: cute.Tensor,
               mAngOut, mSsmOut: cute.Tensor, mKOut: cute.Tensor, mVOut: cute.Tensor, mIdx,
               mOut: cute.Tensor):
        if const_expr(self.pdl):
            cute.arch.griddepcontrol_wait()              # the previous grid is done: read anything
            cute.arch.griddepcontrol_launch_dependents()  # the next step may launch now
        tid, _, _ = cute.arch.thread_idx()
        h, b, _ = cute.arch.block_idx()
        m = cutlass.Int64(b)            # pool row; 64-bit: M * H * P * N may pass 2^31
        live = True
        if const_expr(self.has_idx):
            m = cutlass.Int64(mIdx[b])
            live = m >= 0 and m < mSsmIn.shape[0]
        if live:
            self.body(tid, b, h, m, mQ, mK, mV, mZ, mAdt, mDt, mTrap, mAng, mQb, mKb, mD, mMv,
                      mMz, mMo, mW, mAngIn, mSsmIn, mKIn, mVIn, mAngOut, mSsmOut, mKOut, mVOut,
                      mOut)
        else:
            self.zero_out(tid, b, h, mOut)

    @cute.jit
    def zero_out(self, tid, b, h, mOut: cute.Tensor):
        """Padding slot: output row(s) = 0, no state touched."""
        for k in cutlass.range_constexpr(_cdiv(self.P, self.T)):
            p = tid + k * self.T
            if (k + 1) * self.T <= self.P or p < self.P:
                if const_expr(self.mode == "per_rank"):
                    for r in cutlass.range_constexpr(self.R):
                        mOut[b, r, h, p] = Float32(0.0).to(mOut.element_type)
                else:
                    mOut[b, h, p] = Float32(0.0).to(mOut.element_type)

    @cute.jit
    def load_chunk(self, ch: cutlass.Constexpr, rg, c, m, h, mSsmIn: cute.Tensor):
        """Issue the vector loads of this thread's part of row chunk `ch` (no wait)."""
        buf = []
        for i in cutlass.range_constexpr(self.rpt):
            row = []
            for j in cutlass.range_constexpr(self.cv):
                row.append(cute.make_rmem_tensor((self.vec,), self.st_dtype))
            buf.append(row)
        for i in cutlass.range_constexpr(self.rpt):
            p = ch * self.tile_p + rg + self.RP * i
            lo = ch * self.tile_p + self.RP * i
            if const_expr(lo < self.P):
                if lo + self.RP <= self.P or p < self.P:
                    gRow = mSsmIn[m, h, p, None]
                    for j in cutlass.range_constexpr(self.cv):
                        vi = c + self.L * j
                        if self.L * (j + 1) <= self.nv or vi < self.nv:
                            cute.autovec_copy(cute.local_tile(gRow, (self.vec,), (vi,)), buf[i][j])
        return buf

    @cute.jit
    def body(self, tid, b, h, m, mQ: cute.Tensor, mK: cute.Tensor, mV: cute.Tensor, mZ,
             mAdt: cute.Tensor, mDt: cute.Tensor, mTrap, mAng, mQb: cute.Tensor,
             mKb: cute.Tensor, mD, mMv, mMz, mMo, mW, mAngIn, mSsmIn: cute.Tensor,
             mKIn: cute.Tensor, mVIn: cute.Tensor, mAngOut, mSsmOut: cute.Tensor,
             mKOut: cute.Tensor, mVOut: cute.Tensor, mOut: cute.Tensor):
        N, P, R, A, NH, T = self.N, self.P, self.R, self.A, self.NH, self.T
        KA, KP, KU = _cdiv(NH, T), _cdiv(P, T), _cdiv(R * NH, T)
        g = h // self.HG
        rg = tid // self.L          # row group
        c = tid % self.L            # lane within the row

        # 1. every global load is issued before the first use of any: the ssm state of chunk 0
        #    first, then the small operands into registers (one DRAM round trip for the CTA).
        bufs = [self.load_chunk(0, rg, c, m, h, mSsmIn)]
        adt = Float32(mAdt[b, h])
        dt = Float32(mDt[b, h])
        trap = Float32(0.0)
        if const_expr(not self.euler):
            trap = Float32(mTrap[b, h])
        dd = Float32(0.0)
        if const_expr(mD is not None):
            dd = Float32(mD[h])
        # angles: thread j < A owns angle j (read here, written after barrier A)
        raw = cute.make_rmem_tensor((KA,), Float32)
        th0 = cute.make_rmem_tensor((KA,), Float32)
        for k in cutlass.range_constexpr(KA):
            j = tid + k * T
            raw[k] = Float32(0.0)
            th0[k] = Float32(0.0)
            if const_expr(A > 0 and k * T < A):
                if (k + 1) * T <= A or j < A:
                    if const_expr(self.spec.shared_angles):
                        raw[k] = Float32(mAng[b, j])
                    else:
                        raw[k] = Float32(mAng[b, h, j])
                    th0[k] = Float32(mAngIn[m, h, j])
        # rows: thread p owns v[p], vprev[p] and the output row p (p = tid + k T)
        vv = cute.make_rmem_tensor((KP,), Float32)
        vp = cute.make_rmem_tensor((KP,), Float32)
        zz = cute.make_rmem_tensor((KP,), Float32)
        ww = cute.make_rmem_tensor((KP,), Float32)
        mv = cute.make_rmem_tensor((KP, R), Float32)
        mz = cute.make_rmem_tensor((KP, R), Float32)
        mo = cute.make_rmem_tensor((KP, R), Float32)
        for k in cutlass.range_constexpr(KP):
            p = tid + k * T
            vv[k] = Float32(0.0)
            vp[k] = Float32(0.0)
            zz[k] = Float32(0.0)
            ww[k] = Float32(1.0)
            for r in cutlass.range_constexpr(R):
                mv[k, r] = Float32(1.0)
                mz[k, r] = Float32(1.0)
                mo[k, r] = Float32(1.0)
            if (k + 1) * T <= P or p < P:
                vv[k] = Float32(mV[b, h, p])
                vp[k] = Float32(mVIn[m, h, p])
                if const_expr(mZ is not None):
                    zz[k] = Float32(mZ[b, h, p])
                if const_expr(mW is not None):
                    ww[k] = Float32(mW[h, p])
                for r in cutlass.range_constexpr(R):
                    if const_expr(mMv is not None):
                        mv[k, r] = Float32(mMv[h, r, p])
                    if const_expr(mMz is not None):
                        mz[k, r] = Float32(mMz[h, r, p])
                    if const_expr(mMo is not None):
                        mo[k, r] = Float32(mMo[h, r, p])
        # q/k units: unit u = (rank r, pair j) owns elements i0, i1 of q, k and the k state
        qk = cute.make_rmem_tensor((KU, 6), Float32)   # q'0, q'1, k'0, k'1, kprev0, kprev1
        for k in cutlass.range_constexpr(KU):
            u = tid + k * T
            for e in cutlass.range_constexpr(6):
                qk[k, e] = Float32(0.0)
            if (k + 1) * T <= R * NH or u < R * NH:
                r = u // NH
                j = u - r * NH
                i0 = j
                i1 = j + NH
                if const_expr(self.interleaved):
                    i0 = 2 * j
                    i1 = 2 * j + 1
                qk[k, 0] = Float32(mQ[b, r, g, i0]) + Float32(mQb[h, r, i0])
                qk[k, 1] = Float32(mQ[b, r, g, i1]) + Float32(mQb[h, r, i1])
                qk[k, 2] = Float32(mK[b, r, g, i0]) + Float32(mKb[h, r, i0])
                qk[k, 3] = Float32(mK[b, r, g, i1]) + Float32(mKb[h, r, i1])
                qk[k, 4] = Float32(mKIn[m, r, h, i0])
                qk[k, 5] = Float32(mKIn[m, r, h, i1])

        smem = cutlass.memory.SmemAllocator()   # (cutlass.utils.SmemAllocator: deprecated in 4.8)
        sCos = smem.allocate_tensor(Float32, cute.make_layout(NH), byte_alignment=16)
        sSin = smem.allocate_tensor(Float32, cute.make_layout(NH), byte_alignment=16)
        sTh = smem.allocate_tensor(Float32, cute.make_layout(max(A, 1)), byte_alignment=16)
        rn = cute.make_ordered_layout((R, N), order=(1, 0))
        rp = cute.make_ordered_layout((R, P), order=(1, 0))
        sQh = smem.allocate_tensor(Float32, rn, byte_alignment=16)
        sKh = smem.allocate_tensor(Float32, rn, byte_alignment=16)
        sKp = smem.allocate_tensor(Float32, rn, byte_alignment=16)
        sCg = smem.allocate_tensor(Float32, rp, byte_alignment=16)   # gamma * v * mv_r
        sCb = smem.allocate_tensor(Float32, rp, byte_alignment=16)   # beta * vprev * mv_r
        sY = smem.allocate_tensor(Float32, rp, byte_alignment=16)    # S' qh_r
        sRed = smem.allocate_tensor(Float32, cute.make_ordered_layout((self.num_warps, R), order=(1, 0)),
                                    byte_alignment=16)

        # 2. discretization scalars
        alpha = cute.math.exp(adt)
        lam = Float32(1.0)
        if const_expr(not self.euler):
            lam = Float32(1.0) / (Float32(1.0) + cute.math.exp(-trap))
        beta = alpha * dt * (Float32(1.0) - lam)
        gamma = dt * lam

        # 3. angles -> cos/sin per pair (identity for pairs >= A); per-row coefficients
        for k in cutlass.range_constexpr(KA):
            j = tid + k * T
            if (k + 1) * T <= NH or j < NH:
                cs = Float32(1.0)
                sn = Float32(0.0)
                if const_expr(A > 0 and k * T < A):
                    if j < A:
                        x = th0[k] + Float32(_PI) * cute.math.tanh(raw[k]) * dt
                        th = x - Float32(_TWO_PI) * cute.math.floor(x * Float32(_INV_TWO_PI))
                        if th >= Float32(_TWO_PI):
                            th = th - Float32(_TWO_PI)
                        if th < Float32(0.0):
                            th = Float32(0.0)
                        sTh[j] = th
                        cs = cute.math.cos(th)
                        sn = cute.math.sin(th)
                sCos[j] = cs
                sSin[j] = sn
        for k in cutlass.range_constexpr(KP):
            p = tid + k * T
            if (k + 1) * T <= P or p < P:
                for r in cutlass.range_constexpr(R):
                    sCg[r, p] = gamma * vv[k] * mv[k, r]
                    sCb[r, p] = beta * vp[k] * mv[k, r]
        cute.arch.sync_threads()   # (A) every read of the angle / v / k states is done

        # 4. rotated q, k to smem; new angle, v states
        for k in cutlass.range_constexpr(KU):
            u = tid + k * T
            if (k + 1) * T <= R * NH or u < R * NH:
                r = u // NH
                j = u - r * NH
                i0 = j
                i1 = j + NH
                if const_expr(self.interleaved):
                    i0 = 2 * j
                    i1 = 2 * j + 1
                cs = sCos[j]
                sn = sSin[j]
                sQh[r, i0] = qk[k, 0] * cs - qk[k, 1] * sn
                sQh[r, i1] = qk[k, 0] * sn + qk[k, 1] * cs
                sKh[r, i0] = qk[k, 2] * cs - qk[k, 3] * sn
                sKh[r, i1] = qk[k, 2] * sn + qk[k, 3] * cs
                sKp[r, i0] = qk[k, 4]
                sKp[r, i1] = qk[k, 5]
        if const_expr(A > 0):
            for k in cutlass.range_constexpr(_cdiv(A, T)):
                j = tid + k * T
                if (k + 1) * T <= A or j < A:
                    mAngOut[m, h, j] = sTh[j]
        for k in cutlass.range_constexpr(KP):
            p = tid + k * T
            if (k + 1) * T <= P or p < P:
                mVOut[m, h, p] = vv[k].to(mVOut.element_type)
        cute.arch.sync_threads()   # (B) qh, kh, kprev ready
        for k in cutlass.range_constexpr(_cdiv(R * N, T)):
            e = tid + k * T
            if (k + 1) * T <= R * N or e < R * N:
                r = e // N
                n = e - r * N
                mKOut[m, r, h, n] = sKh[r, n]

        # 5. the state tile: S' = alpha S + sum_r cb_r kprev_r^T + cg_r kh_r^T; y_r += S' qh_r
        for ch in cutlass.range_constexpr(self.nch):
            if const_expr(ch + 1 < self.nch):
                bufs.append(self.load_chunk(ch + 1, rg, c, m, h, mSsmIn))
            self.update_chunk(ch, rg, c, m, h, alpha, bufs[ch], sKp, sKh, sQh, sCg, sCb, sY,
                              mSsmOut)
        cute.arch.sync_threads()   # (C) sY complete

        # 6. output
        self.epilogue(tid, b, h, dd, vv, zz, ww, mv, mz, mo, sY, sRed, mOut)

    @cute.jit
    def update_chunk(self, ch: cutlass.Constexpr, rg, c, m, h, alpha, buf, sKp: cute.Tensor,
                     sKh: cute.Tensor, sQh: cute.Tensor, sCg: cute.Tensor, sCb: cute.Tensor,
                     sY: cute.Tensor, mSsmOut: cute.Tensor):
        R, vec, rpt = self.R, self.vec, self.rpt
        # per-row coefficients (rows this thread owns in the chunk)
        cg = cute.make_rmem_tensor((rpt, R), Float32)
        cb = cute.make_rmem_tensor((rpt, R), Float32)
        acc = cute.make_rmem_tensor((rpt, R), Float32)
        for i in cutlass.range_constexpr(rpt):
            p = ch * self.tile_p + rg + self.RP * i
            pc = cutlass.min(p, self.P - 1)            # clamp: padded rows compute garbage-free zeros
            for r in cutlass.range_constexpr(R):
                cg[i, r] = sCg[r, pc]
                cb[i, r] = sCb[r, pc]
                acc[i, r] = Float32(0.0)
        kp = cute.make_rmem_tensor((vec,), Float32)
        kh = cute.make_rmem_tensor((vec,), Float32)
        qh = cute.make_rmem_tensor((R, vec), Float32)
        sv = cute.make_rmem_tensor((vec,), Float32)
        so = cute.make_rmem_tensor((vec,), self.st_dtype)
        for j in cutlass.range_constexpr(self.cv):
            vi = c + self.L * j
            if self.L * (j + 1) <= self.nv or vi < self.nv:
                for r in cutlass.range_constexpr(R):
                    cute.autovec_copy(cute.local_tile(sQh[r, None], (vec,), (vi,)), qh[r, None])
                for i in cutlass.range_constexpr(rpt):
                    lo = ch * self.tile_p + self.RP * i
                    if const_expr(lo < self.P):
                        sv.store(buf[i][j].load().to(Float32) * alpha)
                        for r in cutlass.range_constexpr(R):
                            cute.autovec_copy(cute.local_tile(sKp[r, None], (vec,), (vi,)), kp)
                            cute.autovec_copy(cute.local_tile(sKh[r, None], (vec,), (vi,)), kh)
                            sv.store(sv.load() + kp.load() * cb[i, r] + kh.load() * cg[i, r])
                        for r in cutlass.range_constexpr(R):
                            acc[i, r] = acc[i, r] + (sv.load() * qh[r, None].load()).reduce(
                                cute.ReductionOp.ADD, Float32(0.0), 0)
                        p = ch * self.tile_p + rg + self.RP * i
                        if lo + self.RP <= self.P or p < self.P:
                            so.store(sv.load().to(self.st_dtype))
                            cute.autovec_copy(so, cute.local_tile(mSsmOut[m, h, p, None], (vec,), (vi,)))
        # reduce over the L lanes of each row, lane 0 of the row writes sY
        for i in cutlass.range_constexpr(rpt):
            lo = ch * self.tile_p + self.RP * i
            if const_expr(lo < self.P):
                for r in cutlass.range_constexpr(R):
                    x = acc[i, r]
                    for s in cutlass.range_constexpr(int(math.log2(self.L))):
                        x = x + cute.arch.shuffle_sync_bfly(x, offset=self.L >> (s + 1))
                    acc[i, r] = x
                p = ch * self.tile_p + rg + self.RP * i
                if c == 0:
                    if lo + self.RP <= self.P or p < self.P:
                        for r in cutlass.range_constexpr(R):
                            sY[r, p] = acc[i, r]

    @cute.jit
    def epilogue(self, tid, b, h, dd, vv, zz, ww, mv, mz, mo, sY: cute.Tensor, sRed: cute.Tensor,
                 mOut: cute.Tensor):
        """y_r = S' qh_r + D v mv_r, then the output mode (thread p = tid + k T owns row p)."""
        P, R, T = self.P, self.R, self.T
        KP = _cdiv(P, T)
        norm = const_expr(self.mode == "norm_reduce")
        gated = const_expr(self.spec.has_z)
        rstd = cute.make_rmem_tensor((R,), Float32)
        for r in cutlass.range_constexpr(R):
            rstd[r] = Float32(1.0)
        if const_expr(norm):
            sq = cute.make_rmem_tensor((R,), Float32)
            for r in cutlass.range_constexpr(R):
                sq[r] = Float32(0.0)
            for k in cutlass.range_constexpr(KP):
                p = tid + k * T
                if (k + 1) * T <= P or p < P:
                    for r in cutlass.range_constexpr(R):
                        y = sY[r, p] + dd * vv[k] * mv[k, r]
                        sq[r] = sq[r] + y * y
            lane = cute.arch.lane_idx()
            warp = tid // 32
            for r in cutlass.range_constexpr(R):
                x = sq[r]
                for s in cutlass.range_constexpr(5):
                    x = x + cute.arch.shuffle_sync_bfly(x, offset=16 >> s)
                if lane == 0:
                    sRed[warp, r] = x
            cute.arch.sync_threads()
            for r in cutlass.range_constexpr(R):
                tot = Float32(0.0)
                for w in cutlass.range_constexpr(self.num_warps):
                    tot = tot + sRed[w, r]
                rstd[r] = cute.math.rsqrt(tot * Float32(1.0 / P) + Float32(self.eps))
        for k in cutlass.range_constexpr(KP):
            p = tid + k * T
            if (k + 1) * T <= P or p < P:
                o = Float32(0.0)
                for r in cutlass.range_constexpr(R):
                    y = sY[r, p] + dd * vv[k] * mv[k, r]
                    if const_expr(norm):
                        y = y * rstd[r] * ww[k]
                    if const_expr(gated):
                        u = zz[k] * mz[k, r]
                        y = y * (u / (Float32(1.0) + cute.math.exp(-u)))
                    if const_expr(self.mode == "per_rank"):
                        mOut[b, r, h, p] = y.to(mOut.element_type)
                    else:
                        o = o + y * mo[k, r]
                if const_expr(self.mode != "per_rank"):
                    mOut[b, h, p] = o.to(mOut.element_type)


# ------------------------------------------------------------------------------------------
# compilation (fake tensors, symbolic B and M) and the Python wrapper

_cache: dict = {}


def _fake_args(spec: ScanSpec, H: int, G: int, has_idx: bool, align_bytes: int):
    """Fake tensors in the kernel's argument order: static everything but B and M."""
    from cutlass.cute.runtime import make_fake_compact_tensor, make_fake_stream
    R, N, P, A = spec.rank, spec.d_state, spec.head_dim, spec.n_angles
    B, M = cute.sym_int(), cute.sym_int64()   # M * H * P * N may pass 2^31
    idt, sdt, f32 = CUTE_DTYPES[spec.input_dtype], CUTE_DTYPES[spec.state_dtype], cutlass.Float32

    def t(dtype, shape, align=None):
        return make_fake_compact_tensor(dtype, shape, stride_order=tuple(range(len(shape) - 1, -1, -1)),
                                        assumed_align=align)

    trap = t(f32, (B, H)) if spec.discretization == "trapezoidal" else None
    ang = None
    if A:
        ang = t(f32, (B, A)) if spec.shared_angles else t(f32, (B, H, A))
    proj = lambda on: t(f32, (H, R, P)) if on else None
    out = t(idt, (B, R, H, P)) if spec.output_mode == "per_rank" else t(idt, (B, H, P))
    args = [
        t(idt, (B, R, G, N)), t(idt, (B, R, G, N)), t(idt, (B, H, P)),
        t(idt, (B, H, P)) if spec.has_z else None,
        t(f32, (B, H)), t(f32, (B, H)), trap, ang,
        t(f32, (H, R, N)), t(f32, (H, R, N)),
        t(f32, (H,)) if spec.has_d else None,
        proj(spec.has_mimo_v), proj(spec.has_mimo_z), proj(spec.has_mimo_out),
        t(f32, (H, P)) if spec.output_mode == "norm_reduce" else None,
    ]
    states = lambda: [t(f32, (M, H, A)) if A else None, t(sdt, (M, H, P, N), align_bytes),
                      t(f32, (M, R, H, N)), t(idt, (M, H, P))]
    args += states() + states()
    args += [t(cutlass.Int32, (B,)) if has_idx else None, out]
    return args + [make_fake_stream(use_tvm_ffi_env_stream=True)]


def build(spec: ScanSpec, cfg: dict, H: int, G: int, has_idx: bool, align_bytes: int = 16,
          options: str = "--enable-tvm-ffi"):
    """cute.compile the kernel for these static sizes (no GPU needed with --gpu-arch)."""
    op = Mamba3StepKernel(spec, cfg, H, G, has_idx, align_bytes)
    return cute.compile(op, *_fake_args(spec, H, G, has_idx, align_bytes), options=options)


def run(spec: ScanSpec, cfg: dict, t) -> None:
    """Launch the decode step on a StepTensors bundle (writes t.out and t.state_out).
    Kept lean: it is the per-token host cost (a dict lookup and one TVM-FFI call)."""
    v = t.v
    if v.shape[0] == 0:
        return
    si, so = t.state_in, t.state_out
    a = (si.ssm.data_ptr() | so.ssm.data_ptr()) & 15
    align = 16 if a == 0 else (a & -a)
    key = (spec, cfg["num_warps"], cfg["lanes_per_row"], cfg["vec"], cfg["tile_p"], cfg.get("min_ctas", 0),
           cfg.get("pdl", False), v.shape[1], t.q.shape[2], t.state_indices is not None, align)
    fn = _cache.get(key)
    if fn is None:
        fn = _cache[key] = build(spec, cfg, v.shape[1], t.q.shape[2], t.state_indices is not None, align)
    A = spec.n_angles
    trap = t.trap if spec.discretization == "trapezoidal" else None
    fn(t.q, t.k, t.v, t.z, t.adt, t.dt, trap, t.angles if A else None, t.q_bias, t.k_bias, t.d,
       t.mimo_v, t.mimo_z, t.mimo_out, t.norm_weight,
       si.angle if A else None, si.ssm, si.k, si.v,
       so.angle if A else None, so.ssm, so.k, so.v,
       t.state_indices, t.out)
