"""mamba3-kernels: the Mamba-3 scan in Triton, TileLang and CuTe DSL, checked against a float64 oracle.

`import mamba3_kernels` needs only the standard library: torch-dependent parts (`step`,
`scan`, dispatch) load on first use, and a missing DSL shows up in `backends_info()`.
"""
from __future__ import annotations

from .spec import Problem, ScanSpec, States

__version__ = "0.1.0"
__all__ = ["ScanSpec", "Problem", "States", "step", "backends_info", "__version__"]


def backends_info() -> dict:
    """{backend name: (available, reason)}."""
    from . import backends
    return backends.availability()


def __getattr__(name):
    if name in ("step",):
        from . import api
        return getattr(api, name)
    raise AttributeError(f"module 'mamba3_kernels' has no attribute {name!r}")
