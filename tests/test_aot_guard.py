"""The runtime spill guards' shared machinery (backends/triton/aot.py `Guard`), on CPU.

Every guard (scan_fwd, with and without SISO save_y's y_out, scan_bwd_core, scan_bwd's stages and
MIMO save_y's output kernel) decides on
the GPU's builds, so here the gate (`Guard.active`: SPILL_GUARD, no interpreter, a CUDA tensor)
is opened for meta tensors and the JIT's build (`aot.jit_build`) is a stand-in: no kernel is
built or launched. Checked for each guard: a decision that raises warns and runs the config as
given; a build that cannot be inspected counts as spill-free (warned); a spilling stand-in
steps the config down as the module's `fallback` says; the decision is remembered per key (a
second call builds nothing), in one memo that all guards share.
"""
from __future__ import annotations

import types
import warnings

import pytest
import torch

pytest.importorskip("triton")

from mamba3_kernels.backends.triton import aot  # noqa: E402
from mamba3_kernels.backends.triton import scan_bwd as sb  # noqa: E402
from mamba3_kernels.backends.triton import scan_bwd_core as core  # noqa: E402
from mamba3_kernels.backends.triton import scan_fwd as sf  # noqa: E402
from mamba3_kernels.spec import Problem, ScanSpec  # noqa: E402


def _fwd():
    spec = ScanSpec(d_state=128, head_dim=64, n_angles=64, has_d=True, has_z=True, input_dtype="bfloat16")
    d = sf.default_config(spec, Problem(4, 4096, 32, 1, 4))
    assert d["PREFETCH"] == 3 and d["STATE_PREFETCH"] is True
    t = sf.meta_tensors(spec, Problem(2, 4096, 4, 1, 2))

    def spills(c):   # phase 4 spills at the pipelined orders 3 and 2, phase 2 while it prefetches
        return ((c["name"] == "scan_chunk_output" and c["constexprs"]["PREFETCH"] in (2, 3))
                or (c["name"] == "scan_chunk_state" and bool(c["constexprs"]["PREFETCH"])))
    return (lambda cfg: sf.effective_config(spec, cfg, t)), d, spills, \
        dict(d, PREFETCH=0, STATE_PREFETCH=False, STATE_CHUNK=None)


def _core():
    d = core.default_config(1, 64, 64, "bfloat16")
    assert d["dkv_num_stages"] == 2
    e = lambda *s, dt=torch.bfloat16: torch.empty(s, dtype=dt, device="meta")  # noqa: E731
    qh, vt = e(2, 256, 1, 4, 64), e(2, 256, 1, 4, 64)
    adt = e(2, 4, 256, dt=torch.float32)
    s0 = e(2, 4, 64, 64, dt=torch.float32)

    def spills(c):   # dkv spills while pipelined
        return c["name"] == "scan_bwd_core_dkv" and c["num_stages"] > 1
    return (lambda cfg: core.effective_config(cfg, qh, qh, vt, adt, vt, s0, s0, None, True, False)), d, spills, \
        dict(d, dkv_num_stages=1)


def _bwd_bundle():
    spec = ScanSpec(d_state=16, head_dim=8, n_angles=8, rank=4, pairing="half", has_d=True, has_z=True,
                    has_mimo_v=True, has_mimo_z=True, has_mimo_out=True, input_dtype="float32")
    prob = Problem(2, 64, 4, 1, 2)
    return spec, sb.default_config(spec, prob), sf.meta_tensors(spec, prob)


def _bwd():
    spec, d, t = _bwd_bundle()
    grads = dict(out=torch.empty(t.out.shape, dtype=t.v.dtype, device="meta"), _y=None)

    def spills(c):   # post spills until its block is 2 tokens
        return c["name"] == "bwd_post" and c["constexprs"]["BT"] > 2
    return (lambda cfg: sb.effective_config(spec, cfg, t, grads)), d, spills, dict(d, POST_BT=2)


def _save_y():
    spec, d, t = _bwd_bundle()
    B, L, H, P = t.v.shape
    y = torch.empty((B, L, spec.rank, H, P), dtype=torch.float32, device="meta")

    def spills(c):   # save_y's output kernel (MIMO) spills until its block is 4 tokens
        return c["name"] == "save_y_output_fwd" and c["constexprs"]["BT"] > 4
    return (lambda cfg: sb.save_y_config(spec, cfg, t, y)), d, spills, dict(d, BT=4)


def _fwd_y_out():
    spec = ScanSpec(d_state=128, head_dim=64, n_angles=32, has_d=True, has_z=True, input_dtype="bfloat16")
    prob = Problem(2, 4096, 4, 1, 2)
    d = sf.default_config(spec, prob)
    assert d["PREFETCH"] == 3
    t = sf.meta_tensors(spec, prob)
    B, L, H, P = t.v.shape
    y = torch.empty((B, L, spec.rank, H, P), dtype=torch.float32, device="meta")

    def spills(c):   # phase 4 spills while it stores y (SISO save_y) at its pipelined load orders
        return c["name"] == "scan_chunk_output" and c["constexprs"]["Y_OUT"] and c["constexprs"]["PREFETCH"] in (2, 3)
    return (lambda cfg: sf.effective_config(spec, cfg, t, y)), d, spills, dict(d, PREFETCH=0)


GUARDS = {"scan_fwd": _fwd, "scan_bwd_core": _core, "scan_bwd": _bwd, "scan_bwd save_y": _save_y,
          "scan_fwd y_out": _fwd_y_out}


@pytest.fixture
def gpu_gate(monkeypatch):
    """A fresh memo, and the guards' gate open for meta tensors (as for CUDA ones)."""
    monkeypatch.setattr(aot, "_DECIDED", {})
    monkeypatch.setattr(aot.Guard, "active", lambda self, config, device: bool(config.get("SPILL_GUARD")))


def _stand_in(monkeypatch, spills):
    """aot.jit_build replaced by a stand-in whose n_spills follows `spills(call)`; returns the
    names of the calls it was asked to build."""
    built = []

    def jit_build(c):
        built.append(c["name"])
        return types.SimpleNamespace(n_spills=8 if spills(c) else 0)
    monkeypatch.setattr(aot, "jit_build", jit_build)
    return built


@pytest.mark.parametrize("name", GUARDS)
def test_failing_decision_runs_config_as_given(name, gpu_gate, monkeypatch):
    guard, d, _, _ = GUARDS[name]()

    def broken(self, c):
        raise RuntimeError("no build here")
    monkeypatch.setattr(aot.Guard, "gpu_spills", broken)
    module = name.split()[0]
    with pytest.warns(UserWarning, match=f"{module} spill guard failed \\(RuntimeError: no build here\\)"):
        assert guard(d) is d
    with warnings.catch_warnings():   # remembered: no second decision, no second warning
        warnings.simplefilter("error")
        assert guard(d) is d


@pytest.mark.parametrize("name", GUARDS)
def test_build_that_cannot_be_inspected_counts_as_spill_free(name, gpu_gate, monkeypatch):
    guard, d, _, _ = GUARDS[name]()

    def jit_build(c):
        raise RuntimeError("ptxas died")
    monkeypatch.setattr(aot, "jit_build", jit_build)
    with pytest.warns(UserWarning, match="could not inspect the build of .*ptxas died"):
        assert guard(d) == d


@pytest.mark.parametrize("name", GUARDS)
def test_decision_steps_down_and_is_remembered(name, gpu_gate, monkeypatch):
    guard, d, spills, want = GUARDS[name]()
    built = _stand_in(monkeypatch, spills)
    got = guard(d)
    assert got == want, got
    n = len(built)
    assert n > 0
    assert guard(dict(d)) is got   # same key (an equal config): remembered, nothing rebuilt
    assert len(built) == n
    assert len(aot._DECIDED) == 1 and next(iter(aot._DECIDED))[0] == name.split()[0]
    other = dict(d, SPILL_GUARD=True, num_warps=d["num_warps"] * 2)   # another key: decided anew
    guard(other)
    assert len(built) > n and len(aot._DECIDED) == 2


def test_guard_off_builds_nothing(gpu_gate, monkeypatch):
    for name, case in GUARDS.items():
        guard, d, spills, _ = case()
        built = _stand_in(monkeypatch, spills)
        off = dict(d, SPILL_GUARD=False)
        assert guard(off) is off and built == [], name
    assert aot._DECIDED == {}


def test_gate():
    """Off the GPU (meta / CPU tensors, or the interpreter) or without SPILL_GUARD no guard runs."""
    g = aot.Guard("x")
    assert not g.active({"SPILL_GUARD": True}, torch.device("meta"))
    assert not g.active({"SPILL_GUARD": True}, torch.device("cpu"))
    assert not g.active({}, torch.device("cuda"))


def test_gate_on_cuda(monkeypatch):
    monkeypatch.setattr(aot, "_interpret", lambda: False)
    g = aot.Guard("x")
    assert g.active({"SPILL_GUARD": True}, torch.device("cuda"))
    assert not g.active({"SPILL_GUARD": False}, torch.device("cuda"))
    monkeypatch.setattr(aot, "_interpret", lambda: True)
    assert not g.active({"SPILL_GUARD": True}, torch.device("cuda"))


def test_memo_key(monkeypatch):
    """Hashable items as they are (a dict by its items), an unhashable one by its repr (a dict:
    of its sorted items); modules apart; such a key still remembers."""
    spec = ScanSpec(d_state=16, head_dim=8)
    assert aot.memo_key("m", (spec, {"a": 1, "b": (2,)}, (3, 4))) == ("m", spec, (("a", 1), ("b", (2,))), (3, 4))
    k = aot.memo_key("m", ({"b": [1], "a": 2}, [5]))
    assert k == ("m", "[('a', 2), ('b', [1])]", "[5]")
    hash(k)
    assert aot.memo_key("m", (1,)) != aot.memo_key("n", (1,))
    monkeypatch.setattr(aot, "_DECIDED", {})
    calls = []
    g = aot.Guard("m")
    cfg = {"SPILL_GUARD": True, "CORE": {"BLOCK_N": 32}}
    for _ in range(2):
        assert g.remembered((cfg,), cfg, lambda: calls.append(1) or dict(cfg, x=1)) == dict(cfg, x=1)
    assert calls == [1]


@pytest.mark.parametrize("name", ["scan_bwd", "scan_bwd save_y"])
def test_stage_decision_keeps_the_callers_core_overrides(name, gpu_gate, monkeypatch):
    """The stage guards decide per whole config, the core's overrides (CORE) included (post's
    build depends on the core's N blocks): each call runs its own CORE, a config met again
    builds nothing. A decision once shared across CORE overrides handed every later call the
    first call's CORE (the tuner's core candidates all ran one core config)."""
    guard, d, spills, want = GUARDS[name]()
    built = _stand_in(monkeypatch, spills)
    cores = ({"CHUNK": 16}, {"BLOCK_N": 128}, None)
    for core_cfg in cores:
        got = guard(dict(d, CORE=core_cfg))
        assert got == dict(want, CORE=core_cfg), got
    n = len(built)
    assert len(aot._DECIDED) == len(cores)
    assert guard(dict(d, CORE={"CHUNK": 16})) == dict(want, CORE={"CHUNK": 16})   # remembered
    assert len(built) == n
