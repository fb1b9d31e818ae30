"""Helpers shared by the bench scripts: importing the package from this checkout, the device
copy bandwidth every roofline fraction is taken against, and the JSON report with its meta."""
import json
import os
import statistics
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def use_checkout() -> None:
    """Import mamba3_kernels from this checkout (also where `pip install -e .` did not take, as on
    the device image: the package extends its own __path__ to backends/, reference/, autotune/)."""
    if ROOT not in sys.path:
        sys.path.insert(0, ROOT)


def copy_bandwidth(nbytes: int = 1 << 30, reps: int = 20) -> float:
    """Device-to-device copy of `nbytes`, bytes read + written per second (median of `reps`,
    CUDA events, after 3 warm-ups)."""
    import torch
    a = torch.empty(nbytes // 4, dtype=torch.float32, device="cuda").uniform_()
    b = torch.empty_like(a)
    for _ in range(3):
        b.copy_(a)
    ts = []
    for _ in range(reps):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        b.copy_(a)
        e.record()
        e.synchronize()
        ts.append(s.elapsed_time(e) / 1e3)
    del a, b
    torch.cuda.empty_cache()
    return 2 * nbytes / statistics.median(ts)


def events_us(fn, reps: int = 20, iters: int = 10, warmup: int = 3) -> float:
    """Median microseconds per call of `fn`: CUDA events around `iters` back-to-back calls,
    `reps` times (eager: for kernels that launch outside torch's CUDA graph capture, or whose
    launch cost is part of the question)."""
    import torch
    for _ in range(warmup):
        fn()
    ts = []
    for _ in range(reps):
        a, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        for _ in range(iters):
            fn()
        e.record()
        torch.cuda.synchronize()
        ts.append(a.elapsed_time(e) * 1000 / iters)
    return statistics.median(ts)


def write_report(path: str, rows: list, **extra) -> None:
    """JSON {meta: GPU name, torch, triton, commit (MAMBA3_COMMIT), **extra; rows} at `path`."""
    import torch
    import triton
    meta = dict(device=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__,
                commit=os.environ.get("MAMBA3_COMMIT", "unknown"), **extra)
    with open(path, "w") as f:
        json.dump(dict(meta=meta, rows=rows), f, indent=1, default=str)
