"""Triton scan backward + autograd on the GPU against the float64 oracle adjoint (marker `gpu`).

Skipped without a CUDA GPU (CPU coverage: test_triton_scan_bwd.py under the interpreter and
the sm_90a compile test test_triton_scan_bwd_compile.py). Every gradient (Q, K, V, ADT, DT,
Trap, biases, Angles, D, Z, MIMO_V/Z/Out, the norm weight, all four initial states) is compared
with reference/adjoint.py run on the values the kernels saw, with random upstream gradients on
out and on every final state. Grid of the issue, covered pairwise: N {16, 32, 64, 128, 256},
P {32, 64, 128}, R {1, 2, 4, 8}, G {1, 2, 8}, L {1, 63, 64, 65, 1000, 4096} (the oracle adjoint
is a float64 token loop: L and H are bounded so a row stays within seconds), output modes,
pairings, euler, D/Z, MIMO projections, states, shared angles rotating through the rows; plus
determinism (two backward runs bitwise equal) and upstream's failure cases: L not a multiple of
the chunk, empty varlen sequences, L = 1.
"""
from __future__ import annotations

import itertools
import os
import sys

import pytest
import torch

pytestmark = pytest.mark.gpu

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from test_triton_scan_bwd import MIMO, _flat, check, run_grad_case


def _gpu():
    ok, why = __import__("mamba3_kernels.backends", fromlist=["gpu_reason"]).gpu_reason()
    if not ok:
        pytest.skip(why)


def grid():
    Ns, Ps, Rs, Gs = (16, 32, 64, 128, 256), (32, 64, 128), (1, 2, 4, 8), (1, 2, 8)
    Ls = (1, 63, 64, 65, 1000, 4096)
    rows = []
    for i, (N, P) in enumerate(itertools.product(Ns, Ps)):
        R, L = Rs[i % 4], Ls[i % 6]
        if R * N * P > 4 * 128 * 64:   # the oracle's tape and token loop: shorter L for big states
            L = min(L, 1000)
        rows.append(dict(N=N, P=P, R=R, G=Gs[(i // 2) % 3], L=L, i=i))
    rows += [dict(N=128, P=64, R=1, G=1, L=4096, i=101), dict(N=128, P=64, R=4, G=1, L=1000, i=103),
             dict(N=64, P=64, R=4, G=8, L=1000, i=102), dict(N=64, P=32, R=3, G=1, L=200, i=104)]
    return rows


def _spec_of(row, dtype="bfloat16"):
    from mamba3_kernels.spec import ScanSpec
    N, P, R, i = row["N"], row["P"], row["R"], row["i"]
    modes = ("reduce", "norm_reduce") if R == 1 else ("reduce", "per_rank", "norm_reduce")
    mode = modes[i % len(modes)]
    kw = dict(MIMO) if R > 1 else {}
    if mode == "per_rank":
        kw.pop("has_mimo_out")
    has_z = i % 4 != 2 or mode == "norm_reduce"
    if not has_z:
        kw.pop("has_mimo_z", None)
    return ScanSpec(d_state=N, head_dim=P, rank=R, n_angles=(N // 4, N // 2, 3)[i % 3],
                    pairing=("interleaved", "half")[i % 2],
                    # no D with the fused norm at 16-bit inputs: dD is ill-conditioned there (see
                    # test_triton_scan_bwd.py CASES); the fp32 dtype test keeps it
                    discretization="euler" if i % 5 == 4 else "trapezoidal",
                    has_d=i % 4 != 1 and (mode != "norm_reduce" or dtype == "float32"),
                    has_z=has_z, output_mode=mode, initial_states=i % 3 != 0, final_states=i % 2 == 0,
                    shared_angles=i % 2 == 1, input_dtype=dtype, **kw)


def _problem(row):
    from mamba3_kernels.spec import Problem
    R, G, L, N, P = row["R"], row["G"], row["L"], row["N"], row["P"]
    H = max(G, 2)
    B = 2 if L <= 1000 else 1
    while B * L * H * R * N * P > 1000 * 4 * 4 * 128 * 64 and H > G:
        H //= 2
    return Problem(B, L, H, G, B)


@pytest.mark.parametrize("row", grid(), ids=lambda r: f"N{r['N']}-P{r['P']}-R{r['R']}-G{r['G']}-L{r['L']}")
def test_grid_every_gradient(row, rng):
    _gpu()
    rows, case = run_grad_case(_spec_of(row), _problem(row), rng, device="cuda")
    check(rows, case)


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_other_dtypes(dtype, rng):
    _gpu()
    from mamba3_kernels.spec import Problem, ScanSpec
    spec = ScanSpec(d_state=64, head_dim=64, rank=2, n_angles=16, pairing="half", has_d=True, has_z=True,
                    initial_states=True, final_states=True, input_dtype=dtype, **MIMO)
    rows, case = run_grad_case(spec, Problem(2, 333, 4, 2, 2), rng, device="cuda")
    check(rows, case)


@pytest.mark.parametrize("L", [1, 63, 65, 130])
def test_upstream_failure_lengths(L, rng):
    """L = 1 and L not a multiple of the chunk (upstream's SISO backward mishandles tails)."""
    _gpu()
    from mamba3_kernels.spec import Problem, ScanSpec
    spec = ScanSpec(d_state=128, head_dim=64, n_angles=32, has_d=True, has_z=True, initial_states=True,
                    final_states=True, shared_angles=True)
    rows, case = run_grad_case(spec, Problem(2, L, 4, 1, 2), rng, device="cuda")
    check(rows, case)


@pytest.mark.parametrize("rank", [1, 4])
def test_varlen_empty_sequences(rank, rng):
    """Empty sequences first, middle and last (upstream reads a neighbour's DT there)."""
    _gpu()
    from mamba3_kernels.spec import Problem, ScanSpec
    lengths = [0, 1, 63, 0, 65, 200, 0]
    kw = dict(MIMO, pairing="half") if rank > 1 else {}
    spec = ScanSpec(d_state=64, head_dim=64, rank=rank, n_angles=16, has_d=True, has_z=True,
                    initial_states=True, final_states=True, varlen=True, **kw)
    rows, case = run_grad_case(spec, Problem(1, sum(lengths), 4, 2, len(lengths)), rng, device="cuda",
                               lengths=lengths)
    check(rows, case)


def test_save_y_and_core_configs(rng):
    """save_y=True and a multi-segment core config give gradients within bounds too."""
    _gpu()
    from mamba3_kernels.spec import Problem, ScanSpec
    spec = ScanSpec(d_state=128, head_dim=64, rank=4, n_angles=32, pairing="half", has_d=False, has_z=True,
                    output_mode="norm_reduce", final_states=True, **MIMO)   # no D: see _spec_of
    for kw in (dict(save_y=True), dict(bwd_config=dict(CORE=dict(SEG=1)))):
        rows, case = run_grad_case(spec, Problem(1, 1000, 4, 1, 1), rng, device="cuda", **kw)
        check(rows, case)


def test_deterministic(rng):
    """Two backward runs on the same inputs are bitwise equal (GQA, MIMO, varlen, states)."""
    _gpu()
    from mamba3_kernels.backends.triton import scan_bwd, scan_fwd
    from mamba3_kernels.reference.inputs import spec_options

    from mamba3_kernels.scan_tensors import prepare_scan
    from mamba3_kernels.scan_testing import scan_inputs
    from mamba3_kernels.spec import Problem, ScanSpec, resolve_scan
    for spec, lengths, prob in (
            (ScanSpec(d_state=128, head_dim=64, rank=4, n_angles=32, pairing="half", has_d=True, has_z=True,
                      initial_states=True, final_states=True, varlen=True, shared_angles=True, **MIMO),
             [700, 0, 1348], Problem(1, 2048, 8, 2, 3)),
            (ScanSpec(d_state=128, head_dim=64, n_angles=32, has_d=True, has_z=True, initial_states=True,
                      final_states=True), None, Problem(2, 4096, 8, 1, 2))):
        args = scan_inputs(spec, prob, rng, device="cuda", lengths=lengths)
        sp, _ = resolve_scan(**args, **spec_options(spec), final_states=True,
                             cu_seqlens_values=None if lengths is None else args["cu_seqlens"].tolist())
        t = prepare_scan(sp, prob, **args)
        scan_fwd.forward(sp, scan_fwd.default_config(sp, prob), t)
        S, H, R, N, P, A = prob.nseqs, prob.nheads, sp.rank, sp.d_state, sp.head_dim, sp.n_angles
        d = "cuda"
        g = dict(out=torch.randn(t.out.shape, device=d).to(t.out.dtype), angle=torch.randn(S, H, A, device=d),
                 ssm=torch.randn(S, H, P, N, device=d), k=torch.randn(S, R, H, N, device=d),
                 v=torch.randn(S, H, P, device=d).to(t.v.dtype))
        cfg = scan_bwd.default_config(sp, prob)
        a = scan_bwd.backward(sp, cfg, t, g, prob)
        b = scan_bwd.backward(sp, cfg, t, g, prob)
        for (n, x), (_, y) in zip(_flat(a), _flat(b)):
            assert torch.equal(x, y), n


def test_training_step_smoke(rng):
    """A bf16 module-sized call (B=2, L=4096, H=32, N=128, P=64) runs forward + backward, with
    finite gradients of the right shapes (no oracle: the size is the point)."""
    _gpu()
    from mamba3_kernels.reference.inputs import spec_options

    import mamba3_kernels as m3
    from mamba3_kernels.scan_testing import scan_inputs
    from mamba3_kernels.spec import Problem, ScanSpec
    spec = ScanSpec(d_state=128, head_dim=64, n_angles=32, has_d=True, has_z=True, shared_angles=True)
    a = scan_inputs(spec, Problem(2, 4096, 32, 1, 2), rng, device="cuda")
    leaves = [n for n in ("q", "k", "v", "z", "adt", "dt", "trap", "angles", "q_bias", "k_bias", "d")]
    for n in leaves:
        a[n] = a[n].detach().requires_grad_(True)
    out = m3.scan(**a, **spec_options(spec))
    out.float().square().mean().backward()
    for n in leaves:
        assert a[n].grad is not None and a[n].grad.shape == a[n].shape, n
        assert torch.isfinite(a[n].grad).all(), n


@pytest.mark.parametrize("operands", ["bfloat16", "float32"])
def test_module_like_long_sequence(operands, rng):
    """Module-like bf16 inputs (slow decay, RMS-normalised q/k, small DT: many long-range pairs)
    at L = 4096: every gradient within DESIGN.md bounds, the angle gradient included (its reverse
    cumsum cancels the pair terms, see bench/notes/scan_bwd.md "Angle gradient precision": with
    the bf16 core its error grows ~sqrt(L); OPERANDS="float32" is the accurate fallback)."""
    _gpu()
    from mamba3_kernels.reference import adjoint
    from mamba3_kernels.reference.compare import rel_l2
    from test_triton_scan_bwd import _leaf, _module_like

    import mamba3_kernels as m3
    from mamba3_kernels.testing import to_numpy
    a = {n: x.cuda() for n, x in _module_like(rng, 4096, 2, 128, 64, 32).items()}
    args = {n: _leaf(x) for n, x in a.items()}
    out = m3.scan(**args, bwd_config=dict(OPERANDS=operands))
    dout = torch.as_tensor(rng.standard_normal(tuple(out.shape))).to(out.dtype).cuda()
    out.backward(dout)
    ref = adjoint.backward(to_numpy(dout), None, **{n: to_numpy(x) for n, x in a.items()})
    errs = {n: rel_l2(to_numpy(args[n].grad), ref[n]) for n in args}
    assert all(e <= 2e-2 for e in errs.values()), errs


def _tilelang():
    _gpu()
    ok, why = __import__("mamba3_kernels.backends.tilelang", fromlist=["available"]).available()
    if not ok:
        pytest.skip(f"TileLang cannot run here: {why}")


TILELANG_CORE_CASES = [
    # (id, spec kwargs, Problem (B, L, H, G, S), varlen lengths)
    ("siso-bench-heads", dict(d_state=128, head_dim=64, n_angles=32, has_d=True, has_z=True, initial_states=True,
                              final_states=True, shared_angles=True), (2, 1000, 4, 1, 2), None),
    ("siso-N64-G2-L65", dict(d_state=64, head_dim=64, n_angles=16, has_z=True, pairing="half"), (2, 65, 4, 2, 2), None),
    ("siso-varlen-empties", dict(d_state=128, head_dim=64, n_angles=32, has_d=True, initial_states=True,
                                 final_states=True, varlen=True), (1, 329, 4, 1, 7), [0, 1, 63, 0, 65, 200, 0]),
    ("mimo4-norm", dict(d_state=128, head_dim=64, rank=4, n_angles=32, pairing="half", has_z=True,
                        output_mode="norm_reduce", final_states=True, **MIMO), (1, 1000, 4, 1, 1), None),
    ("mimo2-states-P128", dict(d_state=64, head_dim=128, rank=2, n_angles=16, pairing="half", has_d=True,
                               has_z=True, initial_states=True, final_states=True, **MIMO), (2, 130, 2, 1, 2), None),
    ("mimo3-padded", dict(d_state=128, head_dim=64, rank=3, n_angles=8, has_z=True, **MIMO), (1, 77, 2, 1, 1), None),
]


@pytest.mark.parametrize("case", TILELANG_CORE_CASES, ids=[c[0] for c in TILELANG_CORE_CASES])
def test_tilelang_core_every_gradient(case, rng):
    """bwd_config CORE_IMPL "tilelang" (the core's dq / dkv walks in TileLang, at any rank their
    scope takes): every gradient against the oracle adjoint, as the grid above does for the
    Triton core."""
    _tilelang()
    from mamba3_kernels.spec import Problem, ScanSpec
    name, kw, pr, lengths = case
    rows, case_ = run_grad_case(ScanSpec(**kw), Problem(*pr), rng, device="cuda", lengths=lengths,
                                bwd_config=dict(CORE_IMPL="tilelang"))
    check(rows, case_)
