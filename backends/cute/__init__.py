"""CuTe DSL backend (nvidia-cutlass-dsl): the decode step (SPEC §5) in one fused kernel.

Protocol: see backends/__init__.py. Imports without cutlass installed: `cutlass` is imported
only inside the functions below (and by `step.py`, which holds the kernel and is imported
lazily). `compile` builds PTX and cubin on a machine without a GPU (CuTe DSL bundles NVVM and
ptxas; `--gpu-arch` picks the target), which is how CI checks the kernel builds.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile

from mamba3_kernels.backends import common_support, dsl_importable, gpu_reason

NAME = "cute"
MAX_N = 1024
MAX_P = 4096


_mod = None


def _step():
    """The kernel module `step.py`, imported on first use. Importing a submodule binds its name
    on the package, which would shadow the protocol function `step`: rebind the function."""
    global _mod
    if _mod is None:
        import importlib
        _mod = importlib.import_module(__name__ + ".step")
        globals()["step"] = _step_entry
    return _mod


_avail = None


def available():
    """(ok, reason); memoised (the dispatcher asks on every call with an explicit backend)."""
    global _avail
    if _avail is None:
        ok, why = dsl_importable("cutlass.cute")
        if ok:
            ok, why = gpu_reason()
            if not ok:
                why = f"compile-only: {why}"
        _avail = (ok, why)
    return _avail


def supports(spec, op="step"):
    ok, why = common_support(spec, op)
    if not ok:
        return ok, why
    if spec.d_state > MAX_N:
        return False, f"N={spec.d_state} > {MAX_N}"
    if spec.head_dim > MAX_P:
        return False, f"P={spec.head_dim} > {MAX_P}"
    return True, ""


def space(spec, problem=None, op="step"):
    """Tuning candidates: num_warps x lanes_per_row x vec x tile_p (see step.config_space)."""
    if op != "step":
        return []
    return _step().config_space(spec)


_sms = None


def _sm_count() -> int:
    """SMs of the current CUDA device (132, an H100's, without one); asked once."""
    global _sms
    if _sms is None:
        _sms = 132
        try:
            import torch
            if torch.cuda.is_available():
                _sms = int(torch.cuda.get_device_properties(torch.cuda.current_device()).multi_processor_count)
        except Exception:  # noqa: BLE001 - a default config must not fail on a device query
            pass
    return _sms


def _default(spec, batch_heads: int) -> dict:
    """step.default_config for B * H heads (0: unknown) on this device's SM count."""
    return _step().default_config(spec, batch_heads=batch_heads, sms=_sm_count())


def default_config(spec, problem=None, op="step"):
    """The step's default config; with a problem, its batch size picks the geometry where a wave
    boundary matters (step.default_config)."""
    return _default(spec, problem.batch * problem.nheads if problem is not None else 0)


def step(spec, config, tensors):
    """Run the decode step on a StepTensors bundle (writes tensors.out and tensors.state_out)."""
    mod = _mod or _step()
    mod.run(spec, config or _default(spec, tensors.v.shape[0] * tensors.v.shape[1]), tensors)


_step_entry = step


def _ptxas_stats(ptx: str, arch: str) -> dict:
    """registers / spills / static smem from `ptxas -v` on the PTX, when a ptxas is found."""
    exe = os.environ.get("PTXAS") or shutil.which("ptxas")
    if not exe:
        try:
            import triton
            cand = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas-blackwell")
            exe = cand if os.path.exists(cand) else None
        except Exception:
            exe = None
    if not exe:
        return {}
    with tempfile.TemporaryDirectory() as d:
        src = os.path.join(d, "k.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        r = subprocess.run([exe, f"-arch={arch}", "-v", src, "-o", os.path.join(d, "k.cubin")],
                           capture_output=True, text=True, timeout=120)
    txt = r.stdout + r.stderr
    out = {"ptxas": exe}
    m = re.search(r"Used (\d+) registers", txt)
    if m:
        out["registers"] = int(m.group(1))
    m = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", txt)
    if m:
        out["spill_stores"], out["spill_loads"] = int(m.group(1)), int(m.group(2))
        out["spills"] = out["spill_stores"] + out["spill_loads"]
    m = re.search(r"(\d+) bytes smem", txt)
    if m:
        out["shared"] = int(m.group(1))
    if r.returncode != 0:
        out["ptxas_error"] = txt[-2000:]
    return out


def compile(spec, config=None, op="step", arch="sm_90a", nheads=None, ngroups=1,
            state_indices=False, stats=True):
    """AOT build without a GPU: {"ptx": str, "cubin": bytes, "registers", "spills", "shared",
    "config", "seconds"}. nheads defaults to 2*ngroups (H and G are compile-time constants)."""
    import time
    if op != "step":
        raise NotImplementedError(f"cute backend: op {op!r} not implemented yet")
    ok, why = supports(spec, op)
    if not ok:
        raise ValueError(f"spec: not supported by the cute backend ({why})")
    st = _step()
    cfg = dict(config) if config else st.default_config(spec)
    H = nheads or 2 * ngroups
    t0 = time.time()
    with tempfile.TemporaryDirectory(prefix="cute-step-") as dump:   # --keep-* writes files there
        fn = st.build(spec, cfg, H, ngroups, state_indices,
                      options=f"--enable-tvm-ffi --gpu-arch {arch} --keep-ptx --keep-cubin --dump-dir {dump}")
        res = {"ptx": fn.artifacts.PTX, "cubin": fn.artifacts.CUBIN, "config": cfg,
               "geometry": st.geometry(spec, cfg), "smem_bytes": st.smem_bytes(spec, cfg),
               "seconds": time.time() - t0, "arch": arch}
    if stats and res["ptx"]:
        res.update(_ptxas_stats(res["ptx"], arch))
    return res
