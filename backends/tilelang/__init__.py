"""TileLang backend: the decode step (SPEC §5), the backward core's dq / dkv walks
(scan_bwd_core_chunk.py, with scan_bwd_core.py pairing them with the Triton core's other
kernels; the scan backward's CORE_IMPL), and the chunked forward's phase 4
(scan_chunk_output.py: the Triton forward's OUT_IMPL "tilelang", opt-in).

Protocol: see backends/__init__.py. Imports without tilelang installed: tilelang is imported
only inside the functions that need it and by `step.py`, which holds the kernel.

Running needs a CUDA GPU of compute capability >= 9.0. `compile` lowers and builds the cubin
without any GPU (for sm_90a, through the system nvcc; CPU-TOOLCHAINS.md §3).

Config knobs (`space`): `threads` per CTA; `cols`, the contiguous state columns one thread owns
(a multiple of the 16-byte vector); `block_p`, the state rows held in registers per P tile;
`prefetch` (0/1, default 0), all per-head loads in one round trip before the first barrier.
Kernels are compiled per (spec, H, G, in-place, config); B and the state pool size M are dynamic.
"""
import functools
import importlib
import os
import subprocess
import sys
import time

from mamba3_kernels.backends import common_support, dsl_importable, gpu_reason

NAME = "tilelang"
MAX_ELEMS_PER_THREAD = 128         # fp32 state elements a thread holds in registers
MAX_SHARED = 160 * 1024


def _state_bytes(spec) -> int:
    return 4 if spec.state_dtype == "float32" else 2


def available():
    ok, why = dsl_importable("tilelang")
    if not ok:
        return False, why
    ok, why = gpu_reason()
    if not ok:
        return False, f"compile-only: {why}"
    return True, why


def pow2(x: int) -> int:
    return 1 if x <= 1 else 1 << (int(x) - 1).bit_length()


def geometry(N: int, P: int, threads: int, block_p: int, cols: int):
    """Tile geometry of the step kernel: (Npad, tpr, rows_per_pass, bpp, n_tiles).

    tpr threads per state row (a power of two <= 32), Npad = tpr * cols >= N, bpp = block_p
    rounded up to whole passes of rows_per_pass = threads / tpr rows, n_tiles = ceil(P / bpp).
    """
    tpr = pow2(-(-N // cols))
    if tpr > 32:
        raise ValueError(f"cols: expected cols * 32 >= N={N}, got cols={cols}")
    if threads % 32 or threads % tpr:
        raise ValueError(f"threads: expected a multiple of 32 and of {tpr}, got {threads}")
    npad = tpr * cols
    rpp = threads // tpr
    bp = max(1, min(block_p, P))
    bpp = -(-bp // rpp) * rpp
    n_tiles = -(-P // bpp)
    return npad, tpr, rpp, bpp, n_tiles


def _geometry(spec, cfg):
    return geometry(spec.d_state, spec.head_dim, cfg["threads"], cfg["block_p"], cfg["cols"])


def shared_bytes(spec, cfg) -> int:
    """Dynamic shared memory of the kernel (bytes, fp32 arrays)."""
    npad, _, _, bpp, nt = _geometry(spec, cfg)
    R, N = spec.rank, spec.d_state
    ppad = bpp * nt
    extra = 4 * (2 * R * npad + R * ppad + ppad) if cfg.get("prefetch") else 0
    return 4 * (N + 3 * R * npad + 2 * ppad + 4 * R * ppad + R) + extra


def supports(spec, op="step"):
    """(ok, reason) for running `op` on `spec` (memoised per (spec, op))."""
    return _supports(spec, op)


@functools.lru_cache(maxsize=None)
def _supports(spec, op):
    ok, why = common_support(spec, op)
    if not ok:
        return ok, why
    if spec.varlen:
        return False, "varlen does not apply to the decode step"
    try:
        cfg = default_config(spec, None, op)
        _geometry(spec, cfg)
    except ValueError as e:
        return False, str(e)
    if shared_bytes(spec, cfg) > MAX_SHARED:
        return False, f"needs {shared_bytes(spec, cfg)} bytes of shared memory (> {MAX_SHARED})"
    return True, ""


# ------------------------------------------------------------------------------------------
# configs

def _vec(spec) -> int:
    """State elements per 16-byte vector."""
    return 16 // _state_bytes(spec)


def _fit_cols(N: int, cols: int) -> int:
    """cols widened until at most 32 threads share a state row."""
    while -(-N // cols) > 32:
        cols *= 2
    return cols


def _elems(spec, cfg) -> int:
    npad, _, _, bpp, _ = _geometry(spec, cfg)
    return bpp * npad // cfg["threads"]


def _block_p(spec, threads, cols, elems=64) -> int:
    """The whole head if a thread then holds <= `elems` state elements, else balanced tiles
    of about that size (e.g. P = 64, N = 128, 64 threads: 32 rows; P = 48: 24 rows)."""
    P = spec.head_dim
    npad, _, rpp, _, _ = geometry(spec.d_state, P, threads, P, cols)
    rows = max(rpp, (elems * threads // npad) // rpp * rpp)
    if rows >= P:
        return P
    nt = -(-P // rows)
    return -(-(-(-P // nt)) // rpp) * rpp


# Measured on the H100 (bench/results/tilelang_step_configs.json, N=128 P=64 fp32 state,
# R=1 and R=4, us per step): at B=64 (2048 CTAs) 64-thread CTAs with 32-row tiles and 32-byte
# thread chunks (cols 8) are best (R=4: 63.8 vs 92.9 for 128 threads / 64 rows / cols 16;
# R=1: 53.6 vs 74.7); at B=1 (32 CTAs) one 128-thread CTA over the whole head with 16-byte
# chunks (cols 4) is best (R=4 8.4 us, R=1 5.5 us). Wide chunks (64 B or more) are slow.
FULL_WAVE_CTAS = 4 * 132          # about one wave of 128-thread CTAs on an H100


def default_config(spec, problem=None, op="step"):
    """Few CTAs (B*H <= ~one wave, or problem unknown): 128 threads, one 16-byte vector per
    thread chunk, the whole head in one tile when that is <= 64 state elements per thread.
    Many CTAs: 64 threads, 32-byte chunks, tiles of ~64 elements per thread (more CTAs
    resident per SM hide the per-CTA latency chain)."""
    v, N = _vec(spec), spec.d_state
    many = problem is not None and problem.batch * problem.nheads > FULL_WAVE_CTAS
    threads, cols = (64, _fit_cols(N, 2 * v)) if many else (128, _fit_cols(N, v))
    return dict(threads=threads, block_p=_block_p(spec, threads, cols), cols=cols)


def space(spec, problem=None, op="step"):
    """Default first (for `problem`) and its `prefetch` variant, then threads in {64, 128, 256}
    x cols in {1, 2, 4} 16-byte vectors x block_p in {tiles of ~64 elements per thread, whole
    head}, keeping <= 128 state elements per thread; the two batch-regime defaults also with
    prefetch; at most 16.

    `prefetch` (0/1): issue every per-head global load (q, k, biases, kprev, v, vprev, z,
    MIMO_V) in one round trip into shared memory before the first barrier, instead of loading
    q/k/kprev with the rotation and v/MIMO_V after it (two to three fewer dependent DRAM round
    trips per CTA: meant for small batches, where that latency is the step's time). Compiled
    and reviewed, not yet timed on a GPU, hence not a default."""
    if op != "step":
        return []
    from mamba3_kernels.spec import Problem
    v, N, P = _vec(spec), spec.d_state, spec.head_dim
    d = default_config(spec, problem, op)
    small = default_config(spec, Problem(1, 1, 1, 1, 1), op)
    many = default_config(spec, Problem(1 << 16, 1, 1, 1, 1), op)
    out = [d, dict(d, prefetch=1)]
    for c in (small, many):
        for cfg in (c, dict(c, prefetch=1)):
            if cfg not in out:
                out.append(cfg)
    for threads in (64, 128, 256):
        for c in (2 * v, v, 4 * v):
            cols = _fit_cols(N, c)
            try:
                bps = (_block_p(spec, threads, cols), P)
            except ValueError:
                continue
            for bp in bps:
                cfg = dict(threads=threads, block_p=bp, cols=cols)
                try:
                    e = _elems(spec, cfg)
                except ValueError:
                    continue
                if e > MAX_ELEMS_PER_THREAD or shared_bytes(spec, cfg) > MAX_SHARED or cfg in out:
                    continue
                out.append(cfg)
    return out[:16]


# ------------------------------------------------------------------------------------------
# entry points

def _kernels():
    """The kernel module `step.py`, imported on first use. Importing a submodule binds its name
    on the package, which would shadow the protocol function `step`: rebind the function."""
    name = __name__ + ".step"
    mod = sys.modules.get(name)
    if mod is None:
        mod = importlib.import_module(name)
    globals()["step"] = _step_entry
    return mod


def _step_entry(spec, config, tensors):
    """Write tensors.out and tensors.state_out (SPEC §5). See step.py for the kernel."""
    ok, why = supports(spec, "step")
    if not ok:
        raise ValueError(f"tilelang step: unsupported spec ({why}): {spec.describe()}")
    if tensors.v.shape[0] == 0:
        return
    _kernels().run(spec, config, tensors)


step = _step_entry


def _cuobjdump():
    try:
        import triton
    except Exception:
        return None
    p = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    return p if os.path.exists(p) else None


def resource_usage(cubin_path: str) -> dict:
    """registers / stack / local (spill) / static shared bytes of the cubin's kernel, via the
    cuobjdump bundled with triton (the system CUDA here has none). {} if unavailable."""
    tool = _cuobjdump()
    if tool is None:
        return {}
    try:
        txt = subprocess.run([tool, "--dump-resource-usage", cubin_path], capture_output=True,
                             text=True, timeout=60).stdout
    except Exception:
        return {}
    import re
    m = re.search(r"Function (\S+):\s*\n\s*REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", txt)
    if not m:
        return {"resource_usage_raw": txt}
    return {"function": m.group(1), "registers": int(m.group(2)), "stack": int(m.group(3)),
            "static_shared": int(m.group(4)), "local": int(m.group(5)), "spills": int(m.group(5))}


def compile(spec, config=None, op="step", arch="sm_90a", nheads=32, ngroups=1, inplace=True):
    """Lower and build the step kernel for `arch` without a GPU. Returns {"cubin": bytes,
    "cubin_path", "kernel_name", "source", "registers", "spills" (local-memory bytes per
    thread), "stack", "shared" (dynamic + static bytes), "compile_s", "config"}."""
    if op != "step":
        raise NotImplementedError(f"tilelang backend: op {op!r} not implemented yet")
    ok, why = supports(spec, op)
    if not ok:
        raise ValueError(f"tilelang step: unsupported spec ({why})")
    config = dict(config) if config is not None else default_config(spec, None, op)
    k = _kernels()
    t0 = time.time()
    kern = k.get_kernel(k.kernel_key(spec, config, inplace, nheads, ngroups), arch)
    dt = time.time() - t0
    src = kern.get_kernel_source()
    cubin, path = k.find_cubin(src, arch)
    res = {"cubin": cubin, "cubin_path": path, "kernel_name": "mamba3_step_kernel", "source": src,
           "compile_s": dt, "config": config}
    usage = resource_usage(path) if path else {}
    res.update(usage)
    res["shared"] = shared_bytes(spec, config) + usage.get("static_shared", 0)
    return res
