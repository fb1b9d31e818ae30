"""The `mamba3-kernels tune` and `mamba3-kernels bench` subcommands.

Wiring (mamba3_kernels/cli.py):

    from mamba3_kernels.autotune import commands as tune_commands
    sub = parser.add_subparsers(dest="command")
    tune_commands.add_parsers(sub)          # adds "tune" and "bench", each with set_defaults(func=...)
    args = parser.parse_args(argv)
    return args.func(args)                  # an int exit status

tune   one (spec, shape): builds, checks and times every candidate with a progress bar, prints
       the table of candidates (failures with reasons), writes the cache. Also manages the
       cache: --list, --export FILE, --import FILE, --prune-stale, --clear.
bench  a shape grid: every available backend's default config and its tuned config, upstream
       (through the hook `register_upstream`, if importable), and the memory roofline; prints a
       table, writes JSON and a PNG plot (matplotlib, if importable) under --out.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
import types
from typing import Callable, Optional

from . import cache as cache_mod

DEFAULT_BUDGET_S = 50.0   # `tune`: one (spec, shape) within a minute, cold builds included

# ----------------------------------------------------------------------------------------
# the spec of a decode step from sizes (exactly what api.step would derive from tensors)


def _stub(shape, dtype="float32"):
    return types.SimpleNamespace(shape=tuple(shape), dtype=dtype)


def step_spec_problem(B: int, H: int, N: int, P: int, R: int = 1, G: int = 1, A: int = 0, *,
                      pairing: str = "interleaved", discretization: str = "trapezoidal",
                      has_d: bool = False, has_z: bool = False, mimo_v: bool = False,
                      mimo_z: bool = False, mimo_out: bool = False, output_mode: Optional[str] = None,
                      shared_angles: bool = False, norm_eps: float = 1e-5, dtype: str = "bfloat16",
                      state_dtype: str = "float32", pool: Optional[int] = None):
    """(ScanSpec, Problem) of a decode step with these sizes, derived by spec.resolve_step from
    shape stubs, so the cache key is the one a user's call with such tensors looks up."""
    from mamba3_kernels.spec import States, resolve_step
    M = pool if pool is not None else B
    norm = output_mode == "norm_reduce"
    args = dict(
        q=_stub((B, R, G, N)), k=_stub((B, R, G, N)), v=_stub((B, H, P), dtype),
        adt=_stub((B, H)), dt=_stub((B, H)),
        trap=None if discretization == "euler" else _stub((B, H)),
        q_bias=_stub((H, R, N)), k_bias=_stub((H, R, N)),
        states=States(_stub((M, H, A)), _stub((M, H, P, N), state_dtype), _stub((M, R, H, N)), _stub((M, H, P))),
        angles=None if A == 0 else _stub((B, A) if shared_angles else (B, H, A)),
        d=_stub((H,)) if has_d else None, z=_stub((B, H, P)) if has_z else None,
        mimo_v=_stub((H, R, P)) if mimo_v else None, mimo_z=_stub((H, R, P)) if mimo_z else None,
        mimo_out=_stub((H, R, P)) if mimo_out else None, norm_weight=_stub((H, P)) if norm else None,
        state_indices=_stub((B,)) if pool is not None else None)
    return resolve_step(**args, output_mode=output_mode, pairing=pairing, discretization=discretization,
                        norm_eps=float(norm_eps), input_dtype=dtype, state_dtype=state_dtype)


def scan_spec_problem(B: int, L: int, H: int, N: int, P: int, R: int = 1, G: int = 1, A: int = 0, *,
                      pairing: str = "interleaved", discretization: str = "trapezoidal",
                      has_d: bool = False, has_z: bool = False, mimo_v: bool = False,
                      mimo_z: bool = False, mimo_out: bool = False, output_mode: Optional[str] = None,
                      shared_angles: bool = False, norm_eps: float = 1e-5, dtype: str = "bfloat16",
                      state_dtype: str = "float32", initial_states: bool = False,
                      final_states: bool = False, nseqs: Optional[int] = None, chunk_size: int = 64):
    """(ScanSpec, Problem) of a chunked scan with these sizes, derived by spec.resolve_scan from
    shape stubs (the key `mamba3_kernels.scan` looks up for such tensors). nseqs: packed varlen
    sequences (B must be 1)."""
    from mamba3_kernels.spec import States, resolve_scan
    S = nseqs if nseqs is not None else B
    norm = output_mode == "norm_reduce"
    qs = (B, L, R, G, N) if R > 1 else (B, L, G, N)
    bs = (H, R, N) if R > 1 else (H, N)
    args = dict(
        q=_stub(qs, dtype), k=_stub(qs, dtype), v=_stub((B, L, H, P), dtype),
        adt=_stub((B, H, L)), dt=_stub((B, H, L)),
        trap=None if discretization == "euler" else _stub((B, H, L)),
        q_bias=_stub(bs), k_bias=_stub(bs),
        angles=None if A == 0 else _stub((B, L, A) if shared_angles else (B, L, H, A)),
        d=_stub((H,)) if has_d else None, z=_stub((B, L, H, P), dtype) if has_z else None,
        mimo_v=_stub((H, R, P)) if mimo_v else None, mimo_z=_stub((H, R, P)) if mimo_z else None,
        mimo_out=_stub((H, R, P)) if mimo_out else None, norm_weight=_stub((H, P)) if norm else None,
        initial_states=States(_stub((S, H, A)), _stub((S, H, P, N)), _stub((S, R, H, N)),
                              _stub((S, H, P), dtype)) if initial_states else None,
        cu_seqlens=_stub((S + 1,), "int32") if nseqs is not None else None)
    return resolve_scan(**args, output_mode=output_mode, pairing=pairing, discretization=discretization,
                        final_states=final_states, norm_eps=float(norm_eps), chunk_size=chunk_size,
                        input_dtype=dtype, state_dtype=state_dtype)


def _ints(s: str, arg: str) -> list:
    try:
        out = [int(x) for x in str(s).split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{arg}: expected integers separated by commas, got {s!r}") from None
    if not out or any(v < 1 for v in out):
        raise argparse.ArgumentTypeError(f"{arg}: expected integers >= 1, got {s!r}")
    return out


def _add_spec_args(p, grid: bool):
    g = p.add_argument_group("problem (decode step)")
    if grid:
        g.add_argument("--B", type=lambda s: _ints(s, "--B"), default=[1, 8, 32, 128, 256],
                       help="batch sizes, comma separated (default 1,8,32,128,256)")
        g.add_argument("--R", type=lambda s: _ints(s, "--R"), default=[1, 4],
                       help="MIMO ranks, comma separated (default 1,4)")
        g.add_argument("--H", type=int, default=64, help="heads (default 64)")
        g.add_argument("--N", type=int, default=128, help="state size d_state (default 128)")
        g.add_argument("--P", type=int, default=64, help="head dim (default 64)")
    else:
        g.add_argument("--B", type=lambda s: _ints(s, "--B"), default=None,
                       help="batch size, or several comma separated (tuned one after another in this process)")
        g.add_argument("--R", type=lambda s: _ints(s, "--R"), default=[1],
                       help="MIMO rank (1 = SISO), or several comma separated")
        g.add_argument("--H", type=int, help="heads (required to tune)")
        g.add_argument("--N", type=int, help="state size d_state (required to tune)")
        g.add_argument("--P", type=int, help="head dim (required to tune)")
    g.add_argument("--G", type=int, default=1, help="Q/K groups (default 1)")
    g.add_argument("--L", type=int, default=1, help="sequence length (the step: 1)")
    g.add_argument("--A", type=int, default=0, help="rotary angles (default 0)")
    g.add_argument("--pairing", default="interleaved", choices=("interleaved", "half"))
    g.add_argument("--discretization", default="trapezoidal", choices=("trapezoidal", "euler"))
    g.add_argument("--has-d", action="store_true", help="skip connection D")
    g.add_argument("--has-z", action="store_true", help="gate silu(Z)")
    g.add_argument("--mimo-v", action="store_true")
    g.add_argument("--mimo-z", action="store_true")
    g.add_argument("--mimo-out", action="store_true")
    g.add_argument("--output-mode", default=None, choices=("reduce", "per_rank", "norm_reduce"),
                   help="default: inferred as the API does")
    g.add_argument("--shared-angles", action="store_true")
    g.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"))
    g.add_argument("--state-dtype", default="float32", choices=("float32", "bfloat16"))
    g.add_argument("--pool", type=int, default=None, help="state pool size M (> B: state_indices)")
    c = p.add_argument_group("problem (chunked scan, --op forward / backward)")
    c.add_argument("--initial-states", action="store_true", help="initial states in")
    c.add_argument("--final-states", action="store_true", help="final states out")
    c.add_argument("--nseqs", type=int, default=None, help="packed varlen sequences (cu_seqlens; B must be 1)")


def _spec_from(args, B: int, R: int):
    if args.op in ("forward", "backward"):
        for name in ("H", "N", "P"):
            if getattr(args, name) is None:
                raise SystemExit(f"--{name}: required to tune")
        if args.nseqs is not None and B != 1:
            raise SystemExit(f"--B: expected 1 with --nseqs (packed sequences), got {B}")
        try:
            return scan_spec_problem(B, args.L, args.H, args.N, args.P, R, args.G, args.A, pairing=args.pairing,
                                     discretization=args.discretization, has_d=args.has_d, has_z=args.has_z,
                                     mimo_v=args.mimo_v, mimo_z=args.mimo_z, mimo_out=args.mimo_out,
                                     output_mode=args.output_mode, shared_angles=args.shared_angles,
                                     dtype=args.dtype, state_dtype=args.state_dtype,
                                     initial_states=args.initial_states, final_states=args.final_states,
                                     nseqs=args.nseqs)
        except ValueError as e:
            raise SystemExit(f"invalid problem: {e}") from None
    if args.op != "step":
        raise SystemExit(f"--op: expected 'step', 'forward' or 'backward', got {args.op!r}")
    if args.L != 1:
        raise SystemExit(f"--L: expected 1 for the decode step, got {args.L}")
    for name in ("H", "N", "P"):
        if getattr(args, name) is None:
            raise SystemExit(f"--{name}: required to tune (or use --list/--export/--import/--prune-stale/--clear)")
    try:
        return step_spec_problem(B, args.H, args.N, args.P, R, args.G, args.A, pairing=args.pairing,
                                 discretization=args.discretization, has_d=args.has_d, has_z=args.has_z,
                                 mimo_v=args.mimo_v, mimo_z=args.mimo_z, mimo_out=args.mimo_out,
                                 output_mode=args.output_mode, shared_angles=args.shared_angles,
                                 dtype=args.dtype, state_dtype=args.state_dtype, pool=args.pool)
    except ValueError as e:
        raise SystemExit(f"invalid problem: {e}") from None


def _backends_arg(s):
    return None if s is None else [b.strip() for b in s.split(",") if b.strip()]


# ----------------------------------------------------------------------------------------
# tune

def add_parsers(subparsers) -> None:
    """Add the `tune` and `bench` subcommands to an argparse subparsers object."""
    p = subparsers.add_parser(
        "tune", help="tune one (spec, shape) over every backend and config; manage the tuning cache",
        description="Build, check (oracle + bitwise repeatability) and time every candidate "
                    "(backend x config) for one decode-step problem; print the table of candidates "
                    "and store the winner in the tuning cache.")
    p.add_argument("--op", default="step", choices=("step", "forward", "backward"),
                   help="step: the decode step; forward: the chunked scan forward (give --L); backward: "
                        "its backward's config (timed as forward + backward; what scan picks when bwd_config=None)")
    _add_spec_args(p, grid=False)
    t = p.add_argument_group("tuning")
    t.add_argument("--backends", default=None, help="comma separated (default: all available)")
    t.add_argument("--cache", default=None, help=f"cache file (default ${cache_mod.ENV_VAR} or {cache_mod.default_path()})")
    t.add_argument("--no-write", action="store_true", help="do not store the result")
    t.add_argument("--strategy", default="auto", choices=("auto", "exhaustive", "halving"))
    t.add_argument("--reps", type=int, default=25, help="samples per median (>= 20)")
    t.add_argument("--confirm-top", type=int, default=3)
    t.add_argument("--confirm-reps", type=int, default=40)
    t.add_argument("--compile-timeout", type=float, default=120.0, help="seconds per build")
    t.add_argument("--workers", type=int, default=None, help="build threads (default min(8, CPUs))")
    t.add_argument("--max-candidates", type=int, default=64)
    t.add_argument("--seed", type=int, default=None, help="input seed (default: fresh)")
    t.add_argument("--remeasure", action="store_true", help="re-time all passing candidates and report the regret")
    t.add_argument("--budget", type=float, default=DEFAULT_BUDGET_S,
                   help=f"wall-clock seconds for the whole tuning run, cold builds included (default "
                        f"{DEFAULT_BUDGET_S:g}; builds run most promising first and stop at 60 %% of it, checks at 90 %%, "
                        f"timing at its end; 0 = no budget)")
    t.add_argument("--device", default=None)
    t.add_argument("--json", default=None, help="also write the full result as JSON here")
    t.add_argument("--no-progress", action="store_true")
    c = p.add_argument_group("cache management (no tuning)")
    c.add_argument("--list", action="store_true", help="list the cache entries")
    c.add_argument("--export", metavar="FILE", default=None, help="write the entries (this GPU's only with --this-gpu)")
    c.add_argument("--import", dest="import_", metavar="FILE", default=None, help="merge entries from FILE")
    c.add_argument("--merge", nargs="+", metavar="FILE", default=None,
                   help="combine cache files tuned by separate processes with different DSLs on the same GPU "
                        "(e.g. Triton+CuTe and Triton+TileLang) into entries for all DSLs (autotune/merge.py)")
    c.add_argument("--this-gpu", action="store_true", help="--export/--list: only this GPU's entries")
    c.add_argument("--prune-stale", action="store_true", help="drop this GPU's entries of other versions/drivers")
    c.add_argument("--clear", action="store_true", help="delete every entry")
    p.set_defaults(func=cmd_tune)

    b = subparsers.add_parser(
        "bench", help="time every backend (default and tuned configs) vs upstream vs roofline on a shape grid",
        description="Benchmark the decode step on a shape grid: each available backend's default "
                    "and tuned config, upstream if importable, and the memory roofline. Prints a "
                    "table, saves JSON and a PNG plot.")
    b.add_argument("--op", default="step", choices=("step",))
    _add_spec_args(b, grid=True)
    o = b.add_argument_group("bench")
    o.add_argument("--backends", default=None, help="comma separated (default: all available)")
    o.add_argument("--cache", default=None, help="tuning cache file")
    o.add_argument("--tune", choices=("missing", "always", "never"), default="missing",
                   help="tune shapes without a cache entry (default), re-tune all, or use only cached entries")
    o.add_argument("--reps", type=int, default=50, help="samples per median (>= 20)")
    o.add_argument("--no-upstream", action="store_true")
    o.add_argument("--peak-bw", type=float, default=None, help="peak HBM bandwidth in GB/s (default: by GPU name)")
    o.add_argument("--overhead", action="store_true", help="also measure the host overhead of api.step vs a direct call")
    o.add_argument("--device", default=None)
    o.add_argument("--out", default=os.path.join("bench", "results"), help="folder for JSON and PNG")
    o.add_argument("--no-plot", action="store_true")
    o.add_argument("--no-progress", action="store_true")
    b.set_defaults(func=cmd_bench)


def _env_match(env):
    if env is None:
        return None
    cur = env.as_dict()
    return lambda e: all(e["key"].get(f) == cur[f] for f in ("gpu", "cc", "sm_count"))


def _list(c: cache_mod.Cache, match) -> str:
    lines = [f"{c.path}:"]
    n = 0
    for ks, e in sorted(c.load().items()):
        if match is not None and not match(e):
            continue
        n += 1
        k = e["key"]
        spec = k["spec"]
        lines.append(f"  [{k['op']}] {k['gpu']} (cc {k['cc']}) {' '.join(f'{f}={v}' for f, v in k['shape'].items())} "
                     f"{spec.get('input_dtype')}/{spec.get('state_dtype')} -> {e['backend']} {e['config']} "
                     f"{e.get('time_us')} us (runners-up: {len(e.get('runners_up', []))}, "
                     f"mamba3-kernels {k['mamba3_kernels']})")
    lines.append(f"{n} entr{'y' if n == 1 else 'ies'}")
    return "\n".join(lines)


def cmd_tune(args) -> int:
    c = cache_mod.get_cache(args.cache)
    managing = args.list or args.export or args.import_ or args.merge or args.prune_stale or args.clear
    if managing:
        env = None
        if args.this_gpu or args.prune_stale:
            env = cache_mod.current_environment(args.device)
            if env is None:
                print("--this-gpu/--prune-stale: no CUDA GPU visible", file=sys.stderr)
                return 2
        match = _env_match(env) if args.this_gpu else None
        if args.import_:
            try:
                n = c.import_entries(args.import_)
            except ValueError as e:
                print(f"--import: {e}", file=sys.stderr)
                return 2
            print(f"imported {n} entries from {args.import_} into {c.path}")
        if args.merge:
            from .merge import merge_files
            try:
                n, m = merge_files(args.merge, c)
            except ValueError as e:
                print(f"--merge: {e}", file=sys.stderr)
                return 2
            print(f"merged {len(args.merge)} files into {c.path}: {n} entries, {m} combined across processes")
        if args.prune_stale:
            print(f"pruned {c.prune_stale(env)} stale entries of {env.gpu} from {c.path}")
        if args.clear:
            print(f"cleared {c.clear()} entries from {c.path}")
        if args.export:
            n = c.export(args.export, match)
            print(f"exported {n} entries from {c.path} to {args.export}")
        if args.list:
            print(_list(c, match))
        return 0
    if args.B is None:
        raise SystemExit("--B: required to tune (or use --list/--export/--import/--prune-stale/--clear)")
    shapes = [(B, R) for R in args.R for B in args.B]
    problems = [_spec_from(args, B, R) for B, R in shapes]   # every shape checked before any tuning
    from .tuner import tune
    from .warmup import warm_up
    budget = args.budget if args.budget and args.budget > 0 else None
    if len(problems) > 1 or budget is not None:
        w = warm_up(args.device, _backends_arg(args.backends), args.op)
        print(f"process warm-up (once per process, not part of any shape's tuning time): {w['seconds']:.1f} s "
              f"({', '.join(f'{k} {v:.1f}' for k, v in w['parts'].items())})", flush=True)
    results, status = [], 0
    for (B, R), (spec, problem) in zip(shapes, problems):
        print(f"tuning {args.op}: {problem.describe()}\n  {spec.describe()}", flush=True)
        try:
            res = tune(args.op, spec, problem, args.device, backends=_backends_arg(args.backends), cache=c,
                       write=not args.no_write, strategy=args.strategy, reps=args.reps,
                       confirm_top=args.confirm_top, confirm_reps=args.confirm_reps,
                       compile_timeout=args.compile_timeout, compile_workers=args.workers,
                       max_candidates=args.max_candidates, progress=not args.no_progress, seed=args.seed,
                       remeasure=args.remeasure, budget_s=budget)
        except ValueError as e:
            print(f"tune: {e}", file=sys.stderr)
            return 2
        if res.env is not None:
            print(f"device: {res.env.describe()}")
        print(res.table(), flush=True)
        results.append(res)
        if res.best is None:
            status = 1
    if len(results) > 1:
        print("\nshape            chosen     time us   tuned in s  re-measured")
        for (B, R), res in zip(shapes, results):
            ch = res.best.backend if res.best else "-"
            t = f"{res.best.best_us:9.2f}" if res.best else f"{'-':>9}"
            rg = f"{res.regret * 100:+.1f}%" if res.regret is not None else "-"
            print(f"B={B:<5} R={R:<3}     {ch:<9} {t}   {res.seconds:9.1f}  {rg}")
    if args.json:
        data = results[0].to_json() if len(results) == 1 else {"results": [r.to_json() for r in results]}
        _write_json(args.json, data)
        print(f"wrote {args.json}")
    return status


def _write_json(path, data):
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(data, f, indent=1, default=str)
        f.write("\n")
    os.replace(tmp, path)


# ----------------------------------------------------------------------------------------
# bench

# upstream kernels: op -> fn(spec, problem, harness) -> (timing.Bench | None, reason)
UPSTREAM: dict = {}


def register_upstream(op: str, fn: Callable) -> None:
    """Hook for the upstream (mamba_ssm) kernels in `bench`: fn(spec, problem, harness) returns
    (Bench, "") to time upstream on the harness's inputs, or (None, why not)."""
    UPSTREAM[op] = fn


def _upstream_step(spec, problem, harness):
    try:
        import mamba_ssm  # noqa: F401
    except Exception as e:
        return None, f"mamba_ssm not importable ({type(e).__name__})"
    return None, ("mamba_ssm is importable but no adapter is registered for its Mamba-3 step: "
                  "autotune.commands.register_upstream('step', fn)")


register_upstream("step", _upstream_step)

# peak HBM bandwidth, GB/s, by a substring of the device name (first match wins)
PEAK_BW = (("H200", 4800.0), ("GH200", 4000.0), ("H100 NVL", 3900.0), ("H100 PCIe", 2000.0),
           ("H100", 3350.0), ("H800", 3350.0), ("H20", 4000.0), ("B200", 8000.0), ("B100", 8000.0),
           ("A100-SXM4-80GB", 2039.0), ("A100 80GB PCIe", 1935.0), ("A100", 1555.0), ("L40S", 864.0),
           ("L4", 300.0))


def peak_bandwidth(gpu_name: str) -> Optional[float]:
    for sub, bw in PEAK_BW:
        if sub.lower() in gpu_name.lower():
            return bw
    return None


def copy_bandwidth(device, nbytes: int = 1 << 30) -> Optional[float]:
    """Measured device-to-device copy bandwidth in GB/s (read + write), or None without CUDA."""
    import torch
    if torch.device(device).type != "cuda":
        return None
    a = torch.empty(nbytes // 2, dtype=torch.uint8, device=device)
    b = torch.empty_like(a)
    for _ in range(3):
        b.copy_(a)
    s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    s.record()
    for _ in range(10):
        b.copy_(a)
    e.record()
    torch.cuda.synchronize(device)
    t = s.elapsed_time(e) / 1e3 / 10
    del a, b
    return 2 * (nbytes // 2) / t / 1e9


def _time_interleaved(timer, benches: dict, reps: int):
    """({name: samples}, {name: failure}): `reps` samples each, in rounds of 10 across all benches."""
    out = {k: [] for k in benches}
    failed = {}
    for done in range(0, reps, 10):
        n = min(10, reps - done)
        for k, b in benches.items():
            if k in failed:
                continue
            try:
                out[k] += list(timer.measure(b, n))
            except Exception as e:  # noqa: BLE001
                from .check import classify
                failed[k] = classify(e)
    return out, failed


def run_bench(args) -> dict:
    import torch
    from .cache import current_environment
    from .check import StepHarness
    from .timing import default_timer

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    env = current_environment(device)
    timer = default_timer(device)
    gpu = env.gpu if env else "cpu"
    peak = args.peak_bw or peak_bandwidth(gpu)
    copy_bw = copy_bandwidth(device)
    c = cache_mod.get_cache(args.cache)
    rows, overhead = [], None
    shapes = [(R, B) for R in args.R for B in args.B]
    for si, (R, B) in enumerate(shapes):
        spec, problem = _spec_from(args, B, R)
        label = f"R={R} B={B}"
        if not args.no_progress:
            print(f"[{si + 1}/{len(shapes)}] {label}: {problem.describe()}", file=sys.stderr, flush=True)
        harness = StepHarness(spec, problem, device)
        with harness.device_context():
            overhead = _bench_shape(args, harness, spec, problem, R, B, label, env, timer, peak, copy_bw, c,
                                    rows, overhead)
        harness.close()
        del harness
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    return {"op": "step", "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "env": env.as_dict() if env else {"gpu": "cpu"}, "timer": getattr(timer, "name", ""),
            "peak_bandwidth_GBps": peak, "copy_bandwidth_GBps": copy_bw, "rows": rows,
            "overhead": overhead, "args": {k: v for k, v in vars(args).items() if k != "func"}}


def _bench_shape(args, harness, spec, problem, R, B, label, env, timer, peak, copy_bw, c, rows, overhead):
    """Time one shape: each backend's default and tuned configs, upstream; append to rows."""
    from mamba3_kernels import backends as reg
    from .check import classify
    from .space import Candidate, candidates
    from .timing import median
    from .tuner import tune
    device = harness.device
    nbytes = harness.bytes_per_set()
    roof_us = nbytes / (peak * 1e9) * 1e6 if peak else None
    copy_us = nbytes / (copy_bw * 1e9) * 1e6 if copy_bw else None
    base = {"shape": {"B": B, "H": problem.nheads, "G": problem.ngroups, "N": spec.d_state,
                      "P": spec.head_dim, "R": R, "pool": problem.nseqs},
            "label": label, "bytes": nbytes, "roofline_us": roof_us, "copy_roofline_us": copy_us}
    cands, skipped = candidates("step", spec, problem, device, _backends_arg(args.backends))
    for name, why in skipped:
        rows.append(dict(base, backend=name, kind="default", status="skipped", reason=why))
    benches, meta, sources = {}, {}, {}
    for cand in [c_ for c_ in cands if c_.is_default]:
        key = (cand.backend, "default")
        try:
            harness.compile(cand)
            ok, why = harness.check(cand)
        except Exception as e:  # noqa: BLE001
            ok, why = False, classify(e)
        if not ok:
            rows.append(dict(base, backend=cand.backend, kind="default", config=cand.config,
                             status="failed", reason=why))
            continue
        benches[key] = harness.bench(cand)
        meta[key] = cand
    # each backend's tuned config: from the cache entry (winner + runners-up), or tuned now
    tuned, chosen = {}, None
    entry = None
    if args.tune != "always" and env is not None:
        entry, _ = c.find(cache_mod.make_key("step", spec, problem, env), nearest=False)
    if entry is not None:
        chosen = entry["backend"]
        tuned[chosen] = (dict(entry["config"]), "cache")
        for ru in entry.get("runners_up", []):
            tuned.setdefault(ru["backend"], (dict(ru["config"]), "cache (runner-up)"))
    elif args.tune != "never" and cands:
        res = tune("step", spec, problem, device, backends=_backends_arg(args.backends), cache=c,
                   harness=harness, progress=not args.no_progress)
        chosen = res.best.backend if res.best is not None else None
        for r in res.ranked():
            tuned.setdefault(r.backend, (dict(r.config), "tuned now"))
    for name, (cfg, src) in tuned.items():
        cand = Candidate(name, cfg, reg.get(name))
        try:
            harness.compile(cand)
            ok, why = harness.check(cand)
            if not ok:
                raise RuntimeError(f"the cached config fails its check: {why}")
            benches[(name, "tuned")] = harness.bench(cand)
            meta[(name, "tuned")] = cand
            sources[name] = src + (", chosen" if name == chosen else "")
        except Exception as e:  # noqa: BLE001
            rows.append(dict(base, backend=name, kind="tuned", config=cfg, status="failed", reason=classify(e)))
    if not args.no_upstream and "step" in UPSTREAM:
        ub, why = UPSTREAM["step"](spec, problem, harness)
        if ub is not None:
            benches[("upstream", "upstream")] = ub
        else:
            rows.append(dict(base, backend="upstream", kind="upstream", status="skipped", reason=why))
    samples, failed = _time_interleaved(timer, benches, max(20, args.reps))
    for key, xs in samples.items():
        name, kind = key
        cand = meta.get(key)
        row = dict(base, backend=name, kind=kind, config=cand.config if cand else None)
        if key in failed or not xs:
            row.update(status="failed", reason=failed.get(key, "no samples"))
        else:
            m = median(xs)
            row.update(status="ok", time_us=m, samples=len(xs), mode=getattr(benches[key], "mode", ""),
                       gbps=nbytes / (m * 1e-6) / 1e9,
                       frac_roofline=(roof_us / m) if roof_us else None,
                       frac_copy=(copy_us / m) if copy_us else None)
            if kind == "tuned":
                row["source"] = sources.get(name, "")
        rows.append(row)
    if args.overhead and overhead is None and benches:
        overhead = _overhead(harness, spec, problem, meta)
    for b in benches.values():
        if hasattr(b, "release"):
            b.release()
    return overhead


def _overhead(harness, spec, problem, meta) -> dict:
    """Host microseconds per call: api.step (validation + warm dispatch) vs the backend's step
    on prepared tensors vs dispatch.select alone. Measured, never asserted."""
    import torch
    from mamba3_kernels import api, dispatch
    from mamba3_kernels.reference.inputs import spec_options
    case = harness.case
    opts = spec_options(spec)
    args = dict(case.args)
    mod, cfg, src = dispatch.select("step", spec, problem, harness.device)
    t = harness._fresh()
    n = 2000

    def loop(fn):
        for _ in range(50):
            fn()
        if harness.device.type == "cuda":
            torch.cuda.synchronize(harness.device)
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        if harness.device.type == "cuda":
            torch.cuda.synchronize(harness.device)
        return (time.perf_counter() - t0) * 1e6 / n

    direct = loop(lambda: mod.step(spec, cfg, t))
    full = loop(lambda: api.step(**args, **opts, validate=False))
    sel = loop(lambda: dispatch.select("step", spec, problem, harness.device))
    return {"backend": mod.NAME, "config": cfg, "source": src, "direct_us": direct, "api_us": full,
            "select_us": sel, "api_minus_direct_us": full - direct}


def bench_table(data: dict) -> str:
    head = f"{'shape':<12} {'backend':<9} {'kind':<8} {'us':>9} {'GB/s':>8} {'%roof':>6} {'%copy':>6}  config / note"
    lines = [head, "-" * len(head)]
    for r in data["rows"]:
        if r.get("status") == "ok":
            fr = f"{100 * r['frac_roofline']:5.1f}%" if r.get("frac_roofline") else f"{'-':>6}"
            fc = f"{100 * r['frac_copy']:5.1f}%" if r.get("frac_copy") else f"{'-':>6}"
            cfg = " ".join(f"{k}={v}" for k, v in sorted((r.get("config") or {}).items()))
            lines.append(f"{r['label']:<12} {r['backend']:<9} {r['kind']:<8} {r['time_us']:9.3f} "
                         f"{r['gbps']:8.1f} {fr} {fc}  {cfg} {r.get('source', '')}".rstrip())
        else:
            lines.append(f"{r['label']:<12} {r['backend']:<9} {r['kind']:<8} {'-':>9} {'':>8} {'':>6} {'':>6}  "
                         f"{r['status']}: {r.get('reason', '')}")
    if data.get("peak_bandwidth_GBps"):
        lines.append(f"%roof: the time of moving the step's bytes at {data['peak_bandwidth_GBps']:.0f} GB/s "
                     "(peak HBM) / the measured time")
    if data.get("copy_bandwidth_GBps"):
        lines.append(f"%copy: the same at the measured device copy bandwidth, {data['copy_bandwidth_GBps']:.0f} GB/s")
    ov = data.get("overhead")
    if ov:
        lines.append(f"host overhead per call: api.step {ov['api_us']:.1f} us, direct {ov['backend']}.step "
                     f"{ov['direct_us']:.1f} us (api - direct = {ov['api_minus_direct_us']:.1f} us), "
                     f"warm dispatch.select {ov['select_us']:.2f} us")
    return "\n".join(lines)


def bench_plot(data: dict, path: str) -> Optional[str]:
    """A PNG of time vs batch, one panel per rank; None if matplotlib is missing."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception:
        return None
    ok = [r for r in data["rows"] if r.get("status") == "ok"]
    ranks = sorted({r["shape"]["R"] for r in data["rows"]}) or [1]
    fig, axes = plt.subplots(1, len(ranks), figsize=(6 * len(ranks), 4.5), squeeze=False)
    for ax, R in zip(axes[0], ranks):
        series = {}
        for r in ok:
            if r["shape"]["R"] == R:
                series.setdefault(f"{r['backend']} {r['kind']}", []).append((r["shape"]["B"], r["time_us"]))
        for name, pts in sorted(series.items()):
            pts.sort()
            style = "--" if name.endswith("default") else (":" if "upstream" in name else "-")
            ax.plot([p[0] for p in pts], [p[1] for p in pts], style, marker="o", label=name)
        roof = sorted({(r["shape"]["B"], r["roofline_us"]) for r in data["rows"]
                       if r["shape"]["R"] == R and r.get("roofline_us")})
        if roof:
            ax.plot([p[0] for p in roof], [p[1] for p in roof], "k-", lw=2, alpha=0.5, label="HBM roofline")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("batch B")
        ax.set_ylabel("us per step")
        ax.set_title(f"decode step, R={R} ({data['env'].get('gpu', '')})")
        ax.grid(True, which="both", alpha=0.3)
        if series or roof:
            ax.legend(fontsize=8)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def cmd_bench(args) -> int:
    if args.reps < 20:
        print(f"--reps: expected >= 20 (a median of at least 20 samples), got {args.reps}", file=sys.stderr)
        return 2
    data = run_bench(args)
    print(bench_table(data))
    slug = "".join(ch if ch.isalnum() else "-" for ch in data["env"].get("gpu", "cpu")).strip("-").lower()
    stem = os.path.join(args.out, f"bench-step-{slug}-{time.strftime('%Y%m%d-%H%M%S')}")
    _write_json(stem + ".json", data)
    print(f"wrote {stem}.json")
    if not args.no_plot:
        png = bench_plot(data, stem + ".png")
        print(f"wrote {png}" if png else "matplotlib not importable: no plot")
    return 0
