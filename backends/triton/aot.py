"""Ahead-of-time builds of the scan's Triton kernels without a GPU (CI's sm_90a check), and
`jit_build`: the build the GPU actually runs, for its register and spill counts; `step_down`, the
spill guards' loop, and `Guard`, what the runtime spill guards (scan_fwd, scan_bwd_core,
scan_bwd's stages and save_y) share: when a guard is on, one memo of their decisions, the GPU
builds' spill predicate and the never-break wrapper (a failing decision warns and runs the
config as given).

Every scan module (scan_fwd, scan_bwd, scan_bwd_core) describes its launches as a list of calls
(name, kernel, args [(name, value)], constexprs, num_warps, num_stages[, maxnreg]); `build`
compiles each for the target and reads registers, spills and shared memory from the cubin. The
signature mirrors what the JIT specialises at launch (`signature`: pointers 16-byte aligned,
integer arguments equal to 1 made constants, multiples of 16 marked divisible by 16), so the
build is the one that runs for the problem the stand-in tensors describe. Run in a process
without TRITON_INTERPRET (the interpreter and AOT builds do not mix).
"""
from __future__ import annotations

import re
import warnings

import torch
import triton

from . import _interpret, _resource_usage

_TT = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32", torch.int32: "i32",
       torch.int64: "i64"}


def target(arch: str):
    """The GPUTarget of 'sm_<cc>' / 'sm_<cc>a'; raises in an interpreter process."""
    if _interpret():
        raise RuntimeError("compile: expected a process without TRITON_INTERPRET (AOT and the "
                           "interpreter do not mix), got TRITON_INTERPRET set")
    from triton.backends.compiler import GPUTarget
    m = re.fullmatch(r"sm_(\d+)a?", arch)
    if not m:
        raise ValueError(f"arch: expected 'sm_<cc>' or 'sm_<cc>a', got {arch!r}")
    return GPUTarget("cuda", int(m.group(1)), 32)


def signature(c: dict):
    """(signature, attrs, constexprs) of call `c` as the JIT specialises it at launch (Triton 3.6
    and 3.9 alike): tensors -> pointers, 16-byte aligned; an int equal to 1 -> the constant 1; an
    int that is a multiple of 16 (0 included) -> marked divisible by 16; floats -> fp32."""
    sig, attrs, consts = {}, {}, dict(c["constexprs"])
    for i, (name, v) in enumerate(c["args"]):
        if isinstance(v, torch.Tensor):
            sig[name] = "*" + _TT[v.dtype]
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif isinstance(v, float):
            sig[name] = "fp32"
        elif v == 1 and not isinstance(v, bool):
            sig[name] = "constexpr"
            consts[name] = 1
        else:
            sig[name] = "i32"
            if v % 16 == 0:
                attrs[(i,)] = [["tt.divisibility", 16]]
    for name in c["constexprs"]:
        sig[name] = "constexpr"
    # the signature is read in the kernel's parameter order, every parameter present: a defaulted
    # constexpr the call leaves out gets its default (the JIT's behaviour); without this the later
    # constexprs shifted into its place and the build was a different program
    params = c["kernel"].params
    for p in params:
        if p.is_constexpr and p.name not in sig:
            if not p.has_default:
                raise ValueError(f"{c['name']}: constexpr {p.name} has no value and no default")
            sig[p.name] = "constexpr"
            consts[p.name] = p.default
    extra = set(sig) - {p.name for p in params}
    if extra:
        raise ValueError(f"{c['name']}: arguments {sorted(extra)} are not parameters of the kernel")
    sig = {p.name: sig[p.name] for p in params}
    return sig, attrs, consts


def build(calls: list, arch: str = "sm_90a") -> list:
    """One dict per call: name, run (if the call has it), registers, spills (local + stack bytes
    per thread), shared (bytes), num_warps, cubin_bytes."""
    tgt = target(arch)
    res = []
    for c in calls:
        if "kernel" not in c:   # another DSL's call in a Triton plan (e.g. the TileLang phase 4)
            continue
        sig, attrs, consts = signature(c)
        src = triton.compiler.ASTSource(fn=c["kernel"], signature=sig, constexprs=consts, attrs=attrs)
        opts = {"num_warps": c["num_warps"], "num_stages": c.get("num_stages", 1)}
        if c.get("maxnreg"):
            opts["maxnreg"] = c["maxnreg"]
        k = triton.compile(src, target=tgt, options=opts)
        use = _resource_usage(k.asm["cubin"])
        row = dict(name=c["name"], registers=use["registers"], spills=(use["local"] or 0) + (use["stack"] or 0),
                   shared=int(getattr(k.metadata, "shared", 0) or 0), num_warps=c["num_warps"],
                   cubin_bytes=len(k.asm["cubin"]))
        if "run" in c:
            row["run"] = c["run"]
        res.append(row)
    return res


def jit_build(c: dict):
    """The JIT's own build of call `c` for this machine's GPU (built, not launched; Triton caches
    it for the launch that follows), with its handles loaded: `.n_regs`, `.n_spills` (bytes)."""
    extra = {"maxnreg": c["maxnreg"]} if c.get("maxnreg") else {}
    k = c["kernel"].warmup(*[v for _, v in c["args"]], grid=c["grid"], **c["constexprs"],
                           num_warps=c["num_warps"], num_stages=c.get("num_stages", 1), **extra)
    k._init_handles()
    return k


def step_down(config: dict, spilled_of, fallback) -> dict:
    """The spill guard's loop: `config` stepped down by `fallback(config, spilled names)` while
    `spilled_of(config)` (the names of the kernels that spill when built for it) is not empty
    and something is left to give up."""
    cfg = config
    while True:
        spilled = spilled_of(cfg)
        nxt = fallback(cfg, spilled) if spilled else None
        if nxt is None:
            return cfg
        cfg = nxt


_DECIDED: dict = {}   # (module, *key) -> the config a module's spill guard decided for it


def memo_key(module: str, items) -> tuple:
    """The memo key of a guard's decision: (module, *items), a dict by its items; an item that
    does not hash (configs hold scalars; a caller's may not) by its repr (a dict: of its sorted
    items)."""
    return (module, *map(_part, items))


def _part(x):
    p = tuple(x.items()) if isinstance(x, dict) else x
    try:
        hash(p)
        return p
    except TypeError:
        return repr(sorted(x.items()) if isinstance(x, dict) else x)


class Guard:
    """One module's runtime spill guard: before the first launch of a config the JIT builds its
    kernels (`gpu_spills`), and the module's spill-free step-down (`decide`) is remembered per
    key in the memo every guard shares; the guard never breaks a run (`remembered`)."""

    def __init__(self, module: str):
        self.module = module

    def active(self, config: dict, device) -> bool:
        """Whether `config` asks for the guard (SPILL_GUARD) and runs on a GPU build (the
        interpreter has no registers; other devices no builds)."""
        return bool(config.get("SPILL_GUARD")) and not _interpret() and device.type == "cuda"

    def remembered(self, key, config: dict, decide) -> dict:
        """The config decided for (this module, *key), else decide() remembered; where deciding
        raises, a warning and `config` as given (remembered too: the guard must never break a
        run, and warns once per key)."""
        k = memo_key(self.module, key)
        cfg = _DECIDED.get(k)
        if cfg is None:
            try:
                cfg = decide()
            except Exception as e:  # noqa: BLE001 -- the guard must never break a run
                warnings.warn(f"{self.module} spill guard failed ({type(e).__name__}: {e}); running the config "
                              "as given")
                cfg = config
            _DECIDED[k] = cfg
        return cfg

    def gpu_spills(self, c: dict) -> bool:
        """Whether the JIT's build of call `c` for this GPU spills (`jit_build`); False, with a
        warning, when it cannot be built or inspected."""
        try:
            return bool(getattr(jit_build(c), "n_spills", 0))
        except Exception as e:  # noqa: BLE001 -- the guard must never break a run
            warnings.warn(f"{self.module} spill guard: could not inspect the build of {c['name']} "
                          f"({type(e).__name__}: {e}); taking it as spill-free")
            return False
