"""Scan forward + backward benchmark: ours (mamba3_kernels.scan, autograd) vs upstream's SISO
Triton `mamba3_siso_combined` (.upstream/ on PYTHONPATH, as bench/scan.py), plus activation
memory and gradient accuracy.

    PYTHONPATH=$PWD:$PWD/.upstream MAMBA3_COMMIT=$(git rev-parse HEAD) \\
        python bench/scan_bwd.py [--out bench/results/scan_bwd.json] [--shapes siso,mimo]
                                 [--quick] [--only LABEL,...] [--no-upstream] [--no-acc]
                                 [--prewarm-upstream WORKERS] [--profile] [--graph]

Shapes (bf16, N=128, P=64, A=32 shared angles, D and Z; module-like inputs from bench/scan.py's
make_inputs): B4-L4096-H32, B8-L2048-H32, B1-L16384-H32, B4-L4096-H32-G8-N64 (SISO; MIMO R=4
B4-L2048-H32 and B4-L4096-H32, the device README's MIMO R=4 shapes, ours only: upstream's MIMO
backward is TileLang).

Per shape and implementation (median ms, triton.testing.do_bench):
  fwd_ms        forward alone, under torch.no_grad (ours: the forward-only path)
  fwd_bwd_ms    forward with grad + backward of <dO, out> (every float input a leaf)
  bwd_ms        fwd_bwd_ms - forward with grad
  held_mb       memory the autograd graph holds between forward and backward, beyond the
                inputs and the output (torch.cuda.memory_allocated after forward - before)
  peak_bwd_mb   peak allocation during the backward above the level before it
ours (default save_y=True: the forward keeps y) also: the same with save_y=False
(`ours_recompute_y`), and the stage breakdown of the backward (CUDA events around each stage,
scan_bwd.backward(..., timings=), with y recomputed: host gaps between launches count there;
--profile gives the kernels' own GPU times).
Accuracy (--acc, on by default): B=1, L=1024, H=4 (the float64 oracle adjoint is a token loop):
rel_l2 of every gradient of ours and upstream's vs reference/adjoint.py on the same inputs
(upstream gets per-head angles and a bf16 Trap, as its module passes them).

Upstream's backward autotunes four kernels over 27-54 configs each (~160 configs, compiled one
after another on the first call: over 5 minutes on the device host). `--prewarm-upstream W`
first runs W processes, each with every upstream autotuner restricted to its 1/W share of the
configs, through the same shapes: they fill Triton's on-disk cache in parallel, and the full
autotune in this process then only loads binaries and times them (upstream keeps its whole
search space; nothing of it is pruned). The time of that step is reported (meta.prewarm_s).
Ours: the first call of each shape (cold compile on a fresh host) is timed separately
(`first_fwd_bwd_s`, the sum over all our kernels of that shape).

Writes JSON: meta (GPU name, torch, triton, commit from MAMBA3_COMMIT) and rows.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import traceback

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import use_checkout

use_checkout()

from mamba3_kernels.backends.triton import scan_bwd, scan_fwd
from scan import make_inputs

import mamba3_kernels as m3
from mamba3_kernels.scan_tensors import prepare_scan
from mamba3_kernels.spec import resolve_scan

SHAPES = [  # (label, B, L, H, G, N, P)
    ("B4-L4096-H32", 4, 4096, 32, 1, 128, 64),
    ("B8-L2048-H32", 8, 2048, 32, 1, 128, 64),
    ("B1-L16384-H32", 1, 16384, 32, 1, 128, 64),
    ("B4-L4096-H32-G8-N64", 4, 4096, 32, 8, 64, 64),
]
MIMO_SHAPES = [("B4-L2048-H32", 4, 2048, 32, 1, 128, 64), ("B4-L4096-H32", 4, 4096, 32, 1, 128, 64)]
LEAVES = ("q", "k", "v", "z", "adt", "dt", "trap", "angles", "q_bias", "k_bias", "d", "mimo_v",
          "mimo_z", "mimo_out")


T0 = time.time()


def log(msg):
    print(f"[{time.time() - T0:7.1f}s] {msg}", file=sys.stderr, flush=True)


UPSTREAM_MODULES = ("mamba_ssm.ops.triton.mamba3.mamba3_siso_fwd", "mamba_ssm.ops.triton.mamba3.mamba3_siso_bwd",
                    "mamba_ssm.ops.triton.mamba3.angle_dt")


def restrict_upstream_autotune(worker, workers):
    """Every triton Autotuner in upstream's SISO modules keeps configs j with j % workers == worker
    (at least one), so `workers` processes together compile the whole space once."""
    import importlib

    from triton.runtime.autotuner import Autotuner
    n = 0
    for name in UPSTREAM_MODULES:
        mod = importlib.import_module(name)
        for obj in vars(mod).values():
            if isinstance(obj, Autotuner):
                cfgs = obj.configs
                mine = [c for j, c in enumerate(cfgs) if j % workers == worker] or [cfgs[worker % len(cfgs)]]
                obj.configs = mine
                n += 1
    return n


def prewarm_worker(worker, workers, shapes):
    torch.cuda.init()
    n = restrict_upstream_autotune(worker, workers)
    for label, B, L, H, G, N, P in shapes:
        a = make_inputs("siso", B, L, H, G, N, P, 1)
        dout = torch.randn(a["v"].shape, device="cuda").to(torch.bfloat16)
        la = _leaves(a)
        upstream_fwd(la).backward(dout)
        torch.cuda.synchronize()
    print(f"worker {worker}: {n} autotuners, {len(shapes)} shapes", flush=True)


def prewarm_upstream(workers, shapes):
    """Run `workers` prewarm processes (this script, --prewarm-worker i/W) and wait for all."""
    t = time.time()
    labels = ",".join(s[0] for s in shapes)
    procs = [subprocess.Popen([sys.executable, os.path.abspath(__file__), "--prewarm-worker", f"{i}/{workers}",
                               "--only", labels, "--shapes", "siso"], stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for i in range(workers)]
    fails = []
    for i, p in enumerate(procs):
        out, _ = p.communicate()
        if p.returncode != 0:
            fails.append(f"worker {i} rc {p.returncode}: {out[-400:]}")
    return time.time() - t, fails


def _median_ms(fn):
    from triton.testing import do_bench
    fn()
    torch.cuda.synchronize()
    return do_bench(fn, warmup=5, rep=50, return_mode="median")


def _leaves(a):
    return {n: (x.detach().clone().requires_grad_(True) if n in LEAVES and x is not None else x)
            for n, x in a.items()}


def _measure(run_fwd, a, dout):
    """fwd_ms (no grad), fwd_grad_ms, fwd_bwd_ms, held_mb, peak_bwd_mb for run_fwd(args) -> out."""
    res = {}
    with torch.no_grad():
        res["fwd_ms"] = _median_ms(lambda: run_fwd(a))
    la = _leaves(a)

    def fwd_grad():
        return run_fwd(la)

    def fwd_bwd():
        for x in la.values():
            if isinstance(x, torch.Tensor) and x.grad is not None:
                x.grad = None
        out = run_fwd(la)
        out.backward(dout)
    res["fwd_grad_ms"] = _median_ms(fwd_grad)
    res["fwd_bwd_ms"] = _median_ms(fwd_bwd)
    res["bwd_ms"] = res["fwd_bwd_ms"] - res["fwd_grad_ms"]
    for x in la.values():
        if isinstance(x, torch.Tensor):
            x.grad = None
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    before = torch.cuda.memory_allocated()
    out = run_fwd(la)
    torch.cuda.synchronize()
    res["held_mb"] = (torch.cuda.memory_allocated() - before - out.numel() * out.element_size()) / 2**20
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    out.backward(dout)
    torch.cuda.synchronize()
    res["peak_bwd_mb"] = (torch.cuda.max_memory_allocated() - base) / 2**20
    del out
    return res


def bench_cases(kinds: str, only: str = ""):
    """(kind, label, inputs, dout) of the benchmark shapes of each kind in `kinds` ("siso,mimo";
    MIMO at R = 4), those whose label is in `only` (comma separated) when given; fresh bf16 dout."""
    for kind in kinds.split(","):
        R = 4 if kind == "mimo" else 1
        for label, B, L, H, G, N, P in (MIMO_SHAPES if kind == "mimo" else SHAPES):
            if only and label not in only.split(","):
                continue
            a = make_inputs(kind, B, L, H, G, N, P, R)
            yield kind, label, a, torch.randn(a["v"].shape, device="cuda").to(torch.bfloat16)


def ours_fwd(kind, **kw):
    pairing = "half" if kind == "mimo" else "interleaved"
    return lambda a: m3.scan(**a, pairing=pairing, **kw)


def upstream_fwd(a):
    from mamba_ssm.ops.triton.mamba3.mamba3_siso_combined import mamba3_siso_combined
    B, L = a["q"].shape[:2]
    H = a["v"].shape[2]
    ang = a["angles"]
    if ang.dim() == 3:   # shared (B, L, A): upstream takes them per head (its module expands them)
        ang = ang[:, :, None, :].expand(B, L, H, ang.shape[-1])
    return mamba3_siso_combined(Q=a["q"][:, :, 0].contiguous(), K=a["k"][:, :, 0].contiguous(), V=a["v"],
                                ADT=a["adt"], DT=a["dt"], Trap=a["trap"].to(torch.bfloat16),
                                Q_bias=a["q_bias"][:, 0].contiguous(), K_bias=a["k_bias"][:, 0].contiguous(),
                                Angles=ang.contiguous(), D=a["d"], Z=a["z"], chunk_size=64)


def graph_ms(run_fwd, a, dout):
    """Forward + backward captured in one CUDA graph and replayed (median ms, do_bench): the
    device time of the whole step without the host's launch gaps (the device host is a slow VM:
    Triton launches cost 50-100 µs each there, so the eager fwd_bwd_ms of ~25 launches is partly
    host-bound). Gradients land in the graph's own buffers on every replay."""
    from triton.testing import do_bench
    la = _leaves(a)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):
            for x in la.values():
                if isinstance(x, torch.Tensor):
                    x.grad = None
            run_fwd(la).backward(dout)
    torch.cuda.current_stream().wait_stream(s)
    for x in la.values():
        if isinstance(x, torch.Tensor):
            x.grad = None
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        run_fwd(la).backward(dout)
    g.replay()
    torch.cuda.synchronize()
    return do_bench(g.replay, warmup=5, rep=50, return_mode="median")


def kernel_profile(run_fwd, a, dout, iters=3):
    """GPU time per kernel of `iters` forward + backward runs (torch.profiler, device time only,
    so host gaps between launches are excluded): [(kernel, launches per run, µs per run)], by
    time, plus the total."""
    from torch.profiler import ProfilerActivity, profile
    la = _leaves(a)
    run_fwd(la).backward(dout)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(iters):
            for x in la.values():
                if isinstance(x, torch.Tensor):
                    x.grad = None
            run_fwd(la).backward(dout)
        torch.cuda.synchronize()
    rows = []
    for e in prof.key_averages():
        us = getattr(e, "self_device_time_total", None)
        if us is None:
            us = e.self_cuda_time_total
        if us > 0:
            rows.append((e.key[:80], e.count / iters, us / iters))
    rows.sort(key=lambda r: -r[2])
    return {"kernels": rows[:25], "total_us": sum(r[2] for r in rows)}


def stage_breakdown(kind, a, dout):
    """Median over 10 runs of each backward stage's CUDA-event time (ms)."""
    pairing = "half" if kind == "mimo" else "interleaved"
    spec, prob = resolve_scan(**a, pairing=pairing)
    t = prepare_scan(spec, prob, **a)
    scan_fwd.forward(spec, scan_fwd.default_config(spec, prob), t)
    cfg = scan_bwd.default_config(spec, prob)
    runs = []
    for _ in range(11):
        tm = {}
        scan_bwd.backward(spec, cfg, t, {"out": dout}, prob, timings=tm)
        runs.append(tm)
    runs = runs[1:]
    return {k: sorted(r[k] for r in runs)[len(runs) // 2] for k in runs[0]}, cfg


def accuracy(kind, with_upstream, L=1024, H=4, N=128, P=64, device="cuda"):
    """rel_l2 of every gradient (and of out) vs the oracle adjoint on B=1, L, H heads (seeded)."""
    import numpy as np
    from mamba3_kernels.reference import adjoint
    from mamba3_kernels.reference import forward as ref_forward
    from mamba3_kernels.reference.compare import rel_l2
    R = 4 if kind == "mimo" else 1
    a = make_inputs(kind, 1, L, H, 1, N, P, R, seed=1)
    a["trap"] = a["trap"].to(torch.bfloat16).float()        # what upstream sees
    A = a["angles"].shape[-1]
    a["angles"] = a["angles"][:, :, None, :].expand(1, L, H, A).contiguous()  # per head for both
    dout = torch.randn(a["v"].shape, generator=torch.Generator().manual_seed(2)).to(torch.bfloat16).to(device)
    f = lambda x: x.detach().double().cpu().numpy()
    pairing = "half" if kind == "mimo" else "interleaved"
    seen = {n: (None if x is None else f(x)) for n, x in a.items()}
    ref = adjoint.backward(f(dout), None, **seen, pairing=pairing)
    ref_out = ref_forward(**seen, pairing=pairing, return_final_states=False)
    res = {}
    impls = [("ours", ours_fwd(kind))] + ([("upstream", upstream_fwd)] if with_upstream else [])
    for name, fn in impls:
        la = _leaves(a)
        out = fn(la)
        out.backward(dout)
        row = {"out": rel_l2(f(out), ref_out)}
        for n in LEAVES:
            x = la.get(n)
            if isinstance(x, torch.Tensor) and x.grad is not None and ref.get(n) is not None:
                row[n] = rel_l2(np.asarray(f(x.grad)).reshape(ref[n].shape), ref[n])
        res[name] = row
    return res


def run_shape(kind, label, B, L, H, G, N, P, args, rows):
    R = 4 if kind == "mimo" else 1
    a = make_inputs(kind, B, L, H, G, N, P, R)
    dout = torch.randn(a["v"].shape, device="cuda").to(torch.bfloat16)
    res = dict(kind=kind, shape=label, B=B, L=L, H=H, G=G, N=N, P=P, R=R)
    la = _leaves(a)
    t = time.time()
    ours_fwd(kind)(la).backward(dout)
    torch.cuda.synchronize()
    res["first_fwd_bwd_s"] = time.time() - t
    log(f"{kind} {label}: ours first fwd+bwd {res['first_fwd_bwd_s']:.1f} s")
    del la
    res["ours"] = _measure(ours_fwd(kind), a, dout)
    log(f"{kind} {label}: ours {res['ours']}")
    try:   # the memory-saving option: y recomputed by the backward
        res["ours_recompute_y"] = _measure(ours_fwd(kind, save_y=False), a, dout)
    except Exception as e:  # noqa: BLE001
        res["ours_recompute_y"] = f"{type(e).__name__}: {e}"[:300]
    try:
        res["ours_stages_ms"], res["ours_config"] = stage_breakdown(kind, a, dout)
    except Exception as e:  # noqa: BLE001
        res["ours_stages_ms"] = f"{type(e).__name__}: {e}"[:300]
    if args.profile:
        try:
            res["ours_profile"] = kernel_profile(ours_fwd(kind), a, dout)
            res["ours_recompute_y_profile"] = kernel_profile(ours_fwd(kind, save_y=False), a, dout)
            log(f"{kind} {label}: profile total {res['ours_profile']['total_us']:.0f} us/run")
        except Exception as e:  # noqa: BLE001
            res["ours_profile"] = f"{type(e).__name__}: {e}"[:300]
    if kind == "siso" and not args.no_upstream:
        try:
            t = time.time()
            la = _leaves(a)
            upstream_fwd(la).backward(dout)
            torch.cuda.synchronize()
            res["upstream_first_fwd_bwd_s"] = time.time() - t
            del la
            log(f"{kind} {label}: upstream first fwd+bwd (autotune) {res['upstream_first_fwd_bwd_s']:.1f} s")
            res["upstream"] = _measure(upstream_fwd, a, dout)
            log(f"{kind} {label}: upstream {res['upstream']}")
            res["speedup_fwd_bwd"] = res["upstream"]["fwd_bwd_ms"] / res["ours"]["fwd_bwd_ms"]
            res["speedup_bwd"] = res["upstream"]["bwd_ms"] / res["ours"]["bwd_ms"]
        except Exception as e:  # noqa: BLE001
            res["upstream_error"] = f"{type(e).__name__}: {e}"[:500]
    if args.graph:
        for name, fn in [("ours", ours_fwd(kind))] + ([("upstream", upstream_fwd)] if kind == "siso" and
                                                       not args.no_upstream else []):
            try:
                res[f"{name}_graph_fwd_bwd_ms"] = graph_ms(fn, a, dout)
            except Exception as e:  # noqa: BLE001
                res[f"{name}_graph_fwd_bwd_ms"] = f"{type(e).__name__}: {e}"[:300]
            log(f"{kind} {label}: {name} graph fwd+bwd {res[f'{name}_graph_fwd_bwd_ms']}")
        if isinstance(res.get("upstream_graph_fwd_bwd_ms"), float) and isinstance(res.get("ours_graph_fwd_bwd_ms"), float):
            res["speedup_graph_fwd_bwd"] = res["upstream_graph_fwd_bwd_ms"] / res["ours_graph_fwd_bwd_ms"]
    rows.append(res)
    print(json.dumps(res, default=str), flush=True)
    torch.cuda.empty_cache()


def _num(x):
    return x if isinstance(x, float) else float("nan")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                                  "scan_bwd.json"))
    ap.add_argument("--shapes", default="siso,mimo")
    ap.add_argument("--quick", action="store_true", help="first shape of each kind only")
    ap.add_argument("--only", default="")
    ap.add_argument("--no-upstream", action="store_true")
    ap.add_argument("--no-acc", action="store_true")
    ap.add_argument("--profile", action="store_true", help="GPU time per kernel (torch.profiler)")
    ap.add_argument("--graph", action="store_true", help="fwd+bwd replayed from a CUDA graph, ours and upstream")
    ap.add_argument("--prewarm-upstream", type=int, default=0, metavar="WORKERS")
    ap.add_argument("--prewarm-worker", default="", help=argparse.SUPPRESS)
    args = ap.parse_args()

    def selected(kind):
        shapes = SHAPES if kind == "siso" else MIMO_SHAPES
        if args.quick:
            shapes = shapes[:1]
        if args.only:
            shapes = [s for s in shapes if s[0] in args.only.split(",")]
        return shapes
    if args.prewarm_worker:
        i, w = map(int, args.prewarm_worker.split("/"))
        prewarm_worker(i, w, selected("siso"))
        return
    torch.backends.cuda.matmul.allow_tf32 = False
    meta = dict(device=torch.cuda.get_device_name(), capability=list(torch.cuda.get_device_capability()),
                torch=torch.__version__, triton=__import__("triton").__version__,
                commit=os.environ.get("MAMBA3_COMMIT", "unknown"))
    print(json.dumps(meta), flush=True)
    rows, acc = [], {}
    if args.prewarm_upstream and "siso" in args.shapes.split(",") and not args.no_upstream:
        meta["prewarm_s"], meta["prewarm_failures"] = prewarm_upstream(args.prewarm_upstream, selected("siso"))
        meta["prewarm_workers"] = args.prewarm_upstream
        log(f"upstream prewarm: {meta['prewarm_s']:.1f} s, failures {meta['prewarm_failures']}")

    def save():
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(dict(meta=meta, rows=rows, accuracy=acc), f, indent=1, default=str)
    for kind in args.shapes.split(","):
        shapes = selected(kind)
        for label, B, L, H, G, N, P in shapes:
            try:
                run_shape(kind, label, B, L, H, G, N, P, args, rows)
            except Exception as e:  # noqa: BLE001
                traceback.print_exc()
                rows.append(dict(kind=kind, shape=label, error=f"{type(e).__name__}: {e}"[:500]))
            save()
        if not args.no_acc:
            log(f"{kind}: accuracy")
            try:
                acc[kind] = accuracy(kind, kind == "siso" and not args.no_upstream)
            except Exception as e:  # noqa: BLE001
                traceback.print_exc()
                acc[kind] = f"{type(e).__name__}: {e}"[:500]
            print(json.dumps({"accuracy": {kind: acc[kind]}}, default=str), flush=True)
            save()
    print(f"{'kind':<5} {'shape':<22} {'fwd':>7} {'fwd+bwd':>8} {'bwd':>7} {'held MB':>8} {'peak MB':>8} "
          f"{'up fwd+bwd':>10} {'up bwd':>7} {'up held':>8} {'x':>5} {'graph':>7} {'up graph':>8} {'xg':>5}")
    for r in rows:
        if "error" in r:
            print(f"{r['kind']:<5} {r['shape']:<22} ERROR {r['error'][:80]}")
            continue
        o, u = r["ours"], r.get("upstream", {})
        nan = float("nan")
        print(f"{r['kind']:<5} {r['shape']:<22} {o['fwd_ms']:7.3f} {o['fwd_bwd_ms']:8.3f} {o['bwd_ms']:7.3f} "
              f"{o['held_mb']:8.1f} {o['peak_bwd_mb']:8.1f} {u.get('fwd_bwd_ms', nan):10.3f} "
              f"{u.get('bwd_ms', nan):7.3f} {u.get('held_mb', nan):8.1f} {r.get('speedup_fwd_bwd', nan):5.2f} "
              f"{_num(r.get('ours_graph_fwd_bwd_ms')):7.3f} {_num(r.get('upstream_graph_fwd_bwd_ms')):8.3f} "
              f"{_num(r.get('speedup_graph_fwd_bwd')):5.2f}")


if __name__ == "__main__":
    main()
