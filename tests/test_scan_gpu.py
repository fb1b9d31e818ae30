"""Triton chunked-scan forward on the GPU against the float64 oracle (marker `gpu`).

Skipped without a CUDA GPU (CPU coverage: test_triton_scan_fwd.py under the interpreter and the
sm_90a compile test). Grid of the issue, covered pairwise: N {16, 32, 64, 128, 256}, P {32, 64,
128}, R {1, 2, 4, 8}, G {1, 2, 8}, L {1, 63, 64, 65, 1000, 4096, 16384}, with the output modes,
pairings, euler, D/Z, MIMO projections, initial / final states, shared angles rotating through
the rows; varlen lengths [1, 63, 64, 65, 2047, 0]; the split-sequence equivalence (two calls
with states == one call). Outputs are poisoned before each run; default configs (the no-spill
ones) plus a few tuning-space configs. The oracle's cost is bounded: long sequences use the
chunked float64 form with B = 1 and few heads.
"""
from __future__ import annotations

import itertools

import pytest
import torch

pytestmark = pytest.mark.gpu

MIMO = dict(has_mimo_v=True, has_mimo_z=True, has_mimo_out=True)


def _sf():
    from mamba3_kernels.backends.triton import scan_fwd as sf
    ok, why = __import__("mamba3_kernels.backends", fromlist=["gpu_reason"]).gpu_reason()
    if not ok:
        pytest.skip(why)
    return sf


def grid():
    Ns, Ps, Rs, Gs = (16, 32, 64, 128, 256), (32, 64, 128), (1, 2, 4, 8), (1, 2, 8)
    Ls = (1, 63, 64, 65, 1000, 4096, 16384)
    rows = []
    for i, (N, P) in enumerate(itertools.product(Ns, Ps)):
        R, G, L = Rs[i % 4], Gs[(i // 2) % 3], Ls[i % 7]
        rows.append(dict(N=N, P=P, R=R, G=G, L=L, i=i))
    # corners: the largest state with MIMO 8, long SISO, G=8 with MIMO
    rows += [dict(N=256, P=128, R=8, G=1, L=1000, i=100), dict(N=128, P=64, R=1, G=1, L=16384, i=101),
             dict(N=64, P=64, R=4, G=8, L=4096, i=102), dict(N=128, P=64, R=4, G=1, L=16384, i=103)]
    return rows


def _case_of(row, rng, dtype="bfloat16"):
    from mamba3_kernels.scan_testing import scan_case
    from mamba3_kernels.spec import Problem, ScanSpec
    N, P, R, G, L, i = row["N"], row["P"], row["R"], row["G"], row["L"], row["i"]
    modes = ("reduce", "norm_reduce") if R == 1 else ("reduce", "per_rank", "norm_reduce")
    mode = modes[i % len(modes)]
    kw = dict(MIMO) if R > 1 else {}
    if mode == "per_rank":
        kw.pop("has_mimo_out")
    A = (N // 4, N // 2, 3)[i % 3]
    has_z = i % 4 != 2 or mode == "norm_reduce"
    if not has_z:
        kw.pop("has_mimo_z", None)
    spec = ScanSpec(d_state=N, head_dim=P, rank=R, n_angles=A, pairing=("interleaved", "half")[i % 2],
                    discretization="euler" if i % 5 == 4 else "trapezoidal", has_d=i % 4 != 1,
                    has_z=has_z, output_mode=mode,
                    initial_states=i % 3 != 0, final_states=i % 2 == 0, shared_angles=i % 2 == 1,
                    input_dtype=dtype, **kw)
    # bound the float64 oracle: B * L * H * R * N * P
    H = max(G, 2)
    B = 2 if L <= 1000 else 1
    while B * L * H * R * N * P > 4096 * 8 * 4 * 128 * 64 and H > G:
        H //= 2
    oracle = "chunked" if L >= 1000 else "recurrent"
    return scan_case(spec, Problem(B, L, H, G, B), rng, device="cuda", oracle=oracle)


@pytest.mark.parametrize("row", grid(), ids=lambda r: f"N{r['N']}-P{r['P']}-R{r['R']}-G{r['G']}-L{r['L']}")
def test_grid_vs_oracle(row, rng):
    sf = _sf()
    from mamba3_kernels.scan_testing import run_scan
    case = _case_of(row, rng)
    cfg = sf.default_config(case.spec, case.problem)
    rep, _, _ = run_scan(sf.forward, case, cfg)
    assert rep.ok, f"{cfg}\n{rep.table()}"


def test_varlen_lengths(rng):
    sf = _sf()
    from mamba3_kernels.scan_testing import compare_segments, run_scan, scan_case
    from mamba3_kernels.spec import Problem, ScanSpec
    lengths = [1, 63, 64, 65, 2047, 0]
    for spec in (ScanSpec(d_state=128, head_dim=64, n_angles=32, has_d=True, has_z=True, initial_states=True,
                          final_states=True, varlen=True, shared_angles=True),
                 ScanSpec(d_state=128, head_dim=64, rank=4, n_angles=32, pairing="half", has_d=True, has_z=True,
                          final_states=True, varlen=True, **MIMO)):
        case = scan_case(spec, Problem(1, sum(lengths), 4, 1, len(lengths)), rng, device="cuda",
                         lengths=lengths, oracle="chunked")
        for cfg in (sf.default_config(spec, case.problem), dict(sf.default_config(spec, case.problem), SEG=2)):
            rep, _, scratch = run_scan(sf.forward, case, cfg, keep=True)
            assert rep.ok, f"{cfg}\n{rep.table()}"
        seg = compare_segments(case, scratch)
        assert seg.ok, seg.table()


def test_split_sequence_equivalence(rng):
    """Two calls with states (the first part's final states as the second's initial states)
    equal one call, SISO and MIMO, cut inside a chunk."""
    sf = _sf()
    from mamba3_kernels.reference.inputs import spec_options
    from mamba3_kernels.scan_tensors import prepare_scan
    from mamba3_kernels.scan_testing import scan_inputs
    from mamba3_kernels.spec import Problem, ScanSpec, resolve_scan
    for spec in (ScanSpec(d_state=128, head_dim=64, n_angles=32, has_d=True, has_z=True, final_states=True,
                          input_dtype="float32"),
                 ScanSpec(d_state=64, head_dim=64, rank=4, n_angles=16, pairing="half", has_d=True, has_z=True,
                          final_states=True, input_dtype="float32", **MIMO)):
        a = scan_inputs(spec, Problem(2, 3000, 4, 1, 2), rng, device="cuda")

        def run(args, sp):
            s2, prob = resolve_scan(**args, **spec_options(sp), final_states=True)
            t = prepare_scan(s2, prob, **args)
            sf.forward(s2, sf.default_config(s2, prob), t)
            return t.out, t.state_out
        whole = run(a, spec)
        cut = 1234
        first, second = dict(a), dict(a)
        for n in ("q", "k", "v", "z"):
            first[n], second[n] = a[n][:, :cut], a[n][:, cut:]
        for n in ("adt", "dt", "trap"):
            first[n], second[n] = a[n][:, :, :cut], a[n][:, :, cut:]
        first["angles"], second["angles"] = a["angles"][:, :cut], a["angles"][:, cut:]
        o1, st1 = run(first, spec)
        second["initial_states"] = st1
        o2, st2 = run(second, spec.replace(initial_states=True))
        o = torch.cat([o1, o2], dim=1)
        err = ((o - whole[0]).norm() / whole[0].norm()).item()
        assert err < 1e-4, err
        for x, y in zip(st2, whole[1]):
            if x.numel():
                assert ((x - y).norm() / y.norm()).item() < 1e-4


@pytest.mark.parametrize("extra", [dict(SEG=1), dict(num_warps=4, state_num_warps=4), dict(num_stages=2),
                                   dict(SCRATCH="float32"),
                                   # phase-4 load orders and the other knobs of bench/notes/scan_fwd.md
                                   dict(PREFETCH=1), dict(PREFETCH=0, STATE_PREFETCH=False, STATE_CHUNK=None),
                                   dict(GATES=False, BIAS_RELOAD=False), dict(ELL=True)])
def test_tuning_configs_long_sequence(extra, rng):
    """Configs of the tuning space on L = 4096 (a long-sequence check per config, SPEC §14)."""
    sf = _sf()
    from mamba3_kernels.scan_testing import run_scan, scan_case
    from mamba3_kernels.spec import Problem, ScanSpec
    spec = ScanSpec(d_state=128, head_dim=64, n_angles=32, has_d=True, has_z=True, initial_states=True,
                    final_states=True, shared_angles=True)
    case = scan_case(spec, Problem(1, 4096, 2, 1, 1), rng, device="cuda", oracle="chunked")
    cfg = dict(sf.default_config(spec, case.problem), **extra)
    rep, _, _ = run_scan(sf.forward, case, cfg)
    assert rep.ok, f"{cfg}\n{rep.table()}"
