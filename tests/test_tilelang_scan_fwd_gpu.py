"""The forward with its phase 4 as the TileLang walk (OUT_IMPL "tilelang",
backends/tilelang/scan_chunk_output.py) on the GPU against the float64 oracle (marker `gpu`).

Skipped without a CUDA GPU or without TileLang (CPU coverage: the walk is built for sm_90a in
tests/test_tilelang_scan_fwd_compile.py, and the plan's wiring is checked there on meta tensors).
Cases span the walk's scope: N in {64, 128}, P = 64, A in {0, 3, N/4, N/2}, both pairings, euler,
D / Z on and off, per-head and shared angles (bf16 and fp32), initial / final states (entry
states from phases 2-3), several segments per sequence, partial chunks, L = 1, varlen with empty
sequences, per_rank output and the saved y of the differentiable forward. Outputs poisoned
before each run (run_scan); the walk's output is also held to the Triton phase 4's on the
same inputs.
"""
from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.gpu


def _sf():
    from mamba3_kernels.backends import gpu_reason
    from mamba3_kernels.backends import tilelang as tlb
    ok, why = gpu_reason()
    if not ok:
        pytest.skip(why)
    ok, why = tlb.available()
    if not ok:
        pytest.skip(f"TileLang: {why}")
    from mamba3_kernels.backends.triton import scan_fwd as sf
    return sf


def _spec(i, N, P, A, **kw):
    from mamba3_kernels.spec import ScanSpec
    base = dict(d_state=N, head_dim=P, n_angles=A, pairing=("interleaved", "half")[i % 2],
                discretization="euler" if i % 5 == 4 else "trapezoidal", has_d=i % 4 != 1,
                has_z=i % 3 != 2, initial_states=i % 3 == 1, final_states=i % 2 == 0,
                shared_angles=i % 2 == 1)
    base.update(kw)
    return ScanSpec(**base)


def _cfg(sf, spec, prob, **over):
    """The default config (with `over`) for the walk: OUT_IMPL "tilelang", whole 64-token chunks."""
    from mamba3_kernels.backends.tilelang.scan_chunk_output import whole_chunks
    return whole_chunks(dict(sf.default_config(spec, prob), **over))


CASES = [  # (id, N, P, A, B, L, H, G, extra spec keys, config overrides)
    ("n128-p64-a32-l4096", 128, 64, 32, 1, 4096, 4, 1, {}, {}),
    ("n128-p64-a64-l1000-seg2", 128, 64, 64, 2, 1000, 4, 2, {}, dict(SEG=8)),
    ("n64-p64-a16-l1000", 64, 64, 16, 2, 1000, 8, 8, {}, {}),
    ("n128-p64-a3-l65", 128, 64, 3, 2, 65, 2, 1, {}, {}),
    ("n64-p64-a0-l63", 64, 64, 0, 2, 63, 2, 1, {}, {}),
    ("n128-p64-a32-l1", 128, 64, 32, 3, 1, 2, 1, {}, {}),
    ("n128-p64-a32-init-final", 128, 64, 32, 2, 700, 4, 1, dict(initial_states=True, final_states=True),
     dict(SEG=4)),
    ("n128-p64-a32-euler-noz", 128, 64, 32, 2, 300, 2, 1, dict(discretization="euler", has_z=False), {}),
    ("n128-p64-a32-per-rank", 128, 64, 32, 2, 200, 2, 1, dict(output_mode="per_rank"), {}),
]


@pytest.mark.parametrize("case_row", CASES, ids=[c[0] for c in CASES])
def test_walk_vs_oracle(case_row, rng):
    sf = _sf()
    from mamba3_kernels.scan_testing import compare_scan, poisoned_scan_tensors, run_scan, scan_case
    from mamba3_kernels.spec import Problem
    name, N, P, A, B, L, H, G, kw, over = case_row
    i = CASES.index(case_row)
    spec = _spec(i, N, P, A, **kw)
    case = scan_case(spec, Problem(B, L, H, G, B), rng, device="cuda",
                     oracle="chunked" if L >= 1000 else "recurrent")
    cfg = _cfg(sf, spec, case.problem, **over)
    rep, t, _ = run_scan(sf.forward, case, cfg)
    assert rep.ok, f"{cfg}\n{rep.table()}"
    # the Triton phase 4 on the same inputs: both approximate the float64 result alike
    ref = poisoned_scan_tensors(case)
    sf.forward(case.spec, dict(cfg, OUT_IMPL="triton"), ref)
    d = ((t.out.float() - ref.out.float()).norm() / ref.out.float().norm()).item()
    assert d < 1e-2, f"TileLang vs Triton phase 4: rel_l2 {d:.3e}"
    assert compare_scan(case, ref, "triton").ok


def test_varlen_with_empty_sequences(rng):
    sf = _sf()
    from mamba3_kernels.scan_testing import run_scan, scan_case
    from mamba3_kernels.spec import Problem, ScanSpec
    lengths = [1, 63, 64, 65, 2047, 0, 130]
    spec = ScanSpec(d_state=128, head_dim=64, n_angles=32, has_d=True, has_z=True, initial_states=True,
                    final_states=True, varlen=True, shared_angles=True)
    case = scan_case(spec, Problem(1, sum(lengths), 4, 1, len(lengths)), rng, device="cuda",
                     lengths=lengths, oracle="chunked")
    for seg in (4, 8, 32):
        cfg = _cfg(sf, spec, case.problem, SEG=seg)
        rep, _, _ = run_scan(sf.forward, case, cfg)
        assert rep.ok, f"{cfg}\n{rep.table()}"


def test_saved_y_matches_triton(rng):
    """The differentiable forward's saved y (fp32, before the gate) from the walk."""
    sf = _sf()
    from mamba3_kernels.scan_testing import poisoned_scan_tensors, scan_case
    from mamba3_kernels.spec import Problem, ScanSpec
    spec = ScanSpec(d_state=128, head_dim=64, n_angles=32, has_d=True, has_z=True, shared_angles=True)
    case = scan_case(spec, Problem(2, 777, 4, 1, 2), rng, device="cuda", oracle="chunked")
    ys = []
    for impl in ("tilelang", "triton"):
        t = poisoned_scan_tensors(case)
        y = torch.full((2, 777, 1, 4, 64), float("nan"), device="cuda")
        sf.forward(spec, dict(_cfg(sf, spec, case.problem), OUT_IMPL=impl), t, y_out=y)
        assert torch.isfinite(y).all()
        ys.append(y)
    d = ((ys[0] - ys[1]).norm() / ys[1].norm()).item()
    assert d < 1e-2, d
