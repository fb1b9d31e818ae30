"""Chunked-scan forward benchmark: our Triton forward vs upstream, vs the rooflines.

    python bench/scan.py [--out results.json] [--shapes siso,mimo] [--sweep] [--no-upstream]
                         [--quick] [--acc-tokens 2048]

Shapes (issue: forward): B=4 L=4096 H=32; B=8 L=2048 H=32; B=1 L=16384 H=32; B=4 L=4096 H=32
G=8 N=64; B=1 L=65536 H=32 -- all bf16, G=1, N=128, P=64 unless said; SISO and MIMO R=4
(plus MIMO B=4 L=2048, upstream's own reference shape). Module-like inputs: RMS-normalised q, k;
DT = exp(U[ln 1e-3, ln 0.1]), ADT = -U[1, 16] DT; raw trap ~ N(0, 1); A = N/4 angles (rope
fraction 0.5) shared by all heads (B, L, A) for ours -- upstream needs them per head, so it gets
the (B, L, H, A) expansion (materialised, as its module does); D, Z on; MIMO projections.

Per candidate: median ms (triton.testing.do_bench, also CUDA-graph replay for ours), ratio to
upstream, fraction of the memory roofline (minimum bytes: every input read once, the output
written once, over the measured device copy bandwidth) and of the bf16 tensor-core roofline
(our algorithm's MMA flops over a measured 8192^3 bf16 matmul rate), and accuracy (rel_l2,
rel_max) of ours and upstream's against the float64 oracle on the same inputs (a slice: batch
row 0, 4 heads, the first --acc-tokens tokens; outputs there depend on nothing else).
Upstream (state-spaces/mamba on PYTHONPATH, e.g. .upstream/): SISO `mamba3_siso_combined`
(Triton), MIMO `mamba3_mimo` (TileLang, chunk 16, rotary divisor 4; needs the tilelang bundle).
With --sweep, configs of the tuning space are timed on the first shape of each kind.
"""
from __future__ import annotations

import argparse
import functools
import json
import math
import os
import sys
import time
import traceback

import torch

from common import copy_bandwidth, use_checkout  # noqa: E402  (bench/common.py)

use_checkout()
_UP = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), ".upstream")
if os.path.isdir(_UP) and _UP not in sys.path:  # upstream state-spaces/mamba (carried, ignored)
    sys.path.append(_UP)

from mamba3_kernels.backends.triton import scan_fwd as sf  # noqa: E402
from mamba3_kernels.reference import forward_chunked  # noqa: E402
from mamba3_kernels.reference.compare import rel_l2, rel_max  # noqa: E402
from mamba3_kernels.scan_tensors import prepare_scan  # noqa: E402
from mamba3_kernels.spec import resolve_scan  # noqa: E402

SHAPES = [  # (label, B, L, H, G, N, P)
    ("B4-L4096-H32", 4, 4096, 32, 1, 128, 64),
    ("B8-L2048-H32", 8, 2048, 32, 1, 128, 64),
    ("B1-L16384-H32", 1, 16384, 32, 1, 128, 64),
    ("B4-L4096-H32-G8-N64", 4, 4096, 32, 8, 64, 64),
    ("B1-L65536-H32", 1, 65536, 32, 1, 128, 64),
]
MIMO_EXTRA = [("B4-L2048-H32", 4, 2048, 32, 1, 128, 64)]
UPSTREAM_NOTED = {  # measured by the issue author on this H100 (ms)
    ("siso", "B4-L4096-H32"): 0.759, ("siso", "B8-L2048-H32"): 0.736, ("siso", "B1-L16384-H32"): 2.54,
    ("siso", "B4-L4096-H32-G8-N64"): 0.549, ("mimo", "B4-L2048-H32"): 0.890,
    # bench/results/scan_fwd_h100_call2.json, scan_fwd_h100_mimo_upstream.json
    ("siso", "B1-L65536-H32"): 10.03, ("mimo", "B4-L4096-H32"): 1.798,
}


def matmul_rate() -> float:
    n = 8192
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    from triton.testing import do_bench
    ms = do_bench(lambda: a @ b, warmup=25, rep=200)
    return 2 * n ** 3 / (ms * 1e-3)


def make_inputs(kind, B, L, H, G, N, P, R, seed=0, device="cuda"):
    g = torch.Generator(device=device).manual_seed(seed)
    dev, bf = device, torch.bfloat16
    A = N // 4

    def rn(*s):
        return torch.randn(*s, device=dev, generator=g)

    def rms(x):
        return x / x.float().pow(2).mean(-1, keepdim=True).sqrt()
    q = rms(rn(B, L, R, G, N)).to(bf)
    k = rms(rn(B, L, R, G, N)).to(bf)
    v = rn(B, L, H, P).to(bf)
    z = rn(B, L, H, P).to(bf)
    dt = torch.exp(torch.empty(B, H, L, device=dev).uniform_(math.log(1e-3), math.log(0.1), generator=g))
    adt = -torch.empty(B, H, L, device=dev).uniform_(1.0, 16.0, generator=g) * dt
    trap = rn(B, H, L)
    qb = 1.0 + 0.1 * rn(H, R, N)
    kb = 1.0 + 0.1 * rn(H, R, N)
    ang = rn(B, L, A)
    d = torch.ones(H, device=dev)
    a = dict(q=q, k=k, v=v, adt=adt, dt=dt, trap=trap, q_bias=qb, k_bias=kb, angles=ang, d=d, z=z)
    if kind == "mimo":
        a["mimo_v"] = 1.0 / R + 0.1 * rn(H, R, P)
        a["mimo_z"] = 1.0 + 0.1 * rn(H, R, P)
        a["mimo_out"] = 1.0 / R + 0.1 * rn(H, R, P)
    return a


def pairing(kind):
    return "half" if kind == "mimo" else "interleaved"


def ours_bundle(kind, a):
    spec, prob = resolve_scan(**a, pairing=pairing(kind))
    return spec, prob, prepare_scan(spec, prob, **a)


def min_bytes(kind, a) -> int:
    n = 0
    for name in ("q", "k", "v", "z", "adt", "dt", "trap", "angles"):
        n += a[name].numel() * a[name].element_size()
    n += a["v"].numel() * 2  # output (B, L, H, P) bf16
    return n


def mma_flops(kind, B, L, H, N, P, R, C) -> float:
    """Our algorithm's tensor-core flops: per chunk of C tokens (rows = C R): scores 2 rows^2 N,
    intra 2 rows^2 P, inter 2 rows N P, state updates 2 x 2 rows N P (phases 2 and 4)."""
    rows = C * R
    per_chunk = 2 * rows * rows * N + 2 * rows * rows * P + 6 * rows * N * P
    return B * H * (L / C) * per_chunk


def upstream_siso(a):
    from mamba_ssm.ops.triton.mamba3.mamba3_siso_combined import mamba3_siso_combined
    B, L, R, G, N = a["q"].shape
    H = a["v"].shape[2]
    ang = a["angles"][:, :, None, :].expand(B, L, H, a["angles"].shape[-1]).contiguous()
    args = dict(Q=a["q"][:, :, 0].contiguous(), K=a["k"][:, :, 0].contiguous(), V=a["v"], ADT=a["adt"],
                DT=a["dt"], Trap=a["trap"].to(torch.bfloat16), Q_bias=a["q_bias"][:, 0].contiguous(),
                K_bias=a["k_bias"][:, 0].contiguous(), Angles=ang, D=a["d"], Z=a["z"])
    return lambda: mamba3_siso_combined(**args, chunk_size=64)


def upstream_mimo(a):
    from mamba_ssm.ops.tilelang.mamba3.mamba3_mimo import mamba3_mimo
    B, L, R, G, N = a["q"].shape
    H = a["v"].shape[2]
    ang = a["angles"][:, :, None, :].expand(B, L, H, a["angles"].shape[-1]).contiguous()
    args = dict(Q=a["q"], K=a["k"], V=a["v"], ADT=a["adt"], DT=a["dt"], Trap=a["trap"].to(torch.bfloat16),
                Q_bias=a["q_bias"], K_bias=a["k_bias"], MIMO_V=a["mimo_v"], MIMO_Z=a["mimo_z"],
                MIMO_Out=a["mimo_out"], Angles=ang, D=a["d"], Z=a["z"])
    return lambda: mamba3_mimo(**args, chunk_size=16, rotary_dim_divisor=4, dtype=torch.bfloat16)


def oracle_slice(kind, a, heads, ntok):
    """float64 chunked oracle on batch row 0, heads [0, heads), tokens [0, ntok)."""
    H = a["v"].shape[2]
    G = a["q"].shape[3]
    hs = slice(0, heads)
    gsel = sorted({h // (H // G) for h in range(heads)})
    assert gsel == [0], "oracle slice assumes the heads share group 0"
    f = lambda x: x.detach().double().cpu().numpy()  # noqa: E731
    s = dict(q=f(a["q"][:1, :ntok, :, :1]), k=f(a["k"][:1, :ntok, :, :1]), v=f(a["v"][:1, :ntok, hs]),
             adt=f(a["adt"][:1, hs, :ntok]), dt=f(a["dt"][:1, hs, :ntok]), trap=f(a["trap"][:1, hs, :ntok]),
             q_bias=f(a["q_bias"][hs]), k_bias=f(a["k_bias"][hs]), angles=f(a["angles"][:1, :ntok]),
             d=f(a["d"][hs]), z=f(a["z"][:1, :ntok, hs]))
    for n in ("mimo_v", "mimo_z", "mimo_out"):
        if n in a:
            s[n] = f(a[n][hs])
    out, _ = forward_chunked(**s, pairing=pairing(kind), chunk_size=64)
    return out


def accuracy(out, ref, heads, ntok):
    o = out[:1, :ntok, :heads].detach().double().cpu().numpy()
    return dict(rel_l2=rel_l2(o, ref), rel_max=rel_max(o, ref))


def bench(fn, graph=False):
    from triton.testing import do_bench
    fn()
    torch.cuda.synchronize()
    ms = do_bench(fn, warmup=10, rep=100, return_mode="median")
    gms = None
    if graph:
        try:
            s = torch.cuda.Stream()
            s.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(s):
                fn()
            torch.cuda.current_stream().wait_stream(s)
            gr = torch.cuda.CUDAGraph()
            with torch.cuda.graph(gr):
                fn()
            gms = do_bench(gr.replay, warmup=5, rep=100, return_mode="median")
        except Exception as e:  # noqa: BLE001
            gms = f"graph failed: {type(e).__name__}: {e}"[:200]
    return ms, gms


def run_shape(kind, label, B, L, H, G, N, P, args, bw, peak, rows):
    R = 4 if kind == "mimo" else 1
    a = make_inputs(kind, B, L, H, G, N, P, R)
    spec, prob, t = ours_bundle(kind, a)
    cfg = sf.default_config(spec, prob)
    res = dict(kind=kind, shape=label, B=B, L=L, H=H, G=G, N=N, P=P, R=R, config=cfg)
    nbytes = min_bytes(kind, a)
    res["min_bytes"] = nbytes
    res["mem_roofline_ms"] = nbytes / bw * 1e3
    heads, ntok = 4, min(L, args.acc_tokens)
    ref = None
    if not args.no_acc:
        t0 = time.time()
        ref = oracle_slice(kind, a, heads, ntok)
        res["oracle_s"] = round(time.time() - t0, 1)
    ms, gms = bench(functools.partial(sf.forward, spec, cfg, t), graph=True)
    res["ours_ms"], res["ours_graph_ms"] = ms, gms
    best = min(ms, gms) if isinstance(gms, float) else ms
    res["ours_mem_roofline_frac"] = res["mem_roofline_ms"] / best
    fl = mma_flops(kind, B, L, H, N, P, R, cfg["CHUNK"])
    res["ours_mma_flops"] = fl
    res["ours_compute_roofline_frac"] = fl / peak / (best * 1e-3)
    if ref is not None:
        res["ours_acc"] = accuracy(t.out, ref, heads, ntok)
    try:
        res["ours_phase_ms"] = breakdown(spec, cfg, t)
    except Exception as e:  # noqa: BLE001
        res["ours_phase_ms"] = f"{type(e).__name__}: {e}"[:300]
    if args.sweep_here:
        sweep = []
        for c in sweep_configs(spec, prob, cfg):
            try:
                m, g = bench(functools.partial(sf.forward, spec, c, t), graph=True)
                sweep.append(dict(config=c, ms=m, graph_ms=g))
            except Exception as e:  # noqa: BLE001
                sweep.append(dict(config=c, error=f"{type(e).__name__}: {e}"[:300]))
        res["sweep"] = sweep
        for sw in sweep:
            if "ms" in sw:
                try:
                    sw["phase_ms"] = breakdown(spec, sw["config"], t)
                except Exception:  # noqa: BLE001
                    pass
        ok = [s for s in sweep if "ms" in s]
        if ok:
            bestc = min(ok, key=lambda s: min(s["ms"], s["graph_ms"]) if isinstance(s["graph_ms"], float) else s["ms"])
            res["sweep_best"] = bestc
    if not args.no_upstream and kind in args.upstream.split(","):
        try:
            up = upstream_mimo(a) if kind == "mimo" else upstream_siso(a)
            with torch.no_grad():
                ums, _ = bench(up)
                uout = up()
            res["upstream_ms"] = ums
            res["speedup"] = ums / best
            res["upstream_mem_roofline_frac"] = res["mem_roofline_ms"] / ums
            if ref is not None:
                res["upstream_acc"] = accuracy(uout, ref, heads, ntok)
        except Exception as e:  # noqa: BLE001
            res["upstream_error"] = f"{type(e).__name__}: {e}"[:500]
    noted = UPSTREAM_NOTED.get((kind, label))
    if noted:
        res["upstream_noted_ms"] = noted
        res["speedup_vs_noted"] = noted / best
    rows.append(res)
    print(json.dumps({k: v for k, v in res.items() if k not in ("sweep",)}, default=str), flush=True)
    del t, a
    torch.cuda.empty_cache()


def sweep_configs(spec, prob, d):
    """Prefetch (phase 2 / phase 4) x rows per chunk {16, 32, 64} x warps, around the default."""
    rp = sf._rp(spec)
    seglen = d["SEG"] * d["CHUNK"]

    def rows(r, **kw):
        C = max(1, r // rp)
        return dict(d, CHUNK=C, SEG=max(1, min(256, sf._pow2(max(1, seglen // C)))), **kw)
    return [d, dict(d, PREFETCH=1), dict(d, PREFETCH=0, STATE_PREFETCH=False, STATE_CHUNK=None),
            dict(d, STATE_PREFETCH=True), dict(d, STATE_PREFETCH=True, PREFETCH=True),
            dict(d, STATE_PREFETCH=True, PREFETCH=True, num_warps=8),
            rows(32, num_warps=4, state_num_warps=4), rows(32, num_warps=4, state_num_warps=4, STATE_PREFETCH=True),
            rows(32, num_warps=4, state_num_warps=4, STATE_PREFETCH=True, PREFETCH=True),
            rows(64, num_warps=4, state_num_warps=4, STATE_PREFETCH=True, PREFETCH=True),
            rows(32, num_warps=8, state_num_warps=4, STATE_PREFETCH=True, PREFETCH=True)]


def breakdown(spec, cfg, t):
    """Median ms of each phase's kernel alone."""
    from triton.testing import do_bench
    calls, _ = sf.plan(spec, sf.effective_config(spec, cfg, t), t)   # what forward runs
    res = {}
    for c in calls:
        if c["run"]:
            sf.launch(c)
            res[c["name"]] = do_bench(lambda: sf.launch(c), warmup=5, rep=50, return_mode="median")
    return res


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "scan.json"))
    ap.add_argument("--shapes", default="siso,mimo")
    ap.add_argument("--sweep", action="store_true")
    ap.add_argument("--no-upstream", action="store_true")
    ap.add_argument("--upstream", default="siso,mimo", help="kinds to time upstream for")
    ap.add_argument("--no-acc", action="store_true")
    ap.add_argument("--quick", action="store_true", help="first two shapes only")
    ap.add_argument("--only", default="", help="comma-separated shape labels to run")
    ap.add_argument("--acc-tokens", type=int, default=2048)
    args = ap.parse_args()
    torch.backends.cuda.matmul.allow_tf32 = False
    bw = copy_bandwidth()
    peak = matmul_rate()
    import importlib.metadata as md

    def ver(dist):
        try:
            return md.version(dist)
        except Exception:  # noqa: BLE001
            return None
    meta = dict(device=torch.cuda.get_device_name(), torch=torch.__version__,
                triton=__import__("triton").__version__, tilelang=ver("tilelang"),
                commit=os.environ.get("MAMBA3_COMMIT", "unknown"), copy_bw=bw, bf16_matmul_flops=peak)
    print(json.dumps(meta), flush=True)
    rows = []
    for kind in args.shapes.split(","):
        shapes = SHAPES + (MIMO_EXTRA if kind == "mimo" else [])
        if args.quick:
            shapes = shapes[:2]
        if args.only:
            shapes = [s for s in shapes if s[0] in args.only.split(",")]
        for i, (label, B, L, H, G, N, P) in enumerate(shapes):
            args.sweep_here = args.sweep and i == 0
            try:
                run_shape(kind, label, B, L, H, G, N, P, args, bw, peak, rows)
            except Exception as e:  # noqa: BLE001
                traceback.print_exc()
                rows.append(dict(kind=kind, shape=label, error=f"{type(e).__name__}: {e}"[:500]))
            os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
            with open(args.out, "w") as f:  # after every shape: a timeout keeps what was measured
                json.dump(dict(meta=meta, rows=rows), f, indent=1, default=str)
    print(f"{'kind':<5} {'shape':<22} {'ours ms':>8} {'graph':>8} {'upstr ms':>8} {'x':>6} {'mem%':>6} {'mma%':>6} "
          f"{'ours l2':>9} {'up l2':>9}")
    for r in rows:
        if "error" in r:
            print(f"{r['kind']:<5} {r['shape']:<22} ERROR {r['error'][:80]}")
            continue
        g = r.get("ours_graph_ms")
        print(f"{r['kind']:<5} {r['shape']:<22} {r['ours_ms']:8.3f} {g if isinstance(g, str) else f'{g:8.3f}':>8} "
              f"{r.get('upstream_ms', float('nan')):8.3f} {r.get('speedup', float('nan')):6.2f} "
              f"{100 * r['ours_mem_roofline_frac']:6.1f} {100 * r['ours_compute_roofline_frac']:6.1f} "
              f"{r.get('ours_acc', {}).get('rel_l2', float('nan')):9.2e} "
              f"{r.get('upstream_acc', {}).get('rel_l2', float('nan')):9.2e}")


if __name__ == "__main__":
    main()
