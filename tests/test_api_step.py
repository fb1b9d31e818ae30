"""The public step API and StepPlan plumbing, on CPU, through an oracle-backed backend.

The backend below computes with the float64 oracle and writes into the StepTensors bundle, so
these tests check what the API owns: argument checks (nothing written on the error path),
in-place vs new states, pools and padding slots, dispatch, and StepPlan == step.
"""
import types

import numpy as np
import pytest
import torch

import mamba3_kernels as m3
from mamba3_kernels import backends, dispatch
from mamba3_kernels import reference as ref
from mamba3_kernels.reference.inputs import spec_options
from mamba3_kernels.spec import Problem, ScanSpec, States
from mamba3_kernels.testing import step_inputs, to_numpy


def _oracle_step(spec, cfg, t):
    n = lambda x: None if x is None else to_numpy(x)
    st = States(*(n(x) for x in t.state_in))
    out, new = ref.step(n(t.q), n(t.k), n(t.v), n(t.adt), n(t.dt), n(t.trap), n(t.q_bias), n(t.k_bias), st,
                        angles=n(t.angles), d=n(t.d), z=n(t.z), mimo_v=n(t.mimo_v), mimo_z=n(t.mimo_z),
                        mimo_out=n(t.mimo_out), norm_weight=n(t.norm_weight),
                        state_indices=n(t.state_indices), **spec_options(spec))
    t.out.copy_(torch.as_tensor(out).reshape(t.out.shape))
    for dst, src in zip(t.state_out, new):
        dst.copy_(torch.as_tensor(src).reshape(dst.shape))


ORACLE = types.SimpleNamespace(NAME="oracle", available=lambda: (True, "float64 oracle"),
                               supports=lambda spec, op: (op == "step", ""),
                               default_config=lambda spec, problem, op: {}, step=_oracle_step)


@pytest.fixture(autouse=True)
def oracle_backend(monkeypatch):
    real_get = backends.get
    monkeypatch.setattr(backends, "get", lambda name: ORACLE if name == "oracle" else real_get(name))
    monkeypatch.setattr(dispatch, "PREFERENCE", {"step": ("oracle",)})
    monkeypatch.setenv("MAMBA3_NO_CACHE", "1")
    dispatch.clear_memo()
    yield
    dispatch.clear_memo()


SPEC = ScanSpec(d_state=8, head_dim=6, rank=2, n_angles=3, pairing="half", has_d=True, has_z=True,
                has_mimo_v=True, has_mimo_z=True, has_mimo_out=True, chunk_size=1, initial_states=True,
                final_states=True, input_dtype="float32")


def _args(rng, pool=None, B=3):
    return step_inputs(SPEC, Problem(B, 1, 4, 2, pool or B), rng, pool=pool)


def _opts():
    return dict(output_mode=SPEC.output_mode, pairing=SPEC.pairing)


def test_step_inplace_and_new(rng):
    a = _args(rng)
    before = States(*(x.clone() for x in a["states"]))
    out_new, st_new = m3.step(**a, **_opts(), inplace=False)
    for x, y in zip(a["states"], before):
        assert torch.equal(x, y)  # inputs untouched
    out_in, st_in = m3.step(**a, **_opts())
    assert torch.equal(out_in, out_new)
    for x, y, z in zip(st_in, st_new, a["states"]):
        assert torch.equal(x, y) and x.data_ptr() == z.data_ptr()


def test_pool_padding_and_untouched_rows(rng):
    a = _args(rng, pool=7)
    before = States(*(x.clone() for x in a["states"]))
    out, st = m3.step(**a, **_opts(), inplace=False)
    idx = a["state_indices"].numpy()
    assert torch.all(out[torch.as_tensor(idx < 0)] == 0)
    untouched = np.setdiff1d(np.arange(7), idx[idx >= 0])
    for x, y in zip(st, before):
        assert torch.equal(x[untouched], y[untouched])


@pytest.mark.parametrize("change,msg", [
    (lambda a: a.update(v=a["v"].double()), "v: expected dtype in"),
    (lambda a: a.update(q=a["q"].to(torch.bfloat16)), "q: expected dtype in"),
    (lambda a: a.update(states=States(a["states"].angle.double(), *a["states"][1:])), "states.angle: expected dtype"),
    (lambda a: a.update(states=States(a["states"].angle, a["states"].ssm.half(), *a["states"][2:])),
     "states.ssm: expected dtype"),
    (lambda a: a.update(states=States(a["states"].angle, a["states"].ssm.transpose(2, 3).contiguous().transpose(2, 3),
                                      *a["states"][2:])), "states.ssm: expected a contiguous tensor"),
    (lambda a: a.update(dt=a["dt"][:, :3]), r"dt: expected shape \(3, 4\)"),
    (lambda a: a.update(state_indices=torch.tensor([0, 1, 2], dtype=torch.int64)), "state_indices: expected dtype"),
])
def test_errors_touch_nothing(rng, change, msg):
    a = _args(rng)
    if "state_indices" in msg:
        a = _args(rng, pool=5)
    change(a)
    before = [x.clone() for x in a["states"]]
    with pytest.raises(ValueError, match=msg):
        m3.step(**a, **_opts())
    for x, y in zip(a["states"], before):
        assert torch.equal(x, y)


def test_state_indices_range_checked(rng):
    a = _args(rng, pool=5)
    a["state_indices"] = torch.tensor([0, 7, 1], dtype=torch.int32)
    before = [x.clone() for x in a["states"]]
    with pytest.raises(ValueError, match="state_indices: expected values < state pool size M=5"):
        m3.step(**a, **_opts())
    for x, y in zip(a["states"], before):
        assert torch.equal(x, y)


def test_unknown_backend_and_config_without_backend(rng):
    a = _args(rng)
    with pytest.raises(ValueError, match="backend: expected one of"):
        m3.step(**a, **_opts(), backend="cuda-c")
    with pytest.raises(ValueError, match="config: expected None unless backend="):
        m3.step(**a, **_opts(), config={"num_warps": 4})


def test_plan_equals_step(rng):
    a = _args(rng, pool=6)
    b = {n: (States(*(x.clone() for x in v)) if n == "states" else v) for n, v in a.items()}
    plan = m3.StepPlan(**a, **_opts())
    tok = {n: a[n] for n in ("q", "k", "v", "adt", "dt", "trap", "angles", "z", "state_indices")}
    for _ in range(3):  # carries states in place
        o1, s1 = plan(**tok)
        o2, s2 = m3.step(**b, **_opts())
        assert torch.equal(o1, o2)
        for x, y in zip(s1, s2):
            assert torch.equal(x, y)
    assert plan.source == "default"


def test_plan_rejects_mismatched_tokens(rng):
    a = _args(rng)
    plan = m3.StepPlan(**a, **_opts())
    tok = {n: a[n] for n in ("q", "k", "v", "adt", "dt", "trap", "angles", "z")}
    bad = dict(tok, v=tok["v"][:2])
    with pytest.raises(ValueError, match=r"v: expected shape \(3, 4, 6\)"):
        plan(**bad)
    with pytest.raises(ValueError, match="z: expected a tensor"):
        plan(**dict(tok, z=None))
    with pytest.raises(ValueError, match="state_indices: expected None"):
        plan(**tok, state_indices=torch.zeros(3, dtype=torch.int32))


def test_validation_cache_never_skips_a_check(rng):
    """After a valid call is cached, a call differing in any dtype/stride/shape is checked again."""
    a = _args(rng, pool=5)
    m3.step(**a, **_opts())                       # validated and cached
    m3.step(**a, **_opts())                       # cache hit
    bad = dict(a, states=States(a["states"].angle, a["states"].ssm.to(torch.float16), *a["states"][2:]))
    with pytest.raises(ValueError, match="states.ssm: expected dtype"):
        m3.step(**bad, **_opts())
    nc = dict(a, v=a["v"].transpose(0, 1).contiguous().transpose(0, 1))   # same shape, other strides
    out_nc, _ = m3.step(**nc, **_opts(), inplace=False)                 # inputs may be strided: copied
    out_c, _ = m3.step(**a, **_opts(), inplace=False)
    assert torch.equal(out_nc, out_c)
    a["state_indices"] = torch.tensor([0, 9, 1], dtype=torch.int32)     # same signature, bad values
    with pytest.raises(ValueError, match="state_indices: expected values < state pool size M=5"):
        m3.step(**a, **_opts())


def test_remembered_choice_follows_dispatch(rng, monkeypatch):
    """api.step remembers the dispatch decision per validated signature, but takes it again when
    dispatch's memo is cleared (a tuning-cache write) and when backend= differs."""
    used = []
    other = types.SimpleNamespace(NAME="other", available=lambda: (True, ""), supports=ORACLE.supports,
                                  default_config=ORACLE.default_config,
                                  step=lambda spec, cfg, t: (used.append("other"), _oracle_step(spec, cfg, t)))
    real_get = backends.get
    monkeypatch.setattr(backends, "get", lambda name: other if name == "other" else real_get(name))
    a = _args(rng)
    o1, _ = m3.step(**a, **_opts(), inplace=False)
    monkeypatch.setattr(dispatch, "PREFERENCE", {"step": ("other", "oracle")})
    m3.step(**a, **_opts(), inplace=False)
    assert used == []                               # memoised: still the oracle
    dispatch.clear_memo()
    o2, _ = m3.step(**a, **_opts(), inplace=False)
    assert used == ["other"] and torch.equal(o1, o2)
    m3.step(**a, **_opts(), inplace=False, backend="oracle")
    assert used == ["other"]                        # explicit backend= is honoured
    m3.step(**a, **_opts(), inplace=False)
    assert used == ["other", "other"]


def test_bundle_contract_with_strided_inputs(rng, monkeypatch):
    """Every tensor a backend receives is contiguous, in the contract's dtype and rank, on the
    first (validating) call and on the calls that reuse its verdict, whatever the strides of
    the caller's tensors (the oracle backend reads any strides, so it cannot see this itself)."""
    seen = []

    def checking_step(spec, cfg, t):
        for name in ("q", "k", "v", "z", "adt", "dt", "trap", "angles", "q_bias", "k_bias", "d",
                     "mimo_v", "mimo_z", "mimo_out", "state_indices", "out"):
            x = getattr(t, name)
            assert x is None or x.is_contiguous(), name
        for x in (*t.state_in, *t.state_out):
            assert x.is_contiguous()
        assert t.q.dim() == 4 and t.k.dim() == 4 and t.q_bias.dim() == 3
        assert all(getattr(t, n).dtype == torch.float32 for n in ("adt", "dt", "trap", "angles", "q_bias", "d"))
        seen.append(1)
        _oracle_step(spec, cfg, t)

    monkeypatch.setattr(ORACLE, "step", checking_step)
    a = _args(rng, pool=5)
    a["adt"] = a["adt"].to(torch.bfloat16).float()     # exactly representable in bf16 (cast below)
    want, _ = m3.step(**a, **_opts(), inplace=False)

    def strided(x):   # same values, every dim's stride changed (a transposed copy, viewed back)
        return x.transpose(0, -1).contiguous().transpose(0, -1) if x.dim() > 1 else x.repeat_interleave(2)[::2]
    b = {n: (strided(x) if isinstance(x, torch.Tensor) else x) for n, x in a.items()}
    b["adt"] = b["adt"].to(torch.bfloat16)
    for _ in range(2):   # validating call, then the remembered verdict
        got, _ = m3.step(**b, **_opts(), inplace=False)
        assert torch.equal(got, want)
    assert len(seen) == 3


def test_graphed_step_static_buffers(rng):
    """plan.graphed(capture=False): the static-buffer path of the CUDA-graph route (the capture
    itself is GPU-only: tests/test_step_gpu.py) equals StepPlan token by token."""
    a = _args(rng, pool=6)
    b = {n: (States(*(x.clone() for x in v)) if n == "states" else v) for n, v in a.items()}
    plan_g, plan_e = m3.StepPlan(**a, **_opts()), m3.StepPlan(**b, **_opts())
    with pytest.raises(ValueError, match="device: expected a CUDA device"):
        plan_g.graphed()
    g = plan_g.graphed(capture=False)
    names = ("q", "k", "v", "adt", "dt", "trap", "angles", "z", "state_indices")
    for s in range(3):
        tok = {n: a[n] for n in names}
        if s:   # fresh token values each step, the plan's shapes and dtypes
            fresh = _args(rng, pool=6)
            tok.update({n: fresh[n] for n in ("q", "k", "v", "adt", "dt", "trap", "angles", "z")})
        g.out.fill_(float("nan"))
        o1, s1 = g(**tok)
        o2, s2 = plan_e(**tok)
        assert o1 is g.out and torch.equal(o1, o2)
        for x, y, z in zip(s1, s2, a["states"]):
            assert torch.equal(x, y) and x is z          # the plan's own states, in place
    before = [x.clone() for x in g.tokens.__dict__.values() if x is not None]
    with pytest.raises(ValueError, match="v: expected shape"):
        g(q=a["q"], v=a["v"].double())
    with pytest.raises(ValueError, match="z: expected shape"):
        g(z=a["z"][:2])
    with pytest.raises(ValueError, match="w: expected one of the token inputs"):
        g(w=a["v"])
    after = [x for x in g.tokens.__dict__.values() if x is not None]
    assert all(torch.equal(x, y) for x, y in zip(before, after))   # nothing written on an error
    with pytest.raises(ValueError, match="plan: expected a StepPlan with inplace=True"):
        m3.StepPlan(**a, **_opts(), inplace=False).graphed(capture=False)
