"""The decode step as a torch.library op: same results as mamba3_kernels.step, and torch.compile
traces a decode loop through it with no graph break (CPU, oracle-backed backend)."""
import numpy as np
import pytest
import torch

import mamba3_kernels as m3
from mamba3_kernels import ops
from mamba3_kernels.spec import Problem, ScanSpec, States
from mamba3_kernels.testing import step_inputs
from test_api_step import oracle_backend  # noqa: F401  (fixture: the float64 oracle as a backend)

pytestmark = pytest.mark.usefixtures("oracle_backend")

SPEC = ScanSpec(d_state=8, head_dim=6, rank=2, n_angles=3, pairing="half", has_d=True, has_z=True,
                has_mimo_v=True, has_mimo_out=True, chunk_size=1, initial_states=True, final_states=True,
                input_dtype="float32")


def _clone_states(a):
    return States(*(x.clone() for x in a["states"]))


def test_op_matches_step(rng):
    a = step_inputs(SPEC, Problem(3, 1, 4, 2, 5), rng, pool=5)
    ref_states = _clone_states(a)
    ref_out, _ = m3.step(**dict(a, states=ref_states), pairing="half")
    out = ops.step(**a, pairing="half")
    assert torch.equal(out, ref_out)
    for x, y in zip(a["states"], ref_states):
        assert torch.equal(x, y)


def test_compiled_decode_loop_has_no_graph_break(rng):
    a = step_inputs(SPEC, Problem(2, 1, 4, 2, 2), rng)
    toks = [step_inputs(SPEC, Problem(2, 1, 4, 2, 2), np.random.default_rng(i)) for i in range(3)]
    names = ("q", "k", "v", "adt", "dt", "trap", "angles", "z")
    params = {n: a[n] for n in ("q_bias", "k_bias", "d", "mimo_v", "mimo_out")}

    def loop(states, toks):
        outs = []
        for t in toks:
            outs.append(ops.step(**{n: t[n] for n in names}, **params, states=states, pairing="half") * 2)
        return torch.stack(outs)

    eager_states = _clone_states(a)
    want = loop(eager_states, toks)
    compiled = torch.compile(loop, backend="aot_eager", fullgraph=True)
    got_states = _clone_states(a)
    got = compiled(got_states, toks)
    assert torch.equal(got, want)
    for x, y in zip(got_states, eager_states):
        assert torch.equal(x, y)
