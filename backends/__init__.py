"""Backend registry: one package per kernel DSL (`triton`, `tilelang`, `cute`).

Every backend package imports without its DSL installed and implements the protocol of
docs/architecture.md:

    NAME: str
    available() -> (ok: bool, reason: str)          # DSL importable, GPU present, versions
    supports(spec, op) -> (ok: bool, reason: str)   # op in {"step", "forward", "backward"}
    space(spec, problem, op) -> list[dict]           # tuning candidates (configs)
    default_config(spec, problem, op) -> dict
    step(spec, config, tensors: StepTensors) -> None # writes tensors.out and tensors.state_out
    compile(spec, config, op, arch="sm_90a") -> dict # AOT build without a GPU: {"cubin": bytes,
                                                     #  "registers", "spills", "shared"}, for CI
A missing DSL never breaks `import mamba3_kernels`: `availability()` reports why.
"""
from __future__ import annotations

import importlib

NAMES = ("triton", "tilelang", "cute")
OPS = ("step", "forward", "backward")
INPUT_DTYPES = ("bfloat16", "float16", "float32")
STATE_DTYPES = ("float32", "bfloat16")


def common_support(spec, op: str, implemented=("step",)):
    """The checks every backend's `supports` starts with: a known op that this backend
    implements, and input/state dtypes that the kernels read. (ok, reason)."""
    if op not in OPS:
        return False, f"op: expected one of {OPS}, got {op!r}"
    if op not in implemented:
        return False, "not implemented yet"
    if spec.input_dtype not in INPUT_DTYPES:
        return False, f"input dtype {spec.input_dtype} (supported: {', '.join(INPUT_DTYPES)})"
    if spec.state_dtype not in STATE_DTYPES:
        return False, f"state dtype {spec.state_dtype} (supported: {', '.join(STATE_DTYPES)})"
    return True, ""


def get(name: str):
    """The backend package `name` (imported lazily)."""
    if name not in NAMES:
        raise ValueError(f"backend: expected one of {NAMES}, got {name!r}")
    return importlib.import_module(f"mamba3_kernels.backends.{name}")


def availability() -> dict:
    """{name: (ok, reason)} for every backend; never raises."""
    res = {}
    for n in NAMES:
        try:
            res[n] = tuple(get(n).available())
        except Exception as e:  # a broken install is reported, not raised
            res[n] = (False, f"import failed: {type(e).__name__}: {e}")
    return res


def dsl_importable(module: str):
    """(ok, reason) for importing a DSL module by name, without raising."""
    try:
        importlib.import_module(module)
        return True, ""
    except Exception as e:
        return False, f"{module} not importable ({type(e).__name__}: {e})"


def gpu_reason():
    """(ok, reason): a CUDA GPU of compute capability >= 9.0 is visible to torch."""
    try:
        import torch
    except Exception as e:
        return False, f"torch not importable ({e})"
    if not torch.cuda.is_available():
        return False, "no CUDA GPU visible (compile-only here)"
    cc = torch.cuda.get_device_capability()
    if cc < (9, 0):
        return False, f"needs compute capability >= 9.0, found {cc[0]}.{cc[1]}"
    return True, torch.cuda.get_device_name()
