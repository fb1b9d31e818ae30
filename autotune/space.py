"""The candidates of a tuning run: every available backend x its config space.

A candidate is (backend, config). Backends come from mamba3_kernels.backends (by name) or are
passed in as objects with the protocol of backends/__init__.py (tests pass fakes). A backend
that is unavailable, does not support the spec, or whose `space` raises is skipped with its
reason; the backend's `default_config` is always a candidate (so tuning never does worse
than the default), and duplicate configs are dropped.

Optional backend attributes the tuner uses when present:
    PARALLEL_COMPILE: bool      its compiles may run in several threads at once (default False)
    precompile(spec, problem, config, op, device)  build without running (else the first run
                                builds, during the check)
    rank(spec, problem, config, op) -> float      lower = more promising; used to prune big spaces
"""
from __future__ import annotations

import dataclasses
from typing import Any, Optional, Sequence

from .cache import canonical_config


@dataclasses.dataclass
class Candidate:
    backend: str
    config: dict
    module: Any = dataclasses.field(default=None, repr=False, compare=False)
    is_default: bool = False

    @property
    def label(self) -> str:
        cfg = " ".join(f"{k}={v}" for k, v in sorted(self.config.items()))
        return f"{self.backend}[{cfg}]" + ("*" if self.is_default else "")

    def as_dict(self) -> dict:
        return {"backend": self.backend, "config": dict(self.config), "default": self.is_default}


def _resolve(b):
    """(name, module) for a backend name or module-like object."""
    if isinstance(b, str):
        from mamba3_kernels import backends
        return b, backends.get(b)
    name = getattr(b, "NAME", None)
    if not isinstance(name, str):
        raise ValueError(f"backends: expected names or backend modules with a NAME, got {b!r}")
    return name, b


def candidates(op: str, spec, problem, device=None, backends: Optional[Sequence] = None):
    """(candidates, skipped): every (backend, config) to try, and [(backend, reason)] for the
    backends left out. `backends`: names or module objects (default: all of
    mamba3_kernels.backends.NAMES)."""
    if backends is None:
        from mamba3_kernels import backends as reg
        backends = reg.NAMES
    if isinstance(backends, str):
        backends = [b.strip() for b in backends.split(",") if b.strip()]
    out, skipped = [], []
    for b in backends:
        try:
            name, mod = _resolve(b)
        except ValueError:
            raise
        except Exception as e:
            skipped.append((str(b), f"import failed: {type(e).__name__}: {e}"))
            continue
        try:
            ok, why = mod.available()
            if not ok:
                skipped.append((name, f"unavailable: {why}"))
                continue
            ok, why = mod.supports(spec, op)
            if not ok:
                skipped.append((name, f"does not support this spec: {why}"))
                continue
            default = dict(mod.default_config(spec, problem, op))
            space = [dict(c) for c in mod.space(spec, problem, op)]
        except Exception as e:
            skipped.append((name, f"{type(e).__name__}: {e}"))
            continue
        seen = set()
        dkey = canonical_config(default)
        for cfg in [default] + space:
            ck = canonical_config(cfg)
            if ck in seen:
                continue
            seen.add(ck)
            out.append(Candidate(name, cfg, mod, is_default=(ck == dkey)))
    return out, skipped
