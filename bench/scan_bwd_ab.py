"""A / B of two backward configs on the fwd+bwd benchmark shapes: every gradient of B compared
with A's on the same inputs (bitwise equal, or the largest relative difference), then fwd+bwd of
each replayed from a CUDA graph (bench/scan_bwd.py's graph_ms), alternating A, B, A, B.

    PYTHONPATH=$PWD python bench/scan_bwd_ab.py --b '{"POST_RECOMPUTE": true}' \
        [--a '{"POST_RECOMPUTE": false}'] [--kinds siso,mimo] [--only B4-L4096-H32] [--out f.json]

--a / --b: JSON overrides of the backward's default config (the `bwd_config` of mamba3_kernels.scan);
--b may be repeated (several candidates, each compared with A; timings alternate A, B1, B2, ...).
"""
import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import write_report  # noqa: E402
from scan_bwd import LEAVES, _leaves, bench_cases, graph_ms, ours_fwd  # noqa: E402


def grads(run, a, dout):
    la = _leaves(a)
    out = run(la)
    names = [n for n in LEAVES if isinstance(la.get(n), torch.Tensor)]
    gs = torch.autograd.grad(out, [la[n] for n in names], dout)
    return dict(zip(names, gs))


def compare(ga, gb):
    res = {}
    for n, x in ga.items():
        y = gb[n]
        res[n] = dict(equal=bool(torch.equal(x, y)), finite=bool(torch.isfinite(y).all()),
                      max_rel=float((x.float() - y.float()).abs().max() / x.float().abs().max().clamp_min(1e-30)))
    return res


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--a", default="{}")
    ap.add_argument("--b", required=True, action="append")
    ap.add_argument("--kinds", default="siso,mimo")
    ap.add_argument("--only", default="")
    ap.add_argument("--reps", type=int, default=2, help="graph timings of each, alternating")
    ap.add_argument("--out", default="scan_bwd_ab.json")
    args = ap.parse_args()
    ca, cbs = json.loads(args.a), [json.loads(b) for b in args.b]
    rows = []
    for kind, label, a, dout in bench_cases(args.kinds, args.only):
        run_a = ours_fwd(kind, bwd_config=ca or None)
        runs = [ours_fwd(kind, bwd_config=cb) for cb in cbs]
        ga = grads(run_a, a, dout)
        cmps = [compare(ga, grads(run_b, a, dout)) for run_b in runs]
        ta, tbs = [], [[] for _ in cbs]
        for _ in range(args.reps):
            ta.append(graph_ms(run_a, a, dout))
            for run_b, tb in zip(runs, tbs):
                tb.append(graph_ms(run_b, a, dout))
        for cb, cmp, tb in zip(cbs, cmps, tbs):
            row = dict(kind=kind, shape=label, a=ca, b=cb, a_ms=min(ta), b_ms=min(tb), a_all=ta, b_all=tb,
                       all_equal=all(c["equal"] for c in cmp.values()), grads=cmp)
            rows.append(row)
            print(f"{kind} {label:22s} A {row['a_ms']:.3f} ms  B {row['b_ms']:.3f} ms  "
                  f"B/A {row['b_ms'] / row['a_ms']:.3f}  grads equal: {row['all_equal']}"
                  + ("" if row["all_equal"] else f" (max rel {max(c['max_rel'] for c in cmp.values()):.2e})")
                  + f"  B = {json.dumps(cb)}", flush=True)
    write_report(args.out, rows)


if __name__ == "__main__":
    main()
