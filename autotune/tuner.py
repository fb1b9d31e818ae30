"""`tune`: build, check and time every candidate for one (op, spec, problem); cache the winner.

Pipeline (each stage records failures with their reason; a failed candidate is never chosen):

1. candidates  space.candidates: every available backend x its config space (+ its default);
               strategy.prune keeps at most `max_candidates` (the rest: status "pruned").
2. compile     in worker threads with a per-candidate `compile_timeout`. A backend's compiles
               run one at a time unless it sets PARALLEL_COMPILE = True; different backends
               build side by side. A compile that overruns is recorded as a timeout (its
               thread is abandoned, a daemon) and the rest of that backend's serial queue is
               skipped.
3. check       the harness's check: matches the oracle-validated reference on fresh inputs and
               is bitwise repeatable over two runs (check.py). If the CUDA context breaks, tuning
               stops with an error naming the candidate.
4. time        strategy.choose: exhaustive for small spaces, successive halving for big ones;
               medians of >= `reps` (>= 20) samples from the timer (timing.py).
5. confirm     the top `confirm_top` are re-timed, interleaved, `confirm_reps` more samples
               each; the fastest confirmed median wins.
6. cache       the entry (backend, config, time, runners-up, failures) goes to the cache.

`maybe_tune_on_miss` / `resolve` are what dispatch calls when tuning inside a user's call was
asked for (MAMBA3_AUTOTUNE=1 or an API flag); nothing here tunes unless asked.
"""
from __future__ import annotations

import dataclasses
import math
import os
import queue
import sys
import threading
import time
import warnings
from typing import Any, Optional

from . import strategy as strategies
from .cache import CacheWarning, Environment, current_environment, get_cache, key_string, lookup, make_key
from .check import classify, make_harness
from .space import Candidate, candidates
from .timing import default_timer, median, summarize

MIN_REPS = 20
BUILD_SHARE = 0.6    # with a time budget: no build starts after this fraction of it
CHECK_SHARE = 0.9    # ... and no check (the timing of what passed takes the rest)


class TuneAborted(RuntimeError):
    """Tuning cannot go on (the CUDA context broke); nothing was cached."""


@dataclasses.dataclass(eq=False)
class Row:
    """One candidate's fate."""
    candidate: Candidate
    status: str = "pending"          # "ok" | "failed" | "pruned"
    stage: str = ""                  # where it stopped: compile | check | time | confirm | prune
    reason: str = ""
    compile_s: Optional[float] = None
    samples: list = dataclasses.field(default_factory=list)   # us per call
    confirm: list = dataclasses.field(default_factory=list)   # us per call, confirmation pass
    remeasure: list = dataclasses.field(default_factory=list)
    mode: str = ""
    bench: Any = dataclasses.field(default=None, repr=False)

    @property
    def backend(self) -> str:
        return self.candidate.backend

    @property
    def config(self) -> dict:
        return self.candidate.config

    @property
    def label(self) -> str:
        return self.candidate.label

    @property
    def time_us(self) -> Optional[float]:
        return median(self.samples) if self.samples else None

    @property
    def confirmed_us(self) -> Optional[float]:
        return median(self.confirm) if self.confirm else None

    @property
    def best_us(self) -> Optional[float]:
        return self.confirmed_us if self.confirm else self.time_us

    def fail(self, stage: str, reason: str):
        self.status, self.stage, self.reason = "failed", stage, reason
        self._release()

    def _release(self):
        b = self.bench
        self.bench = None
        if b is not None and hasattr(b, "release"):
            b.release()

    def as_dict(self) -> dict:
        d = self.candidate.as_dict()
        d.update(status=self.status, stage=self.stage, reason=self.reason, compile_s=self.compile_s,
                 time_us=self.time_us, confirmed_us=self.confirmed_us, samples=len(self.samples),
                 confirm_samples=len(self.confirm), mode=self.mode)
        if self.samples:
            d["iqr_rel"] = summarize(self.samples)["iqr_rel"]
        if self.remeasure:
            d["remeasured_us"] = median(self.remeasure)
        return d


@dataclasses.dataclass
class TuneResult:
    op: str
    spec: Any
    problem: Any
    env: Optional[Environment]
    key: Optional[dict]
    rows: list
    skipped: list                      # [(backend, reason)] backends left out entirely
    best: Optional[Row]
    strategy: str
    timer: str
    seconds: float
    seed: Any = None
    cache_path: Optional[str] = None
    written: bool = False
    regret: Optional[float] = None     # chosen / fastest - 1 when re-measured (remeasure=True)
    budget_s: Optional[float] = None   # the wall-clock budget asked for (None: none)
    stage_seconds: dict = dataclasses.field(default_factory=dict)   # setup / build / check / time

    @property
    def ok(self) -> list:
        return [r for r in self.rows if r.status == "ok"]

    @property
    def failures(self) -> list:
        return [r for r in self.rows if r.status == "failed"]

    def ranked(self) -> list:
        """ok rows fastest first (confirmed medians first, then the rest by median)."""
        ok = self.ok
        conf = sorted([r for r in ok if r.confirm], key=lambda r: r.confirmed_us)
        rest = sorted([r for r in ok if not r.confirm], key=lambda r: r.time_us)
        return conf + rest

    def choice(self):
        """(backend, config) chosen, or None."""
        return None if self.best is None else (self.best.backend, dict(self.best.config))

    def entry(self) -> dict:
        """The cache entry of this result (needs a best row and a key)."""
        if self.best is None or self.key is None:
            raise ValueError("result: expected a tuned result with a best candidate and a key, got "
                             f"best={self.best!r}, key={'set' if self.key else None}")
        b = self.best
        runners = [{"backend": r.backend, "config": dict(r.config), "time_us": _r(r.best_us)}
                   for r in self.ranked() if r is not b][:5]
        fails = [{"backend": r.backend, "config": dict(r.config), "stage": r.stage, "reason": r.reason}
                 for r in self.failures][:20]
        p = self.problem
        by_backend = {}
        for r in self.ranked():
            by_backend.setdefault(r.backend, {"config": dict(r.config), "time_us": _r(r.best_us)})
        defaults = {r.backend: {"config": dict(r.config), "time_us": _r(r.best_us)}
                    for r in self.ok if r.candidate.is_default and r.best_us is not None}
        return {"key": self.key, "backend": b.backend, "config": dict(b.config),
                "time_us": _r(b.best_us), "runners_up": runners, "failures": fails,
                "best_by_backend": by_backend, "default_by_backend": defaults,
                "problem": {"B": p.batch, "L": p.seqlen, "H": p.nheads, "G": p.ngroups, "S": p.nseqs},
                "n_candidates": len(self.rows), "n_ok": len(self.ok), "n_failed": len(self.failures),
                "skipped_backends": [list(s) for s in self.skipped],
                "strategy": self.strategy, "timer": self.timer, "mode": b.mode,
                "tune_seconds": round(self.seconds, 3), "stage_seconds": dict(self.stage_seconds),
                "budget_s": self.budget_s, "n_pruned": sum(r.status == "pruned" for r in self.rows),
                "regret": None if self.regret is None else round(self.regret, 4), "seed": self.seed,
                "tuned_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}

    def to_json(self) -> dict:
        return {"op": self.op, "spec": dataclasses.asdict(self.spec), "problem": dataclasses.asdict(self.problem),
                "env": self.env.as_dict() if self.env else None,
                "key": key_string(self.key) if self.key else None,
                "best": self.best.as_dict() if self.best else None,
                "rows": [r.as_dict() for r in self._ordered()], "skipped": [list(s) for s in self.skipped],
                "strategy": self.strategy, "timer": self.timer, "seconds": self.seconds, "seed": self.seed,
                "cache_path": self.cache_path, "written": self.written, "regret": self.regret,
                "budget_s": self.budget_s, "stage_seconds": self.stage_seconds}

    def _ordered(self) -> list:
        ranked = self.ranked()
        return ranked + [r for r in self.rows if r.status == "failed"] + \
            [r for r in self.rows if r.status not in ("ok", "failed")]

    def table(self) -> str:
        """The candidates as a text table: fastest first, then failures with their reasons."""
        best = self.best.best_us if self.best else None
        head = f"{'#':>3} {'backend':<9} {'config':<38} {'status':<7} {'median us':>10} {'confirm us':>10} {'vs best':>8} {'build s':>7}  note"
        lines = [head, "-" * len(head)]
        n = 0
        for r in self._ordered():
            n += 1
            cfg = " ".join(f"{k}={v}" for k, v in sorted(r.config.items())) or "-"
            if r.candidate.is_default:
                cfg += " (default)"
            t = f"{r.time_us:10.3f}" if r.time_us is not None else f"{'-':>10}"
            c = f"{r.confirmed_us:10.3f}" if r.confirmed_us is not None else f"{'-':>10}"
            vs = f"{(r.best_us / best - 1) * 100:+7.1f}%" if (best and r.status == "ok" and r.best_us) else f"{'':>8}"
            bs = f"{r.compile_s:7.2f}" if r.compile_s is not None else f"{'-':>7}"
            note = "<- chosen" if r is self.best else (f"{r.stage}: {r.reason}" if r.status != "ok" else r.mode)
            lines.append(f"{n:>3} {r.backend[:9]:<9} {cfg[:38]:<38} {r.status:<7} {t} {c} {vs} {bs}  {note}")
        for name, why in self.skipped:
            lines.append(f"  - {name}: skipped ({why})")
        lines.append(self.summary())
        return "\n".join(lines)

    def summary(self) -> str:
        s = (f"{len(self.rows)} candidates, {len(self.ok)} ok, {len(self.failures)} failed, "
             f"{sum(r.status == 'pruned' for r in self.rows)} pruned; {self.strategy}, timer {self.timer}; "
             f"{self.seconds:.1f} s")
        if self.stage_seconds:
            s += " (" + ", ".join(f"{k} {v:.1f}" for k, v in self.stage_seconds.items()) + ")"
        if self.budget_s is not None:
            nb = sum(r.stage == "budget" and r.reason.startswith("not built") for r in self.rows)
            nc = sum(r.stage == "budget" and r.reason.startswith("built, not checked") for r in self.rows)
            nt = sum(r.stage == "budget" and r.reason.startswith("checked, not timed") for r in self.rows)
            s += f"; budget {self.budget_s:g} s" + (f", {nb} not built in it" if nb else "") + \
                (f", {nc} built but not checked in it" if nc else "") + \
                (f", {nt} checked but not timed in it" if nt else "")
        if self.best is not None:
            s += f"\nchosen: {self.best.backend} {self.best.config} at {self.best.best_us:.3f} us"
        else:
            s += "\nno candidate passed: nothing chosen"
        if self.regret is not None:
            s += f"; re-measured: {self.regret * 100:+.1f}% vs the fastest"
        if self.written:
            s += f"\ncached in {self.cache_path}"
        return s


def _r(x):
    return None if x is None else round(float(x), 4)


# ----------------------------------------------------------------------------------------
# progress

class _Phase:
    def __init__(self, owner, name, total):
        self.owner, self.name, self.total, self.done = owner, name, total, 0
        self.bar = None
        self._last = 0.0
        kind = owner.kind
        if kind == "tqdm":
            from tqdm import tqdm
            self.bar = tqdm(total=total, desc=f"{name:<8}", file=sys.stderr, leave=True, dynamic_ncols=True)
        elif kind == "rich":
            self.task = owner.rich.add_task(name, total=total)

    def advance(self, label: str = ""):
        self.done += 1
        kind = self.owner.kind
        if kind == "tqdm":
            self.bar.set_postfix_str(label[:40], refresh=False)
            self.bar.update(1)
        elif kind == "rich":
            self.owner.rich.update(self.task, advance=1, description=f"{self.name} {label[:30]}")
        elif kind == "plain":
            now = time.monotonic()
            if self.done == self.total or now - self._last > 1.0:
                self._last = now
                print(f"  {self.name}: {self.done}/{self.total} {label}", file=sys.stderr, flush=True)
        elif callable(kind):
            kind(self.name, self.done, self.total, label)

    def close(self):
        if self.bar is not None:
            self.bar.close()


class _Progress:
    """progress=True: tqdm, else rich, else plain lines on stderr; False: silent; a callable:
    called as fn(phase, done, total, label)."""

    def __init__(self, progress):
        self.rich = None
        if callable(progress) and not isinstance(progress, bool):
            self.kind = progress
        elif not progress:
            self.kind = None
        elif progress == "plain":
            self.kind = "plain"
        else:
            self.kind = "plain"
            try:
                import tqdm  # noqa: F401
                self.kind = "tqdm"
            except Exception:
                try:
                    from rich.progress import Progress
                    self.rich = Progress(transient=False)
                    self.rich.start()
                    self.kind = "rich"
                except Exception:
                    pass

    def phase(self, name: str, total: int) -> _Phase:
        return _Phase(self, name, total)

    def close(self):
        if self.rich is not None:
            self.rich.stop()


# ----------------------------------------------------------------------------------------
# stages

def _compile_all(rows: list, harness, timeout: float, workers: int, prog: _Progress,
                 deadline: Optional[float] = None, budget_note: str = ""):
    """Build `rows` (in their order: most promising first). A backend without PARALLEL_COMPILE
    gets one builder thread of its own (its builds run one at a time, side by side with the
    other backends'); the parallel backends share `workers` threads. A build that overruns
    `timeout` is recorded as a timeout and abandoned (a daemon thread); a serial backend's queue
    behind it is not built. No build starts after `deadline` (time.monotonic()): those rows are
    recorded as pruned by the time budget, not as failures. A harness with a true
    `serial_builds` attribute (the Triton interpreter on CPU is not thread-safe) gets a single
    builder for everything."""
    if not rows:
        return
    ph = prog.phase("compile", len(rows))
    serial: dict = {}
    shared: queue.Queue = queue.Queue()
    one_lane = bool(getattr(harness, "serial_builds", False))
    for r in rows:
        if one_lane:
            serial.setdefault("*", queue.Queue()).put(r)
        elif getattr(r.candidate.module, "PARALLEL_COMPILE", False):
            shared.put(r)
        else:
            serial.setdefault(r.backend, queue.Queue()).put(r)
    cv = threading.Condition()
    starts, results, abandoned = {}, {}, set()

    def finish(r, res):
        with cv:
            results[id(r)] = res
            cv.notify_all()

    def worker(jobs: queue.Queue, lane: Optional[str]):
        while True:
            if lane is not None and lane in abandoned:
                return
            try:
                r = jobs.get_nowait()
            except queue.Empty:
                return
            if deadline is not None and time.monotonic() > deadline:
                finish(r, ("budget", budget_note or "not built: the tuning time budget was spent", None))
                continue
            t0 = time.monotonic()
            with cv:
                starts[id(r)] = t0
            try:
                with _device_ctx(harness):  # the CUDA device is per thread
                    harness.compile(r.candidate)
                res = ("ok", "", time.monotonic() - t0)
            except BaseException as e:  # noqa: BLE001 - every failure is a recorded reason
                res = ("failed", classify(e), time.monotonic() - t0)
            finish(r, res)

    def spawn(jobs, lane=None):
        threading.Thread(target=worker, args=(jobs, lane), daemon=True, name="mamba3-tune-compile").start()

    for name, jobs in serial.items():
        spawn(jobs, name)
    for _ in range(max(1, min(workers, shared.qsize()))) if shared.qsize() else ():
        spawn(shared)
    pending = {id(r): r for r in rows}
    try:
        while pending:
            with cv:
                cv.wait(timeout=0.05)
                now = time.monotonic()
                for i, r in list(pending.items()):
                    if i in results:
                        status, reason, dt = results[i]
                        r.compile_s = dt
                        if status == "ok":
                            r.status = "compiled"
                        elif status == "budget":
                            r.status, r.stage, r.reason = "pruned", "budget", reason
                        else:
                            r.fail("compile", reason)
                    elif i in starts and now - starts[i] > timeout:
                        r.compile_s = now - starts[i]
                        r.fail("compile", f"timeout: build took over {timeout:g} s (abandoned)")
                        lane = "*" if one_lane else r.backend
                        if lane in serial:
                            abandoned.add(lane)
                            jobs = serial[lane]
                            while True:  # the stuck thread keeps its lane: nothing behind it is built
                                try:
                                    q = jobs.get_nowait()
                                except queue.Empty:
                                    break
                                finish(q, ("failed", "not built: an earlier build of this backend timed "
                                                     "out (its builds run one at a time)", None))
                        else:
                            spawn(shared)  # replace the stuck worker
                    else:
                        continue
                    del pending[i]
                    ph.advance(r.label)
    finally:
        ph.close()


def _device_ctx(harness):
    import contextlib
    f = getattr(harness, "device_context", None)
    return f() if f is not None else contextlib.nullcontext()


def _health(harness, what: str):
    h = getattr(harness, "healthy", None)
    if h is None:
        return
    ok, why = h()
    if not ok:
        raise TuneAborted(f"the device broke after {what} ({why}); nothing was cached. Restart the "
                          "process and leave that candidate out (e.g. --backends) or fix it.")


def _check_all(rows: list, harness, prog: _Progress, deadline: Optional[float] = None, note: str = ""):
    """Check `rows` in their order (most promising first); none starts after `deadline`: those
    are recorded as pruned by the time budget."""
    ph = prog.phase("check", len(rows))
    try:
        for r in rows:
            if deadline is not None and time.monotonic() > deadline:
                r.status, r.stage, r.reason = "pruned", "budget", note
                r._release()
                ph.advance(r.label)
                continue
            try:
                ok, reason = harness.check(r.candidate)
            except Exception as e:  # noqa: BLE001
                ok, reason = False, classify(e)
            if ok:
                r.status = "ok"
            else:
                r.fail("check", reason or "check failed")
                _health(harness, f"checking {r.label}")
            ph.advance(r.label)
    finally:
        ph.close()


def _validate_args(op, spec, problem, reps, confirm_top, confirm_reps, compile_timeout, max_candidates):
    from mamba3_kernels.spec import Problem, ScanSpec
    if not isinstance(op, str):
        raise ValueError(f"op: expected a str such as 'step', got {op!r}")
    if not isinstance(spec, ScanSpec):
        raise ValueError(f"spec: expected a ScanSpec, got {type(spec).__name__}")
    if not isinstance(problem, Problem):
        raise ValueError(f"problem: expected a Problem, got {type(problem).__name__}")
    if not isinstance(reps, int) or reps < MIN_REPS:
        raise ValueError(f"reps: expected an int >= {MIN_REPS} (a median of at least {MIN_REPS} samples), got {reps!r}")
    if not isinstance(confirm_top, int) or confirm_top < 1:
        raise ValueError(f"confirm_top: expected an int >= 1, got {confirm_top!r}")
    if not isinstance(confirm_reps, int) or confirm_reps < MIN_REPS:
        raise ValueError(f"confirm_reps: expected an int >= {MIN_REPS}, got {confirm_reps!r}")
    if not (isinstance(compile_timeout, (int, float)) and compile_timeout > 0):
        raise ValueError(f"compile_timeout: expected seconds > 0, got {compile_timeout!r}")
    if max_candidates is not None and (not isinstance(max_candidates, int) or max_candidates < 1):
        raise ValueError(f"max_candidates: expected an int >= 1 or None, got {max_candidates!r}")


def tune(op: str, spec, problem, device=None, *, backends=None, cache=None, write: bool = True,
         harness=None, timer=None, strategy: str = "auto", reps: int = 25, confirm_top: int = 3,
         confirm_reps: int = 40, compile_timeout: float = 120.0, compile_workers: Optional[int] = None,
         max_candidates: Optional[int] = 64, progress=True, seed: Optional[int] = None,
         env: Optional[Environment] = None, remeasure: bool = False,
         budget_s: Optional[float] = None) -> TuneResult:
    """Tune (op, spec, problem) on `device` over every available backend x config; return a
    TuneResult (`.table()` prints every candidate, failures with reasons) and, if `write` and a
    candidate passed, store the winner in the cache (`cache`: path, Cache or None = default).

    backends: names or backend modules (default all); harness: object with compile / check /
    bench (default: check.make_harness(op, ...)); timer: object with measure(bench, reps)
    (default timing.default_timer: CUDA-graph replay on a GPU); strategy: "auto" | "exhaustive" |
    "halving"; reps / confirm_reps: samples per median (>= 20); confirm_top: how many are
    re-timed; env: the cache environment (default from the device); remeasure: re-time every
    passing candidate afterwards and report the chosen one's regret; budget_s: wall-clock
    budget for the whole run: builds run most promising first (strategy.priority) and none
    starts after BUILD_SHARE of the budget, no check after CHECK_SHARE, and no candidate starts
    timing after the budget's end (timing gets at least its last 10 %; the first one checked is
    always timed); the rest are recorded as pruned by the budget. None = no budget.
    """
    _validate_args(op, spec, problem, reps, confirm_top, confirm_reps, compile_timeout, max_candidates)
    if budget_s is not None and not (isinstance(budget_s, (int, float)) and budget_s > 0):
        raise ValueError(f"budget_s: expected seconds > 0 or None, got {budget_s!r}")
    if harness is None:
        from .check import _HARNESSES
        if op not in _HARNESSES:
            raise ValueError(f"op: expected one of {tuple(sorted(_HARNESSES))} (the ops the tuner can run), "
                             f"got {op!r}")
    t_start = time.monotonic()
    if env is None:
        try:
            env = current_environment(device)
        except Exception:
            env = None
    key = make_key(op, spec, problem, env) if env is not None else None
    cands, skipped = candidates(op, spec, problem, device, backends)
    kept, pruned = strategies.prune(cands, max_candidates, spec, problem, op)
    rows = [Row(c) for c in strategies.priority(kept, spec, problem, op)]
    for c in pruned:
        rows.append(Row(c, status="pruned", stage="prune",
                        reason=f"space of {len(cands)} > max_candidates={max_candidates}"))
    timer = timer if timer is not None else default_timer(device)
    strat = strategies.choose(len(kept), name=strategy)
    prog = _Progress(progress)
    own_harness = harness is None
    cache_obj = get_cache(cache) if write else None
    result = TuneResult(op, spec, problem, env, key, rows, skipped, None, strat.name,
                        getattr(timer, "name", type(timer).__name__), 0.0,
                        cache_path=cache_obj.path if cache_obj is not None else None,
                        budget_s=budget_s)
    try:
        active = [r for r in rows if r.status == "pending"]
        if active and harness is None:
            harness = make_harness(op, spec, problem, device, seed)
        result.seed = getattr(harness, "seed", seed)
        workers = compile_workers or min(8, os.cpu_count() or 1)
        deadline = None if budget_s is None else t_start + BUILD_SHARE * float(budget_s)
        note = "" if budget_s is None else \
            f"not built: builds stop at {BUILD_SHARE:.0%} of the {budget_s:g} s tuning budget"
        t0 = time.monotonic()
        _compile_all(active, harness, float(compile_timeout), workers, prog, deadline, note)
        t1 = time.monotonic()
        built = [r for r in active if r.status == "compiled"]
        if budget_s is not None:
            strat = strategies.choose(len(built), name=strategy)
            result.strategy = strat.name
        with _device_ctx(harness):
            _check_all(built, harness, prog,
                       None if budget_s is None else t_start + CHECK_SHARE * float(budget_s),
                       "" if budget_s is None else
                       f"built, not checked: checks stop at {CHECK_SHARE:.0%} of the {budget_s:g} s tuning budget")
            t2 = time.monotonic()
            _time_and_confirm(result, rows, built, harness, timer, strat, reps, confirm_top, confirm_reps,
                              remeasure, prog, None if budget_s is None else  # timing gets >= the last 10 %
                              max(t_start + float(budget_s), t2 + (1 - CHECK_SHARE) * float(budget_s)),
                              "" if budget_s is None else
                              f"checked, not timed: the {budget_s:g} s tuning budget was spent")
        result.stage_seconds = {"setup": round(t0 - t_start, 3), "build": round(t1 - t0, 3),
                                "check": round(t2 - t1, 3), "time": round(time.monotonic() - t2, 3)}
    finally:
        for r in rows:
            r._release()
        if own_harness and harness is not None and hasattr(harness, "close"):
            harness.close()
        prog.close()
        result.seconds = time.monotonic() - t_start

    if write and result.best is not None:
        if key is None:
            warnings.warn("tune: no device identity (no CUDA GPU and no env=): the result is not cached",
                          CacheWarning, stacklevel=2)
        else:
            try:
                cache_obj.put(result.entry())
                result.written = True
            except OSError as e:
                warnings.warn(f"tune: could not write the tuning cache {cache_obj.path} ({e})", CacheWarning,
                              stacklevel=2)
    return result


def _time_and_confirm(result, rows, active, harness, timer, strat, reps, confirm_top, confirm_reps,
                      remeasure, prog, deadline=None, budget_note=""):
    """Stages 4-5 (and the optional re-measure): fills rows' samples and result.best. Past
    `deadline` (the end of the time budget, or (1 - CHECK_SHARE) of it after timing starts,
    whichever is later) a candidate not yet timed is recorded as pruned by
    the budget, once at least one candidate has samples (there is always a choice); those
    already timed finish their rounds, and the confirm stage runs as usual."""
    ok = [r for r in active if r.status == "ok"]

    ph = prog.phase("time", len(ok))

    def measure(row, n):
        if deadline is not None and not row.samples and time.monotonic() > deadline \
                and any(r.samples for r in ok):
            row.status, row.stage, row.reason = "pruned", "budget", budget_note
            row._release()
            return None
        try:
            if row.bench is None:
                row.bench = harness.bench(row.candidate)
            if n > 0:
                xs = list(timer.measure(row.bench, n))
                if len(xs) != n or not all(isinstance(x, (int, float)) and math.isfinite(x) and x > 0 for x in xs):
                    raise ValueError(f"timer returned {len(xs)} samples, expected {n} finite > 0: {xs[:4]}")
                row.samples += xs
            row.mode = getattr(row.bench, "mode", "") or row.mode
            return median(row.samples)
        except Exception as e:  # noqa: BLE001
            row.fail("time", "timing failed: " + classify(e))
            _health(harness, f"timing {row.label}")
            return None

    seen_rows = set()

    def measured(row, n):
        m = measure(row, n)
        if id(row) not in seen_rows:  # the bar counts candidates timed at least once
            seen_rows.add(id(row))
            ph.advance(row.label)
        return m

    try:
        ranked = strat.run(ok, measured, reps, keep=confirm_top)
    finally:
        ph.close()
    top_ids = {id(r) for r, _ in ranked[:confirm_top]}
    for r in ok:
        if id(r) not in top_ids and not remeasure:
            r._release()

    # confirm: re-time the top few, interleaved, and take the fastest confirmed median
    order = [r for r, _ in ranked if r.status == "ok"]
    best = None
    ph = prog.phase("confirm", min(confirm_top, len(order)))
    try:
        while order and best is None:
            top, order = order[:confirm_top], order[confirm_top:]
            chunk = 10
            for done in range(0, confirm_reps, chunk):
                n = min(chunk, confirm_reps - done)
                for r in top:
                    if r.status != "ok":
                        continue
                    try:
                        xs = list(timer.measure(r.bench if r.bench is not None else _bench(harness, r), n))
                        if len(xs) != n or not all(math.isfinite(x) and x > 0 for x in xs):
                            raise ValueError(f"timer returned {xs[:4]}")
                        r.confirm += xs
                    except Exception as e:  # noqa: BLE001
                        r.fail("confirm", "timing failed: " + classify(e))
                        _health(harness, f"timing {r.label}")
            alive = [r for r in top if r.status == "ok" and r.confirm]
            for r in top:
                ph.advance(r.label)
            if alive:
                best = min(alive, key=lambda r: r.confirmed_us)
    finally:
        ph.close()
    result.best = best

    if remeasure and best is not None:
        live = [r for r in rows if r.status == "ok"]
        for _ in range(max(2, reps // 10)):
            for r in live:
                try:
                    r.remeasure += list(timer.measure(r.bench if r.bench is not None else _bench(harness, r), 10))
                except Exception as e:  # noqa: BLE001
                    r.remeasure = []
                    r.reason = f"re-measure failed: {classify(e)}"
        meds = [median(r.remeasure) for r in live if r.remeasure]
        if best.remeasure and meds:
            result.regret = median(best.remeasure) / min(meds) - 1.0


def _bench(harness, row):
    row.bench = harness.bench(row.candidate)
    return row.bench


# ----------------------------------------------------------------------------------------
# tuning inside a user's call, only when asked

ENV_AUTOTUNE = "MAMBA3_AUTOTUNE"
_tuning = threading.local()


def autotune_requested(flag: Optional[bool] = None) -> bool:
    """The API flag if given, else $MAMBA3_AUTOTUNE (set and not 0/false/no/off)."""
    if flag is not None:
        return bool(flag)
    return os.environ.get(ENV_AUTOTUNE, "").strip().lower() not in ("", "0", "false", "no", "off")


def maybe_tune_on_miss(op: str, spec, problem, device=None, *, flag: Optional[bool] = None, cache=None,
                       **tune_kw):
    """If tuning was asked for (flag, else $MAMBA3_AUTOTUNE), tune now, cache the result and
    return (backend, config, "tuned"); otherwise, or if tuning is impossible here (CUDA graph
    capture in progress, already tuning, no candidate passed), None. Never raises; problems
    become warnings."""
    if not autotune_requested(flag) or getattr(_tuning, "active", False):
        return None
    try:
        import torch
        if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
            warnings.warn("autotune: not tuning during CUDA graph capture; tune before capturing "
                          "(or run `mamba3-kernels tune`)", CacheWarning, stacklevel=2)
            return None
    except Exception:
        pass
    _tuning.active = True
    try:
        print(f"mamba3-kernels: tuning {op} for {problem.describe()} ({ENV_AUTOTUNE}=1 or autotune=True)",
              file=sys.stderr, flush=True)
        kw = dict(progress=False)
        kw.update(tune_kw)
        res = tune(op, spec, problem, device, cache=cache, **kw)
        if res.best is None:
            warnings.warn(f"autotune: no candidate passed for {op} {problem.describe()}:\n{res.table()}",
                          CacheWarning, stacklevel=2)
            return None
        return res.best.backend, dict(res.best.config), "tuned"
    except Exception as e:  # noqa: BLE001 - a user's call never fails because tuning did
        warnings.warn(f"autotune: tuning failed ({type(e).__name__}: {e}); using the default choice",
                      CacheWarning, stacklevel=2)
        return None
    finally:
        _tuning.active = False


def resolve(op: str, spec, problem, device=None, *, autotune: Optional[bool] = None, cache=None,
            env: Optional[Environment] = None, validate: bool = True, **tune_kw):
    """Dispatch's cache step: exact cache hit, else tune if asked (autotune / $MAMBA3_AUTOTUNE),
    else nearest-bucket hit, else None. Returns (backend, config, source) with source "cache",
    "tuned" or "nearest-bucket". Never raises (problems become CacheWarnings)."""
    hit = lookup(op, spec, problem, device, cache=cache, env=env, validate=validate, nearest=False)
    if hit is not None:
        return hit
    if env is not None:
        tune_kw["env"] = env
    hit = maybe_tune_on_miss(op, spec, problem, device, flag=autotune, cache=cache, **tune_kw)
    if hit is not None:
        return hit
    return lookup(op, spec, problem, device, cache=cache, env=env, validate=validate, nearest=True)
