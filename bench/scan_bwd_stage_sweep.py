"""Launch configs of the backward's token-parallel and per-sequence stages on the GPU: each
stage kernel (post, prep, output, seq_fwd, seq_bwd) timed alone over its config keys, on the
benchmark shapes (bench/scan.py's make_inputs), with the other keys at their defaults.

    PYTHONPATH=$PWD MAMBA3_COMMIT=$(git rev-parse HEAD) python bench/scan_bwd_stage_sweep.py \\
        [--out bench/results/scan_bwd_stage_sweep.json] [--only post,prep] [--shapes siso,mimo]

Buffers come from scan_bwd.buffers for each config (their partial-sum blocks depend on it),
filled with random values (timing does not depend on them; correctness of every config's
tiling is the CPU tests' job). Median ms by triton.testing.do_bench (L2 flushed between runs);
each row also has the registers and spilled bytes of the GPU's own build. Timing a stage alone
has misled once (session 5: post with fewer dvt partials than the pipeline gives it); confirm a
winner with bench/scan_bwd_ab.py (fwd+bwd, A / B alternating).
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import use_checkout

use_checkout()

from mamba3_kernels.backends.triton import scan_bwd  # noqa: E402
from mamba3_kernels.backends.triton.aot import jit_build  # noqa: E402
from mamba3_kernels.scan_tensors import prepare_scan  # noqa: E402
from mamba3_kernels.spec import resolve_scan  # noqa: E402
from scan import make_inputs  # noqa: E402

SHAPES = [("siso B4-L4096-H32", "siso", 4, 4096, 32, 1, 128, 64, 1),
          ("siso B4-L4096-H32-G8-N64", "siso", 4, 4096, 32, 8, 64, 64, 1),
          ("mimo B4-L2048-H32", "mimo", 4, 2048, 32, 1, 128, 64, 4)]
DEVICE = "cuda"
SWEEPS = {   # stage call name -> {config key: values} (session 18 added the one-warp points, the defaults now)
    "bwd_post": {"POST_RECOMPUTE": [False, True], "POST_BT": [1, 2, 4, 8, 16], "post_num_warps": [1, 2, 4, 8]},
    "bwd_prep": {"BT": [4, 8, 16, 32, 64], "num_warps": [1, 2, 4, 8]},
    "bwd_output": {"BT": [4, 8, 16, 32, 64], "num_warps": [1, 2, 4, 8]},
    "bwd_seq_fwd": {"SEQ_BT": [16, 32, 64, 128], "seq_num_warps": [1, 2, 4, 8], "SEQ_PROGRAMS": [1056, 2112, 8448]},
    "bwd_seq_bwd": {"SEQ_BT": [16, 32, 64, 128], "seq_num_warps": [1, 2, 4, 8], "SEQ_PROGRAMS": [1056, 2112, 8448]},
}


def filled_buffers(spec, t, g, cfg, dev):
    g = dict(g, _config=cfg)
    b = scan_bwd.buffers(spec, t, g, dev)
    B, L, H, P = t.v.shape
    RC = 1 << (spec.rank - 1).bit_length()
    for k, x in list(b.items()):
        if isinstance(x, torch.Tensor) and x.is_floating_point() and x.numel() > 1:
            x.normal_()
    b["theta"].uniform_(0, 6.28)
    b["dqh"] = torch.randn(B, L, RC, H, spec.d_state, device=dev)
    b["dks"] = torch.randn_like(b["dqh"])
    from mamba3_kernels.backends.triton import scan_bwd_core as _core
    ccfg = dict(_core.default_config(RC, spec.d_state, P, scan_bwd.op_dtype(spec, cfg)), **(cfg.get("CORE") or {}))
    # the core's N-block partials of dvt, as many as the real pipeline has (post's NVP: a
    # session-4 sweep with one partial picked a post config that lost in the full backward)
    b["dvt"] = torch.randn(_core.n_blocks(spec.d_state, ccfg), B, L, RC, H, P, device=dev)
    b["last"] = scan_bwd._last_index(B, L, B, None, dev)
    return b


def main():
    from triton.testing import do_bench
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="bench/results/scan_bwd_stage_sweep.json")
    ap.add_argument("--only", default="")
    ap.add_argument("--shapes", default="", help="labels containing one of these words")
    args = ap.parse_args()
    meta = dict(device=torch.cuda.get_device_name() if DEVICE == "cuda" else DEVICE, torch=torch.__version__, triton=__import__("triton").__version__,
                commit=os.environ.get("MAMBA3_COMMIT", "unknown"))
    rows = []
    dev = torch.device(DEVICE)
    for label, kind, B, L, H, G, N, P, R in SHAPES:
        if args.shapes and not any(w in label for w in args.shapes.split(",")):
            continue
        a = make_inputs(kind, B, L, H, G, N, P, R, device=DEVICE)
        pairing = "half" if kind == "mimo" else "interleaved"
        spec, prob = resolve_scan(**a, pairing=pairing)
        t = prepare_scan(spec, prob, **a)
        g = {"out": torch.randn(t.out.shape, device=dev).to(t.v.dtype), "_y": None}
        if scan_bwd.needs_y(spec):
            g["_y"] = torch.randn(B, L, R, H, P, device=dev)
        for k in ("angle", "ssm", "k", "v"):
            g[k] = None
        base = scan_bwd.default_config(spec, prob)
        for stage, keys in SWEEPS.items():
            if args.only and stage.removeprefix("bwd_") not in args.only.split(","):
                continue
            for vals in itertools.product(*keys.values()):
                cfg = dict(base, **dict(zip(keys, vals)))
                row = dict(shape=label, stage=stage, **dict(zip(keys, vals)),
                           default=all(base.get(k, False) == v for k, v in zip(keys, vals)))
                try:
                    b = filled_buffers(spec, t, g, cfg, dev)
                    calls = {c["name"]: c for c in scan_bwd.plan(spec, cfg, t, b)}
                    c = calls[stage]
                    k = jit_build(c)
                    row["regs"], row["spills"] = k.n_regs, k.n_spills
                    row["ms"] = do_bench(lambda: scan_bwd.launch(c), warmup=10, rep=40, return_mode="median")
                except Exception as e:  # noqa: BLE001
                    row["error"] = f"{type(e).__name__}: {e}"[:300]
                rows.append(row)
                print(json.dumps(row), flush=True)
                with open(args.out, "w") as f:
                    json.dump(dict(meta=meta, rows=rows), f, indent=1)
            best = min((r for r in rows if r["shape"] == label and r["stage"] == stage and "ms" in r),
                       key=lambda r: r["ms"], default=None)
            dflt = [r for r in rows if r["shape"] == label and r["stage"] == stage and r["default"] and "ms" in r]
            if best and dflt:
                print(f"== {label} {stage}: default {dflt[0]['ms']:.3f} ms, best {best['ms']:.3f} ms "
                      f"{ {k: best[k] for k in keys} }", flush=True)


if __name__ == "__main__":
    main()
