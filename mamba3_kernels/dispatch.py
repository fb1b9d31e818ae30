"""Choose (backend, config) for a call: explicit > tuning cache > nearest bucket > heuristic.

1. `backend=` / `config=` given by the caller;
2. an entry of the autotune cache for this GPU, versions, spec and shape bucket; on a miss,
   tuning if asked (autotune=True or MAMBA3_AUTOTUNE=1), else the nearest bucket's entry
   (mamba3_kernels.autotune.resolve);
3. the first available backend (in PREFERENCE order) that supports the spec, with its
   `default_config`.
Decisions are memoised per (op, spec, problem, device) so a warm call costs a dict lookup;
`clear_memo()` (called by every write to a tuning cache in this process) forgets them and bumps
`generation`, which callers that keep a decision of their own (api.step) compare against.
"""
from __future__ import annotations

import os
from typing import Optional

from mamba3_kernels import backends

from .spec import Problem, ScanSpec

PREFERENCE = {"step": ("cute", "triton", "tilelang"), "forward": ("triton", "tilelang", "cute"),
              "backward": ("triton", "tilelang", "cute")}
_memo: dict = {}
generation = 0


class NoBackendError(RuntimeError):
    pass


def _device_key(device) -> str:
    return str(device)


def _usable(name: str, spec: ScanSpec, op: str):
    mod = backends.get(name)
    ok, why = mod.available()
    if not ok:
        return None, f"{name}: unavailable ({why})"
    ok, why = mod.supports(spec, op)
    if not ok:
        return None, f"{name}: does not support this spec ({why})"
    return mod, ""


def select(op: str, spec: ScanSpec, problem: Problem, device, backend: Optional[str] = None,
           config: Optional[dict] = None, autotune: Optional[bool] = None):
    """Return (backend module, config dict, source) where source says which rule chose it:
    "explicit", "cache", "tuned" (autotune=True or MAMBA3_AUTOTUNE=1 on a cache miss),
    "nearest-bucket" or "default"."""
    if backend is not None:
        mod, why = _usable(backend, spec, op)
        if mod is None:
            raise NoBackendError(f"backend={backend!r} cannot run op {op!r}: {why}")
        return mod, dict(config) if config is not None else mod.default_config(spec, problem, op), "explicit"
    if config is not None:
        raise ValueError("config: expected None unless backend= is also given (configs are per backend), "
                         f"got {config!r}")
    from mamba3_kernels.autotune import autotune_requested
    tune = autotune_requested(autotune)
    key = (op, spec, problem, _device_key(device), tune)
    hit = _memo.get(key)
    if hit is not None:
        return hit
    res = _from_cache(op, spec, problem, device, tune)
    if res is None:
        reasons = []
        for name in PREFERENCE[op]:
            mod, why = _usable(name, spec, op)
            if mod is not None:
                res = (mod, mod.default_config(spec, problem, op), "default")
                break
            reasons.append(why)
        if res is None:
            raise NoBackendError(f"no backend can run op {op!r} for: {spec.describe()}\n  " + "\n  ".join(reasons))
    _memo[key] = res
    return res


def _from_cache(op, spec, problem, device, tune=False):
    if os.environ.get("MAMBA3_NO_CACHE"):
        return None
    try:
        from mamba3_kernels import autotune
        hit = autotune.resolve(op, spec, problem, device, autotune=tune)
    except Exception:  # a broken cache never breaks a call (autotune warns itself)
        return None
    if hit is None:
        return None
    name, cfg, source = hit
    mod, _ = _usable(name, spec, op)
    if mod is None:
        return None
    return mod, dict(cfg), source


def clear_memo():
    global generation
    _memo.clear()
    generation += 1
