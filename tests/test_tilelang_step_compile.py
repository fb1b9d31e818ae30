"""TileLang decode step: lower + build cubins for sm_90a on CPU (no GPU needed).

A pairwise subset of R in {1,2,4} x N in {16,64} x P in {16,48} x G in {1,2} x pairing x
state dtype x Z / D x output mode (plus euler, A = 0, shared angles, fp32 / fp16 inputs,
out-of-place, multi-tile and non-default configs), one compile each (~4 s). state_indices is a
runtime tensor in every kernel (identity indices are passed without a pool), and B and the pool
size M are dynamic, so neither needs its own compile. Each case checks that the cubin is an ELF
holding `mamba3_step_kernel` and records registers / stack / local-memory (spill) bytes.
"""
import os
import sys

import pytest

from mamba3_kernels.spec import Problem, ScanSpec

tilelang = pytest.importorskip("tilelang", reason="tilelang not importable: TileLang compile tests skipped")

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from tilelang_support import NO_NVCC, nvcc_ok, setup_env  # noqa: E402

setup_env()
from mamba3_kernels.backends import tilelang as TLB  # noqa: E402

pytestmark = pytest.mark.skipif(not nvcc_ok(), reason=NO_NVCC)


def S(**kw):
    base = dict(d_state=64, head_dim=48, rank=1, n_angles=8, pairing="half", has_d=True, has_z=True,
                input_dtype="bfloat16", state_dtype="float32", initial_states=True, final_states=True,
                chunk_size=1)
    base.update(kw)
    return ScanSpec(**base)


MIMO = dict(has_mimo_v=True, has_mimo_z=True, has_mimo_out=True)

# (id, spec, G, in-place, config or None = default)
CASES = [
    ("R1-N16-P16-G1-inter-f32-ZD-reduce",
     S(rank=1, d_state=16, head_dim=16, n_angles=4, pairing="interleaved"), 1, True, None),
    ("R1-N64-P48-G2-half-bf16-noZ-noD-reduce",
     S(rank=1, d_state=64, head_dim=48, n_angles=32, has_z=False, has_d=False, state_dtype="bfloat16"),
     2, True, None),
    ("R2-N16-P48-G2-inter-bf16-Z-per_rank",
     S(rank=2, d_state=16, head_dim=48, n_angles=8, pairing="interleaved", has_d=False,
       has_mimo_v=True, has_mimo_z=True, output_mode="per_rank", state_dtype="bfloat16"), 2, True, None),
    ("R2-N64-P16-G1-half-f32-D-norm_reduce",
     S(rank=2, d_state=64, head_dim=16, n_angles=16, has_z=False, has_mimo_out=True,
       output_mode="norm_reduce"), 1, True, None),
    ("R4-N16-P16-G2-half-f32-ZD-norm_reduce-mimo",
     S(rank=4, d_state=16, head_dim=16, n_angles=4, output_mode="norm_reduce", **MIMO), 2, True, None),
    ("R4-N64-P48-G1-inter-bf16-ZD-reduce-mimo",
     S(rank=4, d_state=64, head_dim=48, n_angles=16, pairing="interleaved", state_dtype="bfloat16", **MIMO),
     1, True, None),
    ("R4-N64-P16-G2-euler-A0-noZ-noD-per_rank-fp32in",
     S(rank=4, d_state=64, head_dim=16, n_angles=0, discretization="euler", has_z=False, has_d=False,
       output_mode="per_rank", input_dtype="float32"), 2, True, None),
    ("R2-N64-P48-G1-half-shared-angles-fp16in-outofplace",
     S(rank=2, d_state=64, head_dim=48, n_angles=32, shared_angles=True, input_dtype="float16", **MIMO),
     1, False, None),
    ("R1-N6-P6-odd-shapes-masked",
     S(rank=1, d_state=6, head_dim=6, n_angles=3, pairing="interleaved"), 1, True, None),
    ("R4-N128-P64-G1-half-f32-decode-default",
     S(rank=4, d_state=128, head_dim=64, n_angles=32, **MIMO), 1, True, None),
    ("R4-N128-P64-multi-tile-256threads",
     S(rank=4, d_state=128, head_dim=64, n_angles=32, **MIMO), 1, True,
     dict(threads=256, block_p=32, cols=8)),
    ("R4-N128-P64-bf16-many-CTAs-default",
     S(rank=4, d_state=128, head_dim=64, n_angles=32, state_dtype="bfloat16", **MIMO), 1, True,
     TLB.default_config(S(rank=4, d_state=128, head_dim=64, state_dtype="bfloat16"),
                        Problem(64, 1, 32, 1, 64))),
    ("prefetch-R4-N128-P64-small-B",
     S(rank=4, d_state=128, head_dim=64, n_angles=32, **MIMO), 1, True,
     dict(threads=128, block_p=64, cols=4, prefetch=1)),
    ("prefetch-R2-N16-P48-inter-per_rank-outofplace",
     S(rank=2, d_state=16, head_dim=48, n_angles=8, pairing="interleaved", has_mimo_v=True,
       has_mimo_z=True, output_mode="per_rank", state_dtype="bfloat16"), 2, False,
     dict(threads=64, block_p=16, cols=8, prefetch=1)),
    ("prefetch-R1-N6-P6-odd-norm",
     S(rank=1, d_state=6, head_dim=6, n_angles=3, output_mode="norm_reduce"), 1, True,
     dict(threads=128, block_p=6, cols=4, prefetch=1)),
    ("prefetch-R4-N64-P16-euler-A0-noZ",
     S(rank=4, d_state=64, head_dim=16, n_angles=0, discretization="euler", has_z=False,
       has_mimo_v=True), 2, True, dict(threads=64, block_p=16, cols=8, prefetch=1)),
    ("R1-N64-P48-3tiles-64threads",
     S(rank=1, d_state=64, head_dim=48, n_angles=16, output_mode="norm_reduce"), 2, False,
     dict(threads=64, block_p=16, cols=8)),
]

RESULTS = {}


@pytest.mark.parametrize("cid,spec,G,inplace,cfg", CASES, ids=[c[0] for c in CASES])
def test_compile_sm90a(cid, spec, G, inplace, cfg, record_property):
    ok, why = TLB.supports(spec, "step")
    assert ok, why
    r = TLB.compile(spec, cfg, "step", arch="sm_90a", nheads=4 * G, ngroups=G, inplace=inplace)
    cubin = r["cubin"]
    assert isinstance(cubin, (bytes, bytearray)) and cubin[:4] == b"\x7fELF", "not an ELF cubin"
    assert b"mamba3_step_kernel" in cubin, "kernel symbol missing from the cubin"
    assert r["cubin_path"] is None or os.path.exists(r["cubin_path"])
    assert "mamba3_step_kernel" in r["source"]
    usage = {k: r.get(k) for k in ("registers", "spills", "stack", "shared", "compile_s")}
    usage["config"] = r["config"]
    RESULTS[cid] = usage
    record_property("resource_usage", usage)
    print(cid, usage)
    if r.get("registers") is not None:
        assert r["registers"] <= 255
        assert r["spills"] == 0, f"local memory (spills) {r['spills']} bytes"


def test_space_configs_are_buildable_geometries():
    """Every candidate of space() has a valid tile geometry and fits in shared memory (no compile)."""
    specs = [S(rank=r, d_state=n, head_dim=p, n_angles=min(8, n // 2), state_dtype=sd)
             for r in (1, 2, 4, 8) for n in (6, 16, 64, 128, 256) for p in (6, 16, 48, 64, 128)
             for sd in ("float32", "bfloat16")]
    for spec in specs:
        ok, why = TLB.supports(spec, "step")
        assert ok, (spec, why)
        sp = TLB.space(spec, None, "step")
        assert sp and sp[0] == TLB.default_config(spec, None, "step")
        for cfg in sp:
            npad, tpr, rpp, bpp, nt = TLB.geometry(spec.d_state, spec.head_dim, cfg["threads"],
                                                   cfg["block_p"], cfg["cols"])
            assert npad >= spec.d_state and bpp * nt >= spec.head_dim
            assert tpr <= 32 and cfg["threads"] % tpr == 0
            assert bpp * npad // cfg["threads"] <= TLB.MAX_ELEMS_PER_THREAD
            assert TLB.shared_bytes(spec, cfg) <= TLB.MAX_SHARED


def test_default_config_by_batch():
    spec = S(rank=4, d_state=128, head_dim=64)
    assert TLB.default_config(spec, Problem(1, 1, 32, 1, 1)) == dict(threads=128, block_p=64, cols=4)
    assert TLB.default_config(spec, Problem(64, 1, 32, 1, 64)) == dict(threads=64, block_p=32, cols=8)


def test_protocol_without_gpu():
    assert TLB.NAME == "tilelang"
    ok, why = TLB.available()
    assert isinstance(ok, bool) and isinstance(why, str)
    assert TLB.supports(S(), "forward") == (False, "not implemented yet")
    assert TLB.supports(S(state_dtype="float16"), "step")[0] is False
