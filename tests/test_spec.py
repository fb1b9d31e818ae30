"""ScanSpec / Problem validation and the shared argument checks (oracle side)."""
import numpy as np
import pytest

from mamba3_kernels import reference as ref
from mamba3_kernels.reference.inputs import random_scan_inputs, random_step_inputs
from mamba3_kernels.spec import Problem, ScanSpec, States, spec_grid


def test_spec_frozen_hashable_described():
    s = ScanSpec(d_state=64, head_dim=32, rank=4, n_angles=16, pairing="half", has_mimo_out=True)
    assert hash(s) == hash(ScanSpec(d_state=64, head_dim=32, rank=4, n_angles=16, pairing="half",
                                    has_mimo_out=True))
    with pytest.raises(Exception):
        s.rank = 2
    d = s.describe()
    assert "MIMO rank 4" in d and "half pairing" in d and "N=64" in d
    assert len({*spec_grid()}) == len(spec_grid())


@pytest.mark.parametrize("kw,field", [
    (dict(d_state=7, head_dim=4), "d_state"),
    (dict(d_state=8, head_dim=4, n_angles=5), "n_angles"),
    (dict(d_state=8, head_dim=0), "head_dim"),
    (dict(d_state=8, head_dim=4, rank=0), "rank"),
    (dict(d_state=8, head_dim=4, pairing="pairwise"), "pairing"),
    (dict(d_state=8, head_dim=4, discretization="zoh"), "discretization"),
    (dict(d_state=8, head_dim=4, output_mode="sum"), "output_mode"),
    (dict(d_state=8, head_dim=4, output_mode="per_rank", has_mimo_out=True), "has_mimo_out"),
    (dict(d_state=8, head_dim=4, has_mimo_z=True), "has_mimo_z"),
    (dict(d_state=8, head_dim=4, chunk_size=48), "chunk_size"),
    (dict(d_state=8, head_dim=4, state_dtype="int8"), "state_dtype"),
    (dict(d_state=8, head_dim=4, shared_angles=True), "shared_angles"),
])
def test_spec_errors_name_the_field(kw, field):
    with pytest.raises(ValueError, match=f"ScanSpec.{field}: expected"):
        ScanSpec(**kw)


def test_problem_gqa_error():
    with pytest.raises(ValueError, match=r"ngroups: expected a divisor of nheads H=6 \(H % G == 0\), got 4"):
        Problem(1, 4, 6, 4, 1)


def _args(rng, spec=None, prob=None):
    spec = spec or ScanSpec(d_state=8, head_dim=4, n_angles=2, initial_states=True, input_dtype="float64")
    prob = prob or Problem(2, 5, 4, 2, 2)
    return spec, random_scan_inputs(spec, prob, rng)


def test_forward_errors(rng):
    _, a = _args(rng)
    cases = [
        (dict(q=a["q"][:, :, :, :1].repeat(3, axis=3)), r"q: expected a group count G dividing H=4"),
        (dict(angles=np.zeros((2, 5, 4, 5))), r"angles: expected A <= N/2 = 4"),
        (dict(v=a["v"][0]), r"v: expected 4 dims \(B, L, H, P\), got 3 dims"),
        (dict(dt=a["dt"][:, :, :4]), r"dt: expected shape \(2, 4, 5\), got shape \(2, 4, 4\)"),
        (dict(d=np.ones(3)), r"d: expected shape \(4,\), got shape \(3,\)"),
        (dict(initial_states=States(*a["initial_states"][:3], np.zeros((2, 4, 3)))),
         r"initial_states.v: expected shape \(2, 4, 4\), got shape \(2, 4, 3\)"),
        (dict(trap=None), r"trap: expected a \(B, H, L\) tensor"),
    ]
    for change, msg in cases:
        b = dict(a)
        b.update(change)
        with pytest.raises(ValueError, match=msg):
            ref.forward(**b)
    odd = dict(a)
    odd["q"] = np.zeros(a["q"].shape[:-1] + (7,))
    odd["k"] = odd["q"]
    with pytest.raises(ValueError, match="q: expected an even state size N"):
        ref.forward(**odd)


@pytest.mark.parametrize("cu,msg", [
    ([1, 3, 7], r"cu_seqlens\[0\]: expected 0, got 1"),
    ([0, 5, 3, 7], r"cu_seqlens: expected non-decreasing values, got cu_seqlens\[2\]=3 < cu_seqlens\[1\]=5"),
    ([0, 3, 6], r"cu_seqlens\[-1\]: expected the total length L=7, got 6"),
])
def test_cu_seqlens_errors(rng, cu, msg):
    spec = ScanSpec(d_state=4, head_dim=2, varlen=True, input_dtype="float64")
    a = random_scan_inputs(spec, Problem(1, 7, 2, 1, 2), rng)
    a["cu_seqlens"] = np.asarray(cu, dtype=np.int32)
    with pytest.raises(ValueError, match=msg):
        ref.forward(**a)


def test_varlen_needs_batch_one(rng):
    spec = ScanSpec(d_state=4, head_dim=2, input_dtype="float64")
    a = random_scan_inputs(spec, Problem(2, 7, 2, 1, 2), rng)
    a["cu_seqlens"] = np.asarray([0, 3, 7], dtype=np.int32)
    with pytest.raises(ValueError, match="v: expected batch B = 1 with cu_seqlens"):
        ref.forward(**a)


def test_step_errors(rng):
    spec = ScanSpec(d_state=8, head_dim=4, n_angles=2, chunk_size=1, input_dtype="float64")
    a = random_step_inputs(spec, Problem(3, 1, 4, 2, 3), rng)
    b = dict(a)
    b["states"] = States(a["states"].angle, a["states"].ssm[:, :, :, :6], a["states"].k, a["states"].v)
    with pytest.raises(ValueError, match=r"states.ssm: expected shape \(3, 4, 4, 8\), got shape \(3, 4, 4, 6\)"):
        ref.step(**b)
    b = dict(a)
    b["states"] = None
    with pytest.raises(ValueError, match="states: expected a 4-tuple"):
        ref.step(**b)
    c = random_step_inputs(spec, Problem(3, 1, 4, 2, 3), rng, pool=5)
    c["state_indices"] = np.array([0, 9, 1])
    with pytest.raises(ValueError, match="state_indices: expected values < pool size 5"):
        ref.step(**c)


def test_step_pool_and_padding(rng):
    spec = ScanSpec(d_state=8, head_dim=4, n_angles=2, chunk_size=1, input_dtype="float64")
    a = random_step_inputs(spec, Problem(4, 1, 2, 1, 4), rng, pool=7)
    idx = a["state_indices"]
    out, new = ref.step(**a)
    pad = idx < 0
    assert pad.sum() == 1 and np.all(out[pad] == 0)
    untouched = np.setdiff1d(np.arange(7), idx[idx >= 0])
    for old, nw in zip(a["states"], new):
        np.testing.assert_array_equal(old[untouched], nw[untouched])
    # the same rows without a pool give the same outputs
    live = ~pad
    b = dict(a)
    b["states"] = States(*(x[idx[live]] for x in a["states"]))
    b["state_indices"] = None
    for n in ("q", "k", "v", "z", "adt", "dt", "trap", "angles"):
        if b[n] is not None:
            b[n] = a[n][live]
    out2, new2 = ref.step(**b)
    np.testing.assert_allclose(out[live], out2, rtol=0, atol=0)
    np.testing.assert_allclose(new.ssm[idx[live]], new2.ssm)
