"""The checks have teeth: deliberately wrong oracles must fail the oracle's self-check.

Each mutant patches one rule of the recurrent form only (the chunked form, written
independently, keeps the right rule), then `self_check` must report a failure.
"""
import numpy as np
import pytest

from mamba3_kernels.reference import common, recurrent, selfcheck
from mamba3_kernels.reference.selfcheck import self_check
from mamba3_kernels.spec import Problem, ScanSpec


def _beta_dropped(mp):
    def disc(adt, dt, trap, euler):
        a, b, g, lam = common.discretize(adt, dt, trap, euler)
        return a, 0 * b, g, lam
    mp.setattr(recurrent, "discretize", disc)


def _pairing_swapped(mp):
    other = {"interleaved": "half", "half": "interleaved"}

    def bias_rotate(x, bias, theta, pairing):
        return common.bias_rotate(x, bias, theta, other[pairing])
    mp.setattr(recurrent, "bias_rotate", bias_rotate)


def _angle_not_wrapped(mp):
    mp.setattr(recurrent, "wrap_angle", lambda x: x)
    # only an angle state that leaves [0, 2 pi) tells the mutant apart (the rotations and the
    # state comparison are 2 pi-periodic, the range check is not): positive rates from a state
    # just below 2 pi make every channel leave it at its first token (with the plain random
    # inputs all 24 channels sometimes stayed inside: a flaky catch, CI at 9ca6124)
    orig = selfcheck.random_scan_inputs

    def inputs(*args, **kw):
        a = orig(*args, **kw)
        a["angles"] = np.abs(a["angles"]) + 0.5
        a["initial_states"] = a["initial_states"]._replace(
            angle=np.full_like(a["initial_states"].angle, 2 * np.pi - 1e-3))
        return a
    mp.setattr(selfcheck, "random_scan_inputs", inputs)


def _bias_after_rotation(mp):
    def bias_rotate(x, bias, theta, pairing):
        return x + bias, common.rotate(x, theta, pairing) + bias
    mp.setattr(recurrent, "bias_rotate", bias_rotate)


def _d_on_raw_v(mp):
    mp.setattr(recurrent, "skip_term", lambda d, v, vt: d * v)


MUTANTS = {
    "beta term dropped": _beta_dropped,
    "pairing swapped": _pairing_swapped,
    "angle not wrapped": _angle_not_wrapped,
    "bias after rotation": _bias_after_rotation,
    "D on the unprojected v": _d_on_raw_v,
}

# a spec where every mutated rule matters: trapezoidal, angles, MIMO_V != 1, D
SPEC = ScanSpec(d_state=8, head_dim=4, rank=2, n_angles=3, pairing="interleaved", has_d=True,
                has_z=True, has_mimo_v=True, has_mimo_out=True, initial_states=True,
                input_dtype="float64")


def test_unmutated_oracle_passes(rng):
    rep = self_check(SPEC, Problem(2, 12, 4, 2, 2), rng, adjoint_check=False)
    assert rep.ok, rep.table()


@pytest.mark.parametrize("name", list(MUTANTS))
def test_mutant_is_caught(name, monkeypatch, rng):
    MUTANTS[name](monkeypatch)
    prob = Problem(2, 12, 4, 2, 2)
    rep = self_check(SPEC, prob, rng, adjoint_check=False)   # fresh inputs every run
    failed = rep.failures()
    assert failed, f"mutant '{name}' passed every comparison:\n{rep.table()}"
