"""The chunk-parallel phase 4 (config CHUNK_ENTRY: phase 4a stores every chunk's entry state,
phase 4b computes each chunk alone) against the default sequential phase 4, on the benchmark's
SISO and MIMO R=4 shapes.

    PYTHONPATH=$PWD python bench/scan_fwd_chunk_entry_sweep.py [--kind mimo] [--only B4-L4096-H32]
        [--variants plan.json] [--out f.json]

Per shape and variant (overrides of the default config; "seglen" sets SEG = seglen / CHUNK):
the output poisoned with NaN, one run, every element finite and rel_l2 / rel_max against the
float64 oracle (batch row 0, 4 heads, the first 1024 tokens); median ms of the whole forward
(do_bench, CUDA-graph replay) and of each phase alone.
"""
import argparse
import functools
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from scan import MIMO_EXTRA, SHAPES, accuracy, bench, breakdown, make_inputs, oracle_slice, ours_bundle  # noqa: E402

from mamba3_kernels.backends.triton import scan_fwd as sf  # noqa: E402

SISO = [dict(),
        dict(CHUNK_ENTRY=True, CHUNK=64, seglen=1024, num_warps=8, STATE_CHUNK=32),
        dict(CHUNK_ENTRY=True, CHUNK=64, seglen=512, num_warps=8, STATE_CHUNK=32),
        dict(CHUNK_ENTRY=True, CHUNK=64, seglen=2048, num_warps=8, STATE_CHUNK=32),
        dict(CHUNK_ENTRY=True, CHUNK=64, seglen=1024, num_warps=8, BLOCK_P=32, STATE_CHUNK=32),
        dict(CHUNK_ENTRY=True, CHUNK=32, seglen=1024, num_warps=4, STATE_CHUNK=32),
        dict(CHUNK_ENTRY=True, CHUNK=32, seglen=1024, num_warps=8, STATE_CHUNK=32),
        dict(CHUNK_ENTRY=True, CHUNK=32, seglen=1024, num_warps=4, BLOCK_P=32, STATE_CHUNK=32),
        dict(CHUNK_ENTRY=True, CHUNK=64, seglen=1024, num_warps=4, STATE_CHUNK=32),
        dict(CHUNK_ENTRY=True, CHUNK=16, seglen=1024, num_warps=4, STATE_CHUNK=32),
        dict(CHUNK_ENTRY=True, CHUNK=16, seglen=2048, num_warps=4, STATE_CHUNK=32)]
MIMO = [dict(),
        dict(CHUNK_ENTRY=True, CHUNK=16, seglen=512, num_warps=8),
        dict(CHUNK_ENTRY=True, CHUNK=16, seglen=256, num_warps=8),
        dict(CHUNK_ENTRY=True, CHUNK=16, seglen=1024, num_warps=8),
        dict(CHUNK_ENTRY=True, CHUNK=16, seglen=512, num_warps=4),
        dict(CHUNK_ENTRY=True, CHUNK=8, seglen=512, num_warps=4),
        dict(CHUNK_ENTRY=True, CHUNK=8, seglen=512, num_warps=8),
        dict(CHUNK_ENTRY=True, CHUNK=16, seglen=512, num_warps=8, BLOCK_P=32),
        dict(CHUNK_ENTRY=True, CHUNK=4, seglen=512, num_warps=4),
        dict(CHUNK_ENTRY=True, CHUNK=4, seglen=1024, num_warps=4)]


def config(d, over):
    c = dict(d)
    over = dict(over)
    seglen = over.pop("seglen", None)
    c.update(over)
    if seglen:
        c["SEG"] = max(1, seglen // c["CHUNK"])
    return c


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--only", default="B4-L4096-H32,B1-L16384-H32,B8-L2048-H32")
    ap.add_argument("--kind", default="siso", choices=("siso", "mimo"))
    ap.add_argument("--variants", default="", help="JSON file: list of override dicts")
    ap.add_argument("--no-acc", action="store_true")
    ap.add_argument("--out", default="scan_fwd_chunk_entry_sweep.json")
    args = ap.parse_args()
    variants = json.load(open(args.variants)) if args.variants else (MIMO if args.kind == "mimo" else SISO)
    R = 4 if args.kind == "mimo" else 1
    meta = dict(device=torch.cuda.get_device_name(), torch=torch.__version__,
                triton=__import__("triton").__version__, commit=os.environ.get("MAMBA3_COMMIT", "unknown"))
    rows = []
    for label, B, L, H, G, N, P in SHAPES + MIMO_EXTRA:
        if label not in args.only.split(","):
            continue
        a = make_inputs(args.kind, B, L, H, G, N, P, R)
        spec, prob, t = ours_bundle(args.kind, a)
        d = sf.default_config(spec, prob)
        heads, ntok = 4, min(L, 1024)
        ref = None if args.no_acc else oracle_slice(args.kind, a, heads, ntok)
        for over in variants:
            cfg = config(d, over)
            row = dict(kind=args.kind, shape=label, overrides=over, config=cfg)
            try:
                t.out.fill_(float("nan"))
                t0 = time.time()
                sf.forward(spec, cfg, t)
                torch.cuda.synchronize()
                row["first_call_s"] = round(time.time() - t0, 1)
                row["finite"] = bool(torch.isfinite(t.out).all())
                if ref is not None:
                    row["acc"] = accuracy(t.out, ref, heads, ntok)
                row["ms"], row["graph_ms"] = bench(functools.partial(sf.forward, spec, cfg, t), graph=True)
                row["phase_ms"] = breakdown(spec, cfg, t)
            except Exception as e:  # noqa: BLE001
                row["error"] = f"{type(e).__name__}: {e}"[:400]
            rows.append(row)
            print(f"{label:<16} {json.dumps(over):<100} "
                  + (f"ERROR {row['error']}" if "error" in row else
                     f"{row['graph_ms'] if isinstance(row['graph_ms'], str) else round(row['graph_ms'], 4)} ms "
                     f"finite {row['finite']} l2 {row.get('acc', {}).get('rel_l2', float('nan')):.2e} "
                     + " ".join(f"{k.replace('scan_', '')} {v:.3f}" for k, v in row["phase_ms"].items())),
                  flush=True)
            with open(args.out, "w") as f:
                json.dump(dict(meta=meta, rows=rows), f, indent=1, default=str)
        del t, a
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
