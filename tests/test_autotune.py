"""CPU tests of the autotuner's logic, with fake backends, harnesses and timers.

Covered: selection of the fastest, failures (compile error, out of resources, mismatch,
non-repeatable, timeout, timing error) recorded and never selected, confirmation, strategies,
key contents, bucketing and nearest-bucket fallback, corruption recovery, concurrent writers
(several processes, nothing lost), export/import, tune-on-miss only when asked, the CLI, and
the real StepHarness on CPU with an oracle-backed fake backend. Speed is never asserted here
(bench/ measures it).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
import types

import numpy as np
import pytest

from mamba3_kernels import autotune as at
from mamba3_kernels.autotune import buckets, cache as cache_mod, strategy as strat
from mamba3_kernels.autotune.space import Candidate
from mamba3_kernels.spec import Problem, ScanSpec

ENV = at.Environment(gpu="NVIDIA H100 80GB HBM3", cc="9.0", sm_count=132, driver="550.54.15",
                     torch="2.13.0", triton="3.6.0", tilelang="0.1.15", cutlass_dsl="4.8.1",
                     mamba3_kernels="0.1.0")
SPEC = ScanSpec(d_state=16, head_dim=8, chunk_size=1, initial_states=True, final_states=True)
PROB = Problem(batch=6, seqlen=1, nheads=4, ngroups=1, nseqs=6)


@pytest.fixture(autouse=True)
def _isolated(tmp_path, monkeypatch):
    """Every test: its own default cache file, no MAMBA3_AUTOTUNE, the fake environment."""
    monkeypatch.setenv("MAMBA3_TUNE_CACHE", str(tmp_path / "default" / "tune.json"))
    monkeypatch.delenv("MAMBA3_AUTOTUNE", raising=False)
    at.set_environment_provider(lambda device: ENV)
    yield
    at.set_environment_provider(None)
    cache_mod._caches.clear()


# ----------------------------------------------------------------------------------------
# fakes

def fake_backend(name, tiles, default=None, parallel=False):
    return types.SimpleNamespace(
        NAME=name, PARALLEL_COMPILE=parallel,
        available=lambda: (True, ""),
        supports=lambda spec, op: (True, ""),
        space=lambda spec, problem, op: [{"tile": t} for t in tiles],
        default_config=lambda spec, problem, op: {"tile": default if default is not None else tiles[0]},
        step=lambda spec, config, t: None)


def unavailable_backend(name):
    b = fake_backend(name, [1])
    b.available = lambda: (False, "DSL not installed")
    return b


class FakeHarness:
    """plan: {(backend, tile): behaviour}; behaviours: compile_error, oor, hang, mismatch,
    nonrep, time_error. bench(c) returns c itself."""

    def __init__(self, plan=None, compile_sleep=0.0, check_sleep=0.0):
        self.plan = plan or {}
        self.release = threading.Event()
        self.compile_sleep = compile_sleep
        self.check_sleep = check_sleep
        self.compiled, self.checked = [], []
        self.lock = threading.Lock()
        self.seed = 1234

    def _b(self, c):
        return self.plan.get((c.backend, c.config.get("tile")))

    def compile(self, c):
        with self.lock:
            self.compiled.append(c.label)
        b = self._b(c)
        if self.compile_sleep:
            time.sleep(self.compile_sleep)
        if b == "compile_error":
            raise RuntimeError("ptxas fatal: unresolved symbol")
        if b == "oor":
            raise RuntimeError("out of resource: shared memory, Required: 300000, Hardware limit: 232448")
        if b == "hang":
            self.release.wait(30)

    def check(self, c):
        self.checked.append(c.label)
        if self.check_sleep:
            time.sleep(self.check_sleep)
        b = self._b(c)
        if b == "mismatch":
            return False, "mismatch: out rel_l2=3.0e-01"
        if b == "nonrep":
            return False, "non-repeatable: out differs bitwise between two runs"
        if b == "check_raises":
            raise ValueError("illegal config for this shape")
        return True, ""

    def bench(self, c):
        if self._b(c) == "time_error":
            raise RuntimeError("CUDA graph capture failed and events too")
        return c

    def healthy(self):
        return True, ""


class FakeTimer:
    """Preset microseconds per (backend, tile), with deterministic +-0.5% jitter; `after`
    swaps in other times once `switch` samples were taken for a candidate."""
    name = "fake"

    def __init__(self, times, after=None, switch=None):
        self.times, self.after, self.switch = times, after or {}, switch
        self.rng = np.random.default_rng(0)
        self.count = {}
        self.calls = 0

    def measure(self, c, reps):
        k = (c.backend, c.config.get("tile"))
        self.calls += reps
        n0 = self.count.get(k, 0)
        self.count[k] = n0 + reps
        out = []
        for i in range(reps):
            base = self.after.get(k, self.times[k]) if (self.switch is not None and n0 + i >= self.switch) \
                else self.times[k]
            out.append(base * (1 + 0.005 * self.rng.standard_normal()))
        return out


def run_tune(backends, times, plan=None, tmp_path=None, **kw):
    harness = kw.pop("harness", None) or FakeHarness(plan)
    timer = kw.pop("timer", None) or FakeTimer(times)
    cache = kw.pop("cache", None) or (str(tmp_path / "tune.json") if tmp_path else None)
    res = at.tune("step", SPEC, PROB, "cuda:0", backends=backends, harness=harness, timer=timer,
                  cache=cache, env=ENV, progress=False, reps=20, confirm_reps=20, **kw)
    return res, harness, timer


# ----------------------------------------------------------------------------------------
# selection and failures

def test_selects_fastest_and_caches_it(tmp_path):
    a = fake_backend("triton", [16, 32, 64], default=32)
    b = fake_backend("cute", [1, 2])
    times = {("triton", 16): 9.0, ("triton", 32): 7.0, ("triton", 64): 8.0, ("cute", 1): 5.0, ("cute", 2): 6.5}
    res, h, _ = run_tune([a, b], times, tmp_path=tmp_path)
    assert res.best.backend == "cute" and res.best.config == {"tile": 1}
    assert len(res.ok) == 5 and not res.failures
    assert res.best.confirmed_us == pytest.approx(5.0, rel=0.01)
    assert len(res.best.samples) >= 20 and len(res.best.confirm) >= 20
    assert res.written and os.path.exists(tmp_path / "tune.json")
    # the table lists every candidate, the default marked, the winner marked
    t = res.table()
    assert t.count("\n") >= 6 and "<- chosen" in t and "(default)" in t
    # the entry: backend, config, time, runners-up fastest first
    e = at.Cache(str(tmp_path / "tune.json")).get(res.key)
    assert e["backend"] == "cute" and e["config"] == {"tile": 1} and e["time_us"] == pytest.approx(5.0, rel=0.01)
    ru = [(r["backend"], r["config"]["tile"]) for r in e["runners_up"]]
    assert ru[:2] == [("cute", 2), ("triton", 32)] and len(ru) == 4
    assert e["n_candidates"] == 5 and e["n_failed"] == 0 and e["seed"] == 1234
    # lookup finds it (exact bucket); B=5 and B=8 share the bucket of B=6
    hit = at.lookup("step", SPEC, PROB, "cuda:0", cache=str(tmp_path / "tune.json"), validate=False)
    assert hit == ("cute", {"tile": 1}, "cache")
    for B in (5, 8):
        p = Problem(B, 1, 4, 1, B)
        assert at.lookup("step", SPEC, p, cache=str(tmp_path / "tune.json"), validate=False)[2] == "cache"
    json.dumps(res.to_json())  # serialisable


def test_failures_recorded_and_never_selected(tmp_path):
    a = fake_backend("triton", [1, 2, 3, 4, 5, 6, 7], default=7)
    plan = {("triton", 1): "compile_error", ("triton", 2): "oor", ("triton", 3): "mismatch",
            ("triton", 4): "nonrep", ("triton", 5): "time_error", ("triton", 6): "check_raises"}
    # the failing ones are "faster" than the only good one
    times = {("triton", t): 1.0 * t for t in range(1, 7)}
    times[("triton", 7)] = 50.0
    res, h, timer = run_tune([a], times, plan, tmp_path=tmp_path)
    assert res.best.config == {"tile": 7}
    by = {r.config["tile"]: r for r in res.rows}
    assert by[1].status == "failed" and by[1].stage == "compile" and "ptxas" in by[1].reason
    assert by[2].stage == "compile" and by[2].reason.startswith("out of resources")
    assert by[3].stage == "check" and by[3].reason.startswith("mismatch")
    assert by[4].stage == "check" and by[4].reason.startswith("non-repeatable")
    assert by[5].stage == "time" and "timing failed" in by[5].reason
    assert by[6].stage == "check" and "ValueError" in by[6].reason
    # failed candidates were never checked / timed past their failure
    assert "triton[tile=1]" not in h.checked
    assert ("triton", 3) not in timer.count and ("triton", 4) not in timer.count
    e = at.Cache(str(tmp_path / "tune.json")).get(res.key)
    assert e["n_failed"] == 6 and {f["stage"] for f in e["failures"]} == {"compile", "check", "time"}
    assert all(r["backend"] != "triton" or r["config"]["tile"] == 7 for r in e["runners_up"]) or not e["runners_up"]
    t = res.table()
    for word in ("ptxas", "out of resources", "mismatch", "non-repeatable", "timing failed"):
        assert word in t


def test_all_fail_selects_nothing_and_writes_nothing(tmp_path):
    a = fake_backend("triton", [1, 2])
    res, _, _ = run_tune([a, unavailable_backend("tilelang")], {("triton", 1): 1.0, ("triton", 2): 2.0},
                         {("triton", 1): "mismatch", ("triton", 2): "compile_error"}, tmp_path=tmp_path)
    assert res.best is None and not res.written
    assert ("tilelang", "unavailable: DSL not installed") in res.skipped
    assert "no candidate passed" in res.table() and "tilelang: skipped" in res.table()
    assert not os.path.exists(tmp_path / "tune.json")


def test_compile_timeout_recorded_without_hanging(tmp_path):
    serial = fake_backend("tilelang", [1, 2, 3])          # builds one at a time
    par = fake_backend("triton", [1, 2], parallel=True)
    plan = {("tilelang", 1): "hang", ("triton", 1): "hang"}
    times = {("tilelang", 1): 1.0, ("tilelang", 2): 2.0, ("tilelang", 3): 3.0, ("triton", 1): 1.0, ("triton", 2): 4.0}
    h = FakeHarness(plan)
    t0 = time.monotonic()
    try:
        res, _, _ = run_tune([serial, par], times, harness=h, tmp_path=tmp_path, compile_timeout=0.3,
                             compile_workers=4)
    finally:
        h.release.set()
    assert time.monotonic() - t0 < 10
    by = {(r.backend, r.config["tile"]): r for r in res.rows}
    assert by[("tilelang", 1)].reason.startswith("timeout") and by[("triton", 1)].reason.startswith("timeout")
    # the serial backend's queue behind the hung build is skipped, the parallel one is not
    assert by[("tilelang", 2)].status == "failed" and "not built" in by[("tilelang", 2)].reason
    assert by[("triton", 2)].status == "ok"
    assert res.best.backend == "triton" and res.best.config == {"tile": 2}


def test_parallel_compile_overlaps():
    par = fake_backend("triton", list(range(8)), parallel=True)
    h = FakeHarness(compile_sleep=0.25)
    t0 = time.monotonic()
    res, _, _ = run_tune([par], {("triton", t): 1.0 + t for t in range(8)}, harness=h, write=False,
                         compile_workers=8)
    assert res.best.config == {"tile": 0}
    assert time.monotonic() - t0 < 8 * 0.25  # built side by side, not one after another


def test_serial_backends_build_side_by_side():
    """Each backend without PARALLEL_COMPILE gets its own builder: two serial backends overlap
    (a shared worker pool once let one backend's queued builds starve the other's)."""
    a = fake_backend("triton", [0, 1, 2, 3])
    b = fake_backend("cute", [10, 11, 12, 13])
    h = FakeHarness(compile_sleep=0.2)
    times = {("triton", t): 2.0 + t for t in range(4)}
    times.update({("cute", t): 1.0 + (t - 10) for t in range(10, 14)})
    t0 = time.monotonic()
    res, _, _ = run_tune([a, b], times, harness=h, write=False, compile_workers=8)
    assert time.monotonic() - t0 < 8 * 0.2 - 0.3   # 4 + 4 builds of 0.2 s, two lanes
    assert res.best.backend == "cute" and res.best.config == {"tile": 10}


def test_priority_order_defaults_then_round_robin():
    a = fake_backend("triton", [0, 1, 2, 3, 4], default=2)
    b = fake_backend("cute", [10, 11], default=11)
    cands, _ = at.candidates("step", SPEC, PROB, backends=[a, b])
    order = [(c.backend, c.config["tile"], c.is_default) for c in strat.priority(cands)]
    assert [o for o in order if o[2]] == order[:2]                      # defaults first
    assert {o[:2] for o in order[:2]} == {("triton", 2), ("cute", 11)}
    assert len(order) == len({o[:2] for o in order}) == len(cands)      # nothing lost or repeated
    rest = [o[0] for o in order[2:]]
    assert rest[:2] in (["triton", "cute"], ["cute", "triton"])         # round-robin


def test_budget_stops_builds_and_keeps_the_defaults():
    a = fake_backend("triton", list(range(10)), default=5)
    b = fake_backend("cute", list(range(20, 30)), default=25)
    times = {("triton", t): 10.0 - t * 0.1 for t in range(10)}
    times.update({("cute", t): 9.0 - (t - 20) * 0.1 for t in range(20, 30)})
    h = FakeHarness(compile_sleep=0.15)
    t0 = time.monotonic()
    res, _, _ = run_tune([a, b], times, harness=h, write=False, budget_s=1.0)
    wall = time.monotonic() - t0
    budget = [r for r in res.rows if r.stage == "budget"]
    assert budget and all(r.status == "pruned" and "budget" in r.reason for r in budget)
    assert not res.failures
    built = [r for r in res.rows if r.status == "ok"]
    assert {(r.backend, r.config["tile"]) for r in built if r.candidate.is_default} == {("triton", 5), ("cute", 25)}
    assert len(built) + len(budget) == 20 and len(built) < 20
    assert res.best in built and res.best.backend == "cute"
    assert wall < 1.0 + 0.6   # no build starts after 60 % of the budget; each takes 0.15 s
    assert set(res.stage_seconds) == {"setup", "build", "check", "time"}
    assert "not built in it" in res.summary()
    with pytest.raises(ValueError, match="budget_s"):
        run_tune([a], times, write=False, budget_s=0)


def test_budget_also_bounds_the_checks():
    """Slow checks (big batches: the sampled oracle + reference comparisons) stop at 90 % of the
    budget; the rest are pruned by the budget, the best checked one is chosen."""
    a = fake_backend("triton", list(range(12)), default=0)
    times = {("triton", t): 5.0 + t for t in range(12)}
    h = FakeHarness(check_sleep=0.2)
    t0 = time.monotonic()
    res, _, _ = run_tune([a], times, harness=h, write=False, budget_s=1.0)
    assert time.monotonic() - t0 < 1.0 + 0.5
    unchecked = [r for r in res.rows if r.stage == "budget"]
    assert unchecked and all("not checked" in r.reason and r.status == "pruned" for r in unchecked)
    assert res.best is not None and res.best.config == {"tile": 0} and not res.failures


class SlowTimer(FakeTimer):
    """FakeTimer whose every measure call takes `sleep` seconds (a slow timer: the interpreter)."""

    def __init__(self, times, sleep):
        super().__init__(times)
        self.sleep = sleep

    def measure(self, c, reps):
        time.sleep(self.sleep)
        return super().measure(c, reps)


def test_budget_also_bounds_the_timing():
    """Past the budget no candidate starts timing (pruned: "checked, not timed"); those timed
    finish, the best of them is chosen; the first is always timed, so there is a choice even
    when the budget is spent before timing starts. Without a budget every candidate is timed."""
    a = fake_backend("triton", list(range(12)), default=0)
    times = {("triton", t): 5.0 - 0.1 * t for t in range(12)}
    res, _, _ = run_tune([a], times, write=False, budget_s=0.5, timer=SlowTimer(times, 0.1))
    untimed = [r for r in res.rows if r.stage == "budget"]
    timed = [r for r in res.rows if r.status == "ok"]
    assert untimed and timed and not res.failures, res.summary()
    assert all(r.reason.startswith("checked, not timed") and r.status == "pruned" for r in untimed)
    assert res.best is min(timed, key=lambda r: times[("triton", r.config["tile"])])
    assert "checked but not timed in it" in res.summary()
    res, _, _ = run_tune([a], times, write=False, budget_s=0.3, timer=SlowTimer(times, 0.4))
    assert [r.config["tile"] for r in res.rows if r.status == "ok"] == [0] and res.best.config == {"tile": 0}
    res, _, _ = run_tune([a], times, write=False, timer=SlowTimer(times, 0.01))
    assert len([r for r in res.rows if r.status == "ok"]) == 12 and res.best.config == {"tile": 11}


def test_written_result_names_its_cache_even_when_it_was_empty(tmp_path):
    """An empty Cache is falsy (len 0): the result once said 'cached in None'."""
    a = fake_backend("triton", [1, 2])
    res, _, _ = run_tune([a], {("triton", 1): 3.0, ("triton", 2): 6.0}, tmp_path=tmp_path)
    assert res.written and res.cache_path == str(tmp_path / "tune.json")
    assert f"cached in {tmp_path / 'tune.json'}" in res.summary()


def test_confirmation_overrides_first_timing():
    """A candidate that looked fastest but is slower when re-timed is not chosen."""
    a = fake_backend("triton", [1, 2, 3])
    times = {("triton", 1): 4.0, ("triton", 2): 5.0, ("triton", 3): 9.0}
    after = {("triton", 1): 8.0}   # tile 1 gets slow after its first 20 samples
    res, _, _ = run_tune([a], times, timer=FakeTimer(times, after, switch=20), write=False)
    assert res.best.config == {"tile": 2}
    by = {r.config["tile"]: r for r in res.rows}
    assert by[1].time_us < by[2].time_us and by[1].confirmed_us > by[2].confirmed_us


def test_remeasure_reports_regret():
    a = fake_backend("triton", [1, 2])
    res, _, _ = run_tune([a], {("triton", 1): 3.0, ("triton", 2): 6.0}, write=False, remeasure=True)
    assert res.regret is not None and abs(res.regret) < 0.03


def test_bad_arguments_name_the_argument(tmp_path):
    a = fake_backend("triton", [1])
    for kw, word in ((dict(reps=5), "reps"), (dict(confirm_top=0), "confirm_top"),
                     (dict(compile_timeout=0), "compile_timeout"), (dict(max_candidates=0), "max_candidates")):
        with pytest.raises(ValueError, match=word):
            at.tune("step", SPEC, PROB, backends=[a], harness=FakeHarness(), timer=FakeTimer({}), env=ENV, **kw)
    with pytest.raises(ValueError, match="^op:"):
        at.tune("no-such-op", SPEC, PROB, backends=[a], env=ENV)
    with pytest.raises(ValueError, match="^spec:"):
        at.tune("step", "not a spec", PROB, backends=[a], env=ENV)
    with pytest.raises(ValueError, match="^problem:"):
        at.tune("step", SPEC, (1, 2), backends=[a], env=ENV)
    with pytest.raises(ValueError, match="^cache:"):
        at.Cache(123)
    with pytest.raises(ValueError, match="^strategy:"):
        strat.choose(3, name="greedy")
    with pytest.raises(ValueError, match="^n:"):
        buckets.pow2_bucket(-1)


def test_space_default_included_and_deduplicated():
    a = fake_backend("triton", [16, 32], default=64)
    b = fake_backend("cute", [1, 1, 2], default=1)
    broken = fake_backend("tilelang", [1])
    broken.space = lambda spec, problem, op: 1 / 0
    cands, skipped = at.candidates("step", SPEC, PROB, backends=[a, b, broken])
    labels = [(c.backend, c.config["tile"], c.is_default) for c in cands]
    assert labels == [("triton", 64, True), ("triton", 16, False), ("triton", 32, False),
                      ("cute", 1, True), ("cute", 2, False)]
    assert skipped and skipped[0][0] == "tilelang" and "ZeroDivisionError" in skipped[0][1]


# ----------------------------------------------------------------------------------------
# strategies

def _measure_table(times):
    given = {}

    def measure(item, n):
        given[item] = given.get(item, 0) + n
        return times[item]
    return measure, given


def test_exhaustive_times_everything():
    times = {f"c{i}": float(10 - i) for i in range(6)}
    measure, given = _measure_table(times)
    ranked = strat.Exhaustive().run(list(times), measure, reps=20)
    assert [it for it, _ in ranked][:2] == ["c5", "c4"] and all(v == 20 for v in given.values())


def test_successive_halving_finds_best_cheaper():
    rng = np.random.default_rng(1)
    times = {f"c{i}": float(t) for i, t in enumerate(rng.uniform(1, 10, size=60))}
    best = min(times, key=times.get)
    measure, given = _measure_table(times)
    ranked = strat.SuccessiveHalving(eta=3, min_reps=5).run(list(times), measure, reps=20, keep=3)
    assert ranked[0][0] == best and len(ranked) == 60
    assert all(given[it] >= 20 for it, _ in ranked[:3])          # survivors: a full median
    assert sum(given.values()) < 0.5 * 20 * 60                   # far less than exhaustive
    assert strat.choose(5).name == "exhaustive" and strat.choose(100).name.startswith("successive")


def test_successive_halving_drops_failures():
    times = {f"c{i}": float(i + 1) for i in range(20)}

    def measure(item, n):
        return None if item == "c0" else times[item]
    ranked = strat.SuccessiveHalving().run(list(times), measure, reps=20)
    assert ranked[0][0] == "c1" and "c0" not in [it for it, _ in ranked]


def test_tune_with_halving_strategy():
    a = fake_backend("triton", list(range(40)), default=39)
    times = {("triton", t): 2.0 + abs(t - 17) for t in range(40)}
    res, _, timer = run_tune([a], times, write=False, strategy="halving")
    assert res.best.config == {"tile": 17} and res.strategy.startswith("successive")
    assert timer.calls < 40 * 20


def test_prune_keeps_defaults_and_is_fair():
    a = fake_backend("triton", list(range(100)), default=50)
    b = fake_backend("cute", list(range(100, 110)), default=105)
    cands, _ = at.candidates("step", SPEC, PROB, backends=[a, b])
    kept, pruned = strat.prune(cands, 12)
    assert len(kept) == 12 and len(pruned) == len(cands) - 12
    assert sum(c.backend == "cute" for c in kept) == 6
    assert {(c.backend, c.config["tile"]) for c in kept if c.is_default} == {("triton", 50), ("cute", 105)}
    res, _, _ = run_tune([a, b], {(c.backend, c.config["tile"]): 1.0 + c.config["tile"] for c in cands},
                         write=False, max_candidates=12)
    assert sum(r.status == "pruned" for r in res.rows) == len(cands) - 12
    assert all("max_candidates" in r.reason for r in res.rows if r.status == "pruned")


# ----------------------------------------------------------------------------------------
# keys and buckets

def test_key_contents():
    k = at.make_key("step", SPEC, PROB, ENV)
    assert set(k) == {"op", "gpu", "cc", "sm_count", "driver", "torch", "triton", "tilelang", "cutlass_dsl",
                      "mamba3_kernels", "spec", "shape"}
    assert k["gpu"] == "NVIDIA H100 80GB HBM3" and k["cc"] == "9.0" and k["sm_count"] == 132
    assert k["driver"] == "550.54.15" and k["cutlass_dsl"] == "4.8.1" and k["mamba3_kernels"] == "0.1.0"
    import dataclasses
    assert k["spec"] == dataclasses.asdict(SPEC)            # every ScanSpec field
    assert k["shape"] == {"B": 8, "L": 1, "H": 4, "G": 1, "N": 16, "P": 8, "R": 1}
    s = at.key_string(k)
    for part in ("step", "NVIDIA H100 80GB HBM3", "cc 9.0", "132 SMs", "driver 550.54.15", "torch 2.13.0",
                 "triton 3.6.0", "tilelang 0.1.15", "cutlass-dsl 4.8.1", "mamba3-kernels 0.1.0",
                 "d_state=16", "state_dtype=float32", "B=8 L=1 H=4 G=1 N=16 P=8 R=1"):
        assert part in s
    # anything in the key changes the string
    base = at.key_string(k)
    variants = [at.make_key("step", SPEC.replace(has_d=True), PROB, ENV),
                at.make_key("step", SPEC.replace(state_dtype="bfloat16"), PROB, ENV),
                at.make_key("step", SPEC, Problem(9, 1, 4, 1, 9), ENV),
                at.make_key("step", SPEC, Problem(6, 1, 8, 1, 6), ENV),
                at.make_key("step", SPEC, Problem(6, 1, 4, 2, 6), ENV),
                at.make_key("forward", SPEC, PROB, ENV)]
    for f in cache_mod.ENV_FIELDS:
        v = ENV.as_dict()
        v[f] = v[f] + 1 if isinstance(v[f], int) else v[f] + "x"
        variants.append(at.make_key("step", SPEC, PROB, at.Environment(**v)))
    strs = {at.key_string(v) for v in variants}
    assert base not in strs and len(strs) == len(variants)
    # B within a bucket: same key
    assert at.key_string(at.make_key("step", SPEC, Problem(5, 1, 4, 1, 5), ENV)) == base


def test_environment_from_torch_shape(monkeypatch):
    at.set_environment_provider(None)
    v = cache_mod.software_versions()
    assert set(v) == {"torch", "triton", "tilelang", "cutlass_dsl", "mamba3_kernels"}
    assert v["mamba3_kernels"] == __import__("mamba3_kernels").__version__
    import torch
    if not torch.cuda.is_available():
        assert at.current_environment() is None
        assert at.lookup("step", SPEC, PROB) is None    # no GPU: nothing to look up, no error


def test_buckets():
    assert [buckets.pow2_bucket(n) for n in (0, 1, 2, 3, 4, 5, 8, 9, 1000)] == [0, 1, 2, 4, 4, 8, 8, 16, 1024]
    sh = buckets.shape_bucket(SPEC, Problem(33, 1, 4, 1, 33))
    assert sh == {"B": 64, "L": 1, "H": 4, "G": 1, "N": 16, "P": 8, "R": 1}
    mk = lambda B, L=1, H=4: {"B": B, "L": L, "H": H, "G": 1, "N": 16, "P": 8, "R": 1}
    pool = [mk(1), mk(8), mk(64), mk(256), mk(16, H=8)]
    assert buckets.nearest(mk(16), pool) == mk(8)            # log2 distance 1 vs 2 (64)
    assert buckets.nearest(mk(32), pool) == mk(64)           # tie 8 vs 64? no: 64 is 1 away
    assert buckets.nearest(mk(128), pool) == mk(256)         # tie (64, 256): the larger
    assert buckets.nearest(mk(16, H=2), pool) is None        # exact fields must match
    assert buckets.nearest(mk(8, L=4), [mk(8, L=1), mk(4, L=4)]) == mk(4, L=4)  # same L preferred on ties


def _entry(spec, problem, backend="triton", cfg=None, t=1.0, env=ENV, op="step"):
    return {"key": at.make_key(op, spec, problem, env), "backend": backend, "config": cfg or {"tile": 1},
            "time_us": t, "runners_up": []}


def test_nearest_bucket_fallback(tmp_path):
    c = at.Cache(str(tmp_path / "t.json"))
    c.put_many([_entry(SPEC, Problem(8, 1, 4, 1, 8), cfg={"tile": 8}),
                _entry(SPEC, Problem(64, 1, 4, 1, 64), cfg={"tile": 64})])
    look = lambda B, **kw: at.lookup("step", SPEC, Problem(B, 1, 4, 1, B), cache=c, validate=False, **kw)
    assert look(5) == ("triton", {"tile": 8}, "cache")
    assert look(16) == ("triton", {"tile": 8}, "nearest-bucket")
    assert look(40) == ("triton", {"tile": 64}, "cache")
    assert look(1000) == ("triton", {"tile": 64}, "nearest-bucket")
    assert look(16, nearest=False) is None
    # nothing with other exact fields, another GPU or another spec
    assert at.lookup("step", SPEC, Problem(8, 1, 8, 1, 8), cache=c, validate=False) is None
    assert at.lookup("step", SPEC.replace(has_z=True), Problem(8, 1, 4, 1, 8), cache=c, validate=False) is None
    other = at.Environment(**{**ENV.as_dict(), "gpu": "NVIDIA H200"})
    assert at.lookup("step", SPEC, Problem(8, 1, 4, 1, 8), cache=c, env=other, validate=False) is None
    # a vetoed entry (config no longer in the backend's space) falls to the next nearest
    e, src = c.find(at.make_key("step", SPEC, Problem(16, 1, 4, 1, 16), ENV),
                    accept=lambda e: e["config"]["tile"] != 8)
    assert src == "nearest-bucket" and e["config"] == {"tile": 64}
    # validate=True with backend names that do not exist in this tree: vetoed, no exception
    assert at.lookup("step", SPEC, Problem(8, 1, 4, 1, 8), cache=c) is None


# ----------------------------------------------------------------------------------------
# the cache file

def test_cache_file_is_human_readable_and_default_location(tmp_path, monkeypatch):
    c = at.get_cache()
    assert c.path == str(tmp_path / "default" / "tune.json")
    c.put(_entry(SPEC, PROB))
    text = open(c.path).read()
    data = json.loads(text)
    assert data["format"] == cache_mod.FORMAT and data["version"] == cache_mod.VERSION
    assert "\n" in text and '"backend": "triton"' in text
    monkeypatch.delenv("MAMBA3_TUNE_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert at.default_path() == str(tmp_path / "xdg" / "mamba3-kernels" / "tune.json")
    assert at.get_cache(str(tmp_path / "x.json")).path == str(tmp_path / "x.json")


@pytest.mark.parametrize("garbage", [b"{not json", b"\x00\xff\xfe garbage", b"[1, 2, 3]",
                                     b'{"format": "something else", "entries": {}}',
                                     b'{"format": "mamba3-kernels tuning cache", "version": 999, "entries": {}}'])
def test_corrupt_or_stale_file_is_rebuilt(tmp_path, garbage):
    p = tmp_path / "tune.json"
    p.write_bytes(garbage)
    c = at.Cache(str(p))
    with pytest.warns(at.CacheWarning, match="rebuilt"):
        assert c.load() == {}
    backups = [f for f in os.listdir(tmp_path) if ".corrupt-" in f]
    assert len(backups) == 1 and (tmp_path / backups[0]).read_bytes() == garbage
    data = json.loads(p.read_text())
    assert data["entries"] == {} and data["version"] == cache_mod.VERSION
    c.put(_entry(SPEC, PROB))
    assert len(at.Cache(str(p))) == 1
    # lookup never raises on a corrupt file
    p.write_bytes(garbage)
    with pytest.warns(at.CacheWarning):
        assert at.lookup("step", SPEC, PROB, cache=str(p), validate=False) is None


def test_corrupt_file_found_by_a_writer(tmp_path):
    p = tmp_path / "tune.json"
    p.write_text("garbage")
    with pytest.warns(at.CacheWarning, match="kept as"):
        at.Cache(str(p)).put(_entry(SPEC, PROB))
    assert len(at.Cache(str(p))) == 1


def test_malformed_entries_dropped_others_kept(tmp_path):
    p = tmp_path / "tune.json"
    good = _entry(SPEC, PROB)
    p.write_text(json.dumps({"format": cache_mod.FORMAT, "version": cache_mod.VERSION, "entries": {
        "whatever, rekeyed": good, "bad1": {"backend": "triton"}, "bad2": [1, 2],
        "bad3": {**good, "config": "tile=1"}}}))
    with pytest.warns(at.CacheWarning, match="dropped 3 malformed"):
        entries = at.Cache(str(p)).load()
    assert list(entries) == [at.key_string(good["key"])]


def test_unwritable_location_never_raises(tmp_path, monkeypatch):
    p = tmp_path / "tune.json"
    p.write_text("garbage")

    def refuse(self, entries):
        raise PermissionError(13, "Permission denied", self.path)
    monkeypatch.setattr(at.Cache, "_write", refuse)
    with pytest.warns(at.CacheWarning, match="could not be rebuilt"):
        assert at.lookup("step", SPEC, PROB, cache=str(p), validate=False) is None
    # a tune whose result cannot be written warns and still returns the result
    a = fake_backend("triton", [1])
    with pytest.warns(at.CacheWarning, match="could not write"):
        res, _, _ = run_tune([a], {("triton", 1): 1.0}, cache=str(tmp_path / "other.json"))
    assert res.best is not None and not res.written


def test_put_rejects_malformed_entry(tmp_path):
    with pytest.raises(ValueError, match="^entry:"):
        at.Cache(str(tmp_path / "t.json")).put({"backend": "x"})


def test_memo_sees_other_writers(tmp_path):
    p = str(tmp_path / "t.json")
    reader, writer = at.Cache(p), at.Cache(p)
    assert len(reader) == 0
    writer.put(_entry(SPEC, Problem(1, 1, 4, 1, 1)))
    writer.put(_entry(SPEC, Problem(2, 1, 4, 1, 2)))
    assert len(reader) == 2


WRITER = r"""
import os, sys, time
from mamba3_kernels.autotune import cache as C
from mamba3_kernels.spec import ScanSpec, Problem
path, who, n, go = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
env = C.Environment(gpu="G", cc="9.0", sm_count=1, driver="d", torch="t", triton="t", tilelang="t",
                    cutlass_dsl="c", mamba3_kernels="0")
spec = ScanSpec(d_state=16, head_dim=8, chunk_size=1)
while not os.path.exists(go):
    time.sleep(0.005)
c = C.Cache(path)
for i in range(n):
    p = Problem(1, 1, 1 + who * 1000 + i, 1, 1)   # a distinct H: a distinct key
    c.put({"key": C.make_key("step", spec, p, env), "backend": "triton", "config": {"w": who, "i": i},
           "time_us": 1.0, "runners_up": []})
"""


def test_concurrent_processes_lose_nothing(tmp_path):
    p, go = str(tmp_path / "shared" / "tune.json"), str(tmp_path / "go")
    nproc, n = 4, 40
    procs = [subprocess.Popen([sys.executable, "-c", WRITER, p, str(w), str(n), go],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE) for w in range(nproc)]
    time.sleep(0.3)
    open(go, "w").close()
    for pr in procs:
        out, err = pr.communicate(timeout=120)
        assert pr.returncode == 0, err.decode()
    entries = at.Cache(p).load()
    got = {(e["config"]["w"], e["config"]["i"]) for e in entries.values()}
    assert got == {(w, i) for w in range(nproc) for i in range(n)}
    assert not [f for f in os.listdir(os.path.dirname(p)) if f.endswith(".tmp")]


def test_concurrent_threads_lose_nothing(tmp_path):
    p = str(tmp_path / "t.json")

    def work(w):
        c = at.Cache(p)
        for i in range(15):
            c.put(_entry(SPEC, Problem(1, 1, 1 + 100 * w + i, 1, 1), cfg={"w": w, "i": i}))
    ts = [threading.Thread(target=work, args=(w,)) for w in range(4)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    assert len(at.Cache(p)) == 60


def test_export_import_round_trip(tmp_path):
    src = at.Cache(str(tmp_path / "a.json"))
    h200 = at.Environment(**{**ENV.as_dict(), "gpu": "NVIDIA H200"})
    entries = [_entry(SPEC, Problem(b, 1, 4, 1, b), cfg={"tile": b}) for b in (1, 2, 4)]
    entries.append(_entry(SPEC, PROB, env=h200))
    src.put_many(entries)
    assert src.export(str(tmp_path / "all.json")) == 4
    assert src.export(str(tmp_path / "h100.json"), match=lambda e: e["key"]["gpu"] == ENV.gpu) == 3
    dst = at.Cache(str(tmp_path / "b.json"))
    assert dst.import_entries(str(tmp_path / "all.json")) == 4
    assert dst.load() == src.load()
    # overwrite=False keeps what is there
    changed = dict(entries[0], backend="cute")
    other = at.Cache(str(tmp_path / "c.json"))
    other.put(changed)
    assert other.import_entries(str(tmp_path / "h100.json"), overwrite=False) == 2
    assert other.get(changed["key"])["backend"] == "cute"
    assert other.import_entries(str(tmp_path / "h100.json")) == 3
    assert other.get(changed["key"])["backend"] == "triton"
    # a corrupt source is an error naming it, and changes nothing
    (tmp_path / "bad.json").write_text("{nope")
    with pytest.raises(ValueError, match="bad.json"):
        dst.import_entries(str(tmp_path / "bad.json"))
    with pytest.raises(ValueError, match="^path:"):
        dst.import_entries(str(tmp_path / "missing.json"))
    assert len(dst) == 4


def test_prune_stale(tmp_path):
    c = at.Cache(str(tmp_path / "t.json"))
    old = at.Environment(**{**ENV.as_dict(), "triton": "3.5.0"})
    other_gpu = at.Environment(**{**ENV.as_dict(), "gpu": "NVIDIA H200", "triton": "3.5.0"})
    c.put_many([_entry(SPEC, PROB), _entry(SPEC, PROB, env=old), _entry(SPEC, PROB, env=other_gpu)])
    assert c.prune_stale(ENV) == 1 and len(c) == 2


# ----------------------------------------------------------------------------------------
# tuning inside a call: only when asked

def test_resolve_tunes_only_when_asked(tmp_path, monkeypatch):
    a = fake_backend("triton", [1, 2])
    times = {("triton", 1): 2.0, ("triton", 2): 1.0}
    h = FakeHarness()
    kw = dict(cache=str(tmp_path / "t.json"), env=ENV, validate=False, backends=[a], harness=h,
              timer=FakeTimer(times), reps=20, confirm_reps=20)
    assert at.resolve("step", SPEC, PROB, **kw) is None and h.compiled == []   # not asked: no tuning
    monkeypatch.setenv("MAMBA3_AUTOTUNE", "0")
    assert at.resolve("step", SPEC, PROB, **kw) is None and h.compiled == []
    monkeypatch.setenv("MAMBA3_AUTOTUNE", "1")
    assert at.resolve("step", SPEC, PROB, **kw) == ("triton", {"tile": 2}, "tuned")
    n = len(h.compiled)
    assert at.resolve("step", SPEC, PROB, **kw) == ("triton", {"tile": 2}, "cache") and len(h.compiled) == n
    # the API flag wins over the environment
    p2 = Problem(64, 1, 4, 1, 64)
    assert at.resolve("step", SPEC, p2, autotune=False, **kw) == ("triton", {"tile": 2}, "nearest-bucket")
    assert len(h.compiled) == n


def test_tune_on_miss_never_raises(tmp_path):
    class Broken(FakeHarness):
        def compile(self, c):
            raise RuntimeError("boom")
    a = fake_backend("triton", [1])
    with pytest.warns(at.CacheWarning, match="no candidate passed"):
        assert at.maybe_tune_on_miss("step", SPEC, PROB, flag=True, cache=str(tmp_path / "t.json"), env=ENV,
                                     backends=[a], harness=Broken(), timer=FakeTimer({})) is None
    with pytest.warns(at.CacheWarning, match="tuning failed"):
        assert at.maybe_tune_on_miss("step", SPEC, PROB, flag=True, env=ENV, backends=[a], reps=3) is None
    assert at.autotune_requested(None) is False and at.autotune_requested(True) is True


# ----------------------------------------------------------------------------------------
# the real step harness, on CPU, with oracle-backed fake backends

def _oracle_step(noise=0.0, nondeterministic=False):
    import torch
    from mamba3_kernels import reference as ref
    from mamba3_kernels.reference.inputs import spec_options
    from mamba3_kernels.spec import States
    calls = [0]

    def step(spec, config, t):
        n = lambda x: None if x is None else x.detach().to(torch.float64).cpu().numpy()
        out, new = ref.step(q=n(t.q), k=n(t.k), v=n(t.v), adt=n(t.adt), dt=n(t.dt), trap=n(t.trap),
                            q_bias=n(t.q_bias), k_bias=n(t.k_bias), states=States(*(n(x) for x in t.state_in)),
                            angles=n(t.angles), d=n(t.d), z=n(t.z), mimo_v=n(t.mimo_v), mimo_z=n(t.mimo_z),
                            mimo_out=n(t.mimo_out), norm_weight=n(t.norm_weight),
                            state_indices=None if t.state_indices is None else t.state_indices.numpy(),
                            **spec_options(spec))
        calls[0] += 1
        out = out * (1 + noise)
        if nondeterministic:
            out = out + (calls[0] % 2) * 1e-5 * np.abs(out).max()
        t.out.copy_(torch.from_numpy(np.ascontiguousarray(out)).to(t.out.dtype))
        for dst, src in zip(t.state_out, new):
            dst.copy_(torch.from_numpy(np.ascontiguousarray(src)).reshape(dst.shape).to(dst.dtype))
    return step


def test_step_harness_on_cpu(tmp_path):
    pytest.importorskip("torch")
    spec = ScanSpec(d_state=8, head_dim=4, rank=2, n_angles=2, has_d=True, has_z=True, has_mimo_v=True,
                    output_mode="per_rank", chunk_size=1, initial_states=True, final_states=True,
                    input_dtype="float32")
    prob = Problem(3, 1, 2, 1, 5)     # a state pool of 5 with state_indices (one padding slot)
    good = fake_backend("triton", [1, 2])
    good.step = _oracle_step()
    wrong = fake_backend("cute", [1])
    wrong.step = _oracle_step(noise=0.2)
    flaky = fake_backend("tilelang", [1])
    flaky.step = _oracle_step(nondeterministic=True)
    h = at.StepHarness(spec, prob, "cpu", seed=7)
    assert h.check(Candidate("triton", {"tile": 1}, good)) == (True, "")
    ok, why = h.check(Candidate("cute", {"tile": 1}, wrong))
    assert not ok and why.startswith("mismatch") and "out" in why
    ok, why = h.check(Candidate("tilelang", {"tile": 1}, flaky))
    assert not ok and why.startswith("non-repeatable")
    b = h.bench(Candidate("triton", {"tile": 1}, good))
    assert b.n_inputs >= 2 and h._sets[0].state_in.ssm.data_ptr() != h._sets[1].state_in.ssm.data_ptr()
    assert h._sets[0].state_out is h._sets[0].state_in and h.bytes_per_set() > 0
    # the whole pipeline with the real harness and a wall-clock timer
    res = at.tune("step", spec, prob, "cpu", backends=[good, wrong, flaky], harness=h,
                  timer=at.WallTimer(calls=1, warmup=1), env=ENV, cache=str(tmp_path / "t.json"),
                  progress=False, reps=20, confirm_reps=20, confirm_top=2)
    assert res.best.backend == "triton"
    by = {r.backend: r for r in res.rows}
    assert by["cute"].reason.startswith("mismatch") and by["tilelang"].reason.startswith("non-repeatable")
    assert res.written


def test_step_harness_fresh_inputs():
    spec = ScanSpec(d_state=8, head_dim=4, chunk_size=1, initial_states=True, final_states=True,
                    input_dtype="float32")
    a, b = at.StepHarness(spec, Problem(2, 1, 2, 1, 2), "cpu"), at.StepHarness(spec, Problem(2, 1, 2, 1, 2), "cpu")
    assert a.seed != b.seed and not np.array_equal(a.case.ref_out, b.case.ref_out)


# ----------------------------------------------------------------------------------------
# the CLI

def _parser():
    from mamba3_kernels.autotune import commands
    p = argparse.ArgumentParser(prog="mamba3-kernels")
    commands.add_parsers(p.add_subparsers(dest="command"))
    return p


@pytest.mark.parametrize("opts", [
    dict(R=1, A=0, mimo_out=False, has_d=False, has_z=False, pool=None, dtype="bfloat16"),
    dict(R=2, A=2, mimo_out=True, has_d=True, has_z=True, pool=None, dtype="float32"),
    dict(R=3, A=1, mimo_out=False, has_d=False, has_z=True, pool=7, dtype="bfloat16"),
])
def test_cli_spec_matches_the_api(opts):
    """The spec `tune` builds from sizes equals what a user's call with such tensors resolves to,
    so the tuned entry is found by dispatch."""
    from mamba3_kernels.autotune.commands import step_spec_problem
    from mamba3_kernels.reference.inputs import random_step_inputs, spec_options
    from mamba3_kernels.spec import resolve_step
    R, A = opts["R"], opts["A"]
    spec0 = ScanSpec(d_state=8, head_dim=4, rank=R, n_angles=A, has_d=opts["has_d"], has_z=opts["has_z"],
                     has_mimo_out=opts["mimo_out"], output_mode="reduce" if (R == 1 or opts["mimo_out"]) else "per_rank",
                     chunk_size=1, initial_states=True, final_states=True)
    prob0 = Problem(3, 1, 4, 2, opts["pool"] or 3)
    a = random_step_inputs(spec0, prob0, np.random.default_rng(0), pool=opts["pool"])
    want = resolve_step(**a, **spec_options(spec0), input_dtype=opts["dtype"], state_dtype="float32")
    got = step_spec_problem(3, 4, 8, 4, R, 2, A, has_d=opts["has_d"], has_z=opts["has_z"],
                            mimo_out=opts["mimo_out"], dtype=opts["dtype"], pool=opts["pool"])
    assert got == want


def test_cli_tune_and_cache_management(tmp_path, capsys, monkeypatch):
    p = _parser()
    cpath, epath = str(tmp_path / "c.json"), str(tmp_path / "e.json")
    at.Cache(cpath).put_many([_entry(SPEC, PROB), _entry(SPEC, Problem(64, 1, 4, 1, 64), backend="cute")])
    args = p.parse_args(["tune", "--cache", cpath, "--list"])
    assert args.func(args) == 0 and "2 entries" in capsys.readouterr().out
    args = p.parse_args(["tune", "--cache", cpath, "--export", epath])
    assert args.func(args) == 0 and "exported 2" in capsys.readouterr().out
    args = p.parse_args(["tune", "--cache", str(tmp_path / "n.json"), "--import", epath, "--list"])
    assert args.func(args) == 0 and "imported 2" in capsys.readouterr().out
    args = p.parse_args(["tune", "--cache", cpath, "--clear"])
    assert args.func(args) == 0 and len(at.Cache(cpath)) == 0
    args = p.parse_args(["tune", "--cache", cpath, "--import", str(tmp_path / "nope.json")])
    assert args.func(args) == 2
    # tuning from the command line, with fake backends standing in for the registry
    import mamba3_kernels.autotune.tuner as tuner_mod
    real = tuner_mod.tune
    a = fake_backend("triton", [1, 2])

    def fake_tune(op, spec, problem, device=None, **kw):
        kw.update(backends=[a], harness=FakeHarness(), timer=FakeTimer({("triton", 1): 2.0, ("triton", 2): 1.0}),
                  env=ENV, reps=20, confirm_reps=20)
        return real(op, spec, problem, device, **kw)
    monkeypatch.setattr(tuner_mod, "tune", fake_tune)
    args = p.parse_args(["tune", "--B", "6", "--H", "4", "--N", "16", "--P", "8", "--cache", cpath, "--no-progress",
                         "--json", str(tmp_path / "r.json")])
    assert args.func(args) == 0
    out = capsys.readouterr().out
    assert "<- chosen" in out and "tile=2" in out and "cached in" in out
    assert json.load(open(tmp_path / "r.json"))["best"]["config"] == {"tile": 2}
    assert at.lookup("step", SPEC.replace(input_dtype="bfloat16"), PROB, cache=cpath, validate=False)[1] == {"tile": 2}
    # several shapes in one process: one warm-up, a table per shape, a summary, every entry cached
    args = p.parse_args(["tune", "--B", "6,40", "--H", "4", "--N", "16", "--P", "8", "--cache", cpath,
                         "--no-progress", "--budget", "20", "--json", str(tmp_path / "m.json")])
    assert args.func(args) == 0
    out = capsys.readouterr().out
    assert out.count("process warm-up") == 1 and out.count("<- chosen") == 2
    assert "B=6 " in out and "B=40 " in out and "budget 20 s" in out
    assert len(json.load(open(tmp_path / "m.json"))["results"]) == 2
    assert at.lookup("step", SPEC.replace(input_dtype="bfloat16"), Problem(40, 1, 4, 1, 40), cache=cpath,
                     validate=False, nearest=False) is not None
    with pytest.raises(SystemExit, match="--H"):
        args = p.parse_args(["tune", "--B", "6", "--cache", cpath])
        args.func(args)
    args = p.parse_args(["bench", "--B", "1,8", "--R", "1,4"])
    assert args.B == [1, 8] and args.R == [1, 4] and args.func.__name__ == "cmd_bench"


def test_bench_table_and_plot(tmp_path):
    from mamba3_kernels.autotune import commands
    rows = []
    for R in (1, 4):
        for B in (1, 8):
            base = {"shape": {"B": B, "H": 4, "G": 1, "N": 16, "P": 8, "R": R, "pool": B}, "label": f"R={R} B={B}",
                    "bytes": 1000 * B, "roofline_us": 0.3 * B, "copy_roofline_us": 0.4 * B}
            rows.append(dict(base, backend="triton", kind="default", config={"t": 1}, status="ok", time_us=1.0 * B,
                             gbps=1.0, frac_roofline=0.3, frac_copy=0.4))
            rows.append(dict(base, backend="triton", kind="tuned", config={"t": 2}, status="ok", time_us=0.8 * B,
                             gbps=1.2, frac_roofline=0.37, frac_copy=0.5, source="cache, chosen"))
            rows.append(dict(base, backend="upstream", kind="upstream", status="skipped", reason="not importable"))
    data = {"env": {"gpu": "fake"}, "rows": rows, "peak_bandwidth_GBps": 3350.0, "copy_bandwidth_GBps": 2900.0,
            "overhead": {"backend": "triton", "api_us": 12.0, "direct_us": 5.0, "select_us": 0.4,
                         "api_minus_direct_us": 7.0}}
    t = commands.bench_table(data)
    assert "tuned" in t and "not importable" in t and "api - direct" in t
    png = commands.bench_plot(data, str(tmp_path / "p.png"))
    if png is not None:
        assert os.path.getsize(png) > 1000
    assert commands.peak_bandwidth("NVIDIA H100 80GB HBM3") == 3350.0
    assert commands.peak_bandwidth("NVIDIA H200") == 4800.0


def test_import_is_light():
    code = ("import sys, mamba3_kernels.autotune, mamba3_kernels.autotune.commands;"
            "bad = [m for m in ('torch', 'numpy', 'triton', 'tilelang', 'cutlass') if m in sys.modules];"
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_step_harness_sampled_rows_on_cpu():
    """Big batches: the oracle on sampled rows, every row against the oracle-validated
    reference output, untouched pool rows bitwise unchanged."""
    spec = ScanSpec(d_state=8, head_dim=4, n_angles=2, has_d=True, chunk_size=1, initial_states=True,
                    final_states=True, input_dtype="float32")
    prob = Problem(12, 1, 2, 1, 15)
    h = at.StepHarness(spec, prob, "cpu", seed=3, check_rows=4)
    assert h.sampled and len(h.case.rows) == 4 and len(h.case.pool_rows) <= 4
    assert {0, 11, 6} <= set(h.case.rows.tolist())
    unsampled = next(r for r in range(12) if r not in set(h.case.rows.tolist())
                     and int(h.case.args["state_indices"][r]) >= 0)
    good = fake_backend("triton", [1])
    good.step = _oracle_step()
    bad_row = fake_backend("cute", [1])
    inner = _oracle_step()

    def wrong_on_one_unsampled_row(spec, config, t):
        inner(spec, config, t)
        t.out[unsampled] += 1.0
    bad_row.step = wrong_on_one_unsampled_row
    bad_pool = fake_backend("tilelang", [1])

    def scribbles_on_unused_pool_rows(spec, config, t):
        inner(spec, config, t)
        used = set(int(i) for i in t.state_indices if i >= 0)
        free = next(m for m in range(t.state_out.ssm.shape[0]) if m not in used)
        t.state_out.ssm[free] += 1.0
    bad_pool.step = scribbles_on_unused_pool_rows
    # a row the oracle did not see is still caught, through the reference output
    assert h.check(Candidate("cute", {"tile": 1}, bad_row)) == (True, "")   # no reference yet: passes
    h.reference = None
    assert h.check(Candidate("triton", {"tile": 1}, good)) == (True, "")
    assert h.reference[0] == "triton[tile=1]"
    ok, why = h.check(Candidate("cute", {"tile": 1}, bad_row))
    assert not ok and "vs the reference output (triton[tile=1])" in why and "out rel_l2" in why
    ok, why = h.check(Candidate("tilelang", {"tile": 1}, bad_pool))
    assert not ok and "pool rows" in why
    # the sampled oracle itself catches a wrong sampled row
    wrong = fake_backend("cute", [2])
    wrong.step = _oracle_step(noise=0.2)
    ok, why = h.check(Candidate("cute", {"tile": 2}, wrong))
    assert not ok and why.startswith("mismatch: out")


def test_bench_end_to_end_on_cpu(tmp_path, monkeypatch, capsys):
    """`bench` with oracle-backed fake backends on CPU: defaults and tuned configs timed, the
    tuned choice cached, JSON (and PNG) written."""
    from mamba3_kernels import backends as reg
    fakes = {}
    for name, tiles in (("triton", [1, 2]), ("cute", [3])):
        fakes[name] = fake_backend(name, tiles)
        fakes[name].step = _oracle_step()
    monkeypatch.setattr(reg, "get", lambda name: fakes[name], raising=False)
    cpath, out = str(tmp_path / "c.json"), str(tmp_path / "res")
    args = _parser().parse_args(["bench", "--B", "2,20", "--R", "1", "--H", "2", "--N", "8", "--P", "4",
                                 "--dtype", "float32", "--backends", "triton,cute", "--cache", cpath,
                                 "--reps", "20", "--out", out, "--no-progress", "--device", "cpu"])
    assert args.func(args) == 0
    text = capsys.readouterr().out
    assert "default" in text and "tuned" in text
    js = [f for f in os.listdir(out) if f.endswith(".json")]
    data = json.load(open(os.path.join(out, js[0])))
    ok = [(r["label"], r["backend"], r["kind"]) for r in data["rows"] if r["status"] == "ok"]
    for B in (2, 20):
        assert (f"R=1 B={B}", "triton", "default") in ok and (f"R=1 B={B}", "cute", "default") in ok
        assert (f"R=1 B={B}", "triton", "tuned") in ok and (f"R=1 B={B}", "cute", "tuned") in ok
    assert len(at.Cache(cpath)) == 2            # both shapes tuned and cached
    # a second run takes the tuned configs from the cache
    assert args.func(args) == 0
    js = sorted(f for f in os.listdir(out) if f.endswith(".json"))
    assert any("cache" in (r.get("source") or "") for f in js for r in json.load(open(os.path.join(out, f)))["rows"])


def test_timing_helpers():
    from mamba3_kernels.autotune import timing
    MB = 1 << 20
    assert timing.rotation_count(1 * MB, 50 * MB) == 64                 # capped
    assert timing.rotation_count(10 * MB, 50 * MB) == 11                 # 2 x L2 + 1 set
    assert timing.rotation_count(2048 * MB, 50 * MB) == 2                # at least 2
    assert timing.rotation_count(1024 * MB, 50 * MB, free_bytes=3072 * MB) == 1   # memory-bound
    seen = []
    b = at.Bench(lambda i: seen.append(i), n_inputs=3)
    xs = at.WallTimer(calls=4, warmup=1).measure(b, 5)
    assert len(xs) == 5 and all(x > 0 for x in xs) and b.mode == "wall"
    assert set(seen) == {0, 1, 2}                                        # inputs rotate
    s = timing.summarize([1.0, 2.0, 3.0, 4.0, 100.0])
    assert s["median"] == 3.0 and s["n"] == 5 and s["min"] == 1.0
    assert isinstance(at.default_timer("cpu"), at.WallTimer)


def test_cache_write_invalidates_memoised_dispatch(tmp_path):
    """A write to a tuning cache in this process makes dispatch (and api.step's remembered
    choices) decide again: a same-process `tune` takes effect on the next call."""
    from mamba3_kernels import dispatch
    dispatch._memo["sentinel"] = 1
    gen = dispatch.generation
    at.Cache(str(tmp_path / "c.json")).put(_entry(SPEC, PROB))
    assert "sentinel" not in dispatch._memo and dispatch.generation == gen + 1
