"""Triton chunked-scan forward (prefill): configs, launch, AOT build. SPEC §2, §3, §7, §8.

The forward is a split-sequence scan over segments of SEG chunks of C tokens (SEGLEN tokens):

  phase 1  preprocess       (scan_common.py)  bias, rotary angles, gamma / scale, decays:
                                              recomputed on the fly per chunk; only gamma and
                                              beta are stored, by the scan_gates prologue
                                              (config GATES, default)
  phase 2  chunk states     (scan_chunk_state.py)    grid (H * P-blocks, segment slots)
           every segment's local state from zero, in the segment's own rotary frame
  phase 3  state passing    (scan_state_passing.py)  grid (H * P-blocks, sequences)
           entry state of every segment (sequential over the few segments of a sequence);
           initial states in (with their pending beta term), final states out
  phase 4  chunk outputs    (scan_chunk_output.py)   grid (H * P-blocks, segment slots)
           each program walks its segment's chunks with the state in registers

With SEG = 1 this is Mamba-2's SSD (chunk states, state passing, chunk outputs); larger SEG
trades parallelism for less state traffic: the P x N scratch states are written and read once
per segment, not per chunk. Every (batch, head, segment) is a program, so the GPU fills even
when B * H is small (B = 1, H = 32, L = 16384: 512 programs with SEGLEN = 1024).

Phases 2 and 3 are skipped when no segment has a predecessor and no final states are asked
for (every sequence fits in one segment); phase 3 alone runs for initial states then.

Config keys (`default_config`, `space`):
  CHUNK        tokens per chunk C (rows per chunk = C * pow2(R); 64 rows by default)
  SEG          chunks per segment
  BLOCK_P      columns of P per program in phases 2 and 4 (norm_reduce: the whole head)
  PASS_BLOCK_P rows of the state per program in phase 3
  num_warps (phase 4), state_num_warps (phase 2), pass_num_warps (phase 3), num_stages,
  maxnreg      optional register cap of phase 4 (tuning only: it trades spills for occupancy)
  AP_FULL      trig over all N/2 pairs instead of pow2(A) widened (tuning experiment)
  PREFETCH     phase 4: 0 loads each chunk's inputs in their turn, 1 issues them all one chunk
               ahead, 2 only the q / k / v / z tiles, 3 all but z (z, used last, is issued first
               in the chunk's own turn) (software pipelining by hand; the chunk loops are
               latency-bound). Default 3 for SISO N = 128, 1 for MIMO and N <= 64 (`_prefetch`;
               H100, triton 3.6, spill-free there:
               bench/results/scan_fwd_prefetch3_exact_diag_h100_9ca070c.json, with EXACT_DIAG
               off: SISO B4 L4096 0.464 -> 0.423 ms, B8 L2048 0.397 -> 0.362, B1 L16384 0.517
               -> 0.486; 1: 0.443 / 0.368 / 0.492); where a build spills (triton 3.9 spills 3
               and 1 at N = 128) the spill guard steps down 3 -> 2 -> 0
  STATE_PREFETCH  the same (all loads) in phase 2
  STATE_CHUNK  tokens per chunk of phase 2 (its outputs do not depend on it; default 2 C: 32 rows)
  STATE_SPLIT  phases 2-3 on sub-segments, this many per segment (more phase-2 programs for the
               same work; phase 4 reads every STATE_SPLIT-th entry state; 1 with ELL)
  GATES        a prologue kernel (scan_common.scan_gates_kernel) writes gamma = dt lam and
               beta = dt (1 - lam) per (b, h, t); phases 2 and 4 read them instead of dt / trap of
               the token and the next one and compute no sigmoid
  BIAS_RELOAD  phase 4 re-reads the q / k biases per chunk (L1 hits) instead of holding them in
               registers across the loop (what makes the pipelined load orders fit)
  EXACT_DIAG   phase 4 takes the same-step terms q'.k' (the trapezoid's diagonal) in fp32 from the
               unrotated biased pairs instead of from the bf16 rotated operands: where q'.k' is
               small against |q'||k'| the bf16 rounding cancels it away, and the pre-gate norm
               (scale-invariant) turns that into O(1) output errors (token 0 of a sequence
               without initial states holds nothing else). fp32 inputs need no help. Default for
               SISO with the norm (one fp32 row dot per token, spill-free); without the norm the
               rounding stays a small absolute error (H100, SISO reduce: rel_l2 2.33e-3 ->
               2.34e-3, rel_max unchanged; upstream 2.44e-3) and the dot costs 6 % of phase 4's
               loop, so there it is off; MIMO needs every rank pair of a step
               (three bf16 hi/lo tensor-core products) and spills at 255 registers on the AOT
               grid, so there it is a tuning knob and MIMO keeps upstream's precision (bf16
               operands of the same-step q'.k').
  ELL          phase 2 stores every token's segment-relative angles (fp32, (B, H, L, A)) and
               phase 4 reads them (no tanh / cumsum there); measured slower overall (phase 2 pays
               more than phase 4 saves), kept for tuning
  SPILL_GUARD  (default True) the software-pipelined load orders (PREFETCH 3 / 2 in phase 4,
               STATE_PREFETCH in phase 2) sit at the edge of the register file: on some specs
               (A = N/2, per-head angles with A = N/4, A = 16 at N = 128 with D and Z) ptxas spills
               them. With the guard, the kernels are built for the call before the first launch
               (the JIT's own build, cached), and where one spills the config falls back to its
               spill-free load order (`fallback`), remembered per spec, config and tensor layout
               (`aot.Guard`, shared with the backward's guards: a guard that fails to decide
               warns and runs the config as given). The AOT test applies the same fallback;
               tuning candidates without the guard run as given. H100
               (bench/results/scan_fwd_spill_guard_h100_95699b0.json, triton 3.6, which spills
               on fewer specs than 3.9): A = 64 shared 0.751 -> 0.832 ms,
               per-head A = 64 half 0.610 -> 0.636 (the spilling orders were faster; the tuning
               space keeps them as a candidate), elsewhere no fallback.
  OUT_IMPL     phase 4's implementation: "triton" (default) or "tilelang" (opt-in, SISO bf16 N in
               {64, 128}, P = 64, reduce / per_rank, segments of whole 64-token chunks:
               backends/tilelang/scan_chunk_output.py, validated against the float64 oracle on the
               H100 but 1.6-1.7x slower there: 0.59 vs 0.356 ms at SISO B4 L4096,
               bench/results/scan_fwd_tilelang_out_h100_ff666eb.json); OUT_TL_STAGES its pipeline
               (None: 2 stages where they fit in shared memory; 1: no prefetch)
  SCRATCH      dtype of the per-segment scratch states ("bfloat16" or "float32"): they are
               GEMM operands in the input dtype anyway; fp32 inputs keep fp32 scratch.
  PMAJOR       phase 4's products with P as the rows: y^T = vt^T (sc o W)^T + e^{cs} S q^T and
               S <- e^T S + vw^T k, the state tile (P x N) a warpgroup-MMA accumulator and
               operand, instead of the rows as M (16-row mma.sync, the state converted to a B
               operand every chunk). Same math and roundings (operands in the input dtype).
  ANG_TOK / STATE_ANG_TOK  MIMO, phase 4 / phase 2: the rotary angles (tanh, in-chunk cumsum,
               cos / sin) once per token, broadcast to its rank rows, instead of once per row.
  MIMO defaults (16-bit inputs, 4 warps): PMAJOR, STATE_ANG_TOK, and for N >= 128 ANG_TOK
  with PREFETCH 2 (N <= 64: PREFETCH 1, no ANG_TOK). H100, triton 3.6, MIMO R4 graph ms
  (bench/results/scan_fwd_mimo_pmajor_angtok_h100_b6155d5.json; old default -> new):
  B4 L4096 1.883 -> 1.562, B8 L2048 1.653 -> 1.382, B1 L16384 2.172 -> 1.728, B4 L2048
  0.976 -> 0.801 (phase 2 -27 %, phase 4 -15 %); G8 N64 1.577 -> 1.448 with PMAJOR alone
  (ANG_TOK in phase 4 lost there: 1.084 -> 1.264 ms, its per-token tile is 4 x 16). SISO
  keeps the rows as M (PMAJOR 1-3 % slower there, bench/results/scan_fwd_pmajor_h100_aec7f4b.json).

What the backward can use (`forward(..., keep=True)` returns it; the backward issue decides):
  erel (slots, H, P, N)  entry state of each segment, segment frame; with tot/phi below and the
                         inputs, every chunk's state can be recomputed by one segment walk
                         (the forward's phase 4 without outputs), which is what a chunk-parallel
                         backward needs; theta0 per segment = the cumulative phi (phase 3).
  tot (slots, H)         segment decay totals;  phi (slots, H, A) segment angle totals
  lrel (slots, H, P, N)  local segment states (segment frame)
Nothing per token is saved: rotated q/k, gamma, scale and decays are cheap to recompute.
"""
from __future__ import annotations

import torch
import triton

from mamba3_kernels.spec import ScanSpec, bad_arg

from . import scan_chunk_output as _out
from . import scan_chunk_state as _cst
from . import scan_common as _com
from . import scan_state_passing as _pass
from .aot import Guard, step_down

from . import INPUT_DTYPES, STATE_DTYPES, _interpret, _pow2  # the package's

N_SM_H100 = 132


def _rp(spec) -> int:
    return _pow2(spec.rank)


def _nhp(spec) -> int:
    return max(16, _pow2(spec.d_state // 2))


def _ap(spec) -> int:
    """Width of the angle tiles: pow2(A), at least 16 (a tensor-core dot dimension)."""
    return min(_nhp(spec), max(16, _pow2(spec.n_angles)))


def supports(spec: ScanSpec):
    """(ok, reason) for the Triton forward."""
    if spec.input_dtype not in INPUT_DTYPES:
        return False, f"input dtype {spec.input_dtype} (supported: {', '.join(INPUT_DTYPES)})"
    if spec.state_dtype not in STATE_DTYPES:
        return False, f"state dtype {spec.state_dtype} (supported: {', '.join(STATE_DTYPES)})"
    if spec.d_state > 512:
        return False, f"N={spec.d_state} > 512"
    if spec.head_dim > 512:
        return False, f"P={spec.head_dim} > 512"
    if spec.rank > 16:
        return False, f"R={spec.rank} > 16"
    return True, ""


# ------------------------------------------------------------------------------------------
# configs

def _rows(spec) -> int:
    """Rows per chunk (C * pow2(R)): 16. The fp32 state, the rotated q/k pair halves, the
    scores and the output tile of one chunk live in registers together; with 32 or 64 rows
    ptxas spills on part of the grid (AOT-measured, tests/test_triton_scan_compile.py), and
    the defaults must not spill. Longer chunks are in `space` for the tuner."""
    return 16


def _chunk(spec) -> int:
    return max(1, _rows(spec) // _rp(spec))


def _norm_split(spec) -> bool:
    """norm_reduce through the fp32 per-rank scratch and the epilogue kernel when the whole
    head's state (P x N) is over 64 x 128 (one program holding it all would spill)."""
    return spec.output_mode == "norm_reduce" and max(16, _pow2(spec.head_dim)) * _pow2(spec.d_state) > 8192


def _block_p(spec) -> int:
    pp = max(16, _pow2(spec.head_dim))
    if spec.output_mode == "norm_reduce" and not _norm_split(spec):
        return pp
    # keep the fp32 state tile (BP x N) at <= 64 x 128 elements
    cap = max(16, 8192 // max(16, _pow2(spec.d_state)))
    bp = min(pp, cap)
    if bp == 32 and _nhp(spec) == 32:  # a 32 x 32 state-half tile spills (ptxas, AOT-measured)
        bp = 16
    return bp


def _warps(spec, bp: int, chunk: int) -> int:
    """Phase 4 (chunk outputs): 4 warps (H100: 4 warps ran 1.3-1.8x faster than 8 at 16-32
    rows per chunk, where 8 warps replicate the small MMA tiles); 8 where 4 spill on the AOT
    grid: N >= 256, BP >= 128, fp32 inputs, MIMO with the fused norm, R >= 8 with big states."""
    n = _pow2(spec.d_state)
    if (n >= 256 or bp >= 128 or spec.input_dtype == "float32"
            or (spec.rank > 1 and spec.output_mode == "norm_reduce")
            or (_rp(spec) >= 8 and bp * n >= 8192)):
        return 8
    return 4


def _state_warps(spec, bp: int) -> int:
    """Phase 2 (chunk states, lighter: no q, no outputs): 4 warps (H100: 1.5x faster than 8 on
    the benchmark shapes); 8 for N >= 256, fp32 inputs, and MIMO with N >= 128 and BP < 64
    (where 4 spill on the AOT grid)."""
    n = _pow2(spec.d_state)
    if n >= 256 or spec.input_dtype == "float32" or (spec.rank > 1 and n >= 128 and bp < 64):
        return 8
    return 4


def _seg(problem, progs_per_seg: int, chunk: int, resident: int = 4) -> int:
    """Chunks per segment: the longest segments (state traffic falls as 1/SEG; one segment per
    sequence skips phases 2-3 without final states) that still give enough programs
    (B * H * P-blocks * segments).

    resident = 2 (N = 128 at 4 warps: phase 4 holds 2 programs per SM): aim at one full wave,
    2 x 132 programs, never more (floor). H100 (bench/results/scan_fwd_seg_sweep_h100_*.json):
    SISO B8 L2048 0.464 -> 0.400 ms (one segment), B1 L16384 0.538 -> 0.514, B1 L65536 2.05 ->
    1.98, B4 L4096 0.516 -> 0.512; MIMO R4 B8 L2048 2.20 -> 1.76, others -1 to -2 %. Elsewhere
    (N <= 64, 8 warps, ...) the earlier rule, about four programs per SM (SISO G8 N64: 0.41 ms,
    0.43 at one wave)."""
    if problem is None:
        return 16
    nchunks = triton.cdiv(max(problem.seqlen, 1), chunk)
    progs = max(1, problem.batch * progs_per_seg)
    if resident == 2:
        nseg = max(1, 2 * N_SM_H100 // progs)
        return max(1, min(4096, _pow2(triton.cdiv(nchunks, nseg))))
    nseg = triton.cdiv(4 * N_SM_H100, progs)
    return max(1, min(64, _pow2(triton.cdiv(nchunks, nseg))))


def _state_split(spec: ScanSpec, problem, progs_per_seg: int, chunk: int, seg: int) -> int:
    """Phase 2's sub-segments per segment: 2 where phase 2 would have at most one program per SM
    (it skips each sequence's last segment without final states, so two long segments leave
    it half a wave). H100 (bench/results/scan_fwd_state_split_h100_*.json): SISO B4 L4096
    0.520 -> 0.465 ms, MIMO R4 B4 L4096 2.25 -> 2.01, B4 L2048 1.14 -> 1.02; 4 and 8 lose
    (phase 3 walks more sub-segments), and with more phase-2 programs splitting gains nothing."""
    if problem is None:
        return 1
    nseg = triton.cdiv(triton.cdiv(max(problem.seqlen, 1), chunk), seg)
    p2 = problem.batch * progs_per_seg * (nseg if spec.final_states else nseg - 1)
    return 2 if 0 < p2 <= N_SM_H100 and seg >= 2 else 1


def _slots(B: int, L: int, S: int, seglen: int, varlen: bool):
    """(segments per dense row, segment slots) of scan_common._locate's layout: dense B rows of
    cdiv(L, seglen); varlen L // seglen + S (one spare slot per sequence)."""
    nseg = triton.cdiv(L, seglen)
    return nseg, (L // seglen + S) if varlen else B * nseg


def default_config(spec: ScanSpec, problem=None) -> dict:
    C = _chunk(spec)
    bp = _block_p(spec)
    nw = _warps(spec, bp, C)
    H = problem.nheads if problem is not None else 32
    npb = triton.cdiv(spec.head_dim, bp)
    # one spill-prone corner (R >= 8 with 16-column state halves) schedules better pipelined
    stages = 2 if _rp(spec) >= 8 and bp == 16 else 1
    lean = _lean(spec, bp, nw, stages)
    mimo = lean and _rp(spec) > 1   # measured there only (see PMAJOR, ANG_TOK above)
    resident = 2 if _pow2(spec.d_state) == 128 and nw == 4 else 4
    seg = _seg(problem, H * npb, C, resident)
    return dict(CHUNK=C, SEG=seg, STATE_SPLIT=_state_split(spec, problem, H * npb, C, seg), BLOCK_P=bp,
                PASS_BLOCK_P=min(32, max(16, _pow2(spec.head_dim))), num_warps=nw, num_stages=stages,
                state_num_warps=_state_warps(spec, bp), pass_num_warps=4,
                NORM_SPLIT=_norm_split(spec),
                SCRATCH="float32" if spec.input_dtype == "float32" else "bfloat16",
                GATES=True, BIAS_RELOAD=True, PREFETCH=_prefetch(spec) if lean else 0, STATE_PREFETCH=lean,
                STATE_CHUNK=2 * C if lean else None,
                EXACT_DIAG=_rp(spec) == 1 and spec.output_mode == "norm_reduce", SPILL_GUARD=True,
                PMAJOR=mimo, ANG_TOK=mimo and _nhp(spec) >= 64, STATE_ANG_TOK=mimo)


def _prefetch(spec) -> int:
    """Phase 4's load order where the pipelined ones may fit (H100, triton 3.6, all spill-free
    there; bench/results/scan_fwd_prefetch_{g8,mimo}_h100_865ab22.json, scan_fwd_prefetch3_exact_diag_h100_9ca070c.json,
    scan_fwd_mimo_pmajor_angtok_h100_b6155d5.json):
    SISO N = 128: 3 (0.423 ms at B4 L4096; 1: 0.443, 2: 0.464); N = 64: 1 (0.347 / 0.352 / 0.369);
    MIMO N = 128 with PMAJOR and ANG_TOK: 2 (B4 L4096 1.562 ms; 1: 1.696, 3: 1.689; B8 L2048
    1.382 / 1.522 / 1.359); MIMO N = 64 with PMAJOR: 1 (1.448; 2: 1.579, 3: 1.670)."""
    if spec.rank > 1 and _pow2(spec.d_state) >= 128:
        return 2
    return 1 if spec.rank > 1 or _pow2(spec.d_state) <= 64 else 3


def _lean(spec, bp: int, nw: int, stages: int) -> bool:
    """Where the software-pipelined loads (PREFETCH in phase 4, STATE_PREFETCH and 32-row
    chunks in phase 2) may fit in registers (the spill guard checks each build): 16-bit inputs,
    4 warps, N <= 128, BP <= 64, single stage.
    H100 (bench/results/scan_fwd_h100_sweep3.json): 0.77 -> 0.53 ms at SISO B4 L4096 with the
    scan_gates prologue; phase 4 -15 to -20%, phase 2 -20 to -35%."""
    return (spec.input_dtype != "float32" and nw == 4 and stages == 1 and _pow2(spec.d_state) <= 128
            and bp <= 64)


def space(spec: ScanSpec, problem=None) -> list:
    """Tuning candidates (at most 16): the default, the default without its spill guard, the
    other STATE_SPLIT, the phase-4 load orders (MIMO: PMAJOR and ANG_TOK flipped), SEG x warps x
    stages, half the chunk."""
    d = default_config(spec, problem)
    out = [d]
    segs = sorted({max(1, d["SEG"] // 2), d["SEG"], min(4096, d["SEG"] * 2)})
    for seg in segs:
        for nw in (4, 8):
            for st in (1, 2):
                c = dict(d, SEG=seg, num_warps=nw, num_stages=st)
                if c not in out:
                    out.append(c)
    half = dict(d, CHUNK=max(d["CHUNK"] // 2, max(1, 16 // _rp(spec))))
    if half not in out:
        out.append(half)
    # the other phase-4 load orders: all loads one chunk ahead, tiles only, each in its turn
    for pf in (1, 2, 0):
        c = dict(d, PREFETCH=pf)
        if c not in out:
            out.insert(1, c)
    if _rp(spec) > 1:   # MIMO: the other phase-4 product orientation and angle path
        for key in ("ANG_TOK", "PMAJOR"):
            c = dict(d, **{key: not d.get(key, False)})
            if c not in out:
                out.insert(1, c)
    c = dict(d, STATE_SPLIT=1 if d.get("STATE_SPLIT", 1) > 1 else 2)   # phase 2's sub-segments
    if c not in out:
        out.insert(1, c)
    # the pipelined load orders as they are where the spill guard would give them up (spilling a
    # few bytes, they ran 4-11 % faster than the fallback on the H100: the tuner decides)
    out.insert(1, dict(d, SPILL_GUARD=False))
    return out[:16]


OUT_IMPLS = ("triton", "tilelang")


def out_impl(spec: ScanSpec, config: dict, t, seglen: int) -> str:
    """Phase 4's implementation for the bundle `t`: config OUT_IMPL, "triton" (the default) or
    "tilelang" (backends/tilelang/scan_chunk_output.py, opt-in: on the H100 it runs 1.6-1.7x the
    Triton phase 4's time, bench/notes/scan_fwd.md session 15, so nothing picks it by itself).
    "tilelang" outside its scope is an error naming the reason."""
    impl = config.get("OUT_IMPL", "triton")
    if impl == "triton":
        return impl
    from mamba3_kernels.backends.tilelang import scan_chunk_output as _tlo
    ok, why = _tlo.in_scope(spec, t, seglen)
    if not ok:
        raise bad_arg("config.OUT_IMPL", "'tilelang' only where the TileLang phase 4 applies", why)
    return impl


def check_config(spec: ScanSpec, config: dict) -> None:
    if config.get("OUT_IMPL", "triton") not in OUT_IMPLS:
        raise bad_arg("config.OUT_IMPL", "'triton' or 'tilelang'", config.get("OUT_IMPL"))
    if config.get("OUT_TL_STAGES") not in (None, 1, 2):
        raise bad_arg("config.OUT_TL_STAGES", "None, 1 or 2", config.get("OUT_TL_STAGES"))
    for key in ("CHUNK", "SEG", "BLOCK_P", "PASS_BLOCK_P", "num_warps"):
        v = config.get(key)
        if not isinstance(v, int) or v < 1 or v & (v - 1):
            raise bad_arg(f"config.{key}", "a power of two >= 1", v)
    if config["CHUNK"] * _rp(spec) < 16:
        raise bad_arg("config.CHUNK", f">= {16 // _rp(spec)} (C * pow2(R) >= 16 rows)", config["CHUNK"])
    if config["BLOCK_P"] < 16 or config["PASS_BLOCK_P"] < 16:
        raise bad_arg("config.BLOCK_P", ">= 16 (and PASS_BLOCK_P >= 16)",
                      (config["BLOCK_P"], config["PASS_BLOCK_P"]))
    if spec.output_mode == "norm_reduce" and not config.get("NORM_SPLIT") and config["BLOCK_P"] < spec.head_dim:
        raise bad_arg("config.BLOCK_P", f">= P={spec.head_dim} with output_mode 'norm_reduce' "
                      "(or NORM_SPLIT=True)", config["BLOCK_P"])
    ss = config.get("STATE_SPLIT")
    if ss is not None and (not isinstance(ss, int) or ss < 1 or ss & (ss - 1)):
        raise bad_arg("config.STATE_SPLIT", "a power of two >= 1 (or None)", ss)
    sc = config.get("STATE_CHUNK")
    if sc is not None and (not isinstance(sc, int) or sc < 1 or sc & (sc - 1) or sc * _rp(spec) < 16):
        raise bad_arg("config.STATE_CHUNK", f"a power of two >= {max(1, 16 // _rp(spec))} (or None)", sc)
    if config.get("PREFETCH", 0) not in (0, 1, 2, 3, False, True):
        raise bad_arg("config.PREFETCH", "0 / False, 1 / True (all loads), 2 (tiles only) or 3 (all but z)",
                      config.get("PREFETCH"))
    for key in ("SPILL_GUARD", "PMAJOR", "ANG_TOK", "STATE_ANG_TOK"):
        if not isinstance(config.get(key, False), bool):
            raise bad_arg(f"config.{key}", "True or False", config.get(key))
    if config.get("SCRATCH", "bfloat16") not in ("bfloat16", "float32"):
        raise bad_arg("config.SCRATCH", "'bfloat16' or 'float32'", config.get("SCRATCH"))


# ------------------------------------------------------------------------------------------
# launch plan: one list of kernel calls, used both to run and to AOT-compile

_TORCH = {"bfloat16": torch.bfloat16, "float32": torch.float32}


def plan(spec: ScanSpec, config: dict, t, device=None, y_out=None):
    """The three kernel calls for the bundle `t` (mamba3_kernels.scan_tensors.ScanTensors, or a
    stand-in with meta tensors for AOT): list of dicts (name, kernel, grid, args, constexprs,
    num_warps, num_stages, run), plus the scratch tensors. y_out: an fp32 (B, L, R, H, P) tensor
    that phase 4 also fills with the per-rank y before the output mode (the backward's saved y)."""
    check_config(spec, config)
    dev = device if device is not None else t.v.device
    B, L, H, P = t.v.shape
    G = t.q.shape[3]
    R, N, A = spec.rank, spec.d_state, spec.n_angles
    S = B if t.cu_seqlens is None else t.cu_seqlens.shape[0] - 1
    C, SEG = config["CHUNK"], config["SEG"]
    SEGLEN = C * SEG
    varlen = t.cu_seqlens is not None
    nseg_dense, nslots = _slots(B, L, S, SEGLEN, varlen)
    many = (L > SEGLEN) if varlen else nseg_dense > 1
    run_a = L > 0 and (spec.final_states or many)
    run_b = run_a or spec.initial_states or spec.final_states
    # ELL: phase 2 stores every token's segment-relative angles (fp32, (B, H, L, A)) and
    # phase 4 reads them instead of recomputing tanh and the in-chunk cumsum
    ell_on = bool(config.get("ELL")) and run_a and A > 0
    # MIMO: angles once per token (phase 4 / phase 2)
    ang_tok = bool(config.get("ANG_TOK", False)) and _rp(spec) > 1 and not ell_on
    state_ang_tok = bool(config.get("STATE_ANG_TOK", False)) and _rp(spec) > 1 and not ell_on
    # STATE_SPLIT: phases 2-3 on K sub-segments per segment (K times the phase-2 programs);
    # ELL's angles are relative to phase 4's segments, so it keeps K = 1
    K = 1 if ell_on else min(int(config.get("STATE_SPLIT") or 1), SEG)
    SEGLEN2 = SEGLEN // K
    nseg2_dense, nslots2 = _slots(B, L, S, SEGLEN2, varlen)
    # phase 2 may walk its segments in chunks of its own length (its outputs do not depend on it)
    C2 = min(config.get("STATE_CHUNK") or C, SEGLEN2)
    sdt = _TORCH[config.get("SCRATCH", "bfloat16")]
    f32 = torch.float32
    dummy = torch.empty(1, dtype=f32, device=dev)
    cu = t.cu_seqlens if varlen else torch.zeros(1, dtype=torch.int32, device=dev)
    lrel = torch.empty((nslots2, H, P, N), dtype=sdt, device=dev) if run_a else dummy.to(sdt)
    tot = torch.empty((nslots2, H), dtype=f32, device=dev) if run_a else dummy
    phi = torch.empty((nslots2, H, max(A, 1)), dtype=f32, device=dev) if run_a else dummy
    erel = torch.empty((nslots2, H, P, N), dtype=sdt, device=dev) if run_b else dummy.to(sdt)
    ell = torch.empty((B, H, L, A), dtype=f32, device=dev) if ell_on else dummy
    opt = lambda x: dummy if x is None else x  # noqa: E731
    sq, sk, sv = t.q.stride(), t.k.stride(), t.v.stride()
    sz = t.z.stride() if t.z is not None else (0, 0, 0, 0)
    if t.angles is None:
        sa = (0, 0, 0)
    elif spec.shared_angles:
        sa = (t.angles.stride(0), t.angles.stride(1), 0)
    else:
        sa = t.angles.stride()[:3]
    common = dict(R=R, N=N, NHP=_nhp(spec), P=P, A=A, AP=_nhp(spec) if config.get("AP_FULL") else _ap(spec), PAIR_HALF=spec.pairing == "half",
                  TRAP=spec.discretization == "trapezoidal", HAS_MV=t.mimo_v is not None,
                  VARLEN=varlen, FAST_TRIG=not _interpret())
    dotc = dict(DOT_F32=spec.input_dtype == "float32", INTERP=_interpret())
    st_in = t.state_in
    st_out = t.state_out
    calls = []
    bp = config["BLOCK_P"]
    # GATES: gamma = dt lam and beta = dt (1 - lam) per (b, h, t) once, read by phases 2 and 4
    # in place of trap (phase 3 still reads the raw trap for the initial states' pending term)
    tl_out = out_impl(spec, config, t, SEGLEN) == "tilelang"   # phase 4 as the TileLang walk
    gates_on = bool(config.get("GATES")) and common["TRAP"] and L > 0
    if gates_on:
        gates = torch.empty((B, H, L, 2), dtype=f32, device=dev)
        nel = B * H * L
        calls.append(dict(
            # (the TileLang walk reads its own scalar table: the gates then serve phase 2 alone)
            name="scan_gates", kernel=_com.scan_gates_kernel, run=run_a if tl_out else True,
            grid=(triton.cdiv(nel, 1024),),
            args=[("dt_ptr", t.dt), ("trap_ptr", t.trap), ("out_ptr", gates), ("n", nel)],
            constexprs=dict(BLOCK=1024), num_warps=4, num_stages=1))
        trap_k = gates
    else:
        trap_k = opt(t.trap)
    calls.append(dict(
        name="scan_chunk_state", kernel=_cst.scan_chunk_state_kernel, run=run_a,
        grid=_cst.grid(H, P, bp, nslots2),
        args=[("k_ptr", t.k), ("v_ptr", t.v), ("adt_ptr", t.adt), ("dt_ptr", t.dt),
              ("trap_ptr", trap_k), ("ang_ptr", opt(t.angles)), ("kb_ptr", t.k_bias),
              ("mv_ptr", opt(t.mimo_v)), ("cu_ptr", cu), ("lrel_ptr", lrel), ("tot_ptr", tot),
              ("phi_ptr", phi), ("ell_ptr", ell),
              ("s_kb", sk[0]), ("s_kt", sk[1]), ("s_kr", sk[2]), ("s_kg", sk[3]),
              ("s_vb", sv[0]), ("s_vt", sv[1]), ("s_vh", sv[2]),
              ("s_ab", sa[0]), ("s_at", sa[1]), ("s_ah", sa[2]),
              ("L", L), ("H", H), ("G", G), ("S", S), ("NSEG", nseg2_dense)],
        constexprs=dict(common, RP=_rp(spec), BP=bp, C=C2, SEG=SEGLEN2 // C2, FINAL=spec.final_states,
                        ESPLIT=K,
                        PREFETCH=bool(config.get("STATE_PREFETCH", False)), ELL=ell_on, GATES=gates_on,
                        ANG_TOK=state_ang_tok, **dotc),
        num_warps=config.get("state_num_warps", config["num_warps"]), num_stages=config.get("num_stages", 1)))
    pbp = config["PASS_BLOCK_P"]
    calls.append(dict(
        name="scan_state_passing", kernel=_pass.scan_state_passing_kernel, run=run_b,
        grid=_pass.grid(H, P, pbp, S),
        args=[("lrel_ptr", lrel), ("tot_ptr", tot), ("phi_ptr", phi), ("erel_ptr", erel), ("cu_ptr", cu),
              ("dt_ptr", t.dt), ("trap_ptr", opt(t.trap)), ("mv_ptr", opt(t.mimo_v)), ("k_ptr", t.k),
              ("kb_ptr", t.k_bias), ("v_ptr", t.v),
              ("ang_in_ptr", st_in.angle if st_in else dummy),
              ("ssm_in_ptr", st_in.ssm if st_in else dummy),
              ("k_in_ptr", st_in.k if st_in else dummy),
              ("v_in_ptr", st_in.v if st_in else dummy),
              ("ang_out_ptr", st_out.angle if st_out else dummy),
              ("ssm_out_ptr", st_out.ssm if st_out else dummy),
              ("k_out_ptr", st_out.k if st_out else dummy),
              ("v_out_ptr", st_out.v if st_out else dummy),
              ("s_kb", sk[0]), ("s_kt", sk[1]), ("s_kr", sk[2]), ("s_kg", sk[3]),
              ("s_vb", sv[0]), ("s_vt", sv[1]), ("s_vh", sv[2]),
              ("L", L), ("H", H), ("G", G), ("NSEG", nseg2_dense)],
        constexprs=dict(R=R, N=N, NHP=_nhp(spec), P=P, PPOW=_pow2(P), BP=pbp, A=A, SEGLEN=SEGLEN2, ESPLIT=K,
                        PAIR_HALF=common["PAIR_HALF"], TRAP=common["TRAP"], HAS_MV=common["HAS_MV"],
                        VARLEN=varlen, HAS_INIT=st_in is not None, HAS_LOCAL=run_a,
                        FINAL=spec.final_states, FAST_TRIG=common["FAST_TRIG"],
                        INTERP=_interpret()),
        num_warps=config.get("pass_num_warps", 4), num_stages=1))
    scratch = dict(lrel=lrel if run_a else None, tot=tot if run_a else None,
                   phi=phi if run_a else None, erel=erel if run_b else None, seglen=SEGLEN2,
                   split=K, nslots=nslots2, nseg_dense=nseg2_dense, ell=ell if ell_on else None)
    if tl_out:
        from mamba3_kernels.backends.tilelang import scan_chunk_output as _tlo
        calls += _tlo.plan_calls(spec, t, SEGLEN, K, nseg2_dense, erel if run_b else None, y_out, t.out,
                                 stages=config.get("OUT_TL_STAGES"))
        return calls, scratch
    split = spec.output_mode == "norm_reduce" and bool(config.get("NORM_SPLIT"))
    y_store = y_out is not None and not split   # phase 4 stores y itself (with the split, y_out is its scratch)
    if split:  # raw per-rank y (no gate) into an fp32 scratch, then the epilogue
        ybuf = torch.empty((B, L, R, H, P), dtype=f32, device=dev) if y_out is None else y_out
        out4, mode4, z4, mz4, mo4 = ybuf, _out.MODES["per_rank"], None, None, None
    else:
        ybuf = None
        out4, mode4, z4, mz4, mo4 = t.out, _out.MODES[spec.output_mode], t.z, t.mimo_z, t.mimo_out
    calls.append(dict(
        name="scan_chunk_output", kernel=_out.scan_chunk_output_kernel, run=L > 0,
        grid=_out.grid(H, P, bp, nslots),
        args=[("q_ptr", t.q), ("k_ptr", t.k), ("v_ptr", t.v), ("z_ptr", opt(z4)), ("adt_ptr", t.adt),
              ("dt_ptr", t.dt), ("trap_ptr", trap_k), ("ang_ptr", opt(t.angles)),
              ("qb_ptr", t.q_bias), ("kb_ptr", t.k_bias), ("d_ptr", opt(t.d)),
              ("mv_ptr", opt(t.mimo_v)), ("mz_ptr", opt(mz4)), ("mo_ptr", opt(mo4)),
              ("w_ptr", opt(t.norm_weight)), ("erel_ptr", erel), ("cu_ptr", cu), ("out_ptr", out4),
              ("ell_ptr", ell), ("y_ptr", y_out if y_store else dummy),
              ("s_qb", sq[0]), ("s_qt", sq[1]), ("s_qr", sq[2]), ("s_qg", sq[3]),
              ("s_kb", sk[0]), ("s_kt", sk[1]), ("s_kr", sk[2]), ("s_kg", sk[3]),
              ("s_vb", sv[0]), ("s_vt", sv[1]), ("s_vh", sv[2]),
              ("s_zb", sz[0]), ("s_zt", sz[1]), ("s_zh", sz[2]),
              ("s_ab", sa[0]), ("s_at", sa[1]), ("s_ah", sa[2]),
              ("L", L), ("H", H), ("G", G), ("S", S), ("NSEG", nseg_dense), ("NSEG2", nseg2_dense),
              ("eps", float(spec.norm_eps))],
        constexprs=dict(common, RP=_rp(spec), BP=bp, C=C, SEG=SEG, ESPLIT=K, HAS_D=t.d is not None,
                        HAS_Z=z4 is not None, HAS_MZ=mz4 is not None,
                        HAS_MO=mo4 is not None, MODE=mode4,
                        HAS_ENTRY=run_b, PREFETCH=int(config.get("PREFETCH", 0)), ELL=ell_on,
                        GATES=gates_on, BIAS_RELOAD=bool(config.get("BIAS_RELOAD", False)),
                        EXACT_DIAG=bool(config.get("EXACT_DIAG", False)), PMAJOR=bool(config.get("PMAJOR", False)),
                        ANG_TOK=ang_tok, Y_OUT=y_store,
                        **dotc),
        num_warps=config["num_warps"], num_stages=config.get("num_stages", 1),
        maxnreg=config.get("maxnreg")))
    if split:
        BT = 16
        zst = t.z.stride() if t.z is not None else (0, 0, 0, 0)
        calls.append(dict(
            name="scan_norm_epilogue", kernel=_out.scan_norm_epilogue_kernel, run=L > 0,
            grid=_out.norm_grid(B, L, H, BT),
            args=[("y_ptr", ybuf), ("z_ptr", opt(t.z)), ("mz_ptr", opt(t.mimo_z)), ("mo_ptr", opt(t.mimo_out)),
                  ("w_ptr", t.norm_weight), ("out_ptr", t.out), ("s_zb", zst[0]), ("s_zt", zst[1]),
                  ("s_zh", zst[2]), ("BL", B * L), ("L", L), ("H", H), ("eps", float(spec.norm_eps))],
            constexprs=dict(R=R, P=P, PP=max(16, _pow2(P)), BT=BT, HAS_Z=t.z is not None,
                            HAS_MZ=t.mimo_z is not None, HAS_MO=t.mimo_out is not None,
                            INTERP=_interpret()),
            num_warps=4, num_stages=1))
    return calls, scratch


def fallback(config: dict, spilled) -> dict:
    """The config to try after `config` when the kernels named in `spilled` spill: their
    software-pipelined load order one step down (phase 4: PREFETCH 1 -> 3 -> 2 -> 0, fewer loads
    held a chunk ahead, then 8 warps instead of 4; phase 2: STATE_PREFETCH and its longer chunk
    off), or None when nothing is left to give up."""
    c = dict(config)
    if "scan_chunk_output" in spilled:
        if c.get("PREFETCH") in (1, 2, 3):
            c["PREFETCH"] = {1: 3, 3: 2, 2: 0}[c["PREFETCH"]]
        elif c["num_warps"] == 4:   # last resort: half the registers per thread
            c["num_warps"] = 8
    if "scan_chunk_state" in spilled and c.get("STATE_PREFETCH"):
        c["STATE_PREFETCH"] = False
        c["STATE_CHUNK"] = None
    return None if c == config else c


def _layout(t) -> tuple:
    """What decides the JIT's build of the kernels besides spec and config: the problem's sizes
    and the strides of the tensors the kernels read strided (the others are contiguous). Pointer
    alignment is not in it (an unaligned view may build differently: at worst it runs the
    undecided default)."""
    opt = lambda x: None if x is None else x.stride()  # noqa: E731
    return (t.v.shape, t.q.shape[3], t.q.stride(), t.k.stride(), t.v.stride(), opt(t.z), opt(t.angles),
            None if t.cu_seqlens is None else t.cu_seqlens.shape[0])


_GUARD = Guard("scan_fwd")


def effective_config(spec: ScanSpec, config: dict, t, y_out=None) -> dict:
    """`config`, or with SPILL_GUARD its spill-free fallback for the bundle `t` (and y_out: phase 4
    then also stores y; GPU builds only: the interpreter has no registers), remembered per spec,
    config, layout and y_out's dtype (or absence) (`aot.Guard`)."""
    if not _GUARD.active(config, t.v.device):
        return config
    return _GUARD.remembered((spec, config, _layout(t), None if y_out is None else y_out.dtype), config,
                             lambda: spill_free(spec, config, t, _GUARD.gpu_spills, y_out))


def spill_free(spec: ScanSpec, config: dict, t, spills, y_out=None) -> dict:
    """`config` stepped down by `fallback` until no kernel it runs for `t` spills by `spills(call)`
    (the GPU's builds in effective_config; the AOT builds or a stand-in elsewhere), or until
    nothing is left to give up."""
    return step_down(config, lambda cfg: {c["name"] for c in plan(spec, cfg, t, y_out=y_out)[0]
                                          if c["run"] and "kernel" in c and spills(c)}, fallback)


def forward(spec: ScanSpec, config: dict, t, keep: bool = False, y_out=None):
    """Write t.out and t.state_out (mamba3_kernels.scan_tensors.ScanTensors), and with y_out
    (fp32 (B, L, R, H, P)) the per-rank y before the output mode, from the same pass (the
    differentiable scan's saved y). With keep=True return the per-segment scratch (see the
    module docstring) for tests and the backward."""
    ok, why = supports(spec)
    if not ok:
        raise ValueError(f"spec: expected one the Triton forward supports, got one it does not ({why})")
    calls, scratch = plan(spec, effective_config(spec, config, t, y_out), t, y_out=y_out)
    for c in calls:
        if c["run"]:
            launch(c)
    return scratch if keep else None


def launch(c: dict) -> None:
    """Launch one kernel call of `plan` (benchmarks time the phases one by one with it)."""
    if "tilelang" in c:
        from mamba3_kernels.backends.tilelang import scan_chunk_output as _tlo
        _tlo.launch(c)
        return
    extra = {"maxnreg": c["maxnreg"]} if c.get("maxnreg") else {}
    c["kernel"][c["grid"]](*[v for _, v in c["args"]], **c["constexprs"],
                           num_warps=c["num_warps"], num_stages=c["num_stages"], **extra)


# ------------------------------------------------------------------------------------------
# AOT build (no GPU): registers, spills, shared memory per kernel



def meta_tensors(spec: ScanSpec, problem, lengths=None):
    """A ScanTensors bundle of meta tensors (shapes and dtypes only) for AOT builds."""
    from mamba3_kernels.scan_tensors import ScanTensors
    from mamba3_kernels.spec import States
    m = dict(device="meta")
    B, L, H, G, S = problem.batch, problem.seqlen, problem.nheads, problem.ngroups, problem.nseqs
    R, N, P, A = spec.rank, spec.d_state, spec.head_dim, spec.n_angles
    idt = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}[spec.input_dtype]
    sdt = _TORCH[spec.state_dtype]
    f32 = torch.float32
    e = lambda *s, dt=f32: torch.empty(s, dtype=dt, **m)  # noqa: E731
    st = lambda ssm_dt: States(e(S, H, A), e(S, H, P, N, dt=ssm_dt), e(S, R, H, N), e(S, H, P, dt=idt))  # noqa: E731
    out = e(B, L, R, H, P, dt=idt) if spec.output_mode == "per_rank" else e(B, L, H, P, dt=idt)
    return ScanTensors(
        q=e(B, L, R, G, N, dt=idt), k=e(B, L, R, G, N, dt=idt), v=e(B, L, H, P, dt=idt),
        z=e(B, L, H, P, dt=idt) if spec.has_z else None, adt=e(B, H, L), dt=e(B, H, L),
        trap=e(B, H, L) if spec.discretization == "trapezoidal" else None,
        angles=(e(B, L, A) if spec.shared_angles else e(B, L, H, A)) if A else None,
        q_bias=e(H, R, N), k_bias=e(H, R, N), d=e(H) if spec.has_d else None,
        mimo_v=e(H, R, P) if spec.has_mimo_v else None, mimo_z=e(H, R, P) if spec.has_mimo_z else None,
        mimo_out=e(H, R, P) if spec.has_mimo_out else None,
        norm_weight=e(H, P) if spec.output_mode == "norm_reduce" else None,
        cu_seqlens=e(S + 1, dt=torch.int32) if spec.varlen else None,
        state_in=st(f32) if spec.initial_states else None, out=out,
        state_out=st(sdt) if spec.final_states else None)


def compile(spec: ScanSpec, config: dict, problem=None, arch: str = "sm_90a") -> list:
    """AOT-compile the forward's kernels for `arch` without a GPU (run without
    TRITON_INTERPRET). One dict per kernel: name, registers, spills (local bytes per thread),
    shared (bytes), cubin size. `problem` sizes the stand-in tensors; integer arguments that are
    multiples of 16 (strides, lengths) get the divisibility hint the JIT gives them at launch, so
    the build is the one that runs for that problem; default: a small one."""
    if problem is None:
        from mamba3_kernels.spec import Problem
        problem = Problem(1 if spec.varlen else 2, 1024, 4, 1, 2)
    from .aot import build, target
    target(arch)
    t = meta_tensors(spec, problem)
    calls, _ = plan(spec, config, t, device="meta")
    return build(calls, arch)
