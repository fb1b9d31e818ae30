"""Timing a candidate: CUDA-graph replay over rotated inputs, warm-up, median of >= 20.

A harness hands the timer a `Bench`: `launch(i)` runs the candidate once on input set i of
`n_inputs` (separate copies of every tensor, together larger than the L2 cache, so each call
reads its inputs from HBM as a real decode step does). Timers return samples in microseconds
per call; the tuner takes medians and re-times the top few to confirm (tuner.py).

Timers (all have `name` and `measure(bench, reps) -> list[float]`):

* `CudaGraphTimer` (default on a GPU): eager warm-up over every input set (this also finishes
  any JIT compile), then one CUDA graph holding `calls` launches that cycle through the input
  sets (`calls` sized so a replay takes ~`target_us`, capped at `max_calls`), captured once per
  bench and replayed: each sample = one replay between two CUDA events / calls. No launch
  overhead, no host jitter. If capture fails (a launch that syncs or allocates on the host)
  it falls back to `EventTimer` for that bench and says so in `bench.mode`.
* `EventTimer`: per sample, an L2 flush (a memset of 2 x L2 bytes) outside the timed region,
  then events around one launch. Includes launch latency: an upper bound for tiny kernels.
* `WallTimer`: perf_counter around `calls` launches (CPU benches, smoke tests).

Any object with `name` and `measure(bench, reps)` can be passed to `tune(timer=...)`; the CPU
tests pass a fake that returns preset times.
"""
from __future__ import annotations

import dataclasses
import math
import statistics
import time
from typing import Any, Callable, Optional, Sequence


@dataclasses.dataclass(eq=False)
class Bench:
    """What a timer times: launch(i) runs one call on input set i (0 <= i < n_inputs)."""
    launch: Callable[[int], None]
    n_inputs: int = 1
    device: Any = None
    label: str = ""
    mode: str = ""                 # filled by the timer: "cuda-graph", "events", ...
    state: dict = dataclasses.field(default_factory=dict)  # the timer's per-bench memo (graph)

    def release(self):
        self.state.clear()


def median(xs: Sequence[float]) -> float:
    return float(statistics.median(xs)) if xs else float("nan")


def summarize(xs: Sequence[float]) -> dict:
    """{median, min, max, iqr_rel, n}: iqr_rel = (p75 - p25) / median, a noise indicator."""
    if not xs:
        return {"median": float("nan"), "min": float("nan"), "max": float("nan"), "iqr_rel": float("nan"), "n": 0}
    s = sorted(xs)
    q = statistics.quantiles(s, n=4) if len(s) >= 2 else [s[0]] * 3
    m = median(s)
    return {"median": m, "min": s[0], "max": s[-1], "iqr_rel": (q[2] - q[0]) / m if m else float("nan"),
            "n": len(s)}


def l2_bytes(device=None) -> int:
    """The L2 cache size of a CUDA device (50 MiB if torch does not say)."""
    import torch
    try:
        p = torch.cuda.get_device_properties(device if device is not None else torch.cuda.current_device())
        return int(getattr(p, "L2_cache_size", 0)) or 50 << 20
    except Exception:
        return 50 << 20


def rotation_count(bytes_per_set: int, l2: int, free_bytes: Optional[int] = None, max_sets: int = 64) -> int:
    """How many input copies to cycle through: together >= 2 x L2 (plus one), at least 2,
    at most max_sets and a quarter of free memory."""
    bytes_per_set = max(1, int(bytes_per_set))
    n = max(2, math.ceil(2 * l2 / bytes_per_set) + 1)
    if free_bytes is not None:
        n = min(n, max(1, free_bytes // 4 // bytes_per_set))
    return max(1, min(n, max_sets))


class WallTimer:
    """perf_counter around `calls` back-to-back launches (synchronising a CUDA device if any)."""
    name = "wall"

    def __init__(self, calls: int = 10, warmup: int = 2):
        self.calls, self.warmup = calls, warmup

    def _sync(self, bench):
        if bench.device is not None and str(bench.device).startswith("cuda"):
            import torch
            torch.cuda.synchronize(bench.device)

    def measure(self, bench: Bench, reps: int) -> list:
        bench.mode = bench.mode or self.name
        if not bench.state.get("warm"):
            for i in range(max(self.warmup, 1) * bench.n_inputs):
                bench.launch(i % bench.n_inputs)
            bench.state["warm"] = True
        out, j = [], 0
        for _ in range(reps):
            self._sync(bench)
            t0 = time.perf_counter()
            for _ in range(self.calls):
                bench.launch(j % bench.n_inputs)
                j += 1
            self._sync(bench)
            out.append((time.perf_counter() - t0) * 1e6 / self.calls)
        return out


class EventTimer:
    """CUDA events around single launches, each after an L2 flush (or around `calls` launches
    over the rotated inputs with flush=False)."""
    name = "events"

    def __init__(self, flush: bool = True, warmup: int = 3, calls: int = 10):
        self.flush, self.warmup, self.calls = flush, warmup, calls
        self._buf = {}

    def _flush_buf(self, device):
        import torch
        key = str(device)
        if key not in self._buf:
            self._buf[key] = torch.empty(2 * l2_bytes(device), dtype=torch.uint8, device=device)
        return self._buf[key]

    def measure(self, bench: Bench, reps: int) -> list:
        import torch
        if not bench.mode:
            bench.mode = "events+flush" if self.flush else "events"
        if not bench.state.get("warm"):
            for i in range(self.warmup * bench.n_inputs):
                bench.launch(i % bench.n_inputs)
            bench.state["warm"] = True
        buf = self._flush_buf(bench.device) if self.flush else None
        pairs, j = [], bench.state.get("j", 0)
        for _ in range(reps):
            s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            if buf is not None:
                buf.zero_()
                s.record()
                bench.launch(j % bench.n_inputs)
                j += 1
                e.record()
                pairs.append((s, e, 1))
            else:
                s.record()
                for _ in range(self.calls):
                    bench.launch(j % bench.n_inputs)
                    j += 1
                e.record()
                pairs.append((s, e, self.calls))
        bench.state["j"] = j
        torch.cuda.synchronize(bench.device)
        return [s.elapsed_time(e) * 1e3 / n for s, e, n in pairs]


class CudaGraphTimer:
    """Replays of one captured CUDA graph of `calls` launches over the rotated inputs."""
    name = "cuda-graph"

    def __init__(self, target_us: float = 200.0, max_calls: int = 256, warmup_replays: int = 3,
                 fallback: Optional[EventTimer] = None):
        self.target_us, self.max_calls, self.warmup_replays = target_us, max_calls, warmup_replays
        self.fallback = fallback or EventTimer(flush=True)

    def _capture(self, bench: Bench):
        import torch
        n = bench.n_inputs
        # eager warm-up (finishes JIT work) and a rough per-call estimate
        for i in range(2 * n):
            bench.launch(i % n)
        torch.cuda.synchronize(bench.device)
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        for i in range(2 * n):
            bench.launch(i % n)
        e.record()
        torch.cuda.synchronize(bench.device)
        est = max(s.elapsed_time(e) * 1e3 / (2 * n), 0.5)
        calls = int(min(self.max_calls, max(n, math.ceil(self.target_us / est))))
        calls = max(n, calls - calls % n)  # whole rotations
        side = torch.cuda.Stream(device=bench.device)
        side.wait_stream(torch.cuda.current_stream(bench.device))
        with torch.cuda.stream(side):
            for i in range(n):
                bench.launch(i)
        torch.cuda.current_stream(bench.device).wait_stream(side)
        torch.cuda.synchronize(bench.device)
        g = torch.cuda.CUDAGraph()
        try:  # thread_local: an abandoned build thread's CUDA calls cannot spoil this capture
            ctx = torch.cuda.graph(g, capture_error_mode="thread_local")
        except TypeError:
            ctx = torch.cuda.graph(g)
        with ctx:
            for i in range(calls):
                bench.launch(i % n)
        for _ in range(self.warmup_replays):
            g.replay()
        torch.cuda.synchronize(bench.device)
        return g, calls

    def measure(self, bench: Bench, reps: int) -> list:
        import torch
        if bench.state.get("graph_failed"):
            return self.fallback.measure(bench, reps)
        if "graph" not in bench.state:
            try:
                bench.state["graph"], bench.state["calls"] = self._capture(bench)
                bench.mode = self.name
            except Exception as e:  # not capturable: time it with events instead
                bench.state["graph_failed"] = f"{type(e).__name__}: {e}"
                bench.mode = f"{self.fallback.name} (graph capture failed: {type(e).__name__})"
                torch.cuda.synchronize(bench.device)
                return self.fallback.measure(bench, reps)
        g, calls = bench.state["graph"], bench.state["calls"]
        pairs = []
        for _ in range(reps):
            s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            s.record()
            g.replay()
            e.record()
            pairs.append((s, e))
        torch.cuda.synchronize(bench.device)
        return [s.elapsed_time(e) * 1e3 / calls for s, e in pairs]


def default_timer(device=None):
    """CudaGraphTimer on a CUDA device, WallTimer otherwise."""
    try:
        import torch
        if torch.cuda.is_available() and (device is None or torch.device(device).type == "cuda"):
            return CudaGraphTimer()
    except Exception:
        pass
    return WallTimer()
