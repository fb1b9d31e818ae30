"""Triton decode step vs the float64 oracle, on CPU through the Triton interpreter.

TRITON_INTERPRET must be set before triton is imported (Triton's own tl.* helpers are
decorated at import). If some earlier test module already imported triton without it, this
module reruns itself in a fresh process (test_fresh_process) and skips in place.

The grid of the issue (R, N, P, G, pairing, angles, state and input dtypes, Z, D, MIMO
projections, state_indices, output modes, euler, shared angles, in/out of place) is covered
pairwise by a small deterministic covering array, plus targeted cases.
"""
from __future__ import annotations

import os
import subprocess
import sys

_LATE = "triton" in sys.modules and os.environ.get("TRITON_INTERPRET", "") in ("", "0")
if not _LATE:
    os.environ["TRITON_INTERPRET"] = "1"

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import pairwise  # noqa: E402


pytest.importorskip("triton")

import mamba3_kernels  # noqa: E402
from mamba3_kernels.backends import triton as tb  # noqa: E402
from mamba3_kernels.spec import Problem, ScanSpec, States  # noqa: E402
from mamba3_kernels.testing import poisoned_step_tensors, compare_step, run_step_backend, step_case  # noqa: E402

in_place_here = pytest.mark.skipif(_LATE, reason="triton was imported before TRITON_INTERPRET; "
                                                 "see test_fresh_process")


def check(case, config=None, inplace=True):
    rep = run_step_backend(tb, case, config=config, inplace=inplace)
    assert rep.ok, "\n" + rep.table()
    return rep


# ------------------------------------------------------------------------------------------
# pairwise covering array over the grid

FACTORS = dict(
    R=(1, 2, 4), N=(16, 64), P=(16, 48), G=(1, 2), pairing=("interleaved", "half"),
    A=("zero", "odd", "half"), shared=(False, True), state=("float32", "bfloat16"),
    inp=("float32", "bfloat16"), z=(False, True), d=(False, True), pool=(False, True),
    mode=("reduce", "per_rank", "norm_reduce"), euler=(False, True), inplace=(True, False),
    mimo=(False, True),
)


def _possible(row):
    """The spec's constraints (so the covered pairs are the real ones)."""
    return not (row.get("A") == "zero" and row.get("shared") is True)


def row_case(row, seed):
    N, R = row["N"], row["R"]
    A = {"zero": 0, "odd": 3, "half": N // 2}[row["A"]]
    mimo = row["mimo"]
    spec = ScanSpec(
        d_state=N, head_dim=row["P"], rank=R, n_angles=A, pairing=row["pairing"],
        discretization="euler" if row["euler"] else "trapezoidal", has_d=row["d"], has_z=row["z"],
        has_mimo_v=mimo, has_mimo_z=mimo and row["z"],
        has_mimo_out=mimo and row["mode"] != "per_rank", output_mode=row["mode"],
        shared_angles=row["shared"], input_dtype=row["inp"], state_dtype=row["state"])
    G = row["G"]
    B = 3
    prob = Problem(batch=B, seqlen=1, nheads=2 * G, ngroups=G, nseqs=B)
    return step_case(spec, prob, np.random.default_rng(seed), pool=5 if row["pool"] else None)


ROWS = (pairwise.covering_rows(FACTORS, _possible, seed=1234, tries=300)  # two independent arrays
        + pairwise.covering_rows(FACTORS, _possible, seed=4321, tries=300))


def _rid(row):
    return "-".join(f"{k}={v}" for k, v in row.items())


@in_place_here
@pytest.mark.parametrize("i", range(len(ROWS)), ids=[f"row{i}" for i in range(len(ROWS))])
def test_pairwise_grid(i):
    row = ROWS[i]
    case = row_case(row, seed=100 + i)
    check(case, inplace=row["inplace"])


def test_covering_array_is_small_and_complete():
    for seed in (1234, 4321):
        rows = pairwise.covering_rows(FACTORS, _possible, seed=seed, tries=300)
        assert len(rows) <= 24, len(rows)
        assert pairwise.all_pairs(FACTORS, _possible) <= set().union(*(pairwise.pairs(r) for r in rows))


# ------------------------------------------------------------------------------------------
# targeted cases

def realistic_spec(**kw):
    base = dict(d_state=64, head_dim=48, rank=4, n_angles=16, pairing="half", has_d=True, has_z=True,
                has_mimo_v=True, has_mimo_z=True, has_mimo_out=True, output_mode="norm_reduce",
                input_dtype="bfloat16", state_dtype="float32")
    base.update(kw)
    return ScanSpec(**base)


@in_place_here
@pytest.mark.parametrize("mode", ["reduce", "per_rank", "norm_reduce"])
@pytest.mark.parametrize("rank", [1, 4])
def test_output_modes(mode, rank):
    spec = realistic_spec(rank=rank, output_mode=mode, has_mimo_out=mode != "per_rank")
    case = step_case(spec, Problem(2, 1, 4, 2, 2), np.random.default_rng(rank * 10 + len(mode)), pool=4)
    check(case, inplace=True)


@in_place_here
@pytest.mark.parametrize("inplace", [True, False])
def test_every_config_of_the_space(inplace):
    """P = 48 with BLOCK_P 16 / 32 loops over three / two tiles (ragged), or splits over 6 / 3 / 2
    programs per head (ROWS 8 / 16 / 32), in place (arrival counters) and not."""
    spec = realistic_spec(output_mode="reduce", state_dtype="bfloat16", pairing="interleaved", n_angles=5)
    case = step_case(spec, Problem(2, 1, 2, 1, 2), np.random.default_rng(7 + inplace))
    cfgs = tb.space(spec, case.problem, "step")
    assert {c["BLOCK_P"] for c in cfgs} >= {16, 32, 64}
    assert {c["ROWS"] for c in cfgs} >= {8, 16, 32, 64}  # 6, 3, 2 and 1 programs per head
    for cfg in cfgs:
        check(case, config=cfg, inplace=inplace)


@in_place_here
def test_siso_euler_shared_angles_b1():
    spec = ScanSpec(d_state=16, head_dim=16, n_angles=8, shared_angles=True, discretization="euler",
                    has_d=True, input_dtype="float32")
    check(step_case(spec, Problem(1, 1, 2, 1, 1), np.random.default_rng(3)))


@in_place_here
def test_index_past_pool_is_padding():
    """state_indices >= M is padding too (the API rejects it; the kernel must still be safe)."""
    spec = realistic_spec(rank=2, output_mode="reduce")
    case = step_case(spec, Problem(3, 1, 2, 1, 5), np.random.default_rng(11), pool=5)
    idx = case.args["state_indices"]
    pad = int(torch.nonzero(idx < 0)[0, 0])
    t = poisoned_step_tensors(case, inplace=True)
    t.state_indices = idx.clone()
    t.state_indices[pad] = 5 + 3
    tb.step(spec, tb.default_config(spec, case.problem), t)
    rep = compare_step(case, t)
    assert rep.ok, "\n" + rep.table()
    assert torch.all(t.out[pad] == 0)


@in_place_here
def test_three_steps_in_place_match_oracle_scan():
    """Three public-API steps chained in place reproduce the oracle's three-token scan."""
    from mamba3_kernels import reference as ref
    from mamba3_kernels.reference.compare import rel_l2
    spec = realistic_spec(rank=2, input_dtype="float32", output_mode="reduce", state_dtype="float32")
    prob = Problem(2, 1, 2, 1, 2)
    rng = np.random.default_rng(5)
    cases = [step_case(spec, prob, rng) for _ in range(3)]
    params = ("q_bias", "k_bias", "d", "mimo_v", "mimo_z", "mimo_out", "norm_weight")
    states = States(*(x.clone() for x in cases[0].args["states"]))
    outs = []
    for c in cases:  # token inputs of each case, parameters of case 0
        args = dict(c.args, states=states, **{n: cases[0].args[n] for n in params})
        o, states = mamba3_kernels.step(**args, output_mode=spec.output_mode, pairing=spec.pairing,
                                        backend="triton")
        outs.append(o.double().numpy())
    tok = lambda n, ax: np.stack([c.seen[n] for c in cases], axis=ax)
    p0 = {n: cases[0].seen[n] for n in params if n != "norm_weight"}
    ref_out, ref_st = ref.forward(tok("q", 1), tok("k", 1), tok("v", 1), tok("adt", 2), tok("dt", 2),
                                  tok("trap", 2), angles=tok("angles", 1), z=tok("z", 1),
                                  initial_states=cases[0].seen["states"], output_mode=spec.output_mode,
                                  pairing=spec.pairing, **p0)
    got = np.stack(outs, axis=1)
    assert rel_l2(got, ref_out) < 1e-3
    assert rel_l2(states.ssm.double().numpy(), ref_st.ssm) < 1e-3
    assert rel_l2(states.k.double().numpy().reshape(ref_st.k.shape), ref_st.k) < 1e-4


# ------------------------------------------------------------------------------------------
# DOT: the whole head as two tensor-core products (the MIMO default at B * H > 64)

DOT_CFG = dict(BLOCK_P=64, ROWS=64, num_warps=4, num_stages=1, VEC=True, PREFETCH=False, DOT=True)


@in_place_here
@pytest.mark.parametrize("rank,mode,state,inp,pairing", [
    (4, "reduce", "float32", "float32", "half"),
    (4, "per_rank", "bfloat16", "bfloat16", "half"),
    (4, "norm_reduce", "float32", "bfloat16", "interleaved"),
    (2, "reduce", "bfloat16", "float32", "interleaved"),
    (1, "reduce", "float32", "bfloat16", "interleaved"),   # SISO forced onto DOT (K padded to 16)
    (3, "per_rank", "float32", "float32", "half"),          # R not a power of two
])
def test_dot_path(rank, mode, state, inp, pairing):
    """P = 48 (ragged against the 64-row tile), a pool with a padding slot, in place; the
    kernel takes the DOT branch (asserted through its compile-time parameters)."""
    spec = realistic_spec(rank=rank, output_mode=mode, has_mimo_out=mode != "per_rank",
                          state_dtype=state, input_dtype=inp, pairing=pairing,
                          has_mimo_v=rank > 1, has_mimo_z=rank > 1)
    if mode == "per_rank" or rank == 1:
        spec = spec.replace(has_mimo_out=False) if mode == "per_rank" else spec
    ce = tb.kernels.constexprs(spec, DOT_CFG)
    assert ce["DOT"] and ce["KD"] >= max(16, 2 * rank) and ce["RD"] >= max(16, rank)
    assert ce["PREC"] == ("tf32x3" if state == inp == "float32" else "tf32")
    case = step_case(spec, Problem(3, 1, 4, 2, 6), np.random.default_rng(rank * 7 + len(mode)), pool=6)
    check(case, config=DOT_CFG, inplace=True)
    check(case, config=DOT_CFG, inplace=False)


def test_dot_is_the_mimo_default_only_for_whole_heads():
    spec = realistic_spec(output_mode="reduce")
    big = tb.kernels.constexprs(spec, tb.default_config(spec, Problem(64, 1, 32, 1, 64)))
    assert big["DOT"] and big["NT"] == 1
    small = tb.kernels.constexprs(spec, tb.default_config(spec, Problem(1, 1, 32, 1, 1)))
    assert not small["DOT"]                       # the split default (B * H <= 64)
    assert not tb.kernels.constexprs(spec.replace(rank=1), tb.default_config(spec.replace(rank=1)))["DOT"]
    tiny = spec.replace(head_dim=8)               # tiles under tl.dot's 16: the broadcast path
    assert not tb.kernels.constexprs(tiny, dict(DOT_CFG, BLOCK_P=8, ROWS=8))["DOT"]


# ------------------------------------------------------------------------------------------
# P split over several programs per head: the shared kprev / theta and the arrival counters

def _split_cfg(spec, rows, vec=False, nw=2):
    return dict(BLOCK_P=rows, ROWS=rows, num_warps=nw, num_stages=1, VEC=vec, PREFETCH=False)


def _counter_bufs():
    return list(tb.kernels._COUNTERS.values())


@in_place_here
@pytest.mark.parametrize("rank,mode", [(1, "reduce"), (4, "reduce"), (2, "per_rank")])
def test_split_in_place_pool_padding_counters(rank, mode):
    """P = 48 over 3 (ROWS 16) or 6 (ROWS 8) programs per head, in place, a pool with a padding
    slot: matches the oracle, the counters are back to zero after each call, and a second
    call (which relies on that) is right too."""
    spec = realistic_spec(rank=rank, output_mode=mode, has_mimo_out=mode != "per_rank",
                          pairing="interleaved" if rank == 2 else "half")
    for rows in (16, 8):
        cfg = _split_cfg(spec, rows, vec=rows == 16)
        assert tb.kernels.constexprs(spec, dict(cfg, _inplace=True))["WRITER"] == 2
        for seed in (1, 2):  # two consecutive calls on the same counter buffer
            case = step_case(spec, Problem(3, 1, 4, 2, 6), np.random.default_rng(seed * 10 + rows), pool=6)
            assert int((case.args["state_indices"] < 0).sum()) == 1
            check(case, config=cfg, inplace=True)
            bufs = _counter_bufs()
            assert bufs and all(int(b.abs().sum()) == 0 for b in bufs)


@in_place_here
def test_split_out_of_place_writes_shared_states_once():
    spec = realistic_spec(rank=2, output_mode="reduce", state_dtype="bfloat16")
    cfg = _split_cfg(spec, 16)
    assert tb.kernels.constexprs(spec, dict(cfg, _inplace=False))["WRITER"] == 1
    for pool in (None, 5):
        case = step_case(spec, Problem(3, 1, 2, 1, 5 if pool else 3), np.random.default_rng(9), pool=pool)
        check(case, config=cfg, inplace=False)


@in_place_here
def test_split_in_place_needs_the_counter():
    """A counter that does not start at zero lets an early program overwrite kprev / theta
    before the later tiles of the head read them: the result is wrong, so the counter path
    is what keeps the in-place split correct (programs run in order in the interpreter)."""
    spec = realistic_spec(rank=2, output_mode="reduce", n_angles=16)
    cfg = _split_cfg(spec, 16)
    case = step_case(spec, Problem(2, 1, 2, 1, 2), np.random.default_rng(3))
    check(case, config=cfg, inplace=True)
    buf = _counter_bufs()[0]
    buf.fill_(1)  # each head's second program now believes it is the last of three
    try:
        rep = run_step_backend(tb, case, config=cfg, inplace=True)
        assert not rep.ok
    finally:
        buf.zero_()
    check(case, config=cfg, inplace=True)


# ------------------------------------------------------------------------------------------
# public API and errors

def _api(case, **kw):
    s = case.spec
    return mamba3_kernels.step(**case.args, output_mode=s.output_mode, pairing=s.pairing,
                               discretization=s.discretization, norm_eps=s.norm_eps, **kw)


@in_place_here
def test_public_api_equals_backend_call():
    spec = realistic_spec(output_mode="reduce", state_dtype="bfloat16")
    case = step_case(spec, Problem(3, 1, 4, 2, 6), np.random.default_rng(21), pool=6)
    t = poisoned_step_tensors(case, inplace=False)
    tb.step(spec, tb.default_config(spec, case.problem), t)
    before = [x.clone() for x in case.args["states"]]
    out, st = _api(case, backend="triton", inplace=False)
    assert torch.equal(out, t.out)
    for a, b in zip(st, t.state_out):
        assert torch.equal(a.reshape(b.shape), b)
    for a, b in zip(before, case.args["states"]):  # not in place: the caller's states unchanged
        assert torch.equal(a, b)
    # in place: the returned states are the caller's tensors, updated
    args_states = States(*(x.clone() for x in case.args["states"]))
    case2 = type(case)(case.spec, case.problem, dict(case.args, states=args_states), case.seen,
                       case.ref_out, case.ref_states)
    out2, st2 = _api(case2, backend="triton", inplace=True)
    assert st2.ssm is args_states.ssm
    assert torch.equal(out2, t.out) and torch.equal(args_states.ssm, t.state_out.ssm)


@in_place_here
def test_wrong_state_dtype_raises_and_leaves_states_untouched():
    spec = realistic_spec(rank=1, output_mode="reduce")
    case = step_case(spec, Problem(2, 1, 2, 1, 2), np.random.default_rng(4))
    st = case.args["states"]
    bad = States(st.angle.clone(), st.ssm.to(torch.float16), st.k.clone(), st.v.clone())
    keep = [x.clone() for x in bad]
    with pytest.raises(ValueError, match=r"states\.ssm"):
        mamba3_kernels.step(**dict(case.args, states=bad), output_mode="reduce", pairing="half",
                            backend="triton")
    for a, b in zip(keep, bad):
        assert torch.equal(a, b)
    # a pool index out of range: rejected before any kernel, nothing written
    case = step_case(spec, Problem(2, 1, 2, 1, 3), np.random.default_rng(5), pool=3)
    idx = case.args["state_indices"].clone()
    idx[0] = 3
    keep = [x.clone() for x in case.args["states"]]
    with pytest.raises(ValueError, match="state_indices"):
        mamba3_kernels.step(**dict(case.args, state_indices=idx), output_mode="reduce",
                            pairing="half", backend="triton")
    for a, b in zip(keep, case.args["states"]):
        assert torch.equal(a, b)


@in_place_here
def test_protocol():
    ok, why = tb.available()
    assert ok and "TRITON_INTERPRET" in why
    spec = realistic_spec()
    assert tb.supports(spec, "step") == (True, "")
    assert tb.supports(spec, "forward")[0]  # the chunked forward (tests/test_triton_scan_fwd.py)
    assert tb.supports(spec, "backward") == (True, "")   # the chunked scan's (test_triton_scan_bwd.py)
    ok, why = tb.supports(spec.replace(rank=9, pairing="half", output_mode="reduce", has_mimo_v=True), "backward")
    assert not ok and "R=9" in why, why
    prob = Problem(64, 1, 32, 1, 64)
    for s in (spec, spec.replace(output_mode="reduce"), ScanSpec(d_state=128, head_dim=64),
              ScanSpec(d_state=16, head_dim=16), ScanSpec(d_state=256, head_dim=128)):
        sp = tb.space(s, prob, "step")
        d = tb.default_config(s, prob, "step")
        assert 1 <= len(sp) <= 12 and d in sp
        if s.output_mode == "norm_reduce":
            assert all(c["BLOCK_P"] >= s.head_dim for c in sp)
    with pytest.raises(ValueError, match="BLOCK_P"):
        tb.step(spec, dict(BLOCK_P=16, num_warps=4, num_stages=1), None)
    with pytest.raises(ValueError, match="ROWS"):
        tb.step(spec, dict(BLOCK_P=64, ROWS=32, num_warps=4, num_stages=1), None)


@pytest.mark.skipif(not _LATE, reason="triton imported after TRITON_INTERPRET: tests ran here")
def test_fresh_process():
    env = {k: v for k, v in os.environ.items()}
    env["TRITON_INTERPRET"] = "1"
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", __file__], env=env,
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stdout[-5000:] + r.stderr[-2000:]
