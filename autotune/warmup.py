"""Process warm-up before tuning: the one-time costs that belong to no single (spec, shape).

A fresh process pays, once: the CUDA context, importing each DSL (the CuTe DSL and TileLang
imports take seconds), and Triton's first launch (it builds its C launcher stub with the host
compiler, ~10 s on the lent H100's host). `tune` over several shapes in one process, or with a
time budget, does this first and reports it separately, so every shape's tuning time counts its
own kernels' cold builds and nothing else.
"""
from __future__ import annotations

import time
from typing import Optional, Sequence


def _triton_first_launch(device) -> None:
    import torch
    import triton
    import triton.language as tl

    @triton.jit
    def _fill(x_ptr, n, BLOCK: tl.constexpr):
        i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        tl.store(x_ptr + i, i.to(tl.float32), mask=i < n)

    x = torch.empty(64, device=device)
    _fill[(1,)](x, 64, BLOCK=64)
    torch.cuda.synchronize(device)


def warm_up(device=None, backends: Optional[Sequence[str]] = None, op: str = "step") -> dict:
    """Do the one-time costs now; returns {"seconds": total, "parts": {name: seconds}}."""
    parts = {}
    t0 = time.monotonic()
    try:
        import torch
        if torch.cuda.is_available():
            dev = torch.device(device) if device is not None else torch.device("cuda", torch.cuda.current_device())
            torch.empty(1, device=dev)
            torch.cuda.synchronize(dev)
        else:
            dev = None
    except Exception:  # noqa: BLE001 - warm-up is best effort; tuning reports real problems
        dev = None
    parts["cuda"] = time.monotonic() - t0
    from mamba3_kernels import backends as registry
    names = list(backends) if backends else list(registry.NAMES)
    for name in names:
        t = time.monotonic()
        try:
            mod = registry.get(name)
            ok, _ = mod.available()
            if ok and name == "triton" and dev is not None:
                _triton_first_launch(dev)
        except Exception:  # noqa: BLE001
            pass
        parts[name] = time.monotonic() - t
    return {"seconds": time.monotonic() - t0, "parts": parts}
