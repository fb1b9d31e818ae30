"""Triton chunked-scan backward: configs, the stage pipeline, AOT build. SPEC §9.1.

`backward(spec, config, saved, grads)` returns every input gradient of the scan whose forward
ran on the bundle `saved` (mamba3_kernels.scan_tensors.ScanTensors: the inputs in kernel
layout; mamba3_kernels/autograd.py keeps it). Stages (per sequence, value head h, token t,
rank r; q' = Q[g(h)] + Q_bias, k' likewise, theta the cumulative angle, lam = sigmoid(Trap),
gamma_t = DT_t lam_t, scale_t = gamma_t + DT_{t+1}(1 - lam_{t+1})):

  0  seq_fwd   (scan_bwd_prep.py, grid (S, H))   theta, gamma, scale, pend0 = DT_0 (1 - lam_0)
  1  y         the per-rank y (before the output mode) in fp32: recomputed by the forward
               (`scan_fwd.forward` with a per-rank, no-Z, no-MIMO_Out spec), or the copy the
               forward kept (scan(..., save_y=True): `forward_saving_y`: for R = 1 phase 4 stores y
               besides out, in bf16 for 16-bit inputs (`saved_y_dtype`), for R > 1 a per-rank pass
               and the output-mode kernel); only when the output mode needs it (Z, MIMO_Out or the
               norm)
  2  output    (scan_bwd_output.py, token-parallel) dy (B,L,R,H,P), dZ, dMIMO_Z/Out, dNormW partials
  3  prep      (scan_bwd_prep.py, token-parallel)   qh, ks = kh scale, vt in the operand dtype
  4  core      (scan_bwd_core.py) the strictly causal decayed attention's backward:
               dqh, dks, dvt, dADT, dS0 (S0 = S_init + pend0 sum_r vt_init,r k_init,r^T)
  5  post      (scan_bwd_post.py, token-parallel, one program per token block and Q/K group)
               diagonal and D terms, inverse rotation, dK_final / dV_final at each sequence's
               last token -> dQ, dK (the group's heads accumulated in place), dV, dtheta,
               dgamma, dscale, bias / MIMO_V / D partials
  6  seq_bwd   (scan_bwd_post.py, grid (S, H)) dDT, dTrap, reverse angle cumsum -> dAngles, dTheta_init
  7  sums      block partial sums (the bias / MIMO_V ones and the shared-angle head sum of dAngles
               by scan_bwd_sums.py, the small ones by torch), the fp32 -> input dtype cast of
               dQ / dK when G < H, the initial states' K/V/MIMO_V parts (torch).
Every reduction is a fixed-order sum (no atomics): two runs are bitwise equal.

Config keys: BT (tokens per program of output and prep), POST_BT (of post), SEQ_BT (tokens per
step of the per-sequence loops), num_warps / post_num_warps / seq_num_warps, CORE (overrides of
the core's own default config, or None), CORE_IMPL ("auto", the default: "tilelang" where
`auto_tilelang` holds, else "triton"; "triton"; "tilelang": the core's dq / dkv walks in
TileLang, backends/tilelang/scan_bwd_core.py, where its `supports` holds; or "reference": the
float64 NumPy core_adjoint, for tests only), OPERANDS ("float32":
fp32 core operands for 16-bit inputs, the accurate fallback for dAngles at long L; default: the
input's 16-bit type as bf16), POST_RECOMPUTE (post recomputes the core's rotated operands qh, ks from Q, K, the biases and
theta instead of reading prep's per-head copies: the same values bit for bit, 2 x 2N bytes per
token, head and rank less read; default where post's tile is small, see default_config; the
tuner tries the other), PREP_HEADS_FAST (prep's grid order, see default_config), SEQ_PROGRAMS (how
many programs the per-sequence stages aim at, default `SEQ_PROGRAMS`), Y_DTYPE ("auto": the y that
SISO's save_y keeps is bf16 for 16-bit inputs, `saved_y_dtype`; "float32" keeps it fp32), PARTIALS ("auto":
post's bias / MIMO_V partial sums per token block in bf16 for 16-bit inputs, `partials_dtype`;
"float32"), SUMS ("triton": stage 7's sums of those partials over blocks and the shared-angle
head sum of dAngles by scan_bwd_sums.py; "torch": by torch's reductions). The core's operands carry
pow2(R) ranks (zero-padded for R = 3, 5, 6, 7).
"""
from __future__ import annotations

import functools

import torch
import triton

from mamba3_kernels.spec import ScanSpec, States, bad_arg

from . import _interpret, _pow2
from . import scan_bwd_output as _outk
from . import scan_bwd_post as _post
from . import scan_bwd_prep as _prep
from . import scan_bwd_sums as _sums
from .aot import Guard, step_down

F32 = torch.float32
CORE_IMPLS = ("auto", "triton", "tilelang", "reference")
# One-warp programs for post and the per-sequence loops (default_config's docstring): with one warp
# every reduction and relayout is a warp shuffle, where 4-8 warps went through shared memory with
# 13-28 CTA barriers per loop step (AOT, triton 3.6); the tiles keep about the same values per thread.
POST_ONE_WARP_BT = 2    # post: 2 tokens (SISO N128: 128 registers, as the 8 x 4-warp tile)
SEQ_ONE_WARP_BT = 16    # seq_fwd / seq_bwd and their segment sums: 16 tokens per step


def auto_tilelang(RC: int, N: int, P: int, dtype) -> bool:
    """CORE_IMPL "auto" takes the TileLang walks where they are GPU-validated and faster: the
    core's RC in {1, 4}, N = 128, P in {64, 128}, bf16 operands, TileLang able to run here.
    H100, fwd+bwd from CUDA graphs (bench/results/scan_bwd_ab_tilelang_core_h100_af511f5.json,
    ..._c7964da.json): SISO N128 P64 B4 L4096 3.327 -> 3.023 ms, B8 L2048 3.289 -> 2.915, B1 L16384
    3.441 -> 3.117; MIMO R4 B4 L2048 6.919 -> 6.381, B4 L4096 13.491 -> 12.336. Not elsewhere (the
    core alone, scan_bwd_core_tilelang_h100_c7964da.json): RC 2 1.01x (its dq walk slower), RC 8
    0.73x, N 64 0.84-0.89x (the TileLang dkv walk)."""
    if RC not in (1, 4) or N != 128 or P not in (64, 128) or dtype not in (torch.bfloat16, "bfloat16"):
        return False
    return _tilelang_runs()


@functools.lru_cache(maxsize=None)
def _tilelang_runs() -> bool:
    """Whether TileLang can run here (importable, a GPU), asked once per process."""
    from mamba3_kernels.backends import tilelang as _tlb
    return bool(_tlb.available()[0])


def core_impl(config: dict, RC: int, N: int, P: int, dtype) -> str:
    """The core implementation `config` runs at these sizes: CORE_IMPL with "auto" resolved."""
    impl = config.get("CORE_IMPL", "auto")
    if impl == "auto":
        return "tilelang" if auto_tilelang(RC, N, P, dtype) else "triton"
    return impl


def supports(spec: ScanSpec):
    from . import scan_fwd
    ok, why = scan_fwd.supports(spec)
    if not ok:
        return ok, why
    if spec.rank > 8:
        return False, f"R={spec.rank} > 8 (the backward core takes up to 8 ranks)"
    return True, ""


def _nhp(spec) -> int:
    return max(2, _pow2(spec.d_state // 2))


def _ap(spec) -> int:
    return max(2, _pow2(spec.n_angles))


def _post8(spec) -> bool:
    """Where post runs at 8 warps (4 spilled on the AOT grid)."""
    rp = _pow2(spec.rank)
    return (rp >= 8 and _nhp(spec) >= 64) or (rp in (2, 4) and _nhp(spec) <= 8)


def _post_tile4(spec) -> int:
    """Post's token block at 4 (or 8) warps: BT x max(N/2, P) = 512 elements (256 at MIMO R4
    N >= 128, where 8 tokens spill 16 B and 4 do not)."""
    w = max(_nhp(spec), max(2, _pow2(spec.head_dim)))
    pw = 256 if _pow2(spec.rank) == 4 and _nhp(spec) >= 64 else 512
    return max(4, min(32, pw // w))


def default_config(spec: ScanSpec, problem=None) -> dict:
    """Launch configs measured on the H100 (bench/scan_bwd_stage_sweep.py, each stage alone,
    bench/results/scan_bwd_stage_sweep_h100.json) among those spill-free on the AOT grid
    (tests/test_triton_scan_bwd_compile.py):
    prep, output: BT x max(N/2, P) <= 2048 fp32 per tile, 4 warps (flat: +-10 %).
    post: small programs, BT x max(N/2, P) = 512, 4 warps. It walks a group's heads one after
      the other, so it is latency-bound and wants many programs in flight: SISO N=128 1.16 ms
      (16 tokens x 8 warps, the former default) -> 0.84 ms (8 x 4); MIMO R=4 3.84 -> 2.51 (4 x 4:
      half the tile at pow2(R) = 4 with N >= 128, where 8 tokens spill 16 B).
      (2 warps were faster still, 0.78 / 2.48, but spill 8-400 B on most of the grid.) 8 warps
      where 4 spill (ptxas' register use is not monotonic in the tile here; at 8 warps it often
      stops at 128 registers and spills): R >= 5 with N >= 128, R = 2..4 with N <= 16.
    post, since session 18: one warp and POST_BT = 2 tokens (POST_ONE_WARP_BT) wherever the
      4-warp tile was the default (not where 8 warps are). The 4-warp program reduced the bias
      partials over its tokens and re-laid out its pair tiles through shared memory: 28 CTA
      barriers per head (SISO N128, AOT 3.6); one warp does the same in shuffles (10 barriers, no
      more registers: 128). fwd+bwd graph A/B (results/scan_bwd_ab_post_seq_1warp_h100_d28c6e1.json):
      SISO B4 L4096 2.901 -> 2.854 ms, B1 L16384 2.963 -> 2.925, G8 N64 2.048 -> 2.048, MIMO R4
      B4 L2048 6.348 -> 6.092; one token per program (64 registers) lost 2.5-4 % everywhere.
    prep, output: at R >= 5 half the tile (output spilled 8 B at R8 N128 P128). MIMO (R > 1) since
      session 18: one warp and a quarter of the tokens (same values per thread): fwd+bwd R4 B4 L2048
      6.030 -> 5.922 ms, B4 L4096 11.96 -> 11.70 (results/scan_bwd_ab_prep_1warp_h100.json); SISO
      stays at 4 warps (2.811 -> 2.806, G8 N64 2.067 -> 2.077: a tie).
    per-sequence loops (latency-bound: S x H programs walk their sequence): until session 18
      128 tokens per step and 8 warps (64 with initial states); now one warp and 16 tokens per step
      (SEQ_ONE_WARP_BT; AOT: 13-17 barriers and ~170 shared-memory accesses per step -> none).
      With the one-warp post, same A/B: SISO B4 L4096 2.854 -> 2.793 (-4.0 % from both), B1 L16384
      2.925 -> 2.857, G8 N64 2.048 -> 2.037, MIMO 6.092 -> 6.082 (SEQ_PROGRAMS 4 x 2112: no better
      at SISO, -0.5 % at G8 N64; 2 warps x 32 tokens between the two).
    SPILL_GUARD (as the forward's and the core's): a stage kernel whose build for the call spills
    gets half its token block (`fallback`; not more warps: post at 8 warps ran 2.2x slower).
    POST_RECOMPUTE where post's pair tile (POST_BT x N/2) is at most 256 elements at 4 warps (at 8,
      capped at 128 registers, it spilled 16 B at N16 P64 R2, AOT 3.9): fwd+bwd on the
      H100 (bench/scan_bwd_ab.py, results/scan_bwd_ab_post_recompute_h100_a8236e1.json, gradients
      bitwise equal both ways) SISO G8 N64 (8 x 32) 2.362 -> 2.303 ms, MIMO R4 N128 (4 x 64)
      7.61 -> 7.41 and 15.03 -> 14.70; SISO N128 (8 x 64) 3.591 -> 3.683, slower: read there.
      With the one-warp post (session 18) recompute wins at SISO N128 too (post is then near its
      bytes, and qh / ks are 512 of its ~3 KB per token and head): 2.785 -> 2.696 ms (B4 L4096),
      2.891 -> 2.780 (B1 L16384), gradients bitwise equal (results/scan_bwd_ab_post_recompute_1warp_h100.json).
      Default wherever post runs one warp.
    PREP_HEADS_FAST: prep's programs on a 1-D grid with the heads of a token block side by side
      (the grid (token blocks, H) walked all token blocks of one head first, so every head re-read
      the group's Q / K from HBM once they outgrew L2: MIMO R4's 32 MB at B4 L4096). H100,
      gradients bitwise equal (results/scan_bwd_ab_prep_heads_fast_h100_5740b22.json, fwd+bwd graph
      ms): MIMO R4 B4 L4096 14.44 -> 14.07, B4 L2048 7.28 -> 7.15, SISO B4 L4096 3.544 -> 3.502,
      G8 N64 2.291 -> 2.283."""
    w = max(_nhp(spec), max(2, _pow2(spec.head_dim)))
    rp = _pow2(spec.rank)
    post8 = _post8(spec)
    post_bt = _post_tile4(spec)   # the 4-warp (or 8-warp) tile
    bt4 = max(4, min(32, (1024 if rp >= 8 else 2048) // w))   # prep / output at 4 warps
    return dict(BT=bt4 if rp == 1 else max(2, bt4 // 4), POST_BT=post_bt if post8 else POST_ONE_WARP_BT,
                SEQ_BT=SEQ_ONE_WARP_BT, num_warps=4 if rp == 1 else 1, post_num_warps=8 if post8 else 1,
                seq_num_warps=1, CORE=None, CORE_IMPL="auto", SPILL_GUARD=True,
                POST_RECOMPUTE=not post8, PREP_HEADS_FAST=True)


def space(spec: ScanSpec, problem=None) -> list:
    """Tuning candidates of the backward (op "backward", at most 16): the default; the default
    without its spill guards; post's token block halved and doubled; where post and the sequence
    loops run one warp, their 4- / 8-warp forms
    of before session 18, else post at 2 warps; post with POST_RECOMPUTE flipped; where TileLang
    runs and its walks take the spec, the other core
    implementation than "auto" picks (CORE_IMPL "triton" / "tilelang": auto's choice rests on a
    few H100 shapes); then the Triton core's own candidates (scan_bwd_core.space: the FUSED walks
    first, then chunk rows, BLOCK_N, warps, segment length) as CORE overrides of its default,
    with CORE_IMPL "triton" where auto would run the TileLang walks (which fix the chunking)."""
    from . import scan_bwd_core as _core
    d = default_config(spec, problem)
    out = [d]

    def add(c):
        if c not in out:
            out.append(c)
    add(dict(d, SPILL_GUARD=False, CORE=dict(SPILL_GUARD=False)))
    add(dict(d, POST_BT=max(1, d["POST_BT"] // 2)))
    add(dict(d, POST_BT=min(64, d["POST_BT"] * 2)))
    if d["post_num_warps"] == 1:   # the 4-warp post and 8-warp sequence loops of before session 18
        add(dict(d, POST_BT=_post_tile4(spec), post_num_warps=4))
        add(dict(d, SEQ_BT=64 if spec.initial_states else 128, seq_num_warps=8))
    else:
        add(dict(d, post_num_warps=2))
    add(dict(d, POST_RECOMPUTE=not d["POST_RECOMPUTE"]))
    RC, N, P = _pow2(spec.rank), spec.d_state, spec.head_dim
    odt = op_dtype(spec, d)
    tl_auto = core_impl(d, RC, N, P, odt) == "tilelang"
    if tl_auto:
        add(dict(d, CORE_IMPL="triton"))
    elif odt == torch.bfloat16 and _tilelang_runs():
        from mamba3_kernels.backends.tilelang import scan_bwd_core as _tl
        if _tl.supports(RC, N, P, "bfloat16")[0]:
            add(dict(d, CORE_IMPL="tilelang"))
    cd = _core.default_config(RC, N, P, odt)
    for c in sorted(_core.space(RC, N, P, odt)[1:], key=lambda c: not c.get("FUSED")):
        over = {k: v for k, v in c.items() if cd.get(k, None) != v}
        if over and over != {"SPILL_GUARD": False}:
            add(dict(d, CORE=over, **({"CORE_IMPL": "triton"} if tl_auto else {})))
    return out[:16]


def check_config(spec: ScanSpec, config: dict) -> None:
    for key in ("BT", "POST_BT", "SEQ_BT", "num_warps", "post_num_warps", "seq_num_warps"):
        v = config.get(key)
        if not isinstance(v, int) or v < 1 or v & (v - 1):
            raise bad_arg(f"config.{key}", "a power of two >= 1", v)
    v = config.get("SEQ_PROGRAMS", 1)
    if not isinstance(v, int) or isinstance(v, bool) or v < 1:
        raise bad_arg("config.SEQ_PROGRAMS", "an int >= 1", v)
    if config.get("CORE_IMPL", "auto") not in CORE_IMPLS:
        raise bad_arg("config.CORE_IMPL", "'auto', 'triton', 'tilelang' or 'reference'", config.get("CORE_IMPL"))
    if config.get("CORE_IMPL") == "tilelang":
        from mamba3_kernels.backends.tilelang import scan_bwd_core as _tl
        ok, why = _tl.supports(_pow2(spec.rank), spec.d_state, spec.head_dim,
                               "float32" if op_dtype(spec, config) == F32 else "bfloat16")
        if not ok:
            raise bad_arg("config.CORE_IMPL", "'tilelang' only where its walks apply", why)
    if config.get("OPERANDS", "bfloat16") not in ("bfloat16", "float32"):
        raise bad_arg("config.OPERANDS", "'bfloat16' or 'float32'", config.get("OPERANDS"))
    for key in ("SPILL_GUARD", "POST_RECOMPUTE", "PREP_HEADS_FAST"):
        if not isinstance(config.get(key, False), bool):
            raise bad_arg(f"config.{key}", "True or False", config.get(key))
    if config.get("Y_DTYPE", "auto") not in ("auto", "float32"):
        raise bad_arg("config.Y_DTYPE", "'auto' or 'float32'", config.get("Y_DTYPE"))
    if config.get("PARTIALS", "auto") not in ("auto", "float32"):
        raise bad_arg("config.PARTIALS", "'auto' or 'float32'", config.get("PARTIALS"))
    if config.get("SUMS", "triton") not in ("triton", "torch"):
        raise bad_arg("config.SUMS", "'triton' or 'torch'", config.get("SUMS"))
    unknown = sorted(set(config) - {"BT", "POST_BT", "SEQ_BT", "num_warps", "post_num_warps",
                                    "seq_num_warps", "CORE", "CORE_IMPL", "OPERANDS", "SPILL_GUARD",
                                    "POST_RECOMPUTE", "PREP_HEADS_FAST", "SEQ_PROGRAMS", "Y_DTYPE",
                                    "PARTIALS", "SUMS"})
    if unknown:
        raise bad_arg("config", "keys of scan_bwd.default_config (plus OPERANDS)", unknown)
    if config.get("CORE") is not None and not isinstance(config["CORE"], dict):
        raise bad_arg("config.CORE", "None or a dict (overrides of the core's default config)",
                      type(config["CORE"]).__name__)


def partials_dtype(spec: ScanSpec, config=None) -> torch.dtype:
    """The dtype of post's per-token-block partial sums of dQ_bias, dK_bias and dMIMO_V (one row
    per POST_BT tokens, head and rank: 268 MB in fp32 at SISO B4 L4096 with the 2-token blocks):
    bf16 for 16-bit inputs, fp32 for fp32 inputs or with config PARTIALS "float32" (default
    "auto"). The sums over blocks run in fp32 either way. Measured on the CPU against the float64
    adjoint (bf16 inputs; bench/notes/scan_bwd.md, session 18): q_bias / k_bias rel_l2 2.3-3.1e-3
    -> 2.7-3.5e-3 (the final bf16 rounding of the gradient dominates; upstream's are 6.7-7.3e-3).
    H100, fwd+bwd graph ms, with the rows' half layout (scan_bwd_post._store_halves, which took
    post's SISO interleaved build from 10 CTA barriers to 1): SISO B4 L4096 2.733 -> 2.632,
    B1 L16384 2.785 -> 2.718, G8 N64 2.085 -> 2.031, MIMO R4 B4 L2048 5.937 -> 5.538, B4 L4096
    11.648 -> 10.872 (results/scan_bwd_ab_partials_bf16_h100.json; the layout alone with fp32
    rows: SISO 2.733 -> 2.709)."""
    fp32 = spec.input_dtype == "float32" or (config or {}).get("PARTIALS", "auto") == "float32"
    return F32 if fp32 else torch.bfloat16


def op_dtype(spec: ScanSpec, config=None):
    """GEMM operand dtype of the core: bf16 for 16-bit inputs (config OPERANDS="float32" forces
    fp32, 3xTF32 in the core), fp32 for fp32 inputs."""
    if spec.input_dtype == "float32" or (config or {}).get("OPERANDS") == "float32":
        return F32
    return torch.bfloat16


def needs_y(spec: ScanSpec) -> bool:
    """The output mode's adjoint reads y only with a gate, MIMO_Out or the norm."""
    return spec.has_z or spec.has_mimo_out or spec.output_mode == "norm_reduce"


def y_spec(spec: ScanSpec) -> ScanSpec:
    """The forward spec whose output is the per-rank y before the output mode."""
    return spec.replace(output_mode="per_rank", has_z=False, has_mimo_z=False, has_mimo_out=False,
                        final_states=False)


def compute_y(spec: ScanSpec, t, problem=None, fwd_config=None, state_out=None) -> torch.Tensor:
    """Stage 1: the per-rank y (B, L, R, H, P) in fp32, by the Triton forward (with `state_out`
    given, that pass also writes the final states there)."""
    from mamba3_kernels.scan_tensors import ScanTensors

    from . import scan_fwd
    ys = y_spec(spec).replace(final_states=state_out is not None)
    B, L, H, P = t.v.shape
    y = torch.empty((B, L, spec.rank, H, P), dtype=F32, device=t.v.device)
    ty = ScanTensors(q=t.q, k=t.k, v=t.v, z=None, adt=t.adt, dt=t.dt, trap=t.trap, angles=t.angles,
                     q_bias=t.q_bias, k_bias=t.k_bias, d=t.d, mimo_v=t.mimo_v, mimo_z=None,
                     mimo_out=None, norm_weight=None, cu_seqlens=t.cu_seqlens, state_in=t.state_in,
                     out=y, state_out=state_out)
    if L or state_out is not None:
        cfg = fwd_config or scan_fwd.default_config(ys, problem)
        scan_fwd.forward(ys, cfg, ty)
    return y


def forward_saving_y(spec: ScanSpec, t, problem=None, fwd_config=None, config=None) -> torch.Tensor:
    """The forward of scan(..., save_y=True): t.out, the final states and the per-rank y ((B, L, R,
    H, P), returned: the backward's stage 1 input; fp32, or bf16 where `saved_y_dtype` says). R = 1: one forward pass whose phase 4
    also stores y before the output mode (scan_fwd.forward's y_out; `fwd_config`: the forward's
    config). R > 1: the per-rank pass (y and the final states), then out from y by the output mode
    alone (output_fwd_kernel; `config`: the backward's, for its token block). H100, fwd+bwd graph
    ms, the two back to back: SISO B4 L4096 3.666 -> 3.565 and B8 L2048 3.557 -> 3.509 with the
    single pass; MIMO R4 B4 L4096 14.51 -> 14.69 with it (phase 4's rank-reducing output mode plus
    the y store cost more there than the separate pass and kernel), so MIMO keeps the two."""
    from . import scan_fwd
    B, L, H, P = t.v.shape
    if spec.rank > 1:
        y = compute_y(spec, t, problem, state_out=t.state_out)
        if L:
            cfg = save_y_config(spec, config or default_config(spec, problem), t, y)
            launch(save_y_call(spec, cfg, t, y))
        return y
    fcfg = fwd_config or scan_fwd.default_config(spec, problem)
    y = torch.empty((B, L, spec.rank, H, P), dtype=saved_y_dtype(spec, fcfg, config), device=t.v.device)
    if L or t.state_out is not None:
        scan_fwd.forward(spec, fcfg, t, y_out=y)
    return y


def saved_y_dtype(spec: ScanSpec, fwd_config: dict, config=None) -> torch.dtype:
    """The dtype of the y that scan(..., save_y=True) keeps for R = 1: bf16 for 16-bit inputs (the
    output mode's adjoint reads it: dZ, the norm's gradients, MIMO_Out's; rounding it is a 2^-9
    relative error there, far inside the gradient bounds, and out itself is formed from the fp32 y
    in registers), fp32 for fp32 inputs and where the forward's own output epilogue reads it back
    (the norm split: out from y_out). Half the activation and the stage-2 read of fp32; bf16 also
    for fp16 inputs (fp32's range: y may exceed fp16's where a small gate keeps out finite).
    The backward config's Y_DTYPE "float32" (default "auto") keeps fp32 anyway."""
    split = spec.output_mode == "norm_reduce" and bool(fwd_config.get("NORM_SPLIT"))
    fp32 = spec.input_dtype == "float32" or split or (config or {}).get("Y_DTYPE", "auto") == "float32"
    return F32 if fp32 else torch.bfloat16


def save_y_config(spec: ScanSpec, config: dict, t, y) -> dict:
    """`config`, or with SPILL_GUARD its fallback for save_y's output kernel (`save_y_spill_free`;
    GPU builds only), remembered per spec, config and tensor layout (`aot.Guard`)."""
    if not _GUARD.active(config, t.v.device):
        return config
    from .scan_fwd import _layout
    return _GUARD.remembered(("save_y", spec, config, _layout(t)), config,
                             lambda: save_y_spill_free(spec, config, t, y, _GUARD.gpu_spills))


def save_y_call(spec: ScanSpec, config: dict, t, y) -> dict:
    """The output-mode forward of save_y (output_fwd_kernel: t.out from the per-rank y) as a
    call dict, for the launch, the AOT build and the spill guard."""
    B, L, H, P = t.v.shape
    zs = t.z.stride() if t.z is not None else (0, 0, 0)
    d = torch.empty(1, dtype=F32, device=t.v.device)
    opt = lambda x: d if x is None else x  # noqa: E731
    return dict(
        name="save_y_output_fwd", kernel=_outk.output_fwd_kernel, grid=_outk.grid(B * L, H, config["BT"]),
        args=[("y_ptr", y), ("z_ptr", opt(t.z)), ("mz_ptr", opt(t.mimo_z)), ("mo_ptr", opt(t.mimo_out)),
              ("w_ptr", opt(t.norm_weight)), ("out_ptr", t.out), ("s_zb", zs[0]), ("s_zt", zs[1]), ("s_zh", zs[2]),
              ("BL", B * L), ("L", L), ("H", H), ("eps", float(spec.norm_eps))],
        constexprs=dict(R=spec.rank, P=P, PP=max(2, _pow2(P)), BT=config["BT"], MODE=_outk.MODES[spec.output_mode],
                        HAS_Z=t.z is not None, HAS_MZ=t.mimo_z is not None, HAS_MO=t.mimo_out is not None,
                        INTERP=_interpret()),
        num_warps=config["num_warps"])


def save_y_spill_free(spec: ScanSpec, config: dict, t, y, spills) -> dict:
    """`config` with the save_y output kernel's token block halved while its build spills."""
    return step_down(config, lambda c: {"save_y_output_fwd"} if spills(save_y_call(spec, c, t, y)) else set(),
                     fallback)


# ------------------------------------------------------------------------------------------
# the core (stage 4)

def _core_reference(qh, ks, vt, adt, dy, s0, dsf, cu):
    """The float64 NumPy core (reference/core_adjoint.py) on the same operands (tests only)."""
    from mamba3_kernels.reference import core_adjoint as ca
    n = lambda x: None if x is None else x.detach().double().cpu().numpy()
    g = ca.core_backward(n(qh), n(ks), n(vt), n(adt), n(dy), n(s0), n(dsf),
                         None if cu is None else cu.cpu().numpy())
    out = {k: torch.as_tensor(v, dtype=F32, device=qh.device) for k, v in g.items()}
    out["dvt"] = out["dvt"][None]   # as the Triton core's dvt_partials (one part)
    return out


def core_config(config: dict, RC: int, N: int, P: int, dtype) -> dict:
    """The core's config under the backward's `config`: the core's default with config.CORE's
    overrides; where the core runs the TileLang walks (`core_impl`), the Triton config they pair
    with (backends/tilelang/scan_bwd_core.hybrid_config: 64-row chunks, one N block)."""
    from . import scan_bwd_core as core
    ccfg = dict(core.default_config(RC, N, P, dtype), **(config.get("CORE") or {}))
    if core_impl(config, RC, N, P, dtype) == "tilelang":
        from mamba3_kernels.backends.tilelang import scan_bwd_core as _tl
        ccfg = _tl.hybrid_config(RC, N, P, ccfg)
    return ccfg


def run_core(config, qh, ks, vt, adt, dy, s0, dsf, cu):
    impl = core_impl(config, qh.shape[2], qh.shape[4], vt.shape[4], qh.dtype)
    if impl == "reference":
        return _core_reference(qh, ks, vt, adt, dy, s0, dsf, cu)
    from . import scan_bwd_core as core
    ccfg = core_config(config, qh.shape[2], qh.shape[4], vt.shape[4], qh.dtype)
    # dvt as its N-block partials (NNB, B, L, RC, H, P): post sums them as it loads dvt (the
    # core's own summing pass read them all and wrote dvt once more: 0.18 ms at SISO B4 L4096)
    if impl == "tilelang":   # the dq / dkv walks in TileLang, the rest of the core Triton's
        from mamba3_kernels.backends.tilelang import scan_bwd_core as _tl
        if not _tilelang_runs():   # (asked once per process: this is every backward's path)
            from mamba3_kernels.backends import tilelang as _tlb
            raise bad_arg("config.CORE_IMPL", "'tilelang' where TileLang runs (importable, a GPU)",
                          _tlb.available()[1])
        return _tl.core_backward(qh, ks, vt, adt, dy, s0=s0, ds_final=dsf, cu_seqlens=cu, config=ccfg,
                                 want_ds0=True, dvt_partials=True)
    return core.core_backward(qh, ks, vt, adt, dy, s0=s0, ds_final=dsf, cu_seqlens=cu,
                              config=ccfg, want_ds0=True, dvt_partials=True)


# ------------------------------------------------------------------------------------------
# launch plan

def _strides_angles(spec, ang):
    if ang is None:
        return (0, 0, 0)
    if spec.shared_angles:
        return (ang.stride(0), ang.stride(1), 0)
    return tuple(ang.stride()[:3])


def _last_index(B, L, S, cu, dev):
    """Per token (B * L,) int32: the index of the sequence it ends, or -1."""
    last = torch.full((B * L + 1,), -1, dtype=torch.int32, device=dev)
    if B * L == 0:
        return last[:0]
    if cu is None:
        idx = torch.arange(B, device=dev, dtype=torch.int64) * L + (L - 1)
        last[idx] = torch.arange(B, device=dev, dtype=torch.int32)
    else:
        cu64 = cu.to(torch.int64)
        ends = cu64[1:] - 1
        ok = cu64[1:] > cu64[:-1]
        idx = torch.where(ok, ends, torch.full_like(ends, B * L))   # empty ones -> spare slot
        last.scatter_(0, idx, torch.arange(S, device=dev, dtype=torch.int32))
    return last[:B * L]


SEQ_PROGRAMS = 16 * 132  # per-sequence stages: about sixteen programs per H100 SM (config SEQ_PROGRAMS;
#   stage sweep, results/scan_bwd_stage_sweep_seq_h100_25ea2a4.json, SISO B4 L4096: seq_fwd 86 -> 69 us,
#   seq_bwd 119 -> 97 against four per SM)


def seq_segments(config: dict, S: int, H: int, L: int):
    """(NSEG, SEGL): the per-sequence stages (seq_fwd, seq_bwd) run one program per segment of
    SEGL tokens (a multiple of SEQ_BT), NSEG segments per sequence (with varlen, of the packed
    length L: an upper bound; segments past a sequence's end exit at once), enough for
    S * NSEG * H >= SEQ_PROGRAMS where the sequences are long enough."""
    sbt = config["SEQ_BT"]
    nblk = max(1, triton.cdiv(L, sbt))
    nseg = min(nblk, max(1, triton.cdiv(config.get("SEQ_PROGRAMS", SEQ_PROGRAMS), max(1, S * H))))
    segl = sbt * triton.cdiv(nblk, nseg)
    return max(1, triton.cdiv(L, segl)), segl


def plan(spec: ScanSpec, config: dict, t, bufs: dict, device=None):
    """The kernel calls of stages 0, 2, 3 (before the core) and 5, 6 (after it) as dicts
    (name, kernel, grid, args, constexprs, num_warps, stage); `bufs` holds every tensor by name
    (see `buffers`)."""
    B, L, H, P = t.v.shape
    G = t.q.shape[3]
    R, N, A = spec.rank, spec.d_state, spec.n_angles
    S = B if t.cu_seqlens is None else t.cu_seqlens.shape[0] - 1
    BT, PBT, SBT = config["BT"], config["POST_BT"], config["SEQ_BT"]
    nw, pnw, snw = config["num_warps"], config["post_num_warps"], config["seq_num_warps"]
    varlen = t.cu_seqlens is not None
    interp = _interpret()
    b = bufs
    d = b["dummy"]
    opt = lambda x: d if x is None else x
    sq, sk, sv = t.q.stride(), t.k.stride(), t.v.stride()
    sa = _strides_angles(spec, t.angles)
    cu = t.cu_seqlens if varlen else b["zero_i32"]
    PP = max(2, _pow2(P))
    common = dict(R=R, RC=_pow2(R), N=N, NHP=_nhp(spec), P=P, PP=PP, A=A, BT=BT, PAIR_HALF=spec.pairing == "half",
                  HAS_MV=t.mimo_v is not None, INTERP=interp)
    hf = bool(config.get("PREP_HEADS_FAST", False))
    st = t.state_in
    NSEG, SEGL = seq_segments(config, S, H, L)
    sgrid = (S * NSEG, H)
    sb = min(64, _pow2(NSEG))   # segment rows per load of the carry-ins (scan_bwd_prep._carry_in)
    segc = dict(A=A, AP=_ap(spec), BT=SBT, VARLEN=varlen)
    sd = b["dtheta"].stride()
    calls = [
        dict(name="bwd_seq_fwd_sums", stage=0, kernel=_prep.seg_sum_kernel, grid=sgrid, run=A > 0,
             args=[("x_ptr", opt(t.angles)), ("dt_ptr", t.dt), ("cu_ptr", cu), ("tot_ptr", b["ftot"]),
                   ("s_xb", sa[0]), ("s_xt", sa[1]), ("s_xh", sa[2]), ("L", L), ("H", H), ("NSEG", NSEG),
                   ("SEGL", SEGL)],
             constexprs=dict(segc, ANGLES=True), num_warps=snw),
        dict(name="bwd_seq_fwd", stage=0, kernel=_prep.seq_fwd_kernel, grid=sgrid,
             args=[("dt_ptr", t.dt), ("trap_ptr", opt(t.trap)), ("ang_ptr", opt(t.angles)),
                   ("tot_ptr", b["ftot"]), ("init_ptr", opt(st.angle.contiguous() if st is not None else None)), ("cu_ptr", cu),
                   ("theta_ptr", b["theta"]), ("gamma_ptr", b["gamma"]), ("scale_ptr", b["scale"]),
                   ("pend_ptr", b["pend"]), ("s_ab", sa[0]), ("s_at", sa[1]), ("s_ah", sa[2]),
                   ("L", L), ("H", H), ("NSEG", NSEG), ("SEGL", SEGL)],
             constexprs=dict(A=A, AP=_ap(spec), BT=SBT, TRAP=t.trap is not None, VARLEN=varlen,
                             HAS_TINIT=st is not None, SB=sb),
             num_warps=snw),
        dict(name="bwd_output", stage=2, kernel=_outk.output_bwd_kernel, grid=_outk.grid(B * L, H, BT),
             args=[("y_ptr", opt(b["y"])), ("do_ptr", b["dout"]), ("z_ptr", opt(t.z)),
                   ("mz_ptr", opt(t.mimo_z)), ("mo_ptr", opt(t.mimo_out)), ("w_ptr", opt(t.norm_weight)),
                   ("v_ptr", t.v), ("mv_ptr", opt(t.mimo_v)),
                   ("dy_ptr", b["dy"]), ("dz_ptr", opt(b["dz"])), ("pmz_ptr", opt(b["pmz"])),
                   ("pmo_ptr", opt(b["pmo"])), ("pw_ptr", opt(b["pw"])), ("pd_ptr", opt(b["pd"])),
                   ("s_zb", t.z.stride(0) if t.z is not None else 0),
                   ("s_zt", t.z.stride(1) if t.z is not None else 0),
                   ("s_zh", t.z.stride(2) if t.z is not None else 0),
                   ("s_vb", sv[0]), ("s_vt", sv[1]), ("s_vh", sv[2]),
                   ("BL", B * L), ("L", L), ("H", H), ("eps", float(spec.norm_eps))],
             constexprs=dict(R=R, RC=_pow2(R), P=P, PP=PP, BT=BT, MODE=_outk.MODES[spec.output_mode],
                             HAS_Z=t.z is not None, HAS_MZ=t.mimo_z is not None,
                             HAS_MO=t.mimo_out is not None, NEED_Y=needs_y(spec),
                             HAS_D=t.d is not None, HAS_MV=t.mimo_v is not None, INTERP=interp),
             num_warps=nw),
        dict(name="bwd_prep", stage=3, kernel=_prep.prep_kernel,
             grid=(triton.cdiv(max(B * L, 1), BT) * H,) if hf else _post.token_grid(B * L, H, BT),
             args=[("q_ptr", t.q), ("k_ptr", t.k), ("v_ptr", t.v), ("qb_ptr", t.q_bias),
                   ("kb_ptr", t.k_bias), ("mv_ptr", opt(t.mimo_v)), ("theta_ptr", b["theta"]),
                   ("scale_ptr", b["scale"]), ("qh_ptr", b["qh"]), ("ks_ptr", b["ks"]), ("vt_ptr", b["vt"]),
                   ("s_qb", sq[0]), ("s_qt", sq[1]), ("s_qr", sq[2]), ("s_qg", sq[3]),
                   ("s_kb", sk[0]), ("s_kt", sk[1]), ("s_kr", sk[2]), ("s_kg", sk[3]),
                   ("s_vb", sv[0]), ("s_vt", sv[1]), ("s_vh", sv[2]),
                   ("BL", B * L), ("L", L), ("H", H), ("G", G)],
             constexprs=dict(common, HEADS_FAST=hf, VT_OUT=not b["vt_is_v"]), num_warps=nw),
        dict(name="bwd_post", stage=5, grid=_post.token_grid(B * L, G, PBT), kernel=_post.post_kernel,
             args=[("q_ptr", t.q), ("k_ptr", t.k), ("v_ptr", t.v), ("qb_ptr", t.q_bias),
                   ("kb_ptr", t.k_bias), ("mv_ptr", opt(t.mimo_v)), ("d_ptr", opt(t.d)),
                   ("theta_ptr", b["theta"]), ("gamma_ptr", b["gamma"]), ("scale_ptr", b["scale"]),
                   ("qh_ptr", b["qh"]), ("ks_ptr", b["ks"]), ("dqh_ptr", b["dqh"]), ("dks_ptr", b["dks"]), ("dvt_ptr", b["dvt"]), ("dy_ptr", b["dy"]),
                   ("last_ptr", b["last"]), ("dkf_ptr", opt(b["dkf"])), ("dvf_ptr", opt(b["dvf"])),
                   ("dq_ptr", b["dq"]), ("dk_ptr", b["dk"]), ("dv_ptr", b["dv"]), ("dth_ptr", b["dtheta"]),
                   ("dgam_ptr", b["dgamma"]), ("dsc_ptr", b["dscale"]), ("pqb_ptr", b["pqb"]),
                   ("pkb_ptr", b["pkb"]), ("pmv_ptr", opt(b["pmv"])),
                   ("s_qb", sq[0]), ("s_qt", sq[1]), ("s_qr", sq[2]), ("s_qg", sq[3]),
                   ("s_kb", sk[0]), ("s_kt", sk[1]), ("s_kr", sk[2]), ("s_kg", sk[3]),
                   ("s_vb", sv[0]), ("s_vt", sv[1]), ("s_vh", sv[2]),
                   ("s_vpart", b["dvt"].stride(0) if b["dvt"] is not None else 0),
                   ("BL", B * L), ("L", L), ("H", H), ("G", G)],
             constexprs=dict(common, BT=PBT, NVP=b["dvt"].shape[0] if b["dvt"] is not None else 1,
                             HAS_D=t.d is not None, HAS_KF=b["dkf"] is not None,
                             HAS_VF=b["dvf"] is not None, RECOMPUTE=bool(config.get("POST_RECOMPUTE", False))),
             num_warps=pnw),
        dict(name="bwd_seq_bwd_sums", stage=6, kernel=_prep.seg_sum_kernel, grid=sgrid, run=A > 0,
             args=[("x_ptr", b["dtheta"]), ("dt_ptr", t.dt), ("cu_ptr", cu), ("tot_ptr", b["btot"]),
                   ("s_xb", sd[0]), ("s_xt", sd[1]), ("s_xh", sd[2]), ("L", L), ("H", H), ("NSEG", NSEG),
                   ("SEGL", SEGL)],
             constexprs=dict(segc, ANGLES=False), num_warps=snw),
        dict(name="bwd_seq_bwd", stage=6, kernel=_post.seq_bwd_kernel, grid=sgrid,
             args=[("dt_ptr", t.dt), ("trap_ptr", opt(t.trap)), ("ang_ptr", opt(t.angles)), ("cu_ptr", cu),
                   ("dgam_ptr", b["dgamma"]), ("dsc_ptr", b["dscale"]), ("dth_ptr", b["dtheta"]),
                   ("tot_ptr", b["btot"]), ("dthf_ptr", opt(b["dthf"])), ("dpend_ptr", opt(b["dpend"])),
                   ("ddt_ptr", b["ddt"]), ("dtrap_ptr", opt(b["dtrap"])), ("dang_ptr", b["dang"]),
                   ("dthi_ptr", opt(b["dthi"])), ("s_ab", sa[0]), ("s_at", sa[1]), ("s_ah", sa[2]),
                   ("L", L), ("H", H), ("NSEG", NSEG), ("SEGL", SEGL)],
             constexprs=dict(A=A, AP=_ap(spec), BT=SBT, TRAP=t.trap is not None, VARLEN=varlen,
                             HAS_INIT=st is not None, HAS_DTHF=b["dthf"] is not None, SB=sb),
             num_warps=snw),
    ]
    return calls


def buffers(spec: ScanSpec, t, grads: dict, device, with_y=True, post=True) -> dict:
    """Every scratch and output tensor of the pipeline (device may be "meta" for AOT); with
    post=False without post's own (`post_buffers`: the backward allocates those after the core,
    so they do not add to the core's peak)."""
    B, L, H, P = t.v.shape
    R, N, A = spec.rank, spec.d_state, spec.n_angles
    S = B if t.cu_seqlens is None else t.cu_seqlens.shape[0] - 1
    nblk = triton.cdiv(B * L, grads["_config"]["BT"])   # 0 without tokens: the partial sums are then empty (= 0)
    RC = _pow2(R)   # the core's rank layout: padded ranks must be zero
    z = (lambda *s, dt=F32: torch.zeros(s, dtype=dt, device=device)) if RC != R else \
        (lambda *s, dt=F32: torch.empty(s, dtype=dt, device=device))
    e = lambda *s, dt=F32: torch.empty(s, dtype=dt, device=device)
    idt = t.v.dtype
    odt = op_dtype(spec, grads["_config"])
    b = dict(dummy=e(1), zero_i32=torch.zeros(1, dtype=torch.int32, device=device))
    b["theta"] = e(B, L, H, max(A, 1))
    b["gamma"], b["scale"] = e(B, H, L), e(B, H, L)
    b["pend"] = e(S, H)
    b["y"] = grads.get("_y") if with_y else None
    b["dout"] = grads["out"]
    b["dy"] = z(B, L, RC, H, P, dt=odt)
    b["dz"] = e(B, L, H, P, dt=idt) if t.z is not None else None
    b["pmz"] = e(nblk, H, R, P) if t.mimo_z is not None else None
    b["pmo"] = e(nblk, H, R, P) if t.mimo_out is not None else None
    b["pw"] = e(nblk, H, P) if t.norm_weight is not None else None
    b["qh"], b["ks"] = z(B, L, RC, H, N, dt=odt), z(B, L, RC, H, N, dt=odt)
    # SISO without MIMO_V: vt is v itself; where v is already the operand tensor (contiguous, the
    # operand dtype, 16-byte aligned for the walks' TMA) the core reads it in place and prep
    # writes no copy (stage 3's vt store: 2 H P bytes per token)
    b["vt_is_v"] = (RC == 1 and t.mimo_v is None and t.v.dtype == odt and t.v.is_contiguous()
                    and (t.v.device.type == "meta" or t.v.data_ptr() % 16 == 0))
    b["vt"] = t.v.view(B, L, 1, H, P) if b["vt_is_v"] else z(B, L, RC, H, P, dt=odt)
    b["dqh"] = b["dks"] = b["dvt"] = None        # from the core
    b["last"] = torch.empty(B * L, dtype=torch.int32, device=device)
    b["dkf"] = grads.get("k")
    b["dvf"] = grads.get("v")
    b["dthf"] = grads["angle"].contiguous() if A and grads.get("angle") is not None else None
    b["pd"] = e(nblk, H) if t.d is not None else None    # from the output stage (BT blocks)
    b["dpend"] = e(S, H) if t.state_in is not None else None
    NSEG, _ = seq_segments(grads["_config"], S, H, L)
    b["ftot"] = e(S * NSEG, H, max(A, 1))
    b["nblk"] = nblk
    if post:
        b.update(post_buffers(spec, t, grads, device))
    return b


def post_buffers(spec: ScanSpec, t, grads: dict, device) -> dict:
    """The buffers only post and seq_bwd touch (see `buffers`)."""
    B, L, H, P = t.v.shape
    G = t.q.shape[3]
    R, N, A = spec.rank, spec.d_state, spec.n_angles
    S = B if t.cu_seqlens is None else t.cu_seqlens.shape[0] - 1
    npblk = triton.cdiv(B * L, grads["_config"]["POST_BT"])
    NSEG, _ = seq_segments(grads["_config"], S, H, L)
    e = lambda *s, dt=F32: torch.empty(s, dtype=dt, device=device)
    idt = t.v.dtype
    gdt = idt if G == H else F32     # post accumulates a group's heads in place (fp32 when G < H)
    b = {}
    b["dq"], b["dk"] = e(B, L, R, G, N, dt=gdt), e(B, L, R, G, N, dt=gdt)
    b["dv"] = e(B, L, H, P, dt=idt)
    b["dtheta"] = e(B, L, H, max(A, 1))
    b["dgamma"], b["dscale"] = e(B, H, L), e(B, H, L)
    pdt = partials_dtype(spec, grads["_config"])
    b["pqkb"] = e(2, npblk, H, R, N, dt=pdt)   # dQ_bias, dK_bias partials: one buffer, one sum
    b["pqb"], b["pkb"] = b["pqkb"][0], b["pqkb"][1]
    b["pmv"] = e(npblk, H, R, P, dt=pdt) if t.mimo_v is not None else None
    b["ddt"] = e(B, H, L)
    b["dtrap"] = e(B, H, L) if t.trap is not None else None
    b["dang"] = e(B, L, H, max(A, 1))
    b["dthi"] = e(S, H, max(A, 1)) if t.state_in is not None else None
    b["btot"] = e(S * NSEG, H, max(A, 1))
    return b


def _pair_order(x: torch.Tensor, spec: ScanSpec) -> torch.Tensor:
    """Summed bias partial rows (H, R, N) from post's half layout (pair j at columns j, N/2 + j:
    scan_bwd_post._store_halves) into the pairing's column order."""
    if spec.pairing == "half":
        return x
    return x.unflatten(-1, (2, x.shape[-1] // 2)).transpose(-1, -2).flatten(-2)


def launch(c: dict) -> None:
    c["kernel"][c["grid"]](*[v for _, v in c["args"]], **c["constexprs"], num_warps=c["num_warps"],
                           num_stages=1)


def _f32(x):
    return None if x is None else x.to(F32).contiguous()


class _Timer:
    """CUDA-event stage timings for backward(..., timings={}) (bench/scan_bwd.py); no-op else."""

    def __init__(self, out):
        self.out = out
        self.marks = []
        if out is not None:
            self.mark("start")

    def mark(self, name):
        if self.out is not None:
            e = torch.cuda.Event(enable_timing=True)
            e.record()
            self.marks.append((name, e))

    def done(self):
        if self.out is None:
            return
        self.marks[-1][1].synchronize()
        for (_, a), (name, b) in zip(self.marks, self.marks[1:]):
            self.out[name] = self.out.get(name, 0.0) + a.elapsed_time(b)


def fallback(config: dict, spilled) -> dict:
    """The config to try after `config` when the stage kernels named in `spilled` spill: half
    the token block of each (post: POST_BT; prep, output, save_y's output: BT; the per-sequence loops: SEQ_BT),
    down to 1 / 4 / 4 tokens; None when nothing is left to give up."""
    c = dict(config)
    if "bwd_post" in spilled and c["POST_BT"] > 1:
        c["POST_BT"] //= 2
    if ("bwd_prep" in spilled or "bwd_output" in spilled or "save_y_output_fwd" in spilled) and c["BT"] > 4:
        c["BT"] //= 2
    if ("bwd_seq_fwd" in spilled or "bwd_seq_bwd" in spilled) and c["SEQ_BT"] > 4:
        c["SEQ_BT"] //= 2
    return None if c == config else c


def stage_calls(spec: ScanSpec, config: dict, t, grads: dict, device):
    """(calls, core config): the stage kernel calls of `config` for the bundle `t`, on fresh
    buffers with stand-ins (shapes only) for the core's outputs: what AOT builds and the spill
    guard inspect."""
    from . import scan_bwd_core as _core
    B, L, H, P = t.v.shape
    S = B if t.cu_seqlens is None else t.cu_seqlens.shape[0] - 1
    R, N = spec.rank, spec.d_state
    e = lambda *s: torch.empty(s, dtype=F32, device=device)  # noqa: E731
    b = buffers(spec, t, dict(grads, _config=config), device)
    RC = _pow2(R)
    ccfg = core_config(config, RC, N, P, op_dtype(spec, config))   # as run_core's
    b["dqh"], b["dks"] = e(B, L, RC, H, N), e(B, L, RC, H, N)
    b["dvt"] = e(_core.n_blocks(N, ccfg), B, L, RC, H, P)   # the core's N-block partials of dvt
    b["dpend"] = e(S, H) if spec.initial_states else None
    return plan(spec, config, t, b, device=device), ccfg


def spill_free(spec: ScanSpec, config: dict, t, grads: dict, spills, device) -> dict:
    """`config` stepped down by `fallback` until no stage kernel it runs for the bundle `t`
    spills by `spills(call)` (the GPU's builds at run time, the AOT builds in the tests)."""

    def spilled_of(c):
        return {k["name"] for k in stage_calls(spec, c, t, grads, device)[0] if k.get("run", True) and spills(k)}
    return step_down(config, spilled_of, fallback)


_GUARD = Guard("scan_bwd")   # the stage guard and save_y's


def effective_config(spec: ScanSpec, config: dict, t, grads: dict) -> dict:
    """`config`, or with SPILL_GUARD its spill-free fallback for the bundle `t` (GPU builds
    only); remembered per spec, config and tensor layout (`aot.Guard`)."""
    if not _GUARD.active(config, t.v.device):
        return config
    from .scan_fwd import _layout
    # keyed by the whole config, CORE included: post's build depends on the core's N blocks (the
    # dvt partials it sums), and a decision shared across CORE overrides once handed every later
    # call the first call's CORE (the tuner's core candidates all ran one core config)
    return _GUARD.remembered((spec, config, _layout(t), grads.get("_y") is not None), config,
                             lambda: spill_free(spec, config, t, grads, _GUARD.gpu_spills, t.v.device))


def backward(spec: ScanSpec, config: dict, saved, grads: dict, problem=None, timings=None) -> dict:
    """Every input gradient. `saved`: the forward's ScanTensors (out/state_out unused);
    `grads`: out (the upstream gradient of out, any strides) and, for final states, angle, ssm,
    k, v (each None = 0); optional `_y`: the saved fp32 per-rank y. Returns a dict keyed like
    scan()'s arguments in kernel layouts (q, k (B,L,R,G,N); biases (H,R,N); initial_states a
    States with k (S,R,H,N)); None for absent inputs."""
    check_config(spec, config)
    t = saved
    dev = t.v.device
    B, L, H, P = t.v.shape
    R, N, A = spec.rank, spec.d_state, spec.n_angles
    S = B if t.cu_seqlens is None else t.cu_seqlens.shape[0] - 1
    g = dict(grads)
    g["_config"] = config
    g["out"] = grads["out"].contiguous()
    for key in ("angle", "ssm", "k", "v"):
        g[key] = _f32(grads.get(key))
    if g["k"] is not None:
        g["k"] = g["k"].view(S, R, H, N)
    tm = _Timer(timings)
    y = grads.get("_y")
    if y is None and needs_y(spec):
        y = compute_y(spec, t, problem)
    g["_y"] = y
    tm.mark("1 recompute y")
    config = g["_config"] = effective_config(spec, config, t, g)
    b = buffers(spec, t, g, dev, post=False)   # post's own buffers after the core (peak memory)
    if b["dkf"] is not None or b["dvf"] is not None:   # (post reads it only for the final states' grads)
        b["last"] = _last_index(B, L, S, t.cu_seqlens, dev)
    # stages 0-3 with "meta" stand-ins for post's buffers (their calls are planned, not launched, here)
    calls = {c["name"]: c for c in plan(spec, config, t, dict(b, **post_buffers(spec, t, g, "meta")))}
    if A:
        launch(calls["bwd_seq_fwd_sums"])
    launch(calls["bwd_seq_fwd"])
    tm.mark("0 seq_fwd")
    if L:
        launch(calls["bwd_output"])
        tm.mark("2 output")
        launch(calls["bwd_prep"])
        tm.mark("3 prep")
    # stage 4: the core, on the corrected initial state S0 = S_init + pend0 sum_r vt_init k_init^T
    st = t.state_in
    s0 = None
    mv = t.mimo_v if t.mimo_v is not None else torch.ones((H, R, P), dtype=F32, device=dev)
    if st is not None:
        vinit = st.v.to(F32)
        s0 = st.ssm + b["pend"][:, :, None, None] * torch.einsum("shp,hrp,srhn->shpn", vinit, mv, st.k)
    core = run_core(config, b["qh"], b["ks"], b["vt"], t.adt, b["dy"], s0, g["ssm"], t.cu_seqlens)
    b["dqh"], b["dks"], b["dvt"] = core["dqh"].contiguous(), core["dks"].contiguous(), core["dvt"].contiguous()
    tm.mark("4 core")
    # the core's operands that post does not read go before post's buffers come: vt always, qh / ks
    # where post recomputes them (it takes only their dtype then)
    b["vt"] = None
    if config.get("POST_RECOMPUTE"):
        b["qh"] = b["ks"] = torch.empty(1, dtype=b["qh"].dtype, device=dev)
    b.update(post_buffers(spec, t, g, dev))
    ds0 = core["ds0"]
    if st is not None:
        # d/dpend0 of <ds0, pend0 sum_r vt_init,r k_init,r^T>, consumed by seq_bwd at token 0
        kd = torch.einsum("shpn,srhn->shrp", ds0, st.k)                       # (S, H, R, P)
        b["dpend"] = torch.einsum("shrp,shp,hrp->sh", kd, vinit, mv).contiguous()
    calls = {c["name"]: c for c in plan(spec, config, t, b)}
    if L:
        launch(calls["bwd_post"])
        tm.mark("5 post")
    if A:
        launch(calls["bwd_seq_bwd_sums"])
    launch(calls["bwd_seq_bwd"])
    tm.mark("6 seq_bwd")
    # stage 7: fixed-order reductions
    out = {}
    out["q"], out["k"] = b["dq"].to(t.v.dtype), b["dk"].to(t.v.dtype)
    out["v"] = b["dv"]
    out["adt"] = core["dadt"].to(F32).contiguous()
    out["dt"] = b["ddt"]
    out["trap"] = b["dtrap"]
    tsums = config.get("SUMS", "triton") == "triton"
    if tsums:
        dqb, dkb = _sums.block_sums(b["pqkb"], launch)
    else:
        dqb, dkb = b["pqb"].sum(0, dtype=F32), b["pkb"].sum(0, dtype=F32)
    out["q_bias"], out["k_bias"] = _pair_order(dqb, spec), _pair_order(dkb, spec)
    out["d"] = b["pd"].sum(0) if b["pd"] is not None else None
    out["z"] = b["dz"]
    out["mimo_z"] = b["pmz"].sum(0) if b["pmz"] is not None else None
    out["mimo_out"] = b["pmo"].sum(0) if b["pmo"] is not None else None
    out["norm_weight"] = b["pw"].sum(0) if b["pw"] is not None else None
    if b["pmv"] is None:
        dmv = None
    else:
        dmv = _sums.block_sums(b["pmv"][None], launch)[0] if tsums else b["pmv"].sum(0, dtype=F32)
    if A:
        dang = b["dang"]
        if not spec.shared_angles:
            out["angles"] = dang
        else:
            out["angles"] = _sums.head_sum(dang, launch) if tsums else dang.sum(2)
    else:
        out["angles"] = None
    if st is not None:
        pend = b["pend"]
        # S0 = S_init + pend0 sum_r (v_init mv_r) k_init,r^T
        dk_init = pend[:, None, :, None] * torch.einsum("shpn,shp,hrp->srhn", ds0, vinit, mv)
        dv_init = pend[:, :, None] * torch.einsum("shrp,hrp->shp", kd, mv)
        if dmv is not None:
            dmv = dmv + torch.einsum("sh,shrp,shp->hrp", pend, kd, vinit)
        if t.cu_seqlens is not None:   # an empty sequence passes its final-state grads through
            empty = (t.cu_seqlens[1:] == t.cu_seqlens[:-1])
            if g["k"] is not None:
                dk_init = dk_init + torch.where(empty[:, None, None, None], g["k"], 0.0)
            if g["v"] is not None:
                dv_init = dv_init + torch.where(empty[:, None, None], g["v"], 0.0)
        elif L == 0:
            if g["k"] is not None:
                dk_init = dk_init + g["k"]
            if g["v"] is not None:
                dv_init = dv_init + g["v"]
        dth_init = b["dthi"] if A else torch.zeros((S, H, 0), dtype=F32, device=dev)
        out["initial_states"] = States(dth_init, ds0.to(F32), dk_init, dv_init)
    else:
        out["initial_states"] = None
    out["mimo_v"] = dmv
    tm.mark("7 reductions")
    tm.done()
    return out


# ------------------------------------------------------------------------------------------
# AOT build (no GPU)



def compile(spec: ScanSpec, config: dict, problem=None, arch: str = "sm_90a", core: bool = True) -> list:
    """AOT-compile every kernel of the backward for `arch` without a GPU (run without
    TRITON_INTERPRET): this module's own (stages 0, 2, 3, 5, 6) and, with `core`, the core's
    (scan_bwd_core.compile, in the config the backward would give it). One dict per kernel:
    name, registers, spills, shared, cubin size."""
    from mamba3_kernels.spec import Problem

    from . import scan_fwd
    if problem is None:
        problem = Problem(1 if spec.varlen else 2, 1024, 4, 1, 2)
    from .aot import build, target
    target(arch)
    t = scan_fwd.meta_tensors(spec, problem)
    B, L, H, P = t.v.shape
    S = problem.nseqs
    R, N, A = spec.rank, spec.d_state, spec.n_angles
    e = lambda *s: torch.empty(s, dtype=F32, device="meta")
    fwd_default = scan_fwd.default_config(spec, problem)   # SISO save_y's forward: y's dtype, the phase-4 build
    ydt = saved_y_dtype(spec, fwd_default, config) if R == 1 else F32
    grads = dict(out=torch.empty(t.out.shape, dtype=t.v.dtype, device="meta"), _config=config,
                 _y=torch.empty((B, L, R, H, P), dtype=ydt, device="meta") if needs_y(spec) else None,
                 angle=e(S, H, A) if spec.final_states and A else None,
                 k=e(S, R, H, N) if spec.final_states else None,
                 v=e(S, H, P) if spec.final_states else None)
    from . import scan_bwd_core as _core
    if config.get("SPILL_GUARD"):   # as the GPU runs it: after the stage spill guard (AOT builds standing in)
        config = spill_free(spec, config, t, grads, lambda c: build([c], arch)[0]["spills"] > 0, "meta")
    calls, ccfg = stage_calls(spec, config, t, grads, "meta")
    RC = _pow2(R)
    odt = op_dtype(spec, config)
    if needs_y(spec) and R > 1:   # scan(..., save_y=True)'s output-mode forward, after its own guard
        ycfg = config
        if config.get("SPILL_GUARD"):
            ycfg = save_y_spill_free(spec, config, t, grads["_y"], lambda c: build([c], arch)[0]["spills"] > 0)
        calls.append(save_y_call(spec, ycfg, t, grads["_y"]))
    if L and config.get("SUMS", "triton") == "triton":   # stage 7's sums (scan_bwd_sums.py) on post's buffers
        pb = post_buffers(spec, t, dict(grads, _config=config), "meta")
        calls.append(_sums.block_sums_call(pb["pqkb"], _sums.split_buffer(pb["pqkb"])))
        if spec.shared_angles and A:
            calls.append(_sums.head_sum_call(pb["dang"], e(B, L, A)))
    res = build(calls, arch)
    if needs_y(spec) and R == 1:   # scan(..., save_y=True)'s forward: phase 4 storing y too, after its guard
        fcfg = fwd_default
        if fcfg.get("SPILL_GUARD"):
            fcfg = scan_fwd.spill_free(spec, fcfg, t, lambda c: build([c], arch)[0]["spills"] > 0, y_out=grads["_y"])
        ycalls = [c for c in scan_fwd.plan(spec, fcfg, t, device="meta", y_out=grads["_y"])[0]
                  if c["name"] == "scan_chunk_output" and c["run"]]
        res += [dict(k, name="save_y:" + k["name"]) for k in build(ycalls, arch)]
    if core and L:   # as the GPU would run it: after the core's spill guard (AOT builds standing in)
        _, ks = _core.compile_guarded(RC, N, P, odt, config=ccfg, B=B, L=L, H=H, varlen=spec.varlen,
                                      s0=spec.initial_states, ds_final=spec.final_states, want_ds0=True,
                                      arch=arch, dvt_partials=True)   # as run_core calls it
        for k in ks:
            res.append(dict(k, name="core:" + k["name"]))
    return res
