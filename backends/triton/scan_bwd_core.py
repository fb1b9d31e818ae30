"""Triton backward core of the scan (issue 5): configs, launch, AOT build. SPEC §8, §9.

The generic, chunk-parallel middle of the scan backward: per sequence and value head, from the
materialised qh, ks (N), vt, dy (P) of rows (t, r) and the log-decays adt, the gradients of

    loss = sum <dy, y> + <dS_final, S_final>,
    y[t,r]  = e^{cs_t} S0 qh[t,r] + sum_{s<t} sum_r' e^{cs_t - cs_s} (qh[t,r] . ks[s,r']) vt[s,r']
    S_final = e^{cs_{L-1}} S0 + sum_{s,r'} e^{cs_{L-1} - cs_s} vt[s,r'] ks[s,r']^T

(strictly causal by token) with respect to qh, ks, vt, adt and S0 (reference/core_adjoint.py,
which also states the gradient formulas). The prep (rotation, biases, gamma, scale), the
output-mode backward (-> dy) and the post (diagonal terms, D, inverse rotation, angles, dt /
trap, GQA, input states) are other stages (scan_bwd*.py).

Phases (a split-sequence scan over segments of SEG chunks of C tokens, as the forward's):
  1 local       (scan_bwd_core_states.py) grid (H * P-blocks, slots, 2): each segment's local
                state Lf and local adjoint Lb, and its decay total
  2 pass        (scan_bwd_core_states.py) grid (H * P-blocks, sequences, 2): entry state of
                every segment (from S0) and adjoint at every segment's exit (from dS_final);
                dS0
  3 dq, dkv     (scan_bwd_core_chunk.py)  grid (H * N-blocks, slots): each program walks its
                segment with the state (dq: forwards) or adjoint (dkv: backwards) in
                registers: dqh, dks, dvt (or its N-block partials), the per-token partials of
                d loss / d cs, the per-chunk terms of d loss / d T's recurrence, and (dq) the
                last chunk's entry state (d T's boundary term)
  4 dadt        (scan_bwd_core_chunk.py)  grid (H, slots): dvt from its partials, and per
                chunk (walking backwards) d T by its recurrence and dadt = in-chunk reverse
                cumsum of d cs + d T
Every (batch, head, segment) is a program, so B * H small still fills the GPU; the P x N
scratch states move once per segment (no per-chunk state: scan_bwd_core_chunk.py says how d T
does without one). Deterministic: no atomics; the partial sums over P / N blocks are added in
a fixed order.

Scratch (SCRATCH dtype): 5 P x N states per segment (lf, lb, ent, dx and the last chunk's entry
state); fp32 partials of d cs (2 per N block and token), X_c (per N block and chunk), and with N
split in NNB > 1 blocks the NNB partials of dvt.

Config keys (`default_config`, `space`):
  CHUNK    tokens per chunk C (C * pow2(R) >= 16 rows)
  SEG      chunks per segment; 0 = chosen per call from B, H, L (about four programs per SM)
  BLOCK_N  columns of N per dq / dkv program (their state tile is P x BLOCK_N)
  BLOCK_P  rows of P per local-state program (tile BLOCK_P x N)
  PASS_BLOCK_P rows of P per state-passing program
  num_warps (dq, dkv), local_num_warps, pass_num_warps, num_stages (local, dq, dkv; each
  overridden by local_num_stages / dq_num_stages / dkv_num_stages)
  SCRATCH  dtype of the per-segment scratch states lf, lb, ent, dx, S_last ("bfloat16" or
           "float32"; GEMM operands in the input dtype anyway; fp32 inputs keep fp32)
  INTER    "float32": the three inter-chunk products with the carried state / adjoint (dq:
           dy S_c; dkv: vt D_c, ks D_c^T) on its bf16 hi + lo halves (two bf16 MMAs, fp32-accurate
           as the other operand is exact bf16); "bfloat16": the state rounded to bf16, one MMA
  UPDATE   "float32": the state / adjoint updates (local, dq, dkv: (vt e^{T-cs})^T ks,
           (dy e^{cs})^T qh) with the decay-scaled rows split likewise; "bfloat16": rounded once
           (INTER and UPDATE only act on bf16 operands; missing precision keys take the defaults)
  SEG_SCALE optional factor on the automatic SEG (tuning)
  FUSED    True: dq's and dkv's walks in one kernel (dqkv; same grid, dkv_num_stages), so a
           program re-reads the chunk tiles it loaded while they may still be in L2 (short
           segments: SEG_SCALE < 1). A tuning candidate, not the default: H100 fwd+bwd within
           0.3 % of the default at SISO B4 L4096 (bench/results/tune_bwd_siso_h100_71661cf.json)
"""
from __future__ import annotations


import torch
import triton

from . import _interpret, _pow2
from . import scan_bwd_core_chunk as _chunk
from . import scan_bwd_core_states as _st
from .aot import Guard, step_down

N_SM_H100 = 132
DTYPES = ("bfloat16", "float32")
_TORCH = {"bfloat16": torch.bfloat16, "float32": torch.float32}
_NAME = {torch.bfloat16: "bfloat16", torch.float32: "float32"}
TILE = 8192  # fp32 elements of a carried state tile per program (64 x 128)


def _np(x: int) -> int:
    return max(16, _pow2(x))


def default_config(R: int, N: int, P: int, dtype="bfloat16") -> dict:
    """Defaults for rank R, state size N, head dim P and operand dtype ('bfloat16' / 'float32'
    or the torch dtype). SEG = 0: chosen per call from the problem size.

    bf16: 32-row chunks, a P x BLOCK_N state tile of at most 4096 fp32 and BLOCK_N <= 64, 4 warps: the
    fastest spill-free point measured on the H100 (B4-L4096-H32 N128 P64: 1.88 ms vs 2.78 ms
    with 16-row chunks and a 64 x 128 tile at 8 warps; 8 warps were always slower; 64 x 128
    at 4 warps ran 1.39 ms but spills, AOT-measured; bench/notes/scan_bwd_core.md).
    P >= 128: 16-row chunks. fp32 (3xTF32 operand splits): 16-row chunks, 1024-element tile,
    8 warps (spill-free; not timed).

    Precision (bf16): INTER, UPDATE and the segment SCRATCH in fp32 (split bf16 MMAs: the
    angle gradient's pair cancellation needs the q side and the k side of every inter-chunk
    pair to agree; bf16 rounding there made dAngles grow ~sqrt(L): module-like L = 1024
    1.4e-2 -> 3.4e-3, bench/notes/scan_bwd_core.md).
    Spill-free on the AOT grids at the same tiles (dq 176-229, dkv 216-252 registers).

    bf16: the local and dq kernels software-pipelined by Triton (num_stages 2: the next chunk's
    tiles load while this one computes); H100 fwd+bwd (bench/results/bwd_core_stages*_5a41468.json)
    SISO B4-L4096 3.890 -> 3.729 ms, B1-L16384 3.948 -> 3.787, G8-N64 2.550 -> 2.456, MIMO R4
    B4-L2048 8.12 -> 7.85; dkv too: 3.622 / 3.693 / 2.401 / 7.68. Triton 3.6 (the GPU image)
    builds all three spill-free on the benchmark shapes; 3.9 (CI) spills dkv 16 B at N128 P64, so
    SPILL_GUARD (as the forward's, scan_fwd.py): the kernels are built before the first launch
    and a spilling one goes back to 1 stage (`fallback`), decided once per config and shape; the
    AOT tests apply the same fallback."""
    dtype = _NAME.get(dtype, dtype)
    rp = _pow2(R)
    NP, PP = _np(N), _np(P)
    f32 = dtype == "float32"
    # bf16: at most 64 columns per program (P = 32 at BLOCK_N = 128 spills dkv at every R: the
    # ROWS x BLOCK_N operand tiles grow with BLOCK_N, not only the state tile; AOT-measured)
    bn = min(NP, max(16, (1024 if f32 else TILE // 2) // PP), 1024 if f32 else 64)
    rows = 16 if f32 or PP > 64 else 32   # P >= 128 at 32 rows spills dq (AOT)
    return {"CHUNK": max(1, rows // rp), "SEG": 0, "BLOCK_N": bn,
            "BLOCK_P": min(PP, max(16, TILE // NP)), "PASS_BLOCK_P": min(32, PP),
            "num_warps": 8 if f32 else 4, "local_num_warps": 4, "pass_num_warps": 4, "num_stages": 1,
            "local_num_stages": 1 if f32 else 2, "dq_num_stages": 1 if f32 else 2,
            "dkv_num_stages": 1 if f32 else 2, "SPILL_GUARD": True,
            "SCRATCH": "float32",
            "INTER": "float32", "UPDATE": "float32"}


def space(R: int, N: int, P: int, dtype="bfloat16") -> list:
    """Tuning candidates (at most 14): the default, the default without its spill guard, chunk rows
    {16, 32} x BLOCK_N {default, double} x warps {4, 8}, the default with half / double the
    automatic segment length (SEG_SCALE), and FUSED (dq's and dkv's walks in one kernel) at the
    automatic and a quarter of the segment length. Some spill (the tuner times them anyway; the
    defaults do not)."""
    d = default_config(R, N, P, dtype)
    out = [d]
    rp = _pow2(R)
    NP = _np(N)
    for c in sorted({max(1, 32 // rp), max(1, 16 // rp)}, reverse=True):
        for bn in sorted({d["BLOCK_N"], min(NP, 2 * d["BLOCK_N"])}):
            for nw in (4, 8):
                cfg = dict(d, CHUNK=c, BLOCK_N=bn, num_warps=nw)
                if cfg not in out:
                    out.append(cfg)
    out += [dict(d, SEG_SCALE=0.5), dict(d, SEG_SCALE=2)]
    out += [dict(d, FUSED=True), dict(d, FUSED=True, SEG_SCALE=0.25)]   # one walk kernel; short segments for L2
    if d.get("SPILL_GUARD"):   # the pipelined kernels as they are where the guard would give them up
        out.insert(1, dict(d, SPILL_GUARD=False))
    return out[:12]


def _seg(config, B, L, H, progs_per_seg):
    if config["SEG"]:
        return int(config["SEG"])
    C = config["CHUNK"]
    nchunks = triton.cdiv(max(L, 1), C)
    nseg = triton.cdiv(4 * N_SM_H100, max(1, B * progs_per_seg))
    seg = _pow2(triton.cdiv(nchunks, nseg))
    seg = int(seg * config.get("SEG_SCALE", 1))
    return max(1, min(64, seg))


def check_config(R: int, config: dict) -> None:
    for key in ("CHUNK", "BLOCK_N", "BLOCK_P", "PASS_BLOCK_P", "num_warps"):
        v = config.get(key)
        if not isinstance(v, int) or v < 1 or v & (v - 1):
            raise ValueError(f"config.{key}: expected a power of two >= 1, got {v!r}")
    if config["CHUNK"] * _pow2(R) < 16:
        raise ValueError(f"config.CHUNK: expected >= {16 // _pow2(R)} (C * pow2(R) >= 16 rows), "
                         f"got {config['CHUNK']}")
    for key in ("BLOCK_N", "BLOCK_P", "PASS_BLOCK_P"):
        if config[key] < 16:
            raise ValueError(f"config.{key}: expected >= 16, got {config[key]}")
    seg = config.get("SEG", 0)
    if not isinstance(seg, int) or seg < 0:
        raise ValueError(f"config.SEG: expected an int >= 0 (0 = auto), got {seg!r}")
    for key in ("INTER", "UPDATE"):
        if config.get(key, "bfloat16") not in DTYPES:
            raise ValueError(f"config.{key}: expected one of {DTYPES}, got {config.get(key)!r}")
    for key in ("SCRATCH",):
        if config.get(key, "bfloat16") not in DTYPES:
            raise ValueError(f"config.{key}: expected one of {DTYPES}, got {config.get(key)!r}")
    for key in ("SPILL_GUARD", "FUSED"):
        if not isinstance(config.get(key, False), bool):
            raise ValueError(f"config.{key}: expected True or False, got {config.get(key)!r}")
    for key in ("num_stages", "local_num_stages", "dq_num_stages", "dkv_num_stages"):
        v = config.get(key, 1)
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise ValueError(f"config.{key}: expected an int >= 1, got {v!r}")


# ------------------------------------------------------------------------------------------
# validation and the launch plan (one list of kernel calls, to run and to AOT-compile)

def _check(qh, ks, vt, adt, dy, s0, ds_final, cu_seqlens):
    if qh.dim() != 5:
        raise ValueError(f"qh: expected (B, L, R, H, N), got shape {tuple(qh.shape)}")
    B, L, R, H, N = qh.shape
    P = vt.shape[-1]
    want = {"qh": (qh, (B, L, R, H, N)), "ks": (ks, (B, L, R, H, N)), "vt": (vt, (B, L, R, H, P)),
            "dy": (dy, (B, L, R, H, P)), "adt": (adt, (B, H, L))}
    for name, (x, shape) in want.items():
        if tuple(x.shape) != shape:
            raise ValueError(f"{name}: expected shape {shape}, got {tuple(x.shape)}")
    if qh.dtype not in _NAME:
        raise ValueError(f"qh: expected dtype bfloat16 or float32, got {qh.dtype}")
    for name, x in (("ks", ks), ("vt", vt), ("dy", dy)):
        if x.dtype != qh.dtype:
            raise ValueError(f"{name}: expected dtype {qh.dtype} (qh's), got {x.dtype}")
    if adt.dtype != torch.float32:
        raise ValueError(f"adt: expected float32, got {adt.dtype}")
    if R not in (1, 2, 4, 8):
        raise ValueError(f"R: expected 1, 2, 4 or 8, got {R}")
    if cu_seqlens is not None:
        if B != 1:
            raise ValueError(f"qh: expected B == 1 with cu_seqlens, got B={B}")
        if cu_seqlens.dim() != 1 or cu_seqlens.dtype != torch.int32:
            raise ValueError(f"cu_seqlens: expected (S+1,) int32, got {tuple(cu_seqlens.shape)} {cu_seqlens.dtype}")
    S = B if cu_seqlens is None else cu_seqlens.shape[0] - 1
    for name, x in (("s0", s0), ("ds_final", ds_final)):
        if x is not None and (tuple(x.shape) != (S, H, P, N) or x.dtype != torch.float32):
            raise ValueError(f"{name}: expected ({S}, {H}, {P}, {N}) float32, got {tuple(x.shape)} {x.dtype}")
    return B, L, R, H, N, P, S


def n_blocks(N: int, config: dict) -> int:
    """How many BLOCK_N-column blocks the state's N columns are split into (dvt's partials)."""
    return _np(N) // min(config["BLOCK_N"], _np(N))


def plan(qh, ks, vt, adt, dy, s0=None, ds_final=None, cu_seqlens=None, config=None, want_ds0=True,
         device=None, poison=False, dvt_partials=False):
    """The kernel calls (list of dicts: name, kernel, grid, args, constexprs, num_warps,
    num_stages, run) and the output dict. Tensors must be contiguous (meta tensors for AOT).
    poison: fill the outputs and every scratch tensor with NaN first (tests). dvt_partials:
    out["dvt"] is dvt's N-block partials (NNB, B, L, R, H, P), left unsummed for a consumer
    that reads dvt once anyway (the scan backward's post stage sums them as it loads)."""
    B, L, R, H, N, P, S = _check(qh, ks, vt, adt, dy, s0, ds_final, cu_seqlens)
    dtype = _NAME[qh.dtype]
    dflt = default_config(R, N, P, dtype)
    config = dict(dflt if config is None else config)
    for key in ("SCRATCH", "INTER", "UPDATE"):   # precision keys: default if missing
        config.setdefault(key, dflt[key])
    check_config(R, config)
    dev = device if device is not None else qh.device
    RP, NP, PP = _pow2(R), _np(N), _np(P)
    C = config["CHUNK"]
    BN, BP, PBP = min(config["BLOCK_N"], NP), min(config["BLOCK_P"], PP), min(config["PASS_BLOCK_P"], PP)
    NNB = n_blocks(N, config)
    SEG = _seg(config, B, L, H, H * NNB)
    SEGLEN = SEG * C
    varlen = cu_seqlens is not None
    nseg = triton.cdiv(L, SEGLEN)
    nslots = (L // SEGLEN + S) if varlen else B * nseg
    f32 = torch.float32
    sdt = _TORCH[config["SCRATCH"]]
    if poison:
        e = lambda *s, dt=f32: torch.full(s, float("nan"), dtype=dt, device=dev)
    else:
        e = lambda *s, dt=f32: torch.empty(s, dtype=dt, device=dev)
    lf, lb, ent, dx = (e(nslots, H, P, N, dt=sdt) for _ in range(4))
    tot = e(2, nslots, H)
    nch = nslots * SEG
    sx = e(nslots, H, P, N, dt=sdt)   # each segment's last-chunk entry state (dq), for d T's boundary (dadt)
    dcs = e(2 * NNB, B, H, L)
    nrow = B * L * R * H
    dtc = e(NNB, nch, H)      # X_c per N block and chunk (dkv)
    out = {"dqh": e(B, L, R, H, N), "dks": e(B, L, R, H, N), "dadt": e(B, H, L),
           "ds0": e(S, H, P, N) if want_ds0 else None}
    if dvt_partials:
        out["dvt"] = dvp = e(NNB, B, L, R, H, P)
    else:
        out["dvt"] = e(B, L, R, H, P)
        dvp = out["dvt"] if NNB == 1 else e(NNB, B, L, R, H, P)   # dvt's N-block partials
    dummy = e(1)
    cu = cu_seqlens if varlen else torch.zeros(1, dtype=torch.int32, device=dev)
    opt = lambda x: dummy if x is None else x
    dot = {"DOT_F32": dtype == "float32", "INTERP": _interpret()}
    split = dtype != "float32" and config["INTER"] == "float32"
    usplit = dtype != "float32" and config["UPDATE"] == "float32"
    shape = {"R": R, "RP": RP, "N": N, "NP": NP, "P": P, "C": C, "SEG": SEG, "VARLEN": varlen}
    run = L > 0
    fused = config.get("FUSED", False)
    stages = config.get("num_stages", 1)
    tok = [("qh_ptr", qh), ("ks_ptr", ks), ("vt_ptr", vt), ("dy_ptr", dy), ("adt_ptr", adt), ("cu_ptr", cu)]
    calls = [
        {"name": "scan_bwd_core_local", "kernel": _st.scan_bwd_core_local_kernel, "run": run,
         "grid": _st.local_grid(H, P, BP, nslots),
         "args": [*tok, ("lf_ptr", lf), ("lb_ptr", lb), ("tot_ptr", tot),
                  ("L", L), ("H", H), ("S", S), ("NSEG", nseg), ("NSLOT", nslots)],
         "constexprs": dict(shape, BP=BP, NEED_FIRST=want_ds0, USPLIT=usplit, **dot),
         "num_warps": config.get("local_num_warps", 4), "num_stages": config.get("local_num_stages", stages)},
        {"name": "scan_bwd_core_pass", "kernel": _st.scan_bwd_core_pass_kernel, "run": True,
         "grid": _st.pass_grid(H, P, PBP, S),
         "args": [("lf_ptr", lf), ("lb_ptr", lb), ("tot_ptr", tot), ("cu_ptr", cu), ("s0_ptr", opt(s0)),
                  ("dsf_ptr", opt(ds_final)), ("ent_ptr", ent), ("dx_ptr", dx), ("ds0_ptr", opt(out["ds0"])),
                  ("L", L), ("H", H), ("NSEG", nseg), ("NSLOT", nslots)],
         "constexprs": {"N": N, "NP": NP, "P": P, "BP": PBP, "SEGLEN": SEGLEN, "VARLEN": varlen,
                        "HAS_S0": s0 is not None, "HAS_DSF": ds_final is not None, "WANT_DS0": want_ds0,
                        "INTERP": _interpret()},
         "num_warps": config.get("pass_num_warps", 4), "num_stages": 1},
        {"name": "scan_bwd_core_dqkv", "kernel": _chunk.scan_bwd_core_dqkv_kernel, "run": run,
         "grid": _chunk.grid(H, NP, BN, nslots),
         "args": [*tok, ("ent_ptr", ent), ("dx_ptr", dx), ("sx_ptr", sx), ("dqh_ptr", out["dqh"]),
                  ("dks_ptr", out["dks"]), ("dvp_ptr", dvp), ("dcs_ptr", dcs), ("dtc_ptr", dtc),
                  ("B", B), ("L", L), ("H", H), ("S", S), ("NSEG", nseg), ("NCH", nch), ("NROW", nrow)],
         "constexprs": dict(shape, BN=BN, PP=PP, SPLIT=split, USPLIT=usplit, **dot),
         "num_warps": config["num_warps"], "num_stages": config.get("dkv_num_stages", stages)},
        {"name": "scan_bwd_core_dq", "kernel": _chunk.scan_bwd_core_dq_kernel, "run": run,
         "grid": _chunk.grid(H, NP, BN, nslots),
         "args": [*tok, ("ent_ptr", ent), ("sx_ptr", sx), ("dqh_ptr", out["dqh"]), ("dcs_ptr", dcs),
                  ("B", B), ("L", L), ("H", H), ("S", S), ("NSEG", nseg)],
         "constexprs": dict(shape, BN=BN, PP=PP, SPLIT=split, USPLIT=usplit, **dot),
         "num_warps": config["num_warps"], "num_stages": config.get("dq_num_stages", stages)},
        {"name": "scan_bwd_core_dkv", "kernel": _chunk.scan_bwd_core_dkv_kernel, "run": run,
         "grid": _chunk.grid(H, NP, BN, nslots),
         "args": [*tok, ("dx_ptr", dx), ("dks_ptr", out["dks"]), ("dvp_ptr", dvp),
                  ("dcs_ptr", dcs), ("dtc_ptr", dtc), ("B", B), ("L", L), ("H", H), ("S", S),
                  ("NSEG", nseg), ("NCH", nch), ("NROW", nrow)],
         "constexprs": dict(shape, BN=BN, PP=PP, SPLIT=split, USPLIT=usplit, **dot),
         "num_warps": config["num_warps"], "num_stages": config.get("dkv_num_stages", stages)},
        {"name": "scan_bwd_core_dadt", "kernel": _chunk.scan_bwd_core_dadt_kernel, "run": run,
         "grid": _chunk.dadt_grid(H, nslots),
         "args": [("dvp_ptr", dvp), ("dvt_ptr", out["dvt"]), ("dcs_ptr", dcs),
                  ("dtc_ptr", dtc), ("dx_ptr", dx), ("sx_ptr", sx), ("adt_ptr", adt), ("cu_ptr", cu),
                  ("dadt_ptr", out["dadt"]), ("B", B), ("L", L), ("H", H), ("S", S), ("NSEG", nseg), ("NCH", nch),
                  ("NROW", nrow)],
         "constexprs": {"R": R, "RP": RP, "N": N, "NP": NP, "P": P, "PP": PP, "C": C, "SEG": SEG, "NNB": NNB,
                        "VARLEN": varlen, "SEGP": triton.next_power_of_2(SEG),
                        "SUM_DV": not dvt_partials},
         "num_warps": 4, "num_stages": 1},
    ]
    # FUSED: both walks in one kernel (dqkv) instead of dq then dkv
    skip = ("scan_bwd_core_dq", "scan_bwd_core_dkv") if fused else ("scan_bwd_core_dqkv",)
    return [c for c in calls if c["name"] not in skip], out


def launch(c: dict) -> None:
    c["kernel"][c["grid"]](*[v for _, v in c["args"]], **c["constexprs"], num_warps=c["num_warps"],
                           num_stages=c["num_stages"])


_STAGE_KEYS = (("scan_bwd_core_local", "local_num_stages"), ("scan_bwd_core_dq", "dq_num_stages"),
               ("scan_bwd_core_dkv", "dkv_num_stages"), ("scan_bwd_core_dqkv", "dkv_num_stages"))


def fallback(config: dict, spilled) -> dict:
    """The config to try after `config` when the kernels named in `spilled` spill: those of
    them that Triton pipelines (num_stages > 1) back to one stage; None when none is left."""
    c = dict(config)
    for name, key in _STAGE_KEYS:
        if name in spilled and c.get(key, c.get("num_stages", 1)) > 1:
            c[key] = 1
    return None if c == config else c


_GUARD = Guard("scan_bwd_core")


def effective_config(config: dict, qh, ks, vt, adt, dy, s0, ds_final, cu_seqlens, want_ds0,
                     dvt_partials) -> dict:
    """`config`, or with SPILL_GUARD its spill-free fallback for these operands (GPU builds
    only); remembered per config, shapes and options (`aot.Guard`)."""
    if not _GUARD.active(config, qh.device):
        return config

    def spilled_of(c):
        calls, _ = plan(qh, ks, vt, adt, dy, s0, ds_final, cu_seqlens, c, want_ds0, dvt_partials=dvt_partials)
        return {k["name"] for k in calls if k["run"] and _GUARD.gpu_spills(k)}
    key = (config, qh.shape, vt.shape, qh.dtype, s0 is None, ds_final is None,
           None if cu_seqlens is None else cu_seqlens.shape[0], want_ds0, dvt_partials)
    return _GUARD.remembered(key, config, lambda: step_down(config, spilled_of, fallback))


def contiguous_operands(*xs):
    """The core's tensor operands made contiguous (None stays None): what `plan` requires."""
    return tuple(None if x is None else x.contiguous() for x in xs)


def core_backward(qh, ks, vt, adt, dy, s0=None, ds_final=None, cu_seqlens=None, config=None,
                  want_ds0=True, poison=False, dvt_partials=False):
    """Gradients of the core (module docstring). Dense: qh, ks (B, L, R, H, N); vt, dy
    (B, L, R, H, P); adt (B, H, L) fp32; s0, ds_final (B, H, P, N) fp32 or None. Varlen: B == 1,
    cu_seqlens (S+1,) int32 (empty sequences allowed), s0 / ds_final (S, H, P, N). qh/ks/vt/dy
    all bf16 or all fp32 (the GEMM operand dtype). Returns dict(dqh, dks (B, L, R, H, N) fp32,
    dvt (B, L, R, H, P) fp32, dadt (B, H, L) fp32, ds0 (B|S, H, P, N) fp32 or None).
    config: default_config(R, N, P, dtype) when None. poison: NaN-fill outputs and scratch
    before the run (tests: every output element must be written, no scratch read unwritten).
    dvt_partials: dvt as its unsummed N-block partials (NNB, B, L, R, H, P) (see plan)."""
    qh, ks, vt, adt, dy, s0, ds_final = contiguous_operands(qh, ks, vt, adt, dy, s0, ds_final)
    if config is None:
        config = default_config(qh.shape[2], qh.shape[4], vt.shape[4], qh.dtype)
    config = effective_config(config, qh, ks, vt, adt, dy, s0, ds_final, cu_seqlens, want_ds0, dvt_partials)
    calls, out = plan(qh, ks, vt, adt, dy, s0, ds_final, cu_seqlens, config, want_ds0, poison=poison,
                      dvt_partials=dvt_partials)
    for c in calls:
        if c["run"]:
            launch(c)
    return out


# ------------------------------------------------------------------------------------------
# AOT build (no GPU): registers, spills, shared memory per kernel



def compile_guarded(R: int, N: int, P: int, dtype="bfloat16", config=None, **kw):
    """(config, kernels): `compile` of the config the spill guard would run, with the AOT builds
    standing in for the GPU's (SPILL_GUARD configs step down while a kernel spills; the final
    config's build comes from Triton's cache)."""
    cfg = dict(default_config(R, N, P, dtype) if config is None else config)
    if cfg.get("SPILL_GUARD"):
        cfg = step_down(cfg, lambda c: {k["name"] for k in compile(R, N, P, dtype, c, **kw) if k["spills"]},
                        fallback)
    return cfg, compile(R, N, P, dtype, cfg, **kw)


def compile(R: int, N: int, P: int, dtype="bfloat16", config=None, B=2, L=4096, H=16, varlen=False,
            s0=True, ds_final=True, want_ds0=True, arch="sm_90a", dvt_partials=False) -> list:
    """AOT-compile every kernel of the core for `arch` without a GPU (run without
    TRITON_INTERPRET). One dict per kernel: name, registers, spills (local + stack bytes per
    thread), shared (bytes), num_warps, cubin_bytes. B, L, H only size the stand-in tensors;
    dvt_partials as `plan` (the scan backward's: its dadt kernel then sums no dvt)."""
    from .aot import build, target
    target(arch)
    dt = _TORCH[_NAME.get(dtype, dtype)]
    S = 3 if varlen else B
    if varlen:
        B = 1
    e = lambda *s, d=torch.float32: torch.empty(s, dtype=d, device="meta")
    calls, _ = plan(e(B, L, R, H, N, d=dt), e(B, L, R, H, N, d=dt), e(B, L, R, H, P, d=dt), e(B, H, L),
                    e(B, L, R, H, P, d=dt), e(S, H, P, N) if s0 else None, e(S, H, P, N) if ds_final else None,
                    e(S + 1, d=torch.int32) if varlen else None, config, want_ds0, device="meta",
                    dvt_partials=dvt_partials)
    return build(calls, arch)
