"""The autotuner: pick the fastest correct (backend, config) for a (op, ScanSpec, Problem).

    space     candidates: every available backend x its config space (+ its default)
    check     a candidate must match the oracle-validated reference on fresh inputs and be
              bitwise repeatable before it is timed (the harness of an op: StepHarness)
    timing    CUDA-graph replay over rotated inputs, warm-up, median of >= 20; pluggable timers
    strategy  exhaustive for small spaces, successive halving for big ones; pruning
    cache     the persistent JSON cache (keyed by GPU, driver, versions, spec, shape bucket)
    buckets   B and L bucketing, nearest-bucket fallback
    tuner     tune(...) -> TuneResult (table of every candidate, failures with reasons)
    commands  the `mamba3-kernels tune` and `bench` subcommands

Dispatch order (mamba3_kernels.dispatch): explicit backend=/config= > cache hit (`lookup`) >
nearest-bucket hit > the backend's heuristic default. Nothing tunes inside a user's call unless
asked: `resolve(..., autotune=True)` or MAMBA3_AUTOTUNE=1 tunes on a cache miss.

Importing this package needs only the standard library (torch loads when a GPU is queried).
"""
from .buckets import nearest, pow2_bucket, shape_bucket
from .cache import (Cache, CacheWarning, Environment, current_environment, default_path, get_cache,
                    key_string, lookup, make_key, set_environment_provider)
from .check import StepHarness, make_harness, register_harness
from .space import Candidate, candidates
from .strategy import Exhaustive, SuccessiveHalving
from .timing import Bench, CudaGraphTimer, EventTimer, WallTimer, default_timer
from .tuner import (ENV_AUTOTUNE, Row, TuneAborted, TuneResult, autotune_requested, maybe_tune_on_miss,
                    resolve, tune)

__all__ = [
    "lookup", "resolve", "maybe_tune_on_miss", "autotune_requested", "tune", "TuneResult", "Row",
    "TuneAborted", "Cache", "CacheWarning", "Environment", "current_environment",
    "set_environment_provider", "get_cache", "default_path", "make_key", "key_string",
    "Candidate", "candidates", "StepHarness", "make_harness", "register_harness", "Bench",
    "CudaGraphTimer", "EventTimer", "WallTimer", "default_timer", "Exhaustive", "SuccessiveHalving",
    "pow2_bucket", "shape_bucket", "nearest", "ENV_AUTOTUNE",
]
