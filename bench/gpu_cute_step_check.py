"""GPU check + timing of the CuTe DSL decode step (backends/cute) against the float64 oracle.

Run on the lent H100 (see /work/shared/device/README.md), e.g.
    source .carry/cute/activate.sh && pip install -q --no-deps --no-build-isolation -e . \
        && PYTHONUNBUFFERED=1 python bench/gpu_cute_step_check.py

Sections, each in its own subprocess (a CUDA fault in one does not take the others down), each
writing JSON under $OUT (default bench/results/) as it goes, within a time budget:
  correct   realistic shapes (B in {1, 64, 257}, H=32, N in {64, 128}, P in {48, 64},
            R in {1, 4}, fp32 & bf16 state, the three output modes, state pool with a padding
            slot, in place and not) and a pairwise cover of small odd shapes, all through
            mamba3_kernels.testing.step_case + run_step_backend (poisoned outputs, oracle on the
            exact inputs).
  timing    default config at B in {1, 16, 64, 256} for SISO (R=1) and MIMO (R=4) with
            H=32 N=128 P=64, fp32 and bf16 state: CUDA-graph replay (several state sets, so the
            ~50 MB L2 does not serve the state) and plain calls from Python (backend entry and
            the public API); GB/s of the state traffic vs the device-to-device copy bandwidth;
            then every config of space() checked (B=5) and timed (graph) at B=1 and B=64.
  sanitize  compute-sanitizer memcheck over the shapes with row / vector predication, chunked
            prefetch and padding slots (in place and not): no out-of-bounds access anywhere.
  upstream  upstream's CuTe `mamba3_step_fn` (state update only) alone and after upstream's
            Triton rotary helper (what the module's step runs), same shapes, same timing, when
            .upstream/mamba_ssm is present (see the device README).
Default: correct + sanitize + timing (about 4 minutes); `--only upstream` for the side by side.
Usage: gpu_cute_step_check.py [--only SECTION ...] [--section NAME --budget SECONDS]
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time
import traceback

from common import copy_bandwidth, use_checkout  # noqa: E402  (bench/common.py)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.environ.get("OUT") or os.path.join(ROOT, "bench", "results")
SECTIONS = {"correct": 70, "sanitize": 40, "timing": 110, "upstream": 30}   # seconds (device call <= 300 s)
DEFAULT_SECTIONS = ("correct", "sanitize", "timing")   # upstream: --only upstream (its numbers change rarely)


def _ensure_package():
    use_checkout()


def _save(name, obj):
    os.makedirs(OUT, exist_ok=True)
    with open(os.path.join(OUT, f"cute_step_{name}.json"), "w") as f:
        json.dump(obj, f, indent=1, default=str)


def _env():
    import torch
    import cutlass
    return {"gpu": torch.cuda.get_device_name(), "cc": list(torch.cuda.get_device_capability()),
            "torch": torch.__version__, "cutlass_dsl": getattr(cutlass, "__version__", "?"),
            "python": sys.version.split()[0]}


# ------------------------------------------------------------------------------------------
# correctness

def _spec(**kw):
    from mamba3_kernels.spec import ScanSpec
    base = dict(chunk_size=1, initial_states=True, final_states=True)
    base.update(kw)
    return ScanSpec(**base)


MIMO = dict(has_mimo_v=True, has_mimo_z=True, has_mimo_out=True)
SISO128 = dict(d_state=128, head_dim=64, n_angles=32, has_d=True, has_z=True)
MIMO128 = dict(d_state=128, head_dim=64, rank=4, n_angles=32, pairing="half", has_d=True, has_z=True, **MIMO)


def realistic_cases():
    """(label, spec kwargs, B, H, G, pool, inplace)"""
    return [
        ("siso fp32", dict(SISO128), 1, 32, 1, None, True),
        ("siso bf16-state", dict(SISO128, state_dtype="bfloat16"), 64, 32, 1, None, True),
        ("siso pool", dict(SISO128), 257, 32, 1, 300, True),
        ("siso N64 P48 G4 out-of-place", dict(d_state=64, head_dim=48, n_angles=16, has_d=True, has_z=True),
         64, 32, 4, None, False),
        ("mimo reduce", dict(MIMO128), 1, 32, 1, None, True),
        ("mimo reduce B257", dict(MIMO128), 257, 32, 1, None, True),
        ("mimo per_rank bf16 pool", dict(d_state=64, head_dim=48, rank=4, n_angles=16, pairing="half",
                                         has_z=True, has_mimo_v=True, has_mimo_z=True,
                                         output_mode="per_rank", state_dtype="bfloat16"), 64, 32, 1, 100, True),
        ("mimo norm_reduce", dict(MIMO128, output_mode="norm_reduce"), 64, 32, 1, None, True),
        ("mimo norm_reduce P48 bf16 oop", dict(MIMO128, head_dim=48, output_mode="norm_reduce",
                                               state_dtype="bfloat16"), 64, 32, 2, None, False),
        ("mimo euler shared", dict(MIMO128, discretization="euler", shared_angles=True, n_angles=16),
         64, 32, 1, None, True),
        ("siso A0 bf16-state pool", dict(d_state=64, head_dim=64, has_d=True, state_dtype="bfloat16"),
         257, 32, 1, 400, True),
        ("siso fp32-in", dict(SISO128, input_dtype="float32"), 64, 32, 1, None, True),
        ("mimo R4 N64 P64 fp32-in pool", dict(MIMO128, d_state=64, n_angles=16, input_dtype="float32"),
         64, 32, 8, 80, False),
    ]


def covering_cases(seed=7, n_rows=18):
    """A greedy pairwise cover over small and odd shapes (deterministic)."""
    import itertools
    import random
    F = dict(R=(1, 2, 4), N=(16, 64, 6), P=(16, 48, 5), G=(1, 2), pairing=("interleaved", "half"),
             A=("zero", "odd", "half"), shared=(False, True), state=("float32", "bfloat16"),
             inp=("float32", "bfloat16", "float16"), z=(False, True), d=(False, True),
             pool=(False, True), mode=("reduce", "per_rank", "norm_reduce"), euler=(False, True),
             inplace=(True, False), mimo=(False, True))
    keys = sorted(F)
    need = {(a, va, b, vb) for a, b in itertools.combinations(keys, 2) for va in F[a] for vb in F[b]}
    rnd = random.Random(seed)
    rows = []
    while need and len(rows) < 60:
        best, bscore = None, -1
        for _ in range(200):
            row = {k: rnd.choice(F[k]) for k in keys}
            sc = len({(a, row[a], b, row[b]) for a, b in itertools.combinations(keys, 2)} & need)
            if sc > bscore:
                best, bscore = row, sc
        rows.append(best)
        need -= {(a, best[a], b, best[b]) for a, b in itertools.combinations(keys, 2)}
    out = []
    for row in rows[:max(n_rows, len(rows))]:
        N, R = row["N"], row["R"]
        A = {"zero": 0, "odd": max(1, (N // 2) - 1 if (N // 2) % 2 == 0 else N // 2), "half": N // 2}[row["A"]]
        if row["A"] == "odd" and A % 2 == 0:
            A = max(1, A - 1)
        mode = row["mode"]
        mimo = row["mimo"]
        kw = dict(d_state=N, head_dim=row["P"], rank=R, n_angles=A, pairing=row["pairing"],
                  discretization="euler" if row["euler"] else "trapezoidal", has_d=row["d"], has_z=row["z"],
                  shared_angles=row["shared"] and A > 0, state_dtype=row["state"], input_dtype=row["inp"],
                  output_mode=mode, has_mimo_v=mimo, has_mimo_z=mimo and row["z"],
                  has_mimo_out=mimo and mode != "per_rank")
        G = row["G"]
        H = 2 * G if G > 1 else 3
        B = 3
        out.append((f"cover{len(out)}", kw, B, H, G, 5 if row["pool"] else None, row["inplace"]))
    return out


def section_correct(budget):
    import numpy as np
    from mamba3_kernels.backends import cute as cb
    from mamba3_kernels.spec import Problem
    from mamba3_kernels.testing import run_step_backend, step_case
    t0 = time.time()
    res = {"env": _env(), "cases": []}
    rng = np.random.default_rng(20261122)
    for label, kw, B, H, G, pool, inplace in realistic_cases() + covering_cases():
        if time.time() - t0 > budget:
            res["cases"].append({"label": label, "skipped": "time budget"})
            continue
        rec = {"label": label, "B": B, "H": H, "G": G, "pool": pool, "inplace": inplace, "spec": kw}
        try:
            spec = _spec(**kw)
            rec["config"] = cb.default_config(spec)
            case = step_case(spec, Problem(B, 1, H, G, pool or B), rng, device="cuda", pool=pool)
            ts = time.time()
            rep = run_step_backend(cb, case, inplace=inplace)
            rec["seconds"] = round(time.time() - ts, 2)
            rec["ok"] = rep.ok
            rec["rows"] = [{"name": r.name, "rel_l2": r.rel_l2, "rel_max": r.rel_max, "bound": r.bound_l2,
                            "ok": r.ok} for r in rep.rows]
            if not rep.ok:
                rec["table"] = rep.table()
                rec["diag"] = _diagnose(cb, case, inplace)
        except Exception as e:
            rec["ok"] = False
            rec["error"] = f"{type(e).__name__}: {e}"
            rec["tb"] = traceback.format_exc()[-4000:]
        worst = max((r["rel_l2"] for r in rec.get("rows", [])), default=float("nan"))
        print(f"[correct] {'ok ' if rec.get('ok') else 'BAD'} {label:38s} B={B:<4d} worst rel_l2 {worst:.2e}"
              f" {rec.get('error', '')[:300]}", flush=True)
        if not rec.get("ok") and "table" in rec:
            print(rec["table"], flush=True)
            print(json.dumps(rec.get("diag"))[:3000], flush=True)
        res["cases"].append(rec)
        _save("correct", res)
        if "error" in rec and "CUDA" in rec["error"]:
            break          # the context is gone
    res["passed"] = sum(1 for c in res["cases"] if c.get("ok"))
    res["total"] = len(res["cases"])
    _save("correct", res)


def _diagnose(cb, case, inplace):
    """Where the output / ssm state differ (first bad indices), to localise a kernel bug."""
    import numpy as np
    from mamba3_kernels.testing import poisoned_step_tensors, to_numpy
    import torch
    t = poisoned_step_tensors(case, inplace)
    cb.step(case.spec, cb.default_config(case.spec), t)
    torch.cuda.synchronize()
    d = {}
    for name, got, ref in (("out", to_numpy(t.out), case.ref_out),
                           ("ssm", to_numpy(t.state_out.ssm), case.ref_states.ssm),
                           ("k", to_numpy(t.state_out.k).reshape(case.ref_states.k.shape), case.ref_states.k),
                           ("v", to_numpy(t.state_out.v), case.ref_states.v),
                           ("angle", to_numpy(t.state_out.angle), case.ref_states.angle)):
        err = np.abs(np.nan_to_num(got, nan=1e30) - ref)
        tol = 2e-2 * (np.abs(ref).max() + 1e-6)
        bad = np.argwhere(err > tol)
        d[name] = {"shape": list(ref.shape), "n_bad": int(len(bad)), "first_bad": bad[:8].tolist(),
                   "got": [float(got[tuple(i)]) for i in bad[:4]], "ref": [float(ref[tuple(i)]) for i in bad[:4]]}
        if len(bad) and ref.ndim >= 2:
            d[name]["bad_per_axis"] = [sorted(set(int(x) for x in bad[:, ax]))[:20] for ax in range(ref.ndim)]
    return d


# ------------------------------------------------------------------------------------------
# timing

def _graph_time(fns, iters=None, trials=5):
    """Median µs per launch of CUDA-graph replays of the launches `fns` (one graph)."""
    import torch
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for f in fns:
            f()
    torch.cuda.current_stream().wait_stream(s)
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for f in fns:
            f()
    g.replay()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    g.replay()
    torch.cuda.synchronize()
    one = time.perf_counter() - t0
    iters = iters or max(2, min(200, int(0.05 / max(one, 1e-6))))
    times = []
    for _ in range(trials):
        e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        e0.record()
        for _ in range(iters):
            g.replay()
        e1.record()
        e1.synchronize()
        times.append(e0.elapsed_time(e1) * 1e3 / (iters * len(fns)))
    del g
    return statistics.median(times)


def _plain_time(fn, n=2000):
    """µs per call of fn() from Python, synchronised only at the end (host overhead bound at
    small B, device bound at large B)."""
    import torch
    for _ in range(20):
        fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) / n * 1e6


def _copy_bw():
    """(GB/s read + write, µs per 1 GiB copy): bench/common.py's measurement."""
    bw = copy_bandwidth()
    return bw / 1e9, (1 << 31) / bw * 1e6


def _sets(spec, B, H, G, rng, min_bytes=200e6, max_sets=128):
    """Several independent StepTensors (own states, shared inputs) for L2-cold timing."""
    from mamba3_kernels.spec import Problem, States, resolve_step
    from mamba3_kernels.tensors import prepare_step
    from mamba3_kernels.testing import step_inputs
    args = step_inputs(spec, Problem(B, 1, H, G, B), rng, device="cuda")
    set_bytes = sum(x.numel() * x.element_size() for x in args["states"])
    n = int(max(2, min(max_sets, math.ceil(min_bytes / set_bytes))))
    out = []
    for i in range(n):
        a = dict(args)
        a["states"] = States(*(x.clone() for x in args["states"]))
        sp, _ = resolve_step(**a, output_mode=spec.output_mode, pairing=spec.pairing,
                             discretization=spec.discretization, norm_eps=spec.norm_eps)
        out.append(prepare_step(sp, **a, inplace=True))
    return args, out


def _bytes(spec, t):
    st = t.state_in
    state = 2 * st.ssm.numel() * st.ssm.element_size()
    other = sum(x.numel() * x.element_size() for x in (t.q, t.k, t.v, t.z, t.adt, t.dt, t.trap, t.angles,
                                                      t.out) if x is not None)
    small = 2 * sum(x.numel() * x.element_size() for x in (st.angle, st.k, st.v))
    return state, state + other + small


def section_timing(budget):
    import numpy as np
    import torch
    from mamba3_kernels import api
    from mamba3_kernels.backends import cute as cb
    from mamba3_kernels.spec import Problem
    from mamba3_kernels.testing import run_step_backend, step_case
    t0 = time.time()
    rng = np.random.default_rng(1)
    res = {"env": _env(), "default": [], "sweep": []}
    bw, us = _copy_bw()
    res["copy_bw_GBs"] = bw
    print(f"[timing] device-to-device copy: {bw:.0f} GB/s", flush=True)
    _save("timing", res)
    H, G = 32, 1
    specs = [("siso fp32", _spec(**SISO128)), ("mimo R4 fp32", _spec(**MIMO128)),
             ("siso bf16-state", _spec(**SISO128, state_dtype="bfloat16")),
             ("mimo R4 bf16-state", _spec(**MIMO128, state_dtype="bfloat16"))]
    for label, spec in specs:
        cfg = cb.default_config(spec)
        for B in (1, 16, 64, 256):
            if time.time() - t0 > budget * 0.35:
                break
            if "bf16" in label and B in (1, 16):
                continue
            sets = None
            try:
                args, sets = _sets(spec, B, H, G, rng)
                sb, ab = _bytes(spec, sets[0])
                g_us = _graph_time([lambda t=t: cb.step(spec, cfg, t) for t in sets])
                p_us = _plain_time(lambda: cb.step(spec, cfg, sets[0]), n=2000 if B <= 16 else 300)
                a = dict(args)
                api_us = _plain_time(lambda: api.step(**a, output_mode=spec.output_mode, pairing=spec.pairing,
                                                      backend="cute", config=cfg, validate=False),
                                     n=1000 if B <= 16 else 200)
                rec = {"label": label, "B": B, "config": cfg, "graph_us": g_us, "plain_us": p_us,
                       "api_us": api_us, "state_GBs": sb / g_us / 1e3, "all_GBs": ab / g_us / 1e3,
                       "frac_copy_bw": ab / g_us / 1e3 / bw, "sets": len(sets)}
            except Exception as e:
                rec = {"label": label, "B": B, "error": f"{type(e).__name__}: {e}",
                       "tb": traceback.format_exc()[-3000:]}
            res["default"].append(rec)
            print(f"[timing] {label:20s} B={B:<4d} graph {rec.get('graph_us', float('nan')):8.2f} us  plain "
                  f"{rec.get('plain_us', float('nan')):7.2f} us  api {rec.get('api_us', float('nan')):7.2f} us  "
                  f"{rec.get('all_GBs', float('nan')):6.0f} GB/s ({100 * rec.get('frac_copy_bw', float('nan')):.0f}% copy)"
                  f" {rec.get('error', '')[:300]}", flush=True)
            _save("timing", res)
            sets = None
            torch.cuda.empty_cache()
    # config sweep: each config checked at B=5, then timed at B=1 and B=64
    for label, spec in specs[:2]:
        space = cb.space(spec)
        space = space[:1] + sorted(space[1:], key=lambda c: (c["lanes_per_row"] not in (8, 16), c["num_warps"] == 2))
        for cfg in space:
            if time.time() - t0 > budget:
                res["sweep"].append({"label": label, "config": cfg, "skipped": "time budget"})
                continue
            rec = {"label": label, "config": cfg}
            try:
                case = step_case(spec, Problem(5, 1, H, G, 5), rng, device="cuda")
                rep = run_step_backend(cb, case, config=cfg)
                rec["ok"] = rep.ok
                rec["worst_rel_l2"] = max(r.rel_l2 for r in rep.rows)
                for B in (1, 64):
                    _, sets = _sets(spec, B, H, G, rng, min_bytes=120e6, max_sets=64)
                    rec[f"B{B}_us"] = _graph_time([lambda t=t: cb.step(spec, cfg, t) for t in sets], trials=3)
                    if B == 64:
                        rec["B64_GBs"] = _bytes(spec, sets[0])[1] / rec["B64_us"] / 1e3
                    sets = None
            except Exception as e:
                rec["ok"] = False
                rec["error"] = f"{type(e).__name__}: {e}"
            res["sweep"].append(rec)
            print(f"[sweep] {label:14s} {str(tuple(cfg.values())):18s} ok={rec.get('ok')} "
                  f"B1 {rec.get('B1_us', float('nan')):7.2f} us  B64 {rec.get('B64_us', float('nan')):7.2f} us "
                  f"{rec.get('error', '')[:200]}", flush=True)
            _save("timing", res)


# ------------------------------------------------------------------------------------------
# compute-sanitizer memcheck on the shapes with row / vector predication and padding slots

SANITIZE_CASES = [
    ("N6 P5 R3 odd pool", dict(d_state=6, head_dim=5, rank=3, n_angles=3, has_d=True, has_z=True, **MIMO), 3, 3, 1, 5, None),
    ("N16 P48 rows past P", dict(d_state=16, head_dim=48, n_angles=4, pairing="half", has_z=True), 2, 2, 1, None, None),
    ("P48 chunks of 8", dict(d_state=64, head_dim=48, n_angles=8, has_d=True), 2, 2, 1, None,
     {"num_warps": 2, "lanes_per_row": 8, "vec": 4, "tile_p": 8}),
    ("R2 N64 P48 norm L32 w8", dict(d_state=64, head_dim=48, rank=2, n_angles=8, pairing="half", has_z=True,
                                    output_mode="norm_reduce", **MIMO), 2, 2, 2, None,
     {"num_warps": 8, "lanes_per_row": 32, "vec": 2, "tile_p": 16}),
]


def section_sanitize_cases(budget):
    import numpy as np
    from mamba3_kernels.backends import cute as cb
    from mamba3_kernels.spec import Problem
    from mamba3_kernels.testing import run_step_backend, step_case
    rng = np.random.default_rng(3)
    for label, kw, B, H, G, pool, cfg in SANITIZE_CASES:
        spec = _spec(**kw)
        case = step_case(spec, Problem(B, 1, H, G, pool or B), rng, device="cuda", pool=pool)
        for inplace in (True, False):
            rep = run_step_backend(cb, case, config=cfg, inplace=inplace)
            print(f"[sanitize-case] {label} inplace={inplace} ok={rep.ok}", flush=True)


def section_sanitize(budget):
    import shutil
    exe = shutil.which("compute-sanitizer") or "/usr/local/cuda/bin/compute-sanitizer"
    res = {"tool": exe}
    if not os.path.exists(exe):
        res["error"] = "compute-sanitizer not found"
    else:
        try:
            r = subprocess.run([exe, "--tool", "memcheck", "--print-limit", "200", sys.executable, __file__,
                                "--section", "sanitize_cases", "--budget", str(budget)],
                               capture_output=True, text=True, timeout=budget)
            res["rc"] = r.returncode
            txt = r.stdout + r.stderr
            res["tail"] = txt[-4000:]
            # device-side findings vs host API errors (CuTe DSL's arch probe raises some of those)
            res["device_errors"] = [l for l in txt.splitlines() if "Invalid __" in l or "out of bounds" in l][:40]
            res["api_errors"] = sorted({l.strip() for l in txt.splitlines() if "Program hit" in l})[:40]
        except subprocess.TimeoutExpired as e:
            res["rc"] = "timeout"
            res["tail"] = ((e.stdout or b"").decode(errors="replace") if isinstance(e.stdout, bytes) else (e.stdout or ""))[-4000:]
    print("[sanitize]", res.get("rc"), res.get("error", ""), "\n" + res.get("tail", "")[-2500:], flush=True)
    _save("sanitize", res)


# ------------------------------------------------------------------------------------------
# upstream side by side

def section_upstream(budget):
    import torch
    t0 = time.time()
    res = {"env": _env(), "rows": []}
    up = os.path.join(ROOT, ".upstream")
    sys.path.insert(0, up)
    try:
        from mamba_ssm.ops.cute.mamba3.mamba3_step_fn import mamba3_step_fn
    except Exception as e:
        res["error"] = f"upstream CuTe step not importable: {type(e).__name__}: {e}"
        print("[upstream]", res["error"], flush=True)
        _save("upstream", res)
        return
    try:
        from mamba_ssm.ops.triton.mamba3.mamba3_mimo_rotary_step import apply_rotary_qk_inference_fwd
    except Exception as e:
        apply_rotary_qk_inference_fwd = None
        res["rotary_error"] = f"{type(e).__name__}: {e}"
    H, N, P, A = 32, 128, 64, 32
    dev, bf, f32 = "cuda", torch.bfloat16, torch.float32
    for R in (1, 4):
        for B in (1, 16, 64, 256):
            if time.time() - t0 > budget:
                break
            rec = {"R": R, "B": B}
            try:
                g = torch.Generator(device=dev).manual_seed(0)
                rn = lambda *s, dt=bf: torch.randn(*s, device=dev, dtype=dt, generator=g)
                Bst, C, Bin = rn(B, R, H, N), rn(B, R, H, N), rn(B, R, H, N)
                x, z, xs = rn(B, H, P), rn(B, H, P), rn(B, H, P)
                A_ = -torch.rand(B, H, device=dev) - 0.1
                dt = torch.rand(B, H, device=dev) * 0.1 + 0.01
                trap = torch.rand(B, H, device=dev)
                D = rn(H, dt=f32)
                xproj, zproj, oproj = rn(R, H, P, dt=f32), rn(R, H, P, dt=f32), rn(R, H, P, dt=f32)
                out = torch.empty(B, H, P, device=dev, dtype=bf)
                ang, angp = rn(B, H, A, dt=f32), rn(B, H, A, dt=f32)
                qb, kb = rn(R, H, N, dt=f32), rn(R, H, N, dt=f32)
                set_bytes = B * H * P * N * 4
                n = int(max(2, min(128, math.ceil(200e6 / set_bytes))))
                states = [rn(B, H, P, N, dt=f32) for _ in range(n)]

                def cute_only(st):
                    mamba3_step_fn(st, Bst, xs, A_, Bin, C, D, x, dt, trap, xproj, oproj, None, out, z, zproj,
                                   tile_D=64, num_warps=4)

                def full(st):
                    q2, k2, _ = apply_rotary_qk_inference_fwd(C, Bin, ang, angp, dt, qb, kb,
                                                              rotate_pairwise=(R == 1))
                    mamba3_step_fn(st, Bst, xs, A_, k2, q2, D, x, dt, trap, xproj, oproj, None, out, z, zproj,
                                   tile_D=64, num_warps=4)

                rec["cute_graph_us"] = _graph_time([lambda s=s: cute_only(s) for s in states])
                rec["cute_plain_us"] = _plain_time(lambda s=states[0]: cute_only(s), n=1000 if B <= 16 else 200)
                if apply_rotary_qk_inference_fwd is not None:
                    rec["full_graph_us"] = _graph_time([lambda s=s: full(s) for s in states])
                    rec["full_plain_us"] = _plain_time(lambda s=states[0]: full(s), n=1000 if B <= 16 else 200)
                rec["state_GBs"] = 2 * set_bytes / rec["cute_graph_us"] / 1e3
                del states
            except Exception as e:
                rec["error"] = f"{type(e).__name__}: {e}"
                rec["tb"] = traceback.format_exc()[-2000:]
            res["rows"].append(rec)
            print(f"[upstream] R={R} B={B:<4d} cute graph {rec.get('cute_graph_us', float('nan')):8.2f} us plain "
                  f"{rec.get('cute_plain_us', float('nan')):7.2f} us | +rotary graph "
                  f"{rec.get('full_graph_us', float('nan')):8.2f} us plain {rec.get('full_plain_us', float('nan')):7.2f} us"
                  f" {rec.get('error', '')[:300]}", flush=True)
            _save("upstream", res)
            torch.cuda.empty_cache()


# ------------------------------------------------------------------------------------------

def _summary():
    print("\n==== summary ====")
    for name in SECTIONS:
        p = os.path.join(OUT, f"cute_step_{name}.json")
        if not os.path.exists(p):
            print(f"{name}: no result")
            continue
        d = json.load(open(p))
        if name == "correct":
            cs = d.get("cases", [])
            bad = [c["label"] for c in cs if not c.get("ok")]
            print(f"correct: {sum(1 for c in cs if c.get('ok'))}/{len(cs)} ok; bad: {bad}")
        elif name == "timing":
            print(f"copy bw {d.get('copy_bw_GBs', 0):.0f} GB/s")
            for r in d.get("default", []):
                print(f"  {r['label']:20s} B={r['B']:<4d} graph {r.get('graph_us', float('nan')):8.2f} us "
                      f"plain {r.get('plain_us', float('nan')):7.2f} api {r.get('api_us', float('nan')):7.2f} "
                      f"{r.get('all_GBs', float('nan')):6.0f} GB/s")
            sw = [r for r in d.get("sweep", []) if "B64_us" in r]
            for lab in sorted({r["label"] for r in sw}):
                rs = [r for r in sw if r["label"] == lab and r.get("ok")]
                if rs:
                    b1 = min(rs, key=lambda r: r["B1_us"])
                    b64 = min(rs, key=lambda r: r["B64_us"])
                    print(f"  sweep {lab}: best B1 {b1['B1_us']:.2f} us {b1['config']}; best B64 "
                          f"{b64['B64_us']:.2f} us {b64['config']}; failing: "
                          f"{[r['config'] for r in d['sweep'] if r['label'] == lab and r.get('ok') is False]}")
        elif name == "sanitize":
            print(f"sanitize: rc {d.get('rc')} {d.get('error', '')}; "
                  f"{[l for l in d.get('tail', '').splitlines() if 'ERROR SUMMARY' in l]}; device-side: "
                  f"{d.get('device_errors')}; API: {d.get('api_errors')}")
        else:
            for r in d.get("rows", []):
                print(f"  upstream R={r['R']} B={r['B']:<4d} cute {r.get('cute_graph_us', float('nan')):8.2f} us "
                      f"+rotary {r.get('full_graph_us', float('nan')):8.2f} us (plain {r.get('full_plain_us', float('nan')):.2f})")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--section", choices=list(SECTIONS) + ["sanitize_cases"])
    ap.add_argument("--budget", type=float)
    ap.add_argument("--only", nargs="*", default=None, help="sections to run (default all)")
    a = ap.parse_args()
    if a.section:
        _ensure_package()
        fn = {"correct": section_correct, "timing": section_timing, "upstream": section_upstream,
              "sanitize": section_sanitize, "sanitize_cases": section_sanitize_cases}[a.section]
        fn(a.budget or SECTIONS.get(a.section, 60))
        return
    import torch
    if not torch.cuda.is_available():
        print("no CUDA GPU: this script runs on the lent H100")
        return
    for name in (a.only or DEFAULT_SECTIONS):
        t0 = time.time()
        try:
            r = subprocess.run([sys.executable, __file__, "--section", name, "--budget", str(SECTIONS[name])],
                               timeout=SECTIONS[name] + 25)
            rc = r.returncode
        except subprocess.TimeoutExpired:
            rc = "timeout"
        print(f"== section {name}: rc {rc}, {time.time() - t0:.0f} s", flush=True)
    _summary()


if __name__ == "__main__":
    main()
