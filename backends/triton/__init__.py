"""Triton backend: the decode step (SPEC §5, step.py) and the chunked forward (SPEC §8, scan_*.py).

Protocol: see backends/__init__.py. Imports without triton installed: triton is imported
only inside the functions that need it (and by `step.py`, which holds the kernel).

With TRITON_INTERPRET=1 set before triton is imported, the backend runs on CPU tensors through
the Triton interpreter (that is how CI checks it against the oracle); otherwise it needs a CUDA
GPU of compute capability >= 9.0. `compile` builds the cubin without any GPU (AOT) and must run
in a process WITHOUT TRITON_INTERPRET.
"""
from __future__ import annotations

import importlib
import os
import re
import subprocess
import sys
import tempfile
import types

from mamba3_kernels.backends import INPUT_DTYPES, OPS, STATE_DTYPES, common_support, dsl_importable, gpu_reason  # noqa: F401 (scan_fwd reads the dtype lists here)

NAME = "triton"
MAX_BLOCK_N = 1024


def _interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "") not in ("", "0")


def _pow2(x: int) -> int:
    return 1 if x <= 1 else 1 << (int(x) - 1).bit_length()


def available():
    ok, why = dsl_importable("triton")
    if not ok:
        return False, why
    if _interpret():
        return True, "Triton interpreter (TRITON_INTERPRET=1): runs on CPU tensors, slowly"
    return gpu_reason()


def supports(spec, op="step"):
    if op not in OPS:
        return False, f"op: expected one of {OPS}, got {op!r}"
    if op == "forward":
        from . import scan_fwd
        return scan_fwd.supports(spec)
    if op == "backward":   # the chunked scan's backward (scan_bwd.py, behind mamba3_kernels.scan's autograd)
        from . import scan_bwd
        return scan_bwd.supports(spec)
    ok, why = common_support(spec, op)
    if not ok:
        return ok, why
    if _pow2(spec.d_state) > MAX_BLOCK_N:
        return False, f"N={spec.d_state}: state rows wider than {MAX_BLOCK_N} columns"
    return True, ""


# ------------------------------------------------------------------------------------------
# configs: ROWS (rows of the P x N state per program: the whole head, or P split over several
# programs), BLOCK_P (rows per tile of a program's loop), num_warps, num_stages, VEC (16-byte
# state accesses) and PREFETCH (see step.py)

def _elems_per_thread(cfg, spec) -> float:
    return cfg["BLOCK_P"] * _pow2(spec.d_state) / (32 * cfg["num_warps"])


def _norm_needs_whole_head(spec) -> bool:
    return spec.output_mode == "norm_reduce"


def _cfg(spec, bp, elems, vec, prefetch=False, rows=None):
    """ROWS = rows (default: the whole head), BLOCK_P = bp with about `elems` state elements per
    thread. With VEC the CTA must have more threads than a state row has columns
    (32 * num_warps > N), or else Triton loads the q/k rows in a layout of their own and
    converts the whole state tile."""
    NB = _pow2(spec.d_state)
    PV = _pow2(spec.head_dim)
    rows = PV if rows is None else rows
    nw = max(1, bp * NB // (32 * elems))
    nw = 1 << min(4, nw.bit_length() - 1)          # a power of two in [1, 16]
    if vec:
        nw = max(nw, min(16, 2 * NB // 32))
    return dict(BLOCK_P=bp, ROWS=rows, num_warps=nw, num_stages=1, VEC=vec,
                PREFETCH=bool(prefetch and bp < min(rows, spec.head_dim)))


# (head / ROWS, head / BLOCK_P, state elements per thread, VEC, PREFETCH). Split heads first
# (ROWS < P: several programs per head), then the whole-head configs of the first version
# (the only ones for norm_reduce, whose RMSNorm needs all of P in one tile).
_PLAN = ((4, 4, 8, True, False), (4, 4, 16, False, False), (4, 4, 32, False, False),
         (2, 2, 16, True, False), (2, 2, 32, False, False), (8, 8, 4, True, False),
         (8, 8, 8, False, False), (2, 4, 8, True, True),
         (1, 1, 32, True, False), (1, 1, 16, True, False), (1, 4, 32, False, False),
         (1, 1, 32, False, False))


def space(spec, problem=None, op="step"):
    """At most 12 candidates from _PLAN: P split over 2, 4 or 8 programs per head, or the whole
    head per program (norm_reduce: the whole head in one tile only), 4 to 32 state elements per
    thread, with and without VEC (16-byte state accesses). op "forward": scan_fwd.space; op
    "backward": scan_bwd.space."""
    if op == "forward":
        from . import scan_fwd
        return scan_fwd.space(spec, problem)
    if op == "backward":
        from . import scan_bwd
        return scan_bwd.space(spec, problem)
    if op != "step":
        return []
    PV = _pow2(spec.head_dim)
    out = []
    for rdiv, bdiv, elems, vec, pre in _PLAN:
        if PV // bdiv < 1 or PV // rdiv < 1:
            continue
        if _norm_needs_whole_head(spec) and bdiv > 1:
            continue
        c = _cfg(spec, PV // bdiv, elems, vec, pre, rows=PV // rdiv)
        if c not in out:
            out.append(c)
    if spec.rank > 1 and _dot_ok(spec):   # DOT (whole head): with and without the register cap
        out = [c for c in (_dot_cfg(spec, True), _dot_cfg(spec, False)) if c not in out] + out
    d = default_config(spec, problem, op)
    if d not in out:
        out = [d] + out
    return out[:12]


def default_config(spec, problem=None, op="step"):
    """Measured on H100 (H=32, N=128, P=64; bench/NOTES.md, "Triton step", results/triton_step_gpu_v2.json):
    - few heads (B * H <= 64, e.g. B = 1): P split over 8 programs per head (ROWS = BLOCK_P =
      P/8; MIMO: VEC, 8 warps; SISO: no VEC, 4 warps): 20-28 % faster than the whole head at
      B = 1 (MIMO 8.0 vs 10.9 us, SISO bf16 5.3 vs 7.3 us); not for norm_reduce;
    - otherwise the whole head per program (the split loses 15-300 % at B >= 16): MIMO (R > 1):
      the DOT path, 4 warps with a register cap (`_dot_cfg`; results/step_variants_h100_call1.json:
      R=4 B=64 fp32 141.6 -> 70.6 us, bf16 127.3 -> 54.0 us); SISO with a bf16 state at B >= 32:
      quarter-head tiles, 2 warps, no VEC; else one tile, VEC, about 32 state elements per thread.
    op "forward": scan_fwd.default_config; op "backward": scan_bwd.default_config."""
    if op == "forward":
        from . import scan_fwd
        return scan_fwd.default_config(spec, problem)
    if op == "backward":
        from . import scan_bwd
        return scan_bwd.default_config(spec, problem)
    PV = _pow2(spec.head_dim)
    norm = _norm_needs_whole_head(spec)
    if problem is not None and problem.batch * problem.nheads <= 64 and not norm and PV >= 8:
        rows = PV // 8
        if spec.rank > 1:
            return _cfg(spec, rows, 4, True, rows=rows)
        return _cfg(spec, rows, 8, False, rows=rows)
    big = problem is not None and problem.batch >= 32
    if spec.rank == 1 and spec.state_dtype == "bfloat16" and big and not norm:
        return _cfg(spec, max(1, PV // 4), 32, False)
    if spec.rank > 1 and _dot_ok(spec):
        return _dot_cfg(spec, cap=True)
    return _cfg(spec, PV, 32, True)


def _dot_ok(spec) -> bool:
    """The DOT path (step.py) needs the whole head in one tile of >= 16 x 16 (tl.dot)."""
    return _pow2(spec.head_dim) >= 16 and _pow2(spec.d_state) >= 16


def _dot_cfg(spec, cap=True):
    """MIMO whole head as two tensor-core products (step.py, DOT): one warpgroup (4 warps) for
    up to 64 state elements per thread, more warps for larger heads; register cap (maxnreg) so
    3 (fp32 state: 168) or 4 (bf16 state: 128) CTAs fit on an SM. Measured on H100, R=4 H=32
    N=128 P=64 (bench/notes/step.md): B=64 fp32 141.6 -> 70.6 us, bf16 127.3 -> 54.0 us; with
    8 warps the DOT path is slower than the broadcast path (174 us)."""
    PV, NB = _pow2(spec.head_dim), _pow2(spec.d_state)
    nw = max(4, min(16, PV * NB // (32 * 64)))
    cfg = dict(BLOCK_P=PV, ROWS=PV, num_warps=nw, num_stages=1, VEC=True, PREFETCH=False, DOT=True)
    if cap:
        cfg["maxnreg"] = 168 if spec.state_dtype == "float32" else 128
    return cfg


# ------------------------------------------------------------------------------------------
# entry points

def _kernels():
    """The kernel module `step.py`, imported on first use."""
    return importlib.import_module(__name__ + ".step")


def step(spec, config, tensors):
    """Write tensors.out and tensors.state_out (see mamba3_kernels.tensors.StepTensors)."""
    ok, why = supports(spec, "step")
    if not ok:
        raise ValueError(f"spec: expected one the triton step supports, got one it does not ({why})")
    if _norm_needs_whole_head(spec):
        for key in ("BLOCK_P", "ROWS"):
            if config.get(key, spec.head_dim) < spec.head_dim:
                raise ValueError(f"config.{key}: expected >= P={spec.head_dim} with output_mode "
                                 f"'norm_reduce', got {config[key]}")
    _kernels().launch(spec, config, tensors)


class _Package(types.ModuleType):
    """Importing the kernel submodule `step.py` binds the name `step` on this package, which
    would shadow the protocol function `step`: the attribute stays the function. The kernel
    module is `mamba3_kernels.backends.triton.kernels` (imported on first access)."""

    @property
    def step(self):
        return _step_entry

    @step.setter
    def step(self, value):  # the import system binding the submodule: it stays in sys.modules
        if not isinstance(value, types.ModuleType):
            raise AttributeError("step: the backend entry point cannot be replaced")

    @property
    def kernels(self):
        return _kernels()


_step_entry = step
sys.modules[__name__].__class__ = _Package


_TT = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32"}


def signature(spec, config):
    """(signature, constexprs) of the step kernel for triton.compile (AOT)."""
    _k = _kernels()
    idt, sdt, f = "*" + _TT[spec.input_dtype], "*" + _TT[spec.state_dtype], "*fp32"
    has_idx = bool(config.get("_has_idx", False))
    sig = dict(
        q_ptr=idt, k_ptr=idt, v_ptr=idt, z_ptr=idt, adt_ptr=f, dt_ptr=f, trap_ptr=f, angles_ptr=f,
        qb_ptr=f, kb_ptr=f, d_ptr=f, mv_ptr=f, mz_ptr=f, mo_ptr=f, w_ptr=f,
        ang_in_ptr=f, ssm_in_ptr=sdt, k_in_ptr=f, v_in_ptr=idt,
        ang_out_ptr=f, ssm_out_ptr=sdt, k_out_ptr=f, v_out_ptr=idt,
        idx_ptr="*i32" if has_idx else f, out_ptr=idt, cnt_ptr="*i32",
        H="i32", G="i32", M="i32", eps="fp32", zero="i32")
    ce = _k.constexprs(spec, config)
    for name in ce:
        sig[name] = "constexpr"
    return sig, ce


def _resource_usage(cubin: bytes) -> dict:
    """REG / STACK / LOCAL / SHARED from the bundled cuobjdump --dump-resource-usage."""
    import triton
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        txt = subprocess.run([tool, "--dump-resource-usage", f.name], capture_output=True,
                             text=True, check=True).stdout

    def get(key):
        m = re.search(rf"\b{key}:(\d+)", txt)
        return int(m.group(1)) if m else None
    return dict(registers=get("REG"), stack=get("STACK"), local=get("LOCAL"),
                shared_static=get("SHARED"), resource_usage=txt.strip())


def compile(spec, config, op="step", arch="sm_90a"):
    """AOT-compile the step kernel for `arch` without a GPU. Returns {"cubin": bytes,
    "registers", "spills" (local-memory bytes per thread: spills or stack), "shared"
    (bytes, dynamic incl. static), "ptx", "arch", "config"}. Run without TRITON_INTERPRET.
    op "forward": a list of such dicts, one per kernel of the chunked forward."""
    if op == "forward":
        from . import scan_fwd
        return scan_fwd.compile(spec, config, None, arch)
    if op != "step":
        raise ValueError(f"op: expected 'step' (the only one implemented), got {op!r}")
    if _interpret():
        raise RuntimeError("compile: expected a process without TRITON_INTERPRET (AOT and the "
                           "interpreter do not mix), got TRITON_INTERPRET set")
    import triton
    from triton.backends.compiler import GPUTarget
    _k = _kernels()
    m = re.fullmatch(r"sm_(\d+)a?", arch)
    if not m:
        raise ValueError(f"arch: expected 'sm_<cc>' or 'sm_<cc>a', got {arch!r}")
    sig, ce = signature(spec, config)
    ptr_idx = [i for i, t in enumerate(sig.values()) if t.startswith("*")]
    attrs = {(i,): [["tt.divisibility", 16]] for i in ptr_idx}
    src = triton.compiler.ASTSource(fn=_k.mamba3_step_kernel, signature=sig, constexprs=ce, attrs=attrs)
    k = triton.compile(src, target=GPUTarget("cuda", int(m.group(1)), 32),
                       options={"num_warps": int(config.get("num_warps", 4)),
                                "num_stages": int(config.get("num_stages", 1)),
                                **({"maxnreg": int(config["maxnreg"])} if config.get("maxnreg") else {})})
    cubin = k.asm["cubin"]
    use = _resource_usage(cubin)
    spills = (use["local"] or 0) + (use["stack"] or 0)
    return dict(cubin=cubin, registers=use["registers"], spills=spills,
                shared=int(getattr(k.metadata, "shared", 0) or 0), ptx=k.asm.get("ptx"),
                arch=arch, config=dict(config), resource_usage=use["resource_usage"])


def forward(spec, config, tensors):
    """The chunked forward: writes tensors.out and tensors.state_out
    (mamba3_kernels.scan_tensors.ScanTensors)."""
    from . import scan_fwd
    scan_fwd.forward(spec, config, tensors)


def scan_grad(spec, config, job):
    """The chunked scan's forward + backward with backward config `config` (scan_bwd.py) on a
    prepared job (autotune/scan_grad_harness.GradJob: the autograd path of mamba3_kernels.scan);
    the input gradients land in job.grads. The tuner's entry point for op "backward"."""
    job.run(config)
