"""Merge the step benchmark runs into one table: best backend per shape, vs upstream and roofline.

    python bench/summarize_step.py bench/results/step_h100_cute_run.json bench/results/step_h100_tilelang_run.json

Each run's JSON comes from bench/step.py (one device call per DSL bundle; both measured the same
H100 back to back). Prints a markdown table and checks the issue-3 targets.
"""
import json
import sys


def main(paths):
    rows, bw = {}, []
    for p in paths:
        d = json.load(open(p))
        bw.append(d["meta"]["copy_bandwidth_GBps"])
        for r in d["rows"]:
            if "us" in r:
                rows[(r["state"], r["R"], r["B"], r["impl"])] = r
    keys = sorted({k[:3] for k in rows}, key=lambda k: (k[0] != "float32", k[1], k[2]))
    ours = ("triton", "tilelang", "cute")
    print(f"copy bandwidth (r+w) per run: {', '.join(f'{b:.0f}' for b in bw)} GB/s\n")
    print("| state | R | B | triton | tilelang | cute | best | % copy bw | upstream cute | up. cute+rotary | up. triton | best vs faster upstream kernel |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for s, R, B in keys:
        get = lambda n: rows.get((s, R, B, n))
        t = {n: get(n)["us"] for n in ours if get(n)}
        if not t:
            continue
        best = min(t, key=t.get)
        ups = {n: get(n)["us"] for n in ("upstream-cute", "upstream-cute+rotary", "upstream-triton") if get(n)}
        kern = [ups[n] for n in ("upstream-cute", "upstream-triton") if n in ups]
        ratio = f"{min(kern) / t[best]:.2f}x" if kern else "-"
        f = lambda n, d: f"{d[n]:.1f}" if n in d else "-"
        print(f"| {s[:4]} | {R} | {B} | {f('triton', t)} | {f('tilelang', t)} | {f('cute', t)} | {best} | "
              f"{100 * get(best)['frac_copy_bw']:.0f}% | {f('upstream-cute', ups)} | {f('upstream-cute+rotary', ups)} | "
              f"{f('upstream-triton', ups)} | {ratio} |")


if __name__ == "__main__":
    main(sys.argv[1:])
