"""TileLang walks of the backward core (backends/tilelang/scan_bwd_core_chunk.py): built for
sm_90a on the CPU (no GPU), no spills, tensor-core products present, every input read, every
TMA destination 128-byte aligned, the launch's dynamic shared memory within the H100's 227 KB
(the last two failed on the GPU before these checks existed); the Triton kernels they pair with
(local, pass, cs, dadt at the hybrid config: 64-row chunks, one N block) AOT-compiled without
spills; the slot table against the Triton core's slot numbering (dense and varlen);
`supports`. GPU correctness: tests/test_tilelang_scan_bwd_core_gpu.py."""
import json
import os
import re
import subprocess
import sys

import pytest
import torch

tilelang = pytest.importorskip("tilelang", reason="tilelang not importable: TileLang compile tests skipped")

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from tilelang_support import NO_NVCC, ROOT, misaligned_tma_destinations, nvcc_ok, setup_env  # noqa: E402

setup_env()
from mamba3_kernels.backends.tilelang import scan_bwd_core as hyb  # noqa: E402
from mamba3_kernels.backends.tilelang import scan_bwd_core_chunk as walks  # noqa: E402


@pytest.mark.skipif(not nvcc_ok(), reason=NO_NVCC)
@pytest.mark.parametrize("which", ["dq", "dkv"])
@pytest.mark.parametrize("R,N,P", [(1, 128, 64), (1, 64, 64), (1, 64, 128), (1, 128, 128), (2, 128, 64),
                                   (4, 128, 64), (4, 128, 128), (8, 64, 64)])
def test_walk_builds_without_spills(which, R, N, P):
    r = walks.compile(which, R, N, P)
    assert "wgmma" in r["source"], "no tensor-core product in the generated code"
    body = r["source"].split("main_kernel(", 2)[-1]   # the definition, past both signatures
    for name in ("QH", "KS", "VT", "DY", "CS", "SLOT"):   # (a T.copy outside a macro is dropped silently)
        assert re.search(rf"\b{name}(_desc\b| \+|\[)", body), f"{which} R{R}: the kernel never reads {name}"
    assert r.get("registers"), f"no resource usage read from the cubin: {r.get('cubin_path')}"
    bad = misaligned_tma_destinations(r["source"])
    assert not bad, f"{which} R{R}: TMA copies into shared memory at offsets not a multiple of 128 B: {bad}"
    # (a launch asking for more than the H100's shared memory fails: N = P = 128 at 2 stages did)
    assert r["dynamic_smem"] and r["dynamic_smem"] <= walks.SMEM_MAX, f"{which} R{R} N{N} P{P}: {r['dynamic_smem']} B shared"
    assert r["spills"] == 0 and r["stack"] == 0, f"{which} R{R} N{N} P{P}: {r['spills']} B spilled, stack {r['stack']}"


def test_misaligned_tma_destinations_are_found():
    ok = "tl::tma_load(CS_desc, mbarrier[0], (&(((float*)cs_s)[((ci & 1) * 32)])), 0, 1, 2);"
    assert misaligned_tma_destinations(ok) == []
    assert misaligned_tma_destinations(ok.replace("* 32", "* 16")) != []
    assert misaligned_tma_destinations(ok.replace("* 32)", "* 32) + 8")) != []


_PYTHONS = [("triton-ci", sys.executable)] + (
    [("triton-3.6", os.environ["MAMBA3_TRITON36_PYTHON"])] if os.environ.get("MAMBA3_TRITON36_PYTHON") else [])


@pytest.mark.parametrize("python", _PYTHONS, ids=[p[0] for p in _PYTHONS])
@pytest.mark.parametrize("R,N,P", [(1, 128, 64), (1, 64, 64), (4, 128, 64), (8, 64, 64), (1, 128, 128)])
def test_triton_kernels_of_the_hybrid_config_build_without_spills(R, N, P, python):
    """local, pass, cs and dadt (the hybrid plan's Triton calls), under this environment's Triton and (with
    MAMBA3_TRITON36_PYTHON, as `make test` sets it) the GPU image's 3.6, in a subprocess without
    TRITON_INTERPRET (AOT and the interpreter do not share a process). The hybrid core runs them
    without the Triton core's spill guard, so a spill here would reach the GPU."""
    pytest.importorskip("triton")
    code = (
        "import json, torch\n"
        "from mamba3_kernels.backends.tilelang import scan_bwd_core as hyb\n"
        "from mamba3_kernels.backends.triton.aot import build, target\n"
        "target('sm_90a')\n"
        "e = lambda *s, d=torch.bfloat16: torch.empty(s, dtype=d, device='meta')\n"
        f"B, L, H, R, N, P = 2, 1024, 4, {R}, {N}, {P}\n"
        "st = e(B, H, P, N, d=torch.float32)\n"
        "calls, _ = hyb.plan(e(B, L, R, H, N), e(B, L, R, H, N), e(B, L, R, H, P), e(B, H, L, d=torch.float32),\n"
        "                    e(B, L, R, H, P), st, st, device='meta', arch='sm_90a')\n"
        "rows = build([c for c in calls if 'tilelang' not in c], 'sm_90a')\n"
        "print(json.dumps([{k: r[k] for k in ('name', 'registers', 'spills')} for r in rows]))\n")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    if python[0] == "triton-3.6":
        env["TRITON_CACHE_DIR"] = str(ROOT / ".cache" / "triton36")
    out = subprocess.run([python[1], "-c", code], capture_output=True, text=True, env=env, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    rows = {r["name"]: r for r in json.loads(out.stdout.strip().splitlines()[-1])}
    kept = ("scan_bwd_core_local", "scan_bwd_core_pass", "scan_bwd_core_cs", "scan_bwd_core_dadt")
    assert set(kept) <= set(rows), sorted(rows)
    for name in kept:
        assert rows[name]["spills"] == 0, f"{name} at the hybrid config spills {rows[name]['spills']} B ({python[0]})"


def _triton_slots(B, L, SEG, TOK, lengths=None):
    """The Triton core's `_locate` in Python: (b, end, start) per slot."""
    seglen = SEG * TOK
    if lengths is None:
        nseg = -(-L // seglen)
        return [(s // nseg, L, (s % nseg) * seglen) for s in range(B * nseg)]
    cu = [0]
    for n in lengths:
        cu.append(cu[-1] + n)
    S = len(lengths)
    out = []
    for slot in range(cu[-1] // seglen + S):
        lo, hi = 0, S - 1
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if cu[mid] // seglen + mid <= slot:
                lo = mid
            else:
                hi = mid - 1
        out.append((0, cu[lo + 1], cu[lo] + (slot - (cu[lo] // seglen + lo)) * seglen))
    return out


@pytest.mark.parametrize("B,L,SEG,lengths,R", [(3, 1000, 2, None, 1), (2, 128, 1, None, 1), (1, 0, 1, [0, 0], 1),
                                               (1, 300, 1, [65, 0, 127, 1, 107], 1), (1, 700, 4, [700], 1),
                                               (1, 300, 2, [65, 0, 127, 1, 107], 4), (2, 100, 3, None, 2)])
def test_slot_table_matches_the_triton_slots(B, L, SEG, lengths, R):
    cu = None if lengths is None else torch.tensor([0] + list(torch.tensor(lengths).cumsum(0)), dtype=torch.int32)
    got = walks.slot_table(B, L, SEG, walks.tokens(R), cu).tolist()
    want = _triton_slots(B, L, SEG, walks.tokens(R), lengths)
    owned = lambda rows: [tuple(r) for r in rows if r[2] < r[1]]  # noqa: E731  (slots past a sequence are skipped)
    assert len(got) == len(want)
    assert owned(got) == owned(want)


def test_supports():
    assert walks.supports(1, 128, 64, "bfloat16") == (True, "")
    assert walks.supports(4, 128, 64, "bfloat16") == (True, "")
    for args, word in (((3, 128, 64, "bfloat16"), "rank"), ((1, 256, 64, "bfloat16"), "N=256"),
                       ((1, 128, 48, "bfloat16"), "P=48"), ((1, 32, 64, "bfloat16"), "N=32"), ((1, 128, 64, "float32"), "float32")):
        ok, why = walks.supports(*args)
        assert not ok and word in why, (args, why)
    with pytest.raises(ValueError, match="N=16"):
        q = torch.zeros(1, 4, 2, 1, 16, dtype=torch.bfloat16)
        v = torch.zeros(1, 4, 2, 1, 16, dtype=torch.bfloat16)
        hyb.plan(q, q, v, torch.zeros(1, 1, 4), v, device="meta")


_DT = {"bfloat16": torch.bfloat16, "float32": torch.float32, "int32": torch.int32}


@pytest.mark.parametrize("R,lengths,s0,dvt_partials", [(1, None, True, True), (1, [65, 0, 127, 1], False, False),
                                                       (2, None, False, True), (4, [9, 0, 40], True, True),
                                                       (8, None, True, False)])
def test_tilelang_calls_match_their_kernels_signatures(R, lengths, s0, dvt_partials):
    """The integration without a GPU: every TileLang call of `plan` (meta tensors) passes, in the
    prim_func's parameter order, tensors of its dtype and shape (each symbolic size bound to one
    value across parameters: B, L and the slot count as the Triton core's scratch has them),
    contiguous; X_c's rows are the slots' chunks."""
    B, L, H, N, P = 2, 333, 3, 128, 64
    cu = None
    if lengths is not None:
        B, L = 1, sum(lengths)
        cu = torch.tensor([0] + list(torch.tensor(lengths).cumsum(0)), dtype=torch.int32)
    e = lambda *s, d=torch.bfloat16: torch.empty(s, dtype=d, device="meta")  # noqa: E731
    st = e(B if cu is None else len(lengths), H, P, N, d=torch.float32) if s0 else None
    calls, out = hyb.plan(e(B, L, R, H, N), e(B, L, R, H, N), e(B, L, R, H, P), e(B, H, L, d=torch.float32),
                          e(B, L, R, H, P), st, st, None if cu is None else cu.to("meta"), device="meta",
                          dvt_partials=dvt_partials)
    tl_calls = [c for c in calls if "tilelang" in c]
    seg = next(c for c in calls if c["name"] == "scan_bwd_core_cs")["constexprs"]["SEG"]
    assert [c["name"] for c in tl_calls] == ["tilelang_core_dq", "tilelang_core_dkv"]
    assert not any(c["name"] in ("scan_bwd_core_dq", "scan_bwd_core_dkv") for c in calls)
    for c in tl_calls:
        f = hyb.program(c)
        bufs = [f.buffer_map[p] for p in f.params]
        assert [b.name for b in bufs] == [n for n, _ in c["args"]], c["name"]
        bound = {}
        for buf, (name, x) in zip(bufs, c["args"]):
            assert x.dtype == _DT[str(buf.dtype)], f"{c['name']} {name}: {x.dtype} vs {buf.dtype}"
            assert x.is_contiguous(), f"{c['name']} {name}: not contiguous"
            assert x.dim() == len(buf.shape), f"{c['name']} {name}: {tuple(x.shape)} vs {list(buf.shape)}"
            for dim, want in zip(x.shape, buf.shape):
                if hasattr(want, "value"):
                    assert dim == want.value, f"{c['name']} {name}: {tuple(x.shape)} vs {list(buf.shape)}"
                else:
                    assert bound.setdefault(want.name, dim) == dim, f"{c['name']} {name}: {want.name} {dim} vs {bound}"
        assert bound["B"] == B and bound["L"] == L and bound["H"] == H
        # the walks read SEG (chunks per slot) as NCH // NSLOT: the cs table's rows are the slots' chunks
        assert bound["NCH"] == bound["NSLOT"] * seg, (c["name"], bound, seg)

