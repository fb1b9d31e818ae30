"""Chunked-scan forward: check and time config variants on the H100 in one call.

    PYTHONPATH=$PWD python bench/scan_fwd_sweep.py --out $OUT/sweep.json [--plan verify] [--budget 380]

Plans: call1 / call2 / call3 are the three H100 calls of bench/notes/scan_fwd.md (results in
bench/results/scan_fwd_h100_sweep{1,2,3}.json); the SPLIT / STATE_SPLIT / JOIN / STATE_JOIN keys
of call3 name knobs that were measured slower and then removed (plan() ignores unknown keys).

Per shape: inputs as bench/scan.py (module-like), the float64 oracle on a slice (batch row 0,
4 heads, the first 1024 tokens). Per variant (config overrides of the default): output poisoned
with NaN, one run, every element finite, rel_l2 / rel_max on the slice; then the whole forward
and each phase alone captured in CUDA graphs and timed by do_bench (median, L2 flushed between
replays). JSON written after every variant (a timeout keeps what was measured).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import copy_bandwidth, use_checkout  # noqa: E402

use_checkout()
_UP = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), ".upstream")
if os.path.isdir(_UP) and _UP not in sys.path:  # upstream state-spaces/mamba (carried, ignored)
    sys.path.append(_UP)

import scan as sb  # noqa: E402  (bench/scan.py: inputs, oracle, bytes)
from mamba3_kernels.backends.triton import scan_fwd as sf  # noqa: E402


def graph_ms(fn):
    from triton.testing import do_bench
    fn()
    torch.cuda.synchronize()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    return do_bench(g.replay, warmup=10, rep=60, return_mode="median")


def plain_ms(fn):
    from triton.testing import do_bench
    fn()
    torch.cuda.synchronize()
    return do_bench(fn, warmup=10, rep=60, return_mode="median")


def run_upstream(kind, label, a, ref, heads, ntok, roof, args, t_start):
    """Upstream on the same inputs (bench/scan.py's wrappers): do_bench median (no graph), accuracy."""
    r = dict(kind=kind, shape=label, variant="upstream", mem_roofline_ms=roof)
    if time.time() - t_start > args.upstream_budget:
        r["skipped"] = "time budget"
        return r
    try:
        t0 = time.time()
        up = sb.upstream_mimo(a) if kind == "mimo" else sb.upstream_siso(a)
        with torch.no_grad():
            out = up()
            torch.cuda.synchronize()
            r["compile_s"] = round(time.time() - t0, 1)
            r["acc"] = sb.accuracy(out, ref, heads, ntok)
            r["ms"] = plain_ms(up)
        r["roofline_frac"] = roof / r["ms"]
        r["all_finite"] = bool(torch.isfinite(out).all().item())
    except Exception as e:  # noqa: BLE001
        traceback.print_exc()
        r["error"] = f"{type(e).__name__}: {e}"[:600]
    return r


def with_rows(spec, d, rows, **kw):
    """The default config with `rows` rows per chunk at the same segment length."""
    rp = sf._rp(spec)
    seglen = d["SEG"] * d["CHUNK"]
    C = max(1, rows // rp)
    return dict(d, CHUNK=C, SEG=max(1, sf._pow2(max(1, seglen // C))), **kw)


PLANS = {
    "call1": {
        ("siso", "B4-L4096-H32"): [
            ("default", 16, {}),
            ("sp", 16, dict(STATE_PREFETCH=True)),
            ("sp+p", 16, dict(STATE_PREFETCH=True, PREFETCH=True)),
            ("ell", 16, dict(ELL=True)),
            ("ell+sp", 16, dict(ELL=True, STATE_PREFETCH=True)),
            ("ell+sp+p", 16, dict(ELL=True, STATE_PREFETCH=True, PREFETCH=True)),
            ("c32w4", 32, dict(num_warps=4)),
            ("c32w4+sp+p", 32, dict(num_warps=4, STATE_PREFETCH=True, PREFETCH=True)),
            ("c32w8", 32, dict(num_warps=8)),
            ("c32w8+ell", 32, dict(num_warps=8, ELL=True)),
            ("c32w8+sp+p", 32, dict(num_warps=8, STATE_PREFETCH=True, PREFETCH=True)),
            ("c64w8", 64, dict(num_warps=8, state_num_warps=8)),
            ("c64w8s4", 64, dict(num_warps=8, state_num_warps=4)),
            ("c16w4 stages2", 16, dict(num_stages=2)),
        ],
        ("siso", "B1-L16384-H32"): [
            ("default", 16, {}), ("sp+p", 16, dict(STATE_PREFETCH=True, PREFETCH=True)),
            ("ell", 16, dict(ELL=True)), ("c32w4", 32, dict(num_warps=4)), ("c32w8", 32, dict(num_warps=8)),
        ],
        ("siso", "B4-L4096-H32-G8-N64"): [
            ("default", 16, {}), ("sp+p", 16, dict(STATE_PREFETCH=True, PREFETCH=True)),
            ("ell", 16, dict(ELL=True)), ("c32w4", 32, dict(num_warps=4)), ("c32w8", 32, dict(num_warps=8)),
            ("c64w8", 64, dict(num_warps=8)),
        ],
        ("mimo", "B4-L4096-H32"): [
            ("default", 16, {}), ("sp+p", 16, dict(STATE_PREFETCH=True, PREFETCH=True)),
            ("ell", 16, dict(ELL=True)), ("c8w4", 32, dict(num_warps=4)), ("c8w8", 32, dict(num_warps=8)),
            ("c16w8", 64, dict(num_warps=8)),
        ],
    },
    "call2": {
        ("siso", "B4-L4096-H32"): [
            ("g", 16, dict(GATES=True)),
            ("nog", 16, {}),
            ("g+p", 16, dict(GATES=True, PREFETCH=True)),
            ("g+sp+p", 16, dict(GATES=True, PREFETCH=True, STATE_PREFETCH=True)),
            ("g+pass16", 16, dict(GATES=True, PASS_BLOCK_P=16)),
            ("g+pass64", 16, dict(GATES=True, PASS_BLOCK_P=64)),
            ("g c32w4", 32, dict(GATES=True, num_warps=4)),
            ("g c32w4+sp", 32, dict(GATES=True, num_warps=4, STATE_PREFETCH=True)),
            ("g+p seg2x", 16, dict(GATES=True, PREFETCH=True, seg_x2=True)),
            ("g again", 16, dict(GATES=True)),
        ],
        ("siso", "B1-L16384-H32"): [
            ("g", 16, dict(GATES=True)), ("g+p", 16, dict(GATES=True, PREFETCH=True)),
            ("g c32w4", 32, dict(GATES=True, num_warps=4)),
        ],
        ("siso", "B4-L4096-H32-G8-N64"): [
            ("g", 16, dict(GATES=True)), ("g+p", 16, dict(GATES=True, PREFETCH=True)),
            ("g+sp+p", 16, dict(GATES=True, PREFETCH=True, STATE_PREFETCH=True)),
            ("g c32w4", 32, dict(GATES=True, num_warps=4)),
        ],
        ("mimo", "B4-L4096-H32"): [
            ("g", 16, dict(GATES=True)), ("g+p", 16, dict(GATES=True, PREFETCH=True)),
            ("g+sp+p", 16, dict(GATES=True, PREFETCH=True, STATE_PREFETCH=True)),
            ("g+sp", 16, dict(GATES=True, STATE_PREFETCH=True)),
            ("g c8w4+sp", 32, dict(GATES=True, num_warps=4, STATE_PREFETCH=True)),
        ],
    },
}

_SISO_CAND = dict(GATES=True, PREFETCH=2, BIAS_RELOAD=True, STATE_CHUNK=32, STATE_PREFETCH=True, STATE_SPLIT=True)
_MIMO_CAND = dict(GATES=True, PREFETCH=2, BIAS_RELOAD=True, STATE_CHUNK=8, STATE_PREFETCH=True, STATE_SPLIT=True)
PLANS["call3"] = {
    ("siso", "B4-L4096-H32"): [
        ("cand", 16, _SISO_CAND),
        ("cand nosplit", 16, dict(_SISO_CAND, STATE_SPLIT=False)),
        ("cand p1", 16, dict(_SISO_CAND, PREFETCH=1)),
        ("cand nosp", 16, dict(_SISO_CAND, STATE_PREFETCH=False)),
        ("cand sc16", 16, dict(_SISO_CAND, STATE_CHUNK=None)),
        ("cand p0", 16, dict(_SISO_CAND, PREFETCH=0)),
        ("cand seg/2", 16, dict(_SISO_CAND, seg_half=True)),
        ("cand split4", 16, dict(_SISO_CAND, SPLIT=True)),
        ("cand noreload", 16, dict(_SISO_CAND, BIAS_RELOAD=False)),
        ("cand join4", 16, dict(_SISO_CAND, JOIN=True)),
        ("cand join4+2", 16, dict(_SISO_CAND, JOIN=True, STATE_JOIN=True)),
        ("cand again", 16, _SISO_CAND),
        ("upstream", 0, {}),
    ],
    ("siso", "B8-L2048-H32"): [("cand", 16, _SISO_CAND), ("cand p1", 16, dict(_SISO_CAND, PREFETCH=1)),
                               ("upstream", 0, {})],
    ("siso", "B1-L16384-H32"): [("cand", 16, _SISO_CAND), ("cand p1", 16, dict(_SISO_CAND, PREFETCH=1)),
                                ("upstream", 0, {})],
    ("siso", "B4-L4096-H32-G8-N64"): [("cand", 16, _SISO_CAND), ("cand p1", 16, dict(_SISO_CAND, PREFETCH=1)),
                                      ("cand join4", 16, dict(_SISO_CAND, JOIN=True)),
                                      ("cand nosplit", 16, dict(_SISO_CAND, STATE_SPLIT=False)),
                                      ("upstream", 0, {})],
    ("siso", "B1-L65536-H32"): [("cand", 16, _SISO_CAND), ("upstream", 0, {})],
    ("mimo", "B4-L4096-H32"): [
        ("cand", 16, _MIMO_CAND),
        ("cand nosplit", 16, dict(_MIMO_CAND, STATE_SPLIT=False)),
        ("cand p1", 16, dict(_MIMO_CAND, PREFETCH=1)),
        ("cand sc4", 16, dict(_MIMO_CAND, STATE_CHUNK=None)),
        ("cand p0", 16, dict(_MIMO_CAND, PREFETCH=0)),
        ("cand seg/2", 16, dict(_MIMO_CAND, seg_half=True)),
        ("cand join4", 16, dict(_MIMO_CAND, JOIN=True)),
        ("upstream", 0, {}),
    ],
    ("mimo", "B4-L2048-H32"): [("cand", 16, _MIMO_CAND), ("upstream", 0, {})],
    ("mimo", "B8-L2048-H32"): [("cand", 16, _MIMO_CAND), ("upstream", 0, {})],
    ("mimo", "B1-L16384-H32"): [("cand", 16, _MIMO_CAND), ("upstream", 0, {})],
    ("mimo", "B4-L4096-H32-G8-N64"): [("cand", 16, _MIMO_CAND), ("upstream", 0, {})],
    ("mimo", "B1-L65536-H32"): [("cand", 16, _MIMO_CAND), ("upstream", 0, {})],
}


# the next device call: the committed defaults and upstream (re-timed) on every listed shape,
# PREFETCH=1 (faster where it spills a little) next to them
PLANS["verify"] = {
    (kind, s[0]): [("default", 0, {}), ("p1", 0, dict(PREFETCH=1)), ("upstream", 0, {})]
    for kind in ("siso", "mimo") for s in sb.SHAPES + (sb.MIMO_EXTRA if kind == "mimo" else [])
}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--plan", default="call1")
    ap.add_argument("--budget", type=float, default=380.0, help="seconds; no new variant after this")
    ap.add_argument("--acc-tokens", type=int, default=1024)
    ap.add_argument("--upstream-budget", type=float, default=400.0, help="seconds; no upstream run after this")
    args = ap.parse_args()
    t_start = time.time()
    torch.backends.cuda.matmul.allow_tf32 = False
    import triton
    meta = dict(device=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__,
                commit=os.environ.get("MAMBA3_COMMIT", "?"), copy_bw=copy_bandwidth(), plan=args.plan)
    print(json.dumps(meta), flush=True)
    rows = []
    shapes = {s[0]: s for s in sb.SHAPES + sb.MIMO_EXTRA}

    def dump():
        with open(args.out, "w") as f:
            json.dump(dict(meta=meta, rows=rows), f, indent=1, default=str)
    for (kind, label), variants in PLANS[args.plan].items():
        _, B, L, H, G, N, P = shapes[label]
        R = 4 if kind == "mimo" else 1
        a = sb.make_inputs(kind, B, L, H, G, N, P, R)
        spec, prob, t = sb.ours_bundle(kind, a)
        d = sf.default_config(spec, prob)
        heads, ntok = 4, min(L, args.acc_tokens)
        ref = sb.oracle_slice(kind, a, heads, ntok)
        roof = sb.min_bytes(kind, a) / meta["copy_bw"] * 1e3
        for name, nrows, over in variants:
            if time.time() - t_start > args.budget:
                rows.append(dict(kind=kind, shape=label, variant=name, skipped="time budget"))
                continue
            if name == "upstream":
                rows.append(run_upstream(kind, label, a, ref, heads, ntok, roof, args, t_start))
                print(json.dumps(rows[-1], default=str), flush=True)
                dump()
                continue
            over = dict(over)
            seg_x2 = over.pop("seg_x2", False)
            seg_half = over.pop("seg_half", False)
            cfg = (with_rows(spec, d, nrows, **over) if nrows and nrows != d["CHUNK"] * sf._rp(spec)
                   else dict(d, **over))
            if seg_x2:  # half the programs, twice the segment
                cfg["SEG"] = min(256, cfg["SEG"] * 2)
            if seg_half:  # twice the programs
                cfg["SEG"] = max(1, cfg["SEG"] // 2)
            r = dict(kind=kind, shape=label, variant=name, config=cfg, mem_roofline_ms=roof)
            try:
                t0 = time.time()
                t.out.fill_(float("nan"))
                sf.forward(spec, cfg, t)
                torch.cuda.synchronize()
                r["compile_s"] = round(time.time() - t0, 1)
                r["all_finite"] = bool(torch.isfinite(t.out).all().item())
                r["acc"] = sb.accuracy(t.out, ref, heads, ntok)
                r["ms"] = graph_ms(lambda t=t: sf.forward(spec, cfg, t))
                r["ms_nograph"] = plain_ms(lambda t=t: sf.forward(spec, cfg, t))
                r["roofline_frac"] = roof / r["ms"]
                calls, _ = sf.plan(spec, cfg, t)
                r["phase_ms"] = {c["name"]: graph_ms(lambda c=c: sf.launch(c)) for c in calls if c["run"]}
            except Exception as e:  # noqa: BLE001
                traceback.print_exc()
                r["error"] = f"{type(e).__name__}: {e}"[:600]
            rows.append(r)
            print(json.dumps({k: v for k, v in r.items() if k != "config"}, default=str), flush=True)
            dump()
        del t, a
        torch.cuda.empty_cache()
    dump()
    print(f"{'kind':<5} {'shape':<20} {'variant':<16} {'ms':>7} {'roof%':>6} {'p2':>6} {'p3':>6} {'p4':>6} {'l2':>8}")
    for r in rows:
        if "ms" not in r:
            print(f"{r['kind']:<5} {r['shape']:<20} {r['variant']:<16} {r.get('error', r.get('skipped', ''))[:80]}")
            continue
        ph = r.get("phase_ms", {})
        print(f"{r['kind']:<5} {r['shape']:<20} {r['variant']:<16} {r['ms']:7.3f} {100 * r['roofline_frac']:6.1f} "
              f"{ph.get('scan_chunk_state', 0):6.3f} {ph.get('scan_state_passing', 0):6.3f} "
              f"{ph.get('scan_chunk_output', 0):6.3f} {r['acc']['rel_l2']:8.2e} {r.get('ms_nograph', 0):7.3f} "
              f"{'' if r['all_finite'] else 'NONFINITE'}")
    print(f"total {time.time() - t_start:.0f} s")


if __name__ == "__main__":
    main()
