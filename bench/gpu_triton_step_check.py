"""Triton decode step on a GPU: correctness against the float64 oracle, then timing.

    python bench/gpu_triton_step_check.py [--out DIR] [--budget SECONDS] [--warm-workers N]
    TRITON_INTERPRET=1 python bench/gpu_triton_step_check.py --smoke   # CPU dry run, tiny shapes

0. Warm-up: worker processes compile every config the timing will use into Triton's on-disk
   cache (one tiny launch each) while the main process checks correctness.
1. Correctness (mamba3_kernels.testing: fresh inputs, NaN-poisoned outputs, DESIGN.md bounds) on
   realistic shapes: B in {1, 16, 64, 257}, H = 32, N = 128, P in {48, 64}, R in {1, 2, 4}, fp32
   and bf16 state, the three output modes, in place / out of place, state_indices with a
   padding slot; every config of the space on two specs; the split-P arrival counters are
   checked to be back at zero.
2. Timing: CUDA-graph replay of many steps, each on its own set of inputs and (in-place) states,
   with enough sets that the states do not fit in L2; median over replays. For every shape:
   the first version's default ("old default", the whole head per program), the current
   default, then (sweeps) every config of the space. Bytes = everything the step must move
   (states read + written, inputs, output); GB/s compared with a measured device-to-device copy
   (torch copy_ of 1 GiB: read + write bytes / time).
Writes JSON to DIR/triton_step_gpu.json (DIR = $OUT or bench/results) after every section.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import time

import numpy as np
import torch


from common import copy_bandwidth, use_checkout  # noqa: E402  (bench/common.py)

use_checkout()
from mamba3_kernels.backends import triton as tb  # noqa: E402
from mamba3_kernels.spec import Problem, ScanSpec, States  # noqa: E402
from mamba3_kernels.tensors import prepare_step  # noqa: E402
from mamba3_kernels.testing import run_step_backend, step_case  # noqa: E402

L2_BYTES = 50 * 2**20
H, N = 32, 128


def siso(**kw):
    base = dict(d_state=N, head_dim=64, n_angles=N // 4, pairing="interleaved", has_d=True, has_z=True,
                input_dtype="bfloat16", state_dtype="float32")
    base.update(kw)
    return ScanSpec(**base)


def mimo(**kw):
    base = dict(d_state=N, head_dim=64, rank=4, n_angles=N // 4, pairing="half", has_d=True, has_z=True,
                has_mimo_v=True, has_mimo_z=True, has_mimo_out=True, output_mode="reduce",
                input_dtype="bfloat16", state_dtype="float32")
    base.update(kw)
    return ScanSpec(**base)


# ------------------------------------------------------------------------------------------
# correctness

def correctness(device, smoke, log):
    h = 2 if smoke else H
    big = 3 if smoke else 257
    cases = [  # (label, spec, B, G, pool, inplace)
        ("siso B1", siso(), 1, 1, None, True),
        ("siso P48 bf16-state pool", siso(head_dim=48, state_dtype="bfloat16"), 64, 1, 80, True),
        ("siso B257 out-of-place", siso(), big, 1, None, False),
        ("siso B257 pool", siso(), big, 1, 300, True),
        ("siso fp32 euler shared-angles G2", siso(input_dtype="float32", discretization="euler",
                                                 shared_angles=True, pairing="half"), 64, 2, None, True),
        ("mimo4 norm_reduce", mimo(output_mode="norm_reduce"), 64, 1, None, True),
        ("mimo4 B1", mimo(), 1, 1, None, True),
        ("mimo4 P48 bf16-state pool", mimo(head_dim=48, state_dtype="bfloat16"), 64, 1, 96, True),
        ("mimo4 per_rank", mimo(output_mode="per_rank", has_mimo_out=False), 16, 1, None, False),
        ("mimo4 B257 bf16-state", mimo(state_dtype="bfloat16"), big, 1, None, True),
        ("mimo4 B257 pool", mimo(), big, 1, 260, True),
        ("mimo2 P48 interleaved", mimo(rank=2, head_dim=48, pairing="interleaved"), 64, 2, 70, True),
    ]
    rows = []
    rng = np.random.default_rng(2026)
    for label, spec, B, G, pool, inplace in cases:
        if smoke:
            B, pool = min(B, 3), (None if pool is None else 5)
        t0 = time.time()
        try:
            case = step_case(spec, Problem(B, 1, h, min(G, h), pool or B), rng, device=device, pool=pool)
            rep = run_step_backend(tb, case, inplace=inplace)
            rows.append(_rep_row(label, spec, B, tb.default_config(spec, case.problem), inplace, rep,
                                 time.time() - t0))
        except Exception as e:  # reported, not fatal: the rest still runs
            rows.append(dict(label=label, B=B, ok=False, error=f"{type(e).__name__}: {str(e)[-1500:]}"))
        log(rows[-1])
    # every config of the space, in place
    for label, spec in (("space siso", siso()), ("space mimo4 bf16-state", mimo(state_dtype="bfloat16")),
                        ("space mimo4 norm_reduce", mimo(output_mode="norm_reduce"))):
        B = 3 if smoke else 16
        case = step_case(spec, Problem(B, 1, h, 1, B), rng, device=device)
        for cfg in tb.space(spec, case.problem, "step"):
            t0 = time.time()
            try:
                rep = run_step_backend(tb, case, config=cfg, inplace=True)
                rows.append(_rep_row(label, spec, B, cfg, True, rep, time.time() - t0))
            except Exception as e:
                rows.append(dict(label=label, B=B, config=cfg, ok=False,
                                 error=f"{type(e).__name__}: {str(e)[-1500:]}"))
            log(rows[-1])
    bufs = list(tb.kernels._COUNTERS.values())
    zero = all(int(b.abs().sum()) == 0 for b in bufs)
    rows.append(dict(label="split-P arrival counters back at zero", B=0, ok=bool(bufs) and zero,
                     buffers=len(bufs)))
    log(rows[-1])
    return rows


def _rep_row(label, spec, B, cfg, inplace, rep, secs):
    errs = {r.name: dict(rel_l2=r.rel_l2, rel_max=r.rel_max) for r in rep.rows}
    return dict(label=label, B=B, config=cfg, inplace=inplace, ok=bool(rep.ok), seconds=round(secs, 2),
                errors=errs, spec=spec.describe())


# ------------------------------------------------------------------------------------------
# timing

def make_args(spec, B, h, G, device, gen):
    """Random realistic step arguments directly on the device (no oracle)."""
    R, P, A = spec.rank, spec.head_dim, spec.n_angles
    idt = getattr(torch, spec.input_dtype)
    sdt = getattr(torch, spec.state_dtype)
    f32 = torch.float32
    rn = lambda *s, dt=f32: torch.randn(*s, device=device, dtype=f32, generator=gen).to(dt)
    dt = torch.exp(torch.empty(B, h, device=device).uniform_(math.log(1e-2), math.log(0.5), generator=gen))
    a = dict(q=rn(B, R, G, N, dt=idt), k=rn(B, R, G, N, dt=idt), v=rn(B, h, P, dt=idt),
             adt=-torch.empty(B, h, device=device).uniform_(0.2, 3.0, generator=gen) * dt, dt=dt,
             trap=None if spec.discretization == "euler" else 1.5 * rn(B, h),
             q_bias=0.5 * rn(h, R, N), k_bias=0.5 * rn(h, R, N),
             angles=(rn(B, A) if spec.shared_angles else rn(B, h, A)) if A else None,
             d=rn(h) if spec.has_d else None, z=rn(B, h, P, dt=idt) if spec.has_z else None,
             mimo_v=1 + 0.5 * rn(h, R, P) if spec.has_mimo_v else None,
             mimo_z=1 + 0.5 * rn(h, R, P) if spec.has_mimo_z else None,
             mimo_out=rn(h, R, P) / R if spec.has_mimo_out else None,
             norm_weight=1 + 0.3 * rn(h, P) if spec.output_mode == "norm_reduce" else None,
             state_indices=None)
    a["states"] = States(torch.empty(B, h, A, device=device).uniform_(0, 2 * math.pi, generator=gen),
                         (0.5 * rn(B, h, P, N)).to(sdt), rn(B, R, h, N), rn(B, h, P, dt=idt))
    return a


def step_bytes(spec, B, h, G):
    """Bytes one step must move: states read + written, inputs read, output written."""
    R, P, A = spec.rank, spec.head_dim, spec.n_angles
    ib = 2 if spec.input_dtype in ("bfloat16", "float16") else 4
    sb = 2 if spec.state_dtype == "bfloat16" else 4
    states = B * h * (P * N * sb + R * N * 4 + P * ib + A * 4) * 2
    inputs = B * (2 * R * G * N * ib + h * P * ib * (2 if spec.has_z else 1) + h * 4 * 3
                  + (A if spec.shared_angles else h * A) * 4)
    params = h * R * N * 4 * 2 + h * R * P * 4 * 3 + h * 4
    out = B * h * P * ib * (R if spec.output_mode == "per_rank" else 1)
    return states + inputs + params + out


def state_bytes(spec, B, h):
    sb = 2 if spec.state_dtype == "bfloat16" else 4
    return B * h * spec.head_dim * N * sb


def time_graph(fn_list, reps=15):
    """Median µs per launch of a CUDA graph that runs every fn in fn_list once."""
    for f in fn_list:
        f()
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for f in fn_list:
            f()
    g.replay()
    torch.cuda.synchronize()
    st, en = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    ts = []
    for _ in range(reps):
        st.record()
        g.replay()
        en.record()
        en.synchronize()
        ts.append(st.elapsed_time(en) * 1e3 / len(fn_list))
    del g
    return statistics.median(ts), min(ts)


def old_default(spec, B):
    """The first version's default (bench/NOTES.md, "Triton step"): the whole head per program."""
    if spec.rank == 1 and spec.state_dtype == "bfloat16" and B >= 32 and spec.output_mode != "norm_reduce":
        return dict(BLOCK_P=16, ROWS=64, num_warps=2, num_stages=1, VEC=False, PREFETCH=False)
    return dict(BLOCK_P=64, ROWS=64, num_warps=8, num_stages=1, VEC=True, PREFETCH=False)


VARIANTS = [("siso fp32-state", dict(kind="siso")), ("siso bf16-state", dict(kind="siso", state_dtype="bfloat16")),
            ("mimo4 fp32-state", dict(kind="mimo")), ("mimo4 bf16-state", dict(kind="mimo", state_dtype="bfloat16")),
            ("mimo4 norm fp32-state", dict(kind="mimo", output_mode="norm_reduce"))]
# (B, sweep the space): the defaults at every B, the whole space at 64, 256 and 1
PLAN = [(64, True), (256, True), (1, True), (16, False), (1024, False)]


def variant_spec(kw):
    kw = dict(kw)
    return (siso if kw.pop("kind") == "siso" else mimo)(**kw)


def configs_for(spec, B, sweep):
    cfgs = [old_default(spec, B), tb.default_config(spec, Problem(B, 1, H, 1, B))]
    if sweep:
        cfgs += tb.space(spec, Problem(B, 1, H, 1, B), "step")
    out = []
    for c in cfgs:
        if c not in out:
            out.append(c)
    return out


def warm_jobs():
    """(variant kwargs, B, config): one job per kernel specialization the timing compiles (M = B
    is specialized only as 1 / multiple of 16 / other)."""
    jobs = []
    for B, sweep in PLAN:
        for _, kw in VARIANTS:
            for c in configs_for(variant_spec(kw), B, sweep):
                key = (json.dumps(kw, sort_keys=True), 1 if B == 1 else 16, json.dumps(c, sort_keys=True))
                if key not in [j[0] for j in jobs]:
                    jobs.append((key, kw, 1 if B == 1 else 16, c))
    return [j[1:] for j in jobs]


def warm_worker(jobs):
    """Compile (one launch on a tiny batch) every job; returns (done, errors)."""
    gen = torch.Generator(device="cuda")
    gen.manual_seed(1)
    done, errs = 0, []
    for kw, B, cfg in jobs:
        spec = variant_spec(kw)
        try:
            t = prepare_step(spec, **make_args(spec, B, H, 1, "cuda", gen), inplace=True)
            tb.step(spec, cfg, t)
            torch.cuda.synchronize()
            done += 1
        except Exception as e:
            errs.append(f"{kw} {cfg}: {type(e).__name__}: {str(e)[-300:]}")
    return done, errs


def start_warm(n_workers):
    import multiprocessing as mp
    jobs = warm_jobs()
    if n_workers <= 0 or not jobs:
        return None, len(jobs)
    ctx = mp.get_context("spawn")
    pool = ctx.Pool(n_workers)
    chunks = [jobs[i::n_workers] for i in range(n_workers)]
    return (pool, pool.map_async(warm_worker, chunks)), len(jobs)


def timing(copy_gbs, deadline, log, rows=None, flush=lambda: None):
    gen = torch.Generator(device="cuda")
    gen.manual_seed(7)
    rows = [] if rows is None else rows
    for B, sweep in PLAN:
        for vname, kw in VARIANTS:
            spec = variant_spec(kw)
            if time.time() > deadline:
                log({"skipped": f"{vname} B={B} sweep={sweep}: out of time budget"})
                continue
            sets = max(1, min(160, math.ceil(3 * L2_BYTES / state_bytes(spec, B, H))))
            n_launch = sets * max(1, math.ceil(20 / sets))
            try:
                bundles = []
                for _ in range(sets):
                    a = make_args(spec, B, H, 1, "cuda", gen)
                    bundles.append(prepare_step(spec, **a, inplace=True))
            except Exception as e:
                log({"error": f"{vname} B={B}: inputs: {type(e).__name__}: {e}"})
                continue
            dflt = tb.default_config(spec, Problem(B, 1, H, 1, B))
            old = old_default(spec, B)
            nbytes = step_bytes(spec, B, H, 1)
            for cfg in configs_for(spec, B, sweep):
                if time.time() > deadline:
                    break
                fns = [(lambda t=bundles[i % sets], c=cfg: tb.step(spec, c, t)) for i in range(n_launch)]
                try:
                    med, best = time_graph(fns)
                except Exception as e:  # a config that fails to compile/launch is reported, not fatal
                    rows.append(dict(variant=vname, B=B, config=cfg, error=f"{type(e).__name__}: {e}"))
                    log(rows[-1])
                    continue
                gbs = nbytes / (med * 1e-6) / 1e9
                rows.append(dict(variant=vname, B=B, config=cfg, default=cfg == dflt, old_default=cfg == old,
                                 us=round(med, 2), us_min=round(best, 2), bytes=nbytes, GBs=round(gbs, 1),
                                 frac_copy=round(gbs / copy_gbs, 3), state_sets=sets, launches=n_launch))
                log(rows[-1])
            del bundles
            torch.cuda.empty_cache()
            flush()
    return rows


# ------------------------------------------------------------------------------------------

def _cfg_s(c):
    return (f"R{c.get('ROWS', 64)}/BP{c['BLOCK_P']}/w{c['num_warps']}/{'vec' if c.get('VEC') else 'novec'}"
            f"{'/pre' if c.get('PREFETCH') else ''}")


def _short(row):
    """One compact line per result (the full rows go to the JSON)."""
    if "errors" in row and "config" in row:
        e = row["errors"]
        worst = max(((v["rel_l2"], k) for k, v in e.items() if k != "state.angle"), default=(0, ""))
        ang = e.get("state.angle", {}).get("rel_l2", 0.0)
        return (f"[{'ok' if row['ok'] else 'FAIL'}] {row['label']:34s} B={row['B']:<4d} {_cfg_s(row['config']):18s}"
                f" {'inplace' if row['inplace'] else 'outofplace'} worst rel_l2 {worst[0]:.1e} ({worst[1]})"
                f" out rel_max {e['out']['rel_max']:.1e} angle {ang:.1e} rad  {row['seconds']}s")
    if "us" in row:
        return (f"{row['variant']:18s} B={row['B']:<5d} {_cfg_s(row['config']):18s} {row['us']:9.2f} us"
                f" {row['GBs']:8.1f} GB/s {100 * row['frac_copy']:5.1f}% copy{'  (default)' if row['default'] else ''}"
                f"{'  (old default)' if row.get('old_default') else ''}")
    return json.dumps(row, default=str)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT") or os.path.join(os.path.dirname(__file__), "results"))
    ap.add_argument("--budget", type=float, default=270.0, help="seconds for the whole script")
    ap.add_argument("--smoke", action="store_true", help="tiny CPU run under TRITON_INTERPRET")
    ap.add_argument("--skip-correctness", action="store_true")
    ap.add_argument("--warm-workers", type=int, default=10, help="processes compiling the timing configs")
    args = ap.parse_args()
    t_start = time.time()
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "triton_step_gpu.json")
    ok, why = tb.available()
    res = dict(available=[ok, why], python=platform.python_version(), torch=torch.__version__)
    try:
        import triton
        res["triton"] = triton.__version__
    except Exception:
        pass
    device = "cpu" if args.smoke else "cuda"
    if device == "cuda":
        res["device"] = torch.cuda.get_device_name()
    flush = lambda: json.dump(res, open(path, "w"), indent=1, default=str)

    def log(row):
        print(_short(row), flush=True)

    warm, n_jobs = (None, 0)
    if device == "cuda":
        try:
            warm, n_jobs = start_warm(args.warm_workers)
        except Exception as e:
            res["warm_error"] = f"{type(e).__name__}: {e}"
    if not args.skip_correctness:
        res["correctness"] = correctness(device, args.smoke, log)
        res["all_ok"] = all(r["ok"] for r in res["correctness"])
        print(f"correctness: {'ALL OK' if res['all_ok'] else 'FAILURES'} "
              f"({sum(r['ok'] for r in res['correctness'])}/{len(res['correctness'])}) "
              f"after {time.time() - t_start:.0f} s", flush=True)
        flush()
    if warm is not None:
        pool, ares = warm
        try:
            outs = ares.get(timeout=max(10.0, t_start + 0.6 * args.budget - time.time()))
            res["warm"] = dict(jobs=n_jobs, done=sum(o[0] for o in outs), errors=sum((o[1] for o in outs), [])[:20])
        except Exception as e:
            res["warm"] = dict(jobs=n_jobs, error=f"{type(e).__name__}: {e}")
        pool.terminate()
        print(f"warm-up: {res['warm']} after {time.time() - t_start:.0f} s", flush=True)
    if device == "cuda":
        res["copy_GBs"] = round(copy_bandwidth() / 1e9, 1)
        print(f"copy bandwidth (torch copy_, 1 GiB): {res['copy_GBs']} GB/s", flush=True)
        res["timing"] = []
        timing(res["copy_GBs"], t_start + args.budget, log, res["timing"], flush)
        bufs = list(tb.kernels._COUNTERS.values())
        res["counters_zero_after_timing"] = all(int(b.abs().sum()) == 0 for b in bufs)
        print(f"counters back at zero after timing: {res['counters_zero_after_timing']}", flush=True)
        flush()
        print("\nsummary (old default -> default):")
        olds = {(r["variant"], r["B"]): r for r in res["timing"] if r.get("old_default")}
        for r in res["timing"]:
            if r.get("default"):
                o = olds.get((r["variant"], r["B"]))
                print(f"  {r['variant']:22s} B={r['B']:5d} {o['us'] if o else float('nan'):9.2f} -> {r['us']:9.2f} us "
                      f"{r['GBs']:8.1f} GB/s {100 * r['frac_copy']:5.1f}% of copy")
        best = {}
        for r in res["timing"]:
            if "us" in r:
                k = (r["variant"], r["B"])
                if k not in best or r["us"] < best[k]["us"]:
                    best[k] = r
        print("best config per shape:")
        for (v, B), r in best.items():
            print(f"  {v:22s} B={B:5d} {r['us']:9.2f} us {100 * r['frac_copy']:5.1f}%  {_cfg_s(r['config'])}")
    flush()
    print(f"wrote {path} after {time.time() - t_start:.0f} s")
    return 0 if res.get("all_ok", True) else 1


if __name__ == "__main__":
    sys.exit(main())
