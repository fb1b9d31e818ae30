"""Core of the scan backward (issue 5): the float64 reference and the Triton kernels.

Reference: reference/core_adjoint.py's quadratic form vs its token recurrence, and its
gradients vs central finite differences (dense and varlen, with and without s0 / ds_final).

Kernels (backends/triton/scan_bwd_core*.py) on CPU through the Triton interpreter, against the
reference run in float64 on the exact (bf16-rounded) operands the kernels saw: fresh random
inputs, decays adt = -U[0.01, 1], outputs and scratch poisoned with NaN before the run, every
output compared (rel_l2 <= 2e-2 for bf16 operands, 2e-3 for fp32). Shapes: a pairwise cover of
R {1, 2, 4}, N {16, 32}, P {16, 48}, L {1, 5, 16, 37}, dtype, s0 / ds_final, segment length,
N / P blocking and rows per chunk {16, 32}; varlen lengths [3, 0, 17, 1]; R = 8; determinism (two runs bitwise equal);
want_ds0=False; argument errors. TRITON_INTERPRET must be set before triton is imported (see
test_triton_scan_fwd.py): if an earlier module imported triton without it, the kernel tests
rerun this module in a fresh process.
"""
from __future__ import annotations

import os
import subprocess
import sys
import zlib

_LATE = "triton" in sys.modules and os.environ.get("TRITON_INTERPRET", "") in ("", "0")
if not _LATE:
    os.environ["TRITON_INTERPRET"] = "1"

import numpy as np
import pytest
from mamba3_kernels.reference import core_adjoint as ca
from mamba3_kernels.reference.compare import rel_l2
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import pairwise  # noqa: E402


here = pytest.mark.skipif(_LATE, reason="triton was imported before TRITON_INTERPRET; see test_fresh_process")


def _inputs(rng, B, L, R, H, N, P, S=None, s0=True, dsf=True):
    X = B if S is None else S
    return {
        "qh": rng.standard_normal((B, L, R, H, N)), "ks": rng.standard_normal((B, L, R, H, N)),
        "vt": rng.standard_normal((B, L, R, H, P)), "adt": -rng.uniform(0.01, 1.0, (B, H, L)),
        "dy": rng.standard_normal((B, L, R, H, P)),
        "s0": rng.standard_normal((X, H, P, N)) if s0 else None,
        "ds_final": rng.standard_normal((X, H, P, N)) if dsf else None}


def test_reference_forward_matches_recurrence():
    rng = np.random.default_rng(0)
    for R in (1, 2, 4):
        x = _inputs(rng, 1, 9, R, 1, 5, 3)
        sl = (0, slice(None), slice(None), 0)
        y, sf = ca.forward_seq(x["qh"][sl], x["ks"][sl], x["vt"][sl], x["adt"][0, 0], x["s0"][0, 0])
        y2, sf2 = ca.recurrent_seq(x["qh"][sl], x["ks"][sl], x["vt"][sl], x["adt"][0, 0], x["s0"][0, 0])
        np.testing.assert_allclose(y, y2, rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(sf, sf2, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("R,s0,dsf,varlen", [(1, True, True, False), (2, False, True, False),
                                             (4, True, False, False), (2, True, True, True)])
def test_reference_gradients_finite_differences(R, s0, dsf, varlen):
    rng = np.random.default_rng(R + 10 * s0 + 100 * dsf + 1000 * varlen)
    cu = np.array([0, 3, 3, 8, 9], np.int32) if varlen else None
    L = 9 if varlen else 6
    B, H = (1, 2) if varlen else (2, 1)
    x = _inputs(rng, B, L, R, H, 3, 2, S=4 if varlen else None, s0=s0, dsf=dsf)
    g = ca.core_backward(**x, cu_seqlens=cu)
    eps = 1e-6
    names = {"qh": "dqh", "ks": "dks", "vt": "dvt", "adt": "dadt", "s0": "ds0"}
    for name, gname in names.items():
        if x[name] is None:
            continue
        arr = x[name]
        num = np.zeros(arr.shape)
        for idx in np.ndindex(arr.shape):
            old = arr[idx]
            arr[idx] = old + eps
            lp = ca.core_loss(**x, cu_seqlens=cu)
            arr[idx] = old - eps
            lm = ca.core_loss(**x, cu_seqlens=cu)
            arr[idx] = old
            num[idx] = (lp - lm) / (2 * eps)
        np.testing.assert_allclose(g[gname], num, rtol=1e-6, atol=1e-6, err_msg=gname)
    if not s0:
        assert g["ds0"].shape == (4 if varlen else B, H, 2, 3)


# ------------------------------------------------------------------------------------------
# Triton kernels (interpreter)

def _core():
    pytest.importorskip("triton")
    from mamba3_kernels.backends.triton import scan_bwd_core
    return scan_bwd_core


def _run_case(rng, B, L, R, H, N, P, dtype="bfloat16", s0=True, dsf=True, lengths=None, cfg=None,
              want_ds0=True, adt_scale=1.0):
    """Run the kernels (poisoned outputs) and the reference on the rounded operands; return
    (kernel outputs, reference outputs). adt_scale: the log-decays times this (weak decay < 1)."""
    import torch
    core = _core()
    tdt = {"bfloat16": torch.bfloat16, "float32": torch.float32}[dtype]
    cu = None if lengths is None else np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
    if cu is not None:
        B, L = 1, int(cu[-1])
    x = _inputs(rng, B, L, R, H, N, P, S=None if cu is None else len(lengths), s0=s0, dsf=dsf)
    x["adt"] = x["adt"] * adt_scale
    t = {k: None if v is None else torch.as_tensor(v, dtype=torch.float32) for k, v in x.items()}
    for k in ("qh", "ks", "vt", "dy"):
        t[k] = t[k].to(tdt)
    out = core.core_backward(t["qh"], t["ks"], t["vt"], t["adt"], t["dy"], t["s0"], t["ds_final"],
                             None if cu is None else torch.as_tensor(cu), config=cfg, want_ds0=want_ds0,
                             poison=True)
    f = lambda v: None if v is None else v.double().numpy()
    ref = ca.core_backward(f(t["qh"]), f(t["ks"]), f(t["vt"]), f(t["adt"]), f(t["dy"]), f(t["s0"]),
                           f(t["ds_final"]), cu)
    return out, ref


def _check(out, ref, dtype, what):
    tol = 2e-2 if dtype == "bfloat16" else 2e-3
    errs = {k: rel_l2(out[k].double().numpy(), ref[k]) for k in ref if out.get(k) is not None}
    scale = max(np.linalg.norm(v) for v in ref.values())
    for k in errs:  # a gradient that is exactly 0 (L = 1: dks, dvt without ds_final, dadt without
        # s0): its error relative to the largest gradient of the problem
        if np.linalg.norm(ref[k]) <= 1e-12 * scale:
            errs[k] = float(np.linalg.norm(out[k].double().numpy() - ref[k]) / scale)
    assert set(errs) >= {"dqh", "dks", "dvt", "dadt"}, errs
    bad = {k: e for k, e in errs.items() if not e <= tol}
    assert not bad, f"{what}: rel_l2 over {tol}: {bad} (all: {errs})"
    return errs


FACTORS = {"R": (1, 2, 4), "N": (16, 32), "P": (16, 48), "L": (1, 5, 16, 37), "dtype": ("bfloat16", "float32"),
           "s0": (True, False), "dsf": (True, False), "seg": (0, 1, 2), "block": (False, True),
           "rows": (16, 32)}


@here
@pytest.mark.parametrize("case", pairwise.covering_rows(FACTORS, seed=5, tries=100), ids=lambda c: "R{R}-N{N}-P{P}-L{L}-{dtype}-s0{s0}-dsf{dsf}-seg{seg}-blk{block}-rows{rows}".format(**c))
def test_core_vs_reference(case):
    core = _core()
    rng = np.random.default_rng(zlib.crc32(repr(sorted(case.items())).encode()))
    cfg = dict(core.default_config(case["R"], case["N"], case["P"], case["dtype"]), SEG=case["seg"])
    cfg["CHUNK"] = max(1, case["rows"] // {1: 1, 2: 2, 4: 4}[case["R"]])   # rows per chunk
    if case["block"]:  # several N blocks (dq, dkv: dvt partials) and P blocks (local states, passing)
        cfg.update(BLOCK_N=16, BLOCK_P=16, PASS_BLOCK_P=16)
    out, ref = _run_case(rng, 2, case["L"], case["R"], 2, case["N"], case["P"], case["dtype"], case["s0"],
                         case["dsf"], cfg=cfg)
    errs = _check(out, ref, case["dtype"], case)
    print(case, {k: f"{e:.1e}" for k, e in errs.items()})


@here
@pytest.mark.parametrize("R,dtype,s0,dsf,seg", [(1, "bfloat16", True, True, 1), (2, "float32", False, True, 2),
                                                (4, "bfloat16", True, False, 0), (1, "float32", False, False, 2)])
def test_core_varlen(R, dtype, s0, dsf, seg):
    core = _core()
    rng = np.random.default_rng(R * 7 + seg)
    cfg = dict(core.default_config(R, 32, 48, dtype), SEG=seg, BLOCK_P=16, PASS_BLOCK_P=16, CHUNK=16 // R)
    out, ref = _run_case(rng, 1, 0, R, 2, 32, 48, dtype, s0, dsf, lengths=[3, 0, 17, 1], cfg=cfg)
    _check(out, ref, dtype, "varlen")
    assert out["ds0"].shape == (4, 2, 48, 32)


@here
@pytest.mark.parametrize("inter,update,scratch", [("bfloat16", "bfloat16", "bfloat16"),
                                                  ("float32", "bfloat16", "bfloat16"),
                                                  ("bfloat16", "float32", "float32")])
def test_core_bf16_precision_modes(inter, update, scratch):
    """The non-default precision keys (the default, all fp32, runs in the cover above): the
    inter-chunk products with the state (INTER), the state updates (UPDATE) and the segment
    scratch (SCRATCH) with bf16 rounding, over several segments and N / P blocks."""
    core = _core()
    rng = np.random.default_rng(11)
    cfg = dict(core.default_config(2, 32, 48, "bfloat16"), SEG=2, BLOCK_N=16, BLOCK_P=16, CHUNK=8,
               INTER=inter, UPDATE=update, SCRATCH=scratch)
    out, ref = _run_case(rng, 1, 53, 2, 2, 32, 48, "bfloat16", True, True, cfg=cfg)
    _check(out, ref, "bfloat16", (inter, update, scratch))


@here
@pytest.mark.parametrize("R,lengths,seg", [(1, None, 2), (1, [70, 0, 5, 64], 1), (4, [20, 0, 3, 33], 1),
                                           (2, None, 2)])
def test_core_at_the_tilelang_walks_config(R, lengths, seg):
    """The Triton core at the config the TileLang walks pair with (backends/tilelang/
    scan_bwd_core.hybrid_config: 64-row chunks, one N block): its local / pass / dadt kernels
    run there beside the TileLang walks, so here the whole Triton core runs at it against the
    oracle (dense with a partial last chunk and two segments; varlen with an empty and a short
    sequence)."""
    from mamba3_kernels.backends.tilelang import scan_bwd_core as hyb
    cfg = dict(hyb.hybrid_config(R, 64, 64), SEG=seg)
    out, ref = _run_case(np.random.default_rng(64 + R), 1, 150 // R, R, 2, 64, 64, lengths=lengths, cfg=cfg)
    _check(out, ref, "bfloat16", "tilelang walks config")


@here
@pytest.mark.parametrize("R,B,L,lengths,seg", [(1, 2, 150, None, 2), (1, 1, None, [70, 0, 5, 64, 129], 1),
                                               (4, 1, None, [20, 0, 3, 33], 2), (8, 2, 19, None, 1)])
def test_cs_table_of_the_tilelang_walks(R, B, L, lengths, seg):
    """The cs kernel (scan_bwd_core_states.scan_bwd_core_cs_kernel), which gives the TileLang walks
    each chunk's in-chunk decay cumsum as one row: every row a walk reads (the slot table's
    chunks) against numpy's cumsum over the chunk's tokens, positions past the sequence's end
    holding its total (the walks read the chunk total T at position C - 1)."""
    import torch
    from mamba3_kernels.backends.tilelang import scan_bwd_core as hyb
    from mamba3_kernels.backends.tilelang import scan_bwd_core_chunk as walks
    from mamba3_kernels.backends.triton import scan_bwd_core as tcore
    cu = None
    if lengths is not None:
        B, L = 1, sum(lengths)
        cu = torch.tensor(np.concatenate([[0], np.cumsum(lengths)]), dtype=torch.int32)
    H, N, P, TOK = 2, 64, 64, walks.tokens(R)
    rng = np.random.default_rng(zlib.crc32(f"cs{R}{L}".encode()))
    adt = torch.tensor(-rng.uniform(0.01, 1.0, (B, H, L)), dtype=torch.float32)
    z = lambda w: torch.zeros(B, L, R, H, w, dtype=torch.bfloat16)  # noqa: E731
    calls, _ = hyb.plan(z(N), z(N), z(P), adt, z(P), None, None, cu, dict(tcore.default_config(R, N, P), SEG=seg),
                        poison=True, arch="sm_90a")
    c = next(c for c in calls if c["name"] == "scan_bwd_core_cs")
    tcore.launch(c)
    cs = dict(c["args"])["cs_ptr"].numpy()
    slots = walks.slot_table(B, L, seg, TOK, cu).numpy()
    a = adt.numpy().astype(np.float64)
    seen = 0
    for slot, (b, end, start) in enumerate(slots):
        for ci in range(min(-(-(end - start) // TOK), seg) if start < end else 0):
            tc = start + ci * TOK
            want = np.cumsum(np.pad(a[b, :, tc:min(tc + TOK, end)], ((0, 0), (0, max(0, tc + TOK - end)))), -1)
            np.testing.assert_allclose(cs[slot * seg + ci], want, rtol=1e-5, atol=1e-5, err_msg=f"slot {slot} chunk {ci}")
            seen += 1
    assert seen == sum(-(-n // TOK) for n in (lengths or [L] * B)), seen


@here
def test_core_rank8_and_odd_sizes():
    rng = np.random.default_rng(8)
    out, ref = _run_case(rng, 1, 11, 8, 1, 24, 40, "float32")
    _check(out, ref, "float32", "R8")


@here
@pytest.mark.parametrize("lengths", [None, [1469, 0, 600]])
def test_core_long_segments(lengths):
    """Segments of 128 16-token chunks (the automatic SEG stops at 64; a config may ask for more),
    the last ending inside a chunk (L = 16 * 128 + 21), dense and varlen with an empty sequence."""
    core = _core()
    cfg = dict(core.default_config(1, 16, 16, "bfloat16"), CHUNK=16, SEG=128)
    out, ref = _run_case(np.random.default_rng(11), 1, 16 * 128 + 21, 1, 1, 16, 16, lengths=lengths, cfg=cfg)
    _check(out, ref, "bfloat16", "long segments")


@here
def test_core_dadt_long_segments_weak_decay():
    """dadt's d T recurrence over a 64-chunk segment with weak decay (long memory: the chunk
    state terms are large and nearly cancel): its terms are fp32-accurate, so dadt stays far
    below the bf16 bound (~1e-5 here); the per-chunk bf16 state scratch it replaced gave ~1e-3."""
    core = _core()
    cfg = dict(core.default_config(1, 32, 16, "bfloat16"), CHUNK=16, SEG=64)
    out, ref = _run_case(np.random.default_rng(21), 1, 16 * 64 + 40, 1, 1, 32, 16, cfg=cfg, adt_scale=0.01)
    errs = _check(out, ref, "bfloat16", "weak decay")
    assert errs["dadt"] <= 2e-4, errs


@here
@pytest.mark.parametrize("cfgx,L,lengths", [({"CHUNK": 64, "SEG": 128}, 64 * 66 + 7, None),
                                            ({"CHUNK": 16, "SEG": 3}, 16 * 7 + 5, None),
                                            ({"CHUNK": 16, "SEG": 5}, 0, [40, 0, 95, 16])])
def test_core_dadt_chunk_blocks(cfgx, L, lengths):
    """dadt takes a segment's chunks as [SB, C] tiles, SB = min(pow2(SEG), 256 / C), carrying
    d T from tile to tile: many tiles per segment (64-token chunks, 128-chunk segments), a
    segment length that is not a power of two, dense and varlen with an empty sequence."""
    core = _core()
    cfg = dict(core.default_config(1, 16, 16, "bfloat16"), **cfgx)
    out, ref = _run_case(np.random.default_rng(3), 1, L, 1, 1, 16, 16, cfg=cfg, lengths=lengths, adt_scale=0.05)
    errs = _check(out, ref, "bfloat16", str(cfgx))
    assert errs["dadt"] <= 2e-4, errs


@here
def test_core_deterministic_and_want_ds0():
    import torch
    core = _core()
    rng = np.random.default_rng(3)
    x = _inputs(rng, 1, 37, 2, 2, 32, 48)
    t = {k: torch.as_tensor(v, dtype=torch.float32) for k, v in x.items()}
    for k in ("qh", "ks", "vt", "dy"):
        t[k] = t[k].to(torch.bfloat16)
    cfg = dict(core.default_config(2, 32, 48, "bfloat16"), SEG=2, BLOCK_N=16, BLOCK_P=16)
    args = (t["qh"], t["ks"], t["vt"], t["adt"], t["dy"], t["s0"], t["ds_final"])
    a = core.core_backward(*args, config=cfg, poison=True)
    b = core.core_backward(*args, config=cfg, poison=True)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    c = core.core_backward(*args, config=cfg, want_ds0=False, poison=True)
    assert c["ds0"] is None
    for k in ("dqh", "dks", "dvt", "dadt"):
        assert torch.equal(a[k], c[k]), k
    # dvt_partials: dvt left as its N-block partials (2 blocks of 16 here), every element written,
    # summing to the same dvt; the other outputs unchanged
    d = core.core_backward(*args, config=cfg, poison=True, dvt_partials=True)
    assert d["dvt"].shape == (2,) + tuple(a["dvt"].shape) and not d["dvt"].isnan().any()
    assert torch.equal(d["dvt"][0] + d["dvt"][1], a["dvt"])
    for k in ("dqh", "dks", "dadt", "ds0"):
        assert torch.equal(a[k], d[k]), k


@here
@pytest.mark.parametrize("R,dtype,block,seg,lengths", [(1, "bfloat16", True, 2, None), (4, "float32", False, 0, None),
                                                       (2, "bfloat16", True, 1, [9, 0, 14])])
def test_core_fused_walks(R, dtype, block, seg, lengths):
    """FUSED (dq's and dkv's walks in one kernel): within the bounds of the oracle and bitwise
    equal to the two kernels (the same operations in the same order), every output written."""
    import torch
    core = _core()
    rng = np.random.default_rng(41 + R)
    cfg = dict(core.default_config(R, 32, 48, dtype), SEG=seg)
    if block:
        cfg.update(BLOCK_N=16, BLOCK_P=16, PASS_BLOCK_P=16)
    fused = dict(cfg, FUSED=True)
    names = {c["name"] for c in core.plan(*(torch.empty(s, device="meta") for s in
                                            ((2, 8, R, 2, 32), (2, 8, R, 2, 32), (2, 8, R, 2, 48), (2, 2, 8),
                                             (2, 8, R, 2, 48))), config=fused, device="meta")[0]}
    assert "scan_bwd_core_dqkv" in names and not names & {"scan_bwd_core_dq", "scan_bwd_core_dkv"}
    out, ref = _run_case(rng, 2, 37, R, 2, 32, 48, dtype, True, True, cfg=fused, lengths=lengths)
    _check(out, ref, dtype, f"fused R{R}")
    rng = np.random.default_rng(41 + R)
    two, _ = _run_case(rng, 2, 37, R, 2, 32, 48, dtype, True, True, cfg=cfg, lengths=lengths)
    for k in ("dqh", "dks", "dvt", "dadt", "ds0"):
        assert torch.equal(out[k], two[k]), k
    with pytest.raises(ValueError, match="config.FUSED"):
        core.check_config(R, dict(cfg, FUSED=1))


@here
def test_core_empty():
    """L = 0 (dense) and varlen with only empty sequences: no tokens, dS0 = dS_final (or 0)."""
    import torch
    core = _core()
    q = torch.zeros(2, 0, 1, 3, 16, dtype=torch.bfloat16)
    adt = torch.zeros(2, 3, 0)
    dsf = torch.randn(2, 3, 16, 16)
    o = core.core_backward(q, q, q, adt, q, None, dsf, poison=True)
    assert o["dadt"].shape == (2, 3, 0) and torch.equal(o["ds0"], dsf)
    cu = torch.tensor([0, 0, 0], dtype=torch.int32)
    o = core.core_backward(q[:1], q[:1], q[:1], adt[:1], q[:1], None, None, cu, poison=True)
    assert o["ds0"].shape == (2, 3, 16, 16) and not o["ds0"].abs().max() > 0


@here
def test_core_argument_errors():
    import torch
    core = _core()
    q = torch.zeros(1, 4, 1, 2, 16, dtype=torch.bfloat16)
    v = torch.zeros(1, 4, 1, 2, 16, dtype=torch.bfloat16)
    adt = torch.zeros(1, 2, 4)
    with pytest.raises(ValueError, match="adt: expected shape"):
        core.core_backward(q, q, v, adt[:, :1], v)
    with pytest.raises(ValueError, match="ks: expected dtype"):
        core.core_backward(q, q.float(), v, adt, v)
    with pytest.raises(ValueError, match="R: expected 1, 2, 4 or 8"):
        core.core_backward(q.expand(1, 4, 3, 2, 16), q.expand(1, 4, 3, 2, 16), v.expand(1, 4, 3, 2, 16), adt,
                           v.expand(1, 4, 3, 2, 16))
    with pytest.raises(ValueError, match="config.CHUNK"):
        core.core_backward(q, q, v, adt, v, config=dict(core.default_config(1, 16, 16), CHUNK=8))
    for key in ("INTER", "UPDATE", "SCRATCH"):
        with pytest.raises(ValueError, match=f"config.{key}"):
            core.core_backward(q, q, v, adt, v, config=dict(core.default_config(1, 16, 16), **{key: "tf32"}))
    for key in ("num_stages", "local_num_stages", "dq_num_stages", "dkv_num_stages"):
        for bad in (0, 1.5, True):
            with pytest.raises(ValueError, match=f"config.{key}"):
                core.core_backward(q, q, v, adt, v, config=dict(core.default_config(1, 16, 16), **{key: bad}))


def test_spill_guard_fallback():
    """The core's spill guard puts the kernels that spilled back to one stage (and only those),
    and gives nothing once none is pipelined; SPILL_GUARD is checked; off the GPU the config runs
    as given."""
    core = _core()
    d = core.default_config(1, 128, 64, "bfloat16")
    assert d["SPILL_GUARD"] is True and (d["local_num_stages"], d["dq_num_stages"], d["dkv_num_stages"]) == (2, 2, 2)
    assert core.fallback(d, set()) is None
    assert core.fallback(d, {"scan_bwd_core_dkv"}) == dict(d, dkv_num_stages=1)
    assert core.fallback(d, {"scan_bwd_core_dq", "scan_bwd_core_pass"}) == dict(d, dq_num_stages=1)
    ones = dict(d, local_num_stages=1, dq_num_stages=1, dkv_num_stages=1)
    assert core.fallback(ones, {"scan_bwd_core_dkv", "scan_bwd_core_dq", "scan_bwd_core_local"}) is None
    assert core.default_config(1, 128, 64, "float32")["dkv_num_stages"] == 1
    import torch
    q = torch.zeros(1, 4, 1, 2, 16, dtype=torch.bfloat16)
    assert core.effective_config(d, q, q, q, torch.zeros(1, 2, 4), q, None, None, None, True, False) is d
    with pytest.raises(ValueError, match="config.SPILL_GUARD"):
        core.check_config(1, dict(d, SPILL_GUARD=1))


def test_fresh_process():
    """Rerun this module in a clean process when triton was imported too early here."""
    if not _LATE:
        pytest.skip("ran in place")
    env = dict(os.environ, TRITON_INTERPRET="1")
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", __file__],
                       env=env, capture_output=True, text=True, check=False)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]
