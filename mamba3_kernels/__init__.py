"""mamba3-kernels: the Mamba-3 scan in Triton, TileLang and CuTe DSL, checked against a float64 oracle.

`import mamba3_kernels` needs only the standard library: torch-dependent parts (`step`,
`scan`, dispatch) load on first use, and a missing DSL shows up in `backends_info()`.
"""
from __future__ import annotations

import os as _os

# From a source checkout that was not pip-installed (e.g. PYTHONPATH=<repo> on a machine where
# `pip install -e .` is unavailable), the folders setup.py maps into this namespace (reference/,
# backends/, autotune/) sit beside this package: make them importable as its subpackages.
_root = _os.path.dirname(_os.path.dirname(_os.path.abspath(__file__)))
if _os.path.isfile(_os.path.join(_root, "setup.py")) and _os.path.isdir(_os.path.join(_root, "reference")):
    __path__.append(_root)

from .spec import Problem, ScanSpec, States  # noqa: E402

__version__ = "0.1.0"
__all__ = ["ScanSpec", "Problem", "States", "step", "scan", "StepPlan", "backends_info", "__version__"]


def backends_info() -> dict:
    """{backend name: (available, reason)}."""
    from . import backends
    return backends.availability()


def __getattr__(name):
    if name in ("step", "scan"):
        from . import api
        return getattr(api, name)
    if name == "StepPlan":
        from .plan import StepPlan
        return StepPlan
    raise AttributeError(f"module 'mamba3_kernels' has no attribute {name!r}")
