"""The forward's TileLang phase 4 (backends/tilelang/scan_chunk_output.py) without a GPU: every
variant of its scope built for sm_90a (no spills, no stack, tensor-core products present, every
input read, TMA destinations 128-byte aligned, the launch's shared memory within the H100's 227 KB);
the plan's wiring on meta tensors (the calls that replace the Triton phase 4, their arguments in
the prim_func's order, OUT_IMPL's values and errors); the slot table against the Triton
forward's slot numbering (scan_common._locate), dense and varlen. GPU correctness against the
float64 oracle: tests/test_tilelang_scan_fwd_gpu.py."""
import os
import re
import sys

import pytest
import torch

tilelang = pytest.importorskip("tilelang", reason="tilelang not importable: TileLang compile tests skipped")

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from tilelang_support import NO_NVCC, misaligned_tma_destinations, nvcc_ok, setup_env  # noqa: E402

setup_env()
from mamba3_kernels.backends.tilelang import scan_chunk_output as walk  # noqa: E402
from mamba3_kernels.backends.triton import scan_fwd as sf  # noqa: E402
BadArgument = ValueError   # spec.bad_arg raises a ValueError naming the argument
from mamba3_kernels.spec import Problem, ScanSpec  # noqa: E402

from mamba3_kernels.backends.tilelang.scan_bwd_core_chunk import SMEM_MAX  # noqa: E402

VARIANTS = [  # (id, spec keys, compile keys)
    ("n128-p64-a32-shared-dz-entry", dict(d_state=128, head_dim=64, n_angles=32, shared_angles=True, has_d=True,
                                          has_z=True), dict(has_entry=True)),
    ("n64-p64-a16-perhead-half", dict(d_state=64, head_dim=64, n_angles=16, pairing="half"), dict(has_entry=False)),
    ("n128-p64-a3-yout", dict(d_state=128, head_dim=64, n_angles=3, has_z=True), dict(has_entry=True, y_out=True)),
    ("n64-p64-a0", dict(d_state=64, head_dim=64, n_angles=0, has_d=True), dict(has_entry=False)),
    ("n128-p64-a32-stages1", dict(d_state=128, head_dim=64, n_angles=32, shared_angles=True, has_d=True,
                                  has_z=True), dict(has_entry=True, stages=1)),
    ("n128-p64-a64-fp32-angles", dict(d_state=128, head_dim=64, n_angles=64, shared_angles=True, has_z=True),
     dict(has_entry=True, ang_dtype="float32")),
]


@pytest.mark.skipif(not nvcc_ok(), reason=NO_NVCC)
@pytest.mark.parametrize("name,spec_kw,kw", VARIANTS, ids=[v[0] for v in VARIANTS])
def test_walk_builds_without_spills(name, spec_kw, kw):
    spec = ScanSpec(**spec_kw)
    r = walk.compile(spec, **kw)
    src = r["source"]
    assert "wgmma" in src, "no tensor-core product in the generated code"
    body = src.split("main_kernel(", 2)[-1]   # the definition, past both signatures
    reads = ["Q", "K", "V", "SC", "QB", "KB", "SLOT", "OUT"]
    reads += ["Z"] if spec.has_z else []
    reads += ["ANG"] if spec.n_angles else []
    reads += ["DV"] if spec.has_d else []
    reads += ["ENT"] if kw.get("has_entry") else []
    reads += ["YO"] if kw.get("y_out") else []
    for x in reads:   # (a T.copy outside a macro is dropped silently)
        assert re.search(rf"\b{x}(_desc\b| \+|\[)", body), f"{name}: the kernel never touches {x}"
    assert r.get("registers"), f"no resource usage read from the cubin: {r.get('cubin_path')}"
    bad = misaligned_tma_destinations(src)
    assert not bad, f"{name}: TMA copies into shared memory at offsets not a multiple of 128 B: {bad}"
    assert r["dynamic_smem"] and r["dynamic_smem"] <= SMEM_MAX, f"{name}: {r['dynamic_smem']} B shared"
    assert r["spills"] == 0 and r["stack"] == 0, f"{name}: {r['spills']} B spilled, stack {r['stack']}"


def _bundle(spec, problem):
    return sf.meta_tensors(spec, problem)


def test_plan_replaces_phase_4_and_matches_the_signature():
    spec = ScanSpec(d_state=128, head_dim=64, n_angles=32, shared_angles=True, has_d=True, has_z=True,
                    final_states=True)
    prob = Problem(2, 4096, 8, 1, 2)
    t = _bundle(spec, prob)
    cfg = dict(sf.default_config(spec, prob), OUT_IMPL="tilelang")
    calls, _ = sf.plan(spec, cfg, t, device="meta")
    names = [c["name"] for c in calls]
    assert "scan_chunk_output" not in names
    assert names[-2:] == ["scan_scalars", "tilelang_chunk_output"], names
    c = calls[-1]
    k = dict(c["tilelang"])
    k.pop("arch")
    k.pop("stages")
    prim = walk.program(**k)
    params = [p.name.removesuffix("_handle") for p in prim.params]
    assert params == [n for n, _ in c["args"]], (params, [n for n, _ in c["args"]])
    # every tensor argument has the prim_func's rank
    for (n, x), p in zip(c["args"], prim.params):
        assert x.dim() == len(prim.buffer_map[p].shape), n
    assert k["has_entry"] and k["has_z"] and k["has_d"] and k["shared_angles"] and not k["y_out"]
    # gates then serve phase 2 only: they run exactly when phase 2 does
    by = {x["name"]: x for x in calls}
    assert by["scan_gates"]["run"] == by["scan_chunk_state"]["run"]
    # the Triton-only default keeps the Triton phase 4
    calls, _ = sf.plan(spec, sf.default_config(spec, prob), t, device="meta")
    assert "scan_chunk_output" in [x["name"] for x in calls]
    # (aot.build and the spill guard take the calls with a Triton "kernel" only)
    assert "kernel" not in by["tilelang_chunk_output"] and "kernel" in by["scan_scalars"]


@pytest.mark.parametrize("spec_kw,why", [
    (dict(rank=2), "rank 2"), (dict(output_mode="norm_reduce"), "norm"), (dict(input_dtype="float32"), "float32"),
    (dict(d_state=32), "N=32"), (dict(head_dim=128), "P=128"), (dict(has_mimo_v=True, rank=4), "rank 4")])
def test_out_impl_outside_the_scope_is_an_error(spec_kw, why):
    base = dict(d_state=128, head_dim=64, n_angles=16)
    base.update(spec_kw)
    spec = ScanSpec(**base)
    prob = Problem(1, 512, 2, 1, 1)
    t = _bundle(spec, prob)
    cfg = dict(sf.default_config(spec, prob), OUT_IMPL="tilelang")
    with pytest.raises(BadArgument, match="config.OUT_IMPL") as e:
        sf.plan(spec, cfg, t, device="meta")
    assert why in str(e.value)


def test_whole_chunks_rounds_segments_up():
    spec = ScanSpec(d_state=128, head_dim=64, n_angles=16)
    d = sf.default_config(spec, Problem(1, 512, 2, 1, 1))
    for seg, want in ((1, 4), (2, 4), (4, 4), (5, 8), (64, 64)):
        c = walk.whole_chunks(dict(d, CHUNK=16, SEG=seg))
        assert (c["SEG"], c["OUT_IMPL"]) == (want, "tilelang") and c["SEG"] * 16 % walk.C == 0
    assert walk.whole_chunks(dict(d, CHUNK=64, SEG=3))["SEG"] == 3


def test_out_impl_values_and_segment_length():
    spec = ScanSpec(d_state=128, head_dim=64, n_angles=16)
    prob = Problem(1, 512, 2, 1, 1)
    t = _bundle(spec, prob)
    for bad in ("cute", "auto"):   # (no "auto": nothing would pick the slower TileLang walk)
        with pytest.raises(BadArgument, match="config.OUT_IMPL"):
            sf.check_config(spec, dict(sf.default_config(spec, prob), OUT_IMPL=bad))
    with pytest.raises(BadArgument, match="config.OUT_TL_STAGES"):
        sf.check_config(spec, dict(sf.default_config(spec, prob), OUT_IMPL="tilelang", OUT_TL_STAGES=3))
    with pytest.raises(BadArgument, match="multiples of 64"):   # 2 chunks of 16 tokens: 32-token segments
        sf.plan(spec, dict(sf.default_config(spec, prob), OUT_IMPL="tilelang", SEG=2), t, device="meta")
    strided = sf.meta_tensors(spec, prob)
    strided.v = torch.empty((1, 512, 2, 128), device="meta")[..., :64]
    with pytest.raises(BadArgument, match="strided"):
        sf.plan(spec, dict(sf.default_config(spec, prob), OUT_IMPL="tilelang"), strided, device="meta")


def _locate(slot, cu, L, nseg, seglen):
    """scan_common._locate in Python: (b, seq, seg, bos, eos, t0)."""
    if cu is None:
        return slot // nseg, slot // nseg, slot % nseg, 0, L, (slot % nseg) * seglen
    S = len(cu) - 1
    seq = max(i for i in range(S) if cu[i] // seglen + i <= slot) if any(
        cu[i] // seglen + i <= slot for i in range(S)) else 0
    bos, eos = cu[seq], cu[seq + 1]
    seg = slot - (bos // seglen + seq)
    return 0, seq, seg, bos, eos, bos + seg * seglen


@pytest.mark.parametrize("lengths", [None, [1, 63, 64, 65, 2047, 0, 130], [0, 0, 300], [700]])
@pytest.mark.parametrize("seglen,split", [(256, 1), (512, 2), (64, 1)])
def test_slot_table_matches_the_triton_numbering(lengths, seglen, split):
    if lengths is None:
        B, L, cu = 3, 1000, None
        nseg = -(-L // seglen)
        nslots = B * nseg
        cu_t = None
    else:
        B, L = 1, sum(lengths)
        cu = [0]
        for n in lengths:
            cu.append(cu[-1] + n)
        nseg = None
        nslots = L // seglen + len(lengths)
        cu_t = torch.tensor(cu, dtype=torch.int32)
    seglen2 = seglen // split
    nseg2 = -(-L // seglen2)
    tab = walk.slot_table(B, L, seglen, split, nseg2, cu_t).tolist()
    assert len(tab) == nslots
    for s, (b, eos, t0, eslot, nck) in enumerate(tab):
        lb, seq, seg, bos, leos, lt0 = _locate(s, cu, L, nseg, seglen)
        want_nck = min(-(-(max(leos - lt0, 0)) // walk.C), seglen // walk.C)
        assert nck == want_nck, (s, tab[s])
        if nck:
            first2 = seq * nseg2 if cu is None else bos // seglen2 + seq
            assert (b, eos, t0, eslot) == (lb, leos, lt0, first2 + seg * split), (s, tab[s])
