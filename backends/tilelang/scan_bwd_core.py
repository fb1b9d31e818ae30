"""Backward core with the TileLang walks: Triton phases 1, 2 and dadt, TileLang dq and dkv.

`core_backward` has the signature and outputs of backends/triton/scan_bwd_core.core_backward
(SPEC §8, §9; the math in backends/triton/scan_bwd_core_chunk.py): it takes the Triton core's
plan at the walks' 64-row chunks (64 / R tokens) and one N block (config `hybrid_config`),
launches the Triton local (chunk states) and pass (entry states, exit adjoints) kernels,
the Triton cs kernel (each chunk's decay cumsum as a table row the walks load), replaces the dq
and dkv walks by the TileLang ones (scan_bwd_core_chunk.py), then runs the Triton dadt kernel
over their d cs shares and X_c. H100, SISO B4 L4096 H32 N128 P64: the whole core 1622 -> 1236 us
(walks 506 / 747 -> 346 / 558 us; bench/results/scan_bwd_core_tilelang_h100_af511f5.json);
MIMO R4 1.28-1.34x; at N = 64 slower (852 -> 953 us).

The Triton kernels run at `hybrid_config` without the Triton core's spill guard: the compile
test builds them spill-free under CI's Triton and the GPU image's 3.6 (local 82-130 registers).
Status: built for sm_90a in CI (tests/test_tilelang_scan_bwd_core_compile.py); on the H100 every
core case of tests/test_tilelang_scan_bwd_core_gpu.py passes against the float64 oracle (R 1 / 2 /
4 / 8, several chunks per slot, dense, varlen with empties, L = 1, partial chunks, N 64, P 128:
rel_l2 1.3-1.7e-3; bench/results/gpu_tests_tilelang_core_h100_5aa7334.log), and every scan
gradient with it (tests/test_scan_bwd_gpu.py -k tilelang: SISO and MIMO R 2 / 3 / 4). The scan
backward takes it by default at the core's R in {1, 4}, N = 128 (CORE_IMPL "auto",
scan_bwd.auto_tilelang: MIMO R4 core 1.30-1.34x, R4 P128 2.66x; R 2 1.01x, R 8 0.73x, so not
there; bench/results/scan_bwd_core_tilelang_h100_c7964da.json).
Scope: `supports` (the core's R in {1, 2, 4, 8}, N and P in {64, 128}, bf16 operands).
"""

import torch

from mamba3_kernels.backends.triton import _pow2
from mamba3_kernels.backends.triton import scan_bwd_core as tcore
from mamba3_kernels.backends.triton import scan_bwd_core_states as tstates

from . import scan_bwd_core_chunk as walks
from .step import arch_of


def supports(R: int, N: int, P: int, dtype: str) -> tuple:
    return walks.supports(R, N, P, dtype)


def hybrid_config(R: int, N: int, P: int, base=None) -> dict:
    """The Triton core config the TileLang walks pair with: their chunks (64 rows: 64 / R tokens,
    so dadt's chunk sums match theirs), one N block (dkv writes dvt whole), fp32 INTER / UPDATE /
    SCRATCH (the walks' precision). `base`: other Triton keys (SEG, the local / pass / dadt warps)."""
    cfg = dict(tcore.default_config(R, N, P, "bfloat16") if base is None else base)
    cfg.update(CHUNK=walks.tokens(R), BLOCK_N=tcore._np(N), INTER="float32", UPDATE="float32",
               SCRATCH="float32", FUSED=False)
    return cfg


def plan(qh, ks, vt, adt, dy, s0=None, ds_final=None, cu_seqlens=None, config=None, want_ds0=True,
         device=None, poison=False, arch=None, dvt_partials=False):
    """(calls, out): the Triton plan with its dq / dkv calls replaced by the TileLang walks'. A
    TileLang call is a dict with name, run, `tilelang` (which walk, R, N, P, arch: the
    build key) and `args` ((parameter name, tensor) in the prim_func's order; `program` gives the
    prim_func to check them against). dvt_partials: out["dvt"] as the Triton core's
    (1, B, L, R, H, P) partials (one N block)."""
    B, L, R, H, N = qh.shape
    P = vt.shape[-1]
    ok, why = supports(R, N, P, {"torch.bfloat16": "bfloat16"}.get(str(qh.dtype), str(qh.dtype)))
    if not ok:
        raise ValueError(f"qh: {why}")
    cfg = hybrid_config(R, N, P, config)
    calls, out = tcore.plan(qh, ks, vt, adt, dy, s0, ds_final, cu_seqlens, cfg, want_ds0, device=device,
                            poison=poison, dvt_partials=dvt_partials)
    by = {c["name"]: c for c in calls}
    dq_args, dkv_args = dict(by["scan_bwd_core_dq"]["args"]), dict(by["scan_bwd_core_dkv"]["args"])
    SEG = by["scan_bwd_core_dq"]["constexprs"]["SEG"]
    dev = qh.device if device is None else device
    slots = walks.slot_table(B, L, SEG, walks.tokens(R), cu_seqlens, device=dev)
    run = by["scan_bwd_core_dq"]["run"]
    nch = dkv_args["dtc_ptr"].shape[1]
    key = dict(R=R, N=N, P=P, arch=arch)
    TOK = walks.tokens(R)
    cs = torch.empty((nch, H, TOK), dtype=torch.float32, device=dev)   # the cs table (Triton cs kernel)
    if poison:
        cs.fill_(float("nan"))
    cs_call = {"name": "scan_bwd_core_cs", "kernel": tstates.scan_bwd_core_cs_kernel, "run": run,
               "grid": tstates.cs_grid(H, slots.shape[0]),
               "args": [("adt_ptr", adt), ("cu_ptr", dq_args["cu_ptr"]), ("cs_ptr", cs), ("L", L), ("H", H),
                        ("S", dq_args["S"]), ("NSEG", dq_args["NSEG"])],
               "constexprs": {"C": TOK, "SEG": SEG, "SEGP": _pow2(SEG), "VARLEN": cu_seqlens is not None},
               "num_warps": 4, "num_stages": 1}
    tok = [("QH", qh), ("KS", ks), ("VT", vt), ("DY", dy), ("CS", cs), ("SLOT", slots)]
    dq = {"name": "tilelang_core_dq", "run": run, "tilelang": dict(key, which="dq"),
          "args": tok + [("ENT", dq_args["ent_ptr"]), ("SX", dq_args["sx_ptr"]), ("DQH", out["dqh"]),
                         ("DCS", dq_args["dcs_ptr"])]}
    dkv = {"name": "tilelang_core_dkv", "run": run, "tilelang": dict(key, which="dkv"),
           "args": tok + [("DX", dkv_args["dx_ptr"]), ("DKS", out["dks"]),
                          ("DVT", dkv_args["dvp_ptr"].view(B, L, R, H, P)), ("DCS", dkv_args["dcs_ptr"]),
                          ("DTC", dkv_args["dtc_ptr"].view(nch, H))]}
    swap = {"scan_bwd_core_dq": [cs_call, dq], "scan_bwd_core_dkv": [dkv]}
    return [x for c in calls for x in swap.get(c["name"], [c])], out


def program(c: dict):
    """The TileLang prim_func of a TileLang call (its signature: what `args` must match)."""
    t = c["tilelang"]
    prog = walks.dq_program if t["which"] == "dq" else walks.dkv_program
    return prog(t["R"], t["N"], t["P"])


def launch(c: dict) -> None:
    """Launch a call of `plan`: a TileLang walk (built for the current device on first use) or a
    Triton kernel."""
    if "tilelang" not in c:
        tcore.launch(c)
        return
    t = c["tilelang"]
    arch = t["arch"] or arch_of(c["args"][0][1].device.index)
    k = walks.build(t["which"], t["R"], t["N"], t["P"], arch)
    k(*[x for _, x in c["args"]])


def core_backward(qh, ks, vt, adt, dy, s0=None, ds_final=None, cu_seqlens=None, config=None,
                  want_ds0=True, poison=False, dvt_partials=False):
    """backends/triton/scan_bwd_core.core_backward with the TileLang walks (module docstring).
    config: Triton core keys for the kernels that stay Triton's (`hybrid_config` fixes CHUNK,
    BLOCK_N and the precision keys)."""
    qh, ks, vt, adt, dy, s0, ds_final = tcore.contiguous_operands(qh, ks, vt, adt, dy, s0, ds_final)
    calls, out = plan(qh, ks, vt, adt, dy, s0, ds_final, cu_seqlens, config, want_ds0, poison=poison,
                      dvt_partials=dvt_partials)
    for c in calls:
        if c["run"]:
            launch(c)
    return out
