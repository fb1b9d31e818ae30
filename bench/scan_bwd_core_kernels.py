"""GPU time of each backward core kernel (local, pass, dq, dkv, dadt) under several core configs
(segment lengths above all: is a walk's last, partial wave of programs the cost?), from
torch.profiler over whole fwd+bwd runs (device time only).

    PYTHONPATH=$PWD python bench/scan_bwd_core_kernels.py --core '{}' --core '{"SEG_SCALE": 0.5}' \
        [--kinds siso,mimo] [--only B4-L4096-H32] [--out f.json]
"""
import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import write_report  # noqa: E402
from scan_bwd import bench_cases, kernel_profile, ours_fwd  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--core", action="append", required=True, help="JSON overrides of the core's config")
    ap.add_argument("--kinds", default="siso")
    ap.add_argument("--only", default="B4-L4096-H32")
    ap.add_argument("--out", default="scan_bwd_core_kernels.json")
    args = ap.parse_args()
    rows = []
    for kind, label, a, dout in bench_cases(args.kinds, args.only):
        for core in args.core:
            cfg = json.loads(core)
            prof = kernel_profile(ours_fwd(kind, bwd_config={"CORE": cfg} if cfg else None), a, dout)
            ks = {k: (n, round(us, 1)) for k, n, us in prof["kernels"] if "core" in k}
            rows.append(dict(kind=kind, shape=label, core=cfg, core_kernels_us=ks, total_us=prof["total_us"]))
            print(kind, label, json.dumps(cfg), f"total {prof['total_us']:.0f} us",
                  " ".join(f"{k.replace('scan_bwd_core_', '')}={v[1]}" for k, v in ks.items()), flush=True)
    write_report(args.out, rows)


if __name__ == "__main__":
    main()
