"""The tuner on the chunked scan forward (op "forward") on CPU: the real ScanHarness with the
Triton forward under the interpreter, plus broken fake backends the harness must reject, and
the CLI's scan spec matching what `mamba3_kernels.scan` derives from tensors."""
from __future__ import annotations

import types

import numpy as np
import pytest
import torch

from mamba3_kernels import autotune as at
from mamba3_kernels.autotune import cache as cache_mod
from mamba3_kernels.autotune.commands import scan_spec_problem
from mamba3_kernels.autotune.scan_harness import ScanHarness, _split_lengths
from mamba3_kernels.spec import resolve_scan

ENV = at.Environment(gpu="NVIDIA H100 80GB HBM3", cc="9.0", sm_count=132, driver="550.54.15",
                     torch="2.13.0", triton="3.6.0", tilelang="0.1.15", cutlass_dsl="4.8.1",
                     mamba3_kernels="0.1.0")


@pytest.fixture(autouse=True)
def _isolated(tmp_path, monkeypatch):
    monkeypatch.setenv("MAMBA3_TUNE_CACHE", str(tmp_path / "tune.json"))
    at.set_environment_provider(lambda device: ENV)
    yield
    at.set_environment_provider(None)
    cache_mod._caches.clear()


class ConstTimer:
    """Preset microseconds per backend name (the CPU has nothing worth timing)."""
    name = "const"

    def __init__(self, times):
        self.times = times

    def measure(self, bench, reps):
        base = self.times[bench.label.split("[")[0].split()[0]]
        return [base * (1 + 1e-3 * i) for i in range(reps)]


def _triton():
    from mamba3_kernels import backends
    return backends.get("triton")


def _fake(name, op, entry, fn):
    """A backend for `op` whose entry point (forward / scan_grad) runs Triton's default config,
    then `fn` on what it wrote (the bundle / the job)."""
    tri = _triton()

    def run(spec, config, x):
        getattr(tri, entry)(spec, tri.default_config(spec, None, op), x)
        fn(x)

    return types.SimpleNamespace(
        NAME=name, PARALLEL_COMPILE=False, available=lambda: (True, ""),
        supports=lambda spec, o: (o == op, ""),
        space=lambda spec, problem, o: [{"x": 0}], default_config=lambda spec, problem, o: {"x": 0},
        **{entry: run})


def _wrapped(name, fn):
    """A forward backend: Triton's default forward, then `fn(t)` on the result."""
    return _fake(name, "forward", "forward", fn)


def _scale_out(t):
    t.out.mul_(1.2)


def _noisy(t):
    t.out.add_(torch.randn_like(t.out) * 1e-6 * t.out.abs().max())


def test_scan_tuning_checks_and_rejects():
    spec, problem = scan_spec_problem(2, 24, 2, 16, 16, A=4, has_d=True, has_z=True, initial_states=True,
                                      final_states=True, dtype="float32")
    good = _triton()
    res = at.tune("forward", spec, problem, "cpu", backends=[good, _wrapped("scaled", _scale_out),
                                                            _wrapped("noisy", _noisy)],
                  harness=ScanHarness(spec, problem, "cpu", seed=5, small_len=12, prefix_len=16),
                  timer=ConstTimer({"triton": 5.0, "scaled": 1.0, "noisy": 2.0}), env=ENV,
                  progress=False, reps=20, confirm_reps=20, max_candidates=2, write=True)
    by = {r.backend: r for r in res.rows}
    assert by["scaled"].status == "failed" and "mismatch (small case" in by["scaled"].reason
    assert by["noisy"].status == "failed" and "non-repeatable" in by["noisy"].reason
    assert res.best is not None and res.best.backend == "triton"
    hit = at.lookup("forward", spec, problem, "cpu", env=ENV)
    assert hit is not None and hit[0] == "triton"


def test_scan_harness_reference_catches_a_late_divergence():
    """A candidate right on the small case and on the prefix but wrong late in the sequence
    fails against the reference output of the first passing candidate."""
    spec, problem = scan_spec_problem(1, 40, 2, 16, 16, A=4, final_states=True, dtype="float32")

    def late(t):
        t.out[:, 30:].mul_(1.5)

    h = ScanHarness(spec, problem, "cpu", seed=9, small_len=12, prefix_len=16)
    tri = _triton()
    cand = lambda mod, cfg: at.Candidate(mod.NAME, cfg, module=mod, is_default=True)  # noqa: E731
    ok, why = h.check(cand(tri, tri.default_config(spec, problem, "forward")))
    assert ok, why
    ok, why = h.check(cand(_wrapped("late", late), {"x": 0}))
    assert not ok and "reference output" in why


def test_cli_scan_spec_matches_the_api():
    B, L, H, G, N, P, R, A = 2, 33, 4, 2, 32, 16, 2, 8
    spec, problem = scan_spec_problem(B, L, H, N, P, R, G, A, pairing="half", has_d=True, has_z=True,
                                      mimo_v=True, mimo_z=True, mimo_out=True, initial_states=True,
                                      final_states=True)
    e = lambda *s, dt=torch.float32: torch.empty(s, dtype=dt, device="meta")  # noqa: E731
    bf = torch.bfloat16
    from mamba3_kernels.spec import States
    api_spec, api_problem = resolve_scan(
        e(B, L, R, G, N, dt=bf), e(B, L, R, G, N, dt=bf), e(B, L, H, P, dt=bf), e(B, H, L), e(B, H, L),
        e(B, H, L), e(H, R, N), e(H, R, N), angles=e(B, L, H, A), d=e(H), z=e(B, L, H, P, dt=bf),
        mimo_v=e(H, R, P), mimo_z=e(H, R, P), mimo_out=e(H, R, P),
        initial_states=States(e(B, H, A), e(B, H, P, N), e(B, R, H, N), e(B, H, P, dt=bf)),
        pairing="half", final_states=True)
    assert (spec, problem) == (api_spec, api_problem)


def test_split_lengths_sum_and_empty():
    rng = np.random.default_rng(0)
    for total, n in ((10, 1), (10, 2), (37, 4), (0, 3)):
        lens = _split_lengths(total, n, rng)
        assert len(lens) == n and sum(lens) == total and min(lens) >= 0
        if n > 2:
            assert 0 in lens


# -- op "backward": the backward's configs through the autograd path ---------------------------

def _grad_backend(name, fn):
    """A backward backend: Triton's default backward, then `fn(job)` on its gradients."""
    return _fake(name, "backward", "scan_grad", fn)


class LabelTimer:
    """Microseconds by label: the backend's, less where the label holds `fast` (a non-default
    Triton config made the winner)."""
    name = "label"

    def __init__(self, times, fast):
        self.times, self.fast = times, fast

    def measure(self, bench, reps):
        base = self.times[bench.label.split("[")[0]]
        if self.fast in bench.label:
            base *= 0.5
        return [base * (1 + 1e-3 * i) for i in range(reps)]


def test_backward_tuning_checks_rejects_and_scan_takes_the_winner():
    from mamba3_kernels import api, dispatch
    from mamba3_kernels.autotune.scan_grad_harness import ScanGradHarness
    from mamba3_kernels.backends.triton import scan_bwd
    spec, problem = scan_spec_problem(1, 20, 2, 16, 8, A=4, has_d=True, has_z=True, initial_states=True,
                                      final_states=True, dtype="float32")

    def scaled(job):
        job.grads["q"].mul_(1.2)

    def noisy(job):
        g = job.grads["v"]
        g.add_(torch.randn_like(g) * 1e-6 * g.abs().max())

    res = at.tune("backward", spec, problem, "cpu",
                  backends=[_triton(), _grad_backend("scaled", scaled), _grad_backend("noisy", noisy)],
                  harness=ScanGradHarness(spec, problem, "cpu", seed=3, small_len=12),
                  timer=LabelTimer({"triton": 5.0, "scaled": 1.0, "noisy": 2.0}, "SPILL_GUARD=False"), env=ENV,
                  progress=False, reps=20, confirm_reps=20, max_candidates=4, write=True)
    rows = {(r.backend, r.candidate.is_default): r for r in res.rows}
    assert rows[("scaled", True)].status == "failed"
    assert "mismatch (small case vs the oracle adjoint)" in rows[("scaled", True)].reason
    assert "grad.q" in rows[("scaled", True)].reason or "q rel_l2" in rows[("scaled", True)].reason
    assert rows[("noisy", True)].status == "failed" and "non-repeatable" in rows[("noisy", True)].reason
    best = res.best
    assert best is not None and best.backend == "triton" and best.config != scan_bwd.default_config(spec, problem)
    assert best.config["SPILL_GUARD"] is False
    hit = at.lookup("backward", spec, problem, "cpu", env=ENV)
    assert hit is not None and hit[0] == "triton" and hit[1] == best.config
    # mamba3_kernels.scan's autograd path: bwd_config=None takes the winner; a dict overrides the default
    dispatch.clear_memo()
    _, bcfg = api.grad_configs(spec, problem, torch.device("cpu"), None, None, None)
    assert bcfg == best.config
    _, bcfg = api.grad_configs(spec, problem, torch.device("cpu"), None, None, {"POST_BT": 4})
    assert bcfg == dict(scan_bwd.default_config(spec, problem), POST_BT=4)


def test_backward_harness_same_precision_bound():
    """16-bit inputs: the harness holds a gradient over the fixed bound to FLOOR_FACTOR x the
    oracle's spread under one-roundoff perturbations (scan_grad_testing.gradient_spread), as the
    tests do; that spread is of the order of roundoff, so a gradient off by 20 % still fails."""
    from mamba3_kernels.autotune.scan_grad_harness import ScanGradHarness
    from mamba3_kernels.scan_testing import FLOOR_FACTOR
    spec, problem = scan_spec_problem(1, 20, 2, 16, 8, A=4, has_d=True, has_z=True, initial_states=True,
                                      final_states=True, dtype="bfloat16")
    h = ScanGradHarness(spec, problem, "cpu", seed=5, small_len=12)
    spread = h.small_spread()
    assert set(spread) == {f"grad.{n}" for n in h.small.names}
    assert h.small_spread() is spread                     # computed once
    assert all(np.isfinite(v).all() and min(v) >= 0 for v in spread.values()), spread
    for n in ("q", "k", "v", "initial_states.ssm"):
        assert 1e-5 < spread[f"grad.{n}"][0] < 0.2 / FLOOR_FACTOR / 2, (n, spread)


def test_backward_space_is_valid():
    from mamba3_kernels.backends.triton import scan_bwd
    for kw in (dict(), dict(R=4, pairing="half", mimo_v=True, mimo_z=True, mimo_out=True)):
        spec, problem = scan_spec_problem(2, 4096, 32, 128, 64, A=32, has_d=True, has_z=True, dtype="bfloat16", **kw)
        sp = _triton().space(spec, problem, "backward")
        assert sp[0] == _triton().default_config(spec, problem, "backward") == scan_bwd.default_config(spec, problem)
        assert 8 <= len(sp) <= 16 and len({repr(sorted(c.items())) for c in sp}) == len(sp)
        for c in sp:
            scan_bwd.check_config(spec, c)
        assert any((c.get("CORE") or {}).get("FUSED") for c in sp)


@pytest.mark.parametrize("R,N,runs", [(1, 128, True), (2, 128, True), (1, 128, False), (1, 32, True)])
def test_backward_space_tries_the_other_core(R, N, runs, monkeypatch):
    """Where TileLang runs and its walks take the spec, the backward's space holds the core
    implementation auto does not pick; where auto picks the TileLang walks, the Triton core's
    candidates come with CORE_IMPL "triton" (else they would not change the TileLang core's
    plan); no TileLang candidate where it cannot run or the walks do not apply."""
    from mamba3_kernels.backends.triton import scan_bwd
    monkeypatch.setattr(scan_bwd, "_tilelang_runs", lambda: runs)
    kw = dict(pairing="half", mimo_v=True) if R > 1 else {}
    spec, problem = scan_spec_problem(2, 4096, 32, N, 64, A=16, has_d=True, has_z=True, dtype="bfloat16", R=R, **kw)
    sp = scan_bwd.space(spec, problem)
    impls = [c.get("CORE_IMPL", "auto") for c in sp]
    auto_tl = scan_bwd.core_impl(sp[0], R, N, 64, torch.bfloat16) == "tilelang"
    assert auto_tl == (runs and R == 1 and N == 128)
    if auto_tl:
        assert "triton" in impls and "tilelang" not in impls
        assert all(c.get("CORE_IMPL") == "triton" for c in sp if c.get("CORE") and c["CORE"] != {"SPILL_GUARD": False})
    elif runs and N in (64, 128):
        assert "tilelang" in impls
    else:
        assert set(impls) == {"auto"}
    for c in sp:
        scan_bwd.check_config(spec, c)
