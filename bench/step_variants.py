"""Decode-step variants on one GPU call: check each against the float64 oracle, then time them
side by side (CUDA-graph replay, rotated state sets, as bench/step.py) with upstream's CuTe
kernel as the yardstick of the same run.

    python bench/step_variants.py [--out results.json] [--Bs 16,64,256,1024] [--skip-cute]

Variants (issue 3, MIMO R = 4, H=32 N=128 P=64, bf16 inputs, fp32 and bf16 state):
- triton: the broadcast path (first version's default) vs DOT (two tensor-core products per
  head) with 4 / 8 warps and register caps (maxnreg);
- cute: the default vs a register cap (min_ctas), 16 lanes per row, 8 warps; `pdl` / `nopdl`:
  the default with / without programmatic dependent launch.
`--Rs 1,4` times SISO too (R = 4 by default).
Writes one JSON (meta, checks, rows) and prints a table last.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
import traceback

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import copy_bandwidth, use_checkout  # noqa: E402

use_checkout()

import step as sb  # noqa: E402  (bench/step.py: graph_time, make_spec, step_bytes, n_sets, upstream_calls)
from mamba3_kernels import backends  # noqa: E402
from mamba3_kernels.spec import Problem, ScanSpec, States  # noqa: E402
from mamba3_kernels.tensors import prepare_step  # noqa: E402
from mamba3_kernels.testing import run_step_backend, step_case, step_inputs  # noqa: E402

TRITON = {
    "bcast8": dict(BLOCK_P=64, ROWS=64, num_warps=8, num_stages=1, VEC=True, PREFETCH=False, DOT=False),
    "dot4": dict(BLOCK_P=64, ROWS=64, num_warps=4, num_stages=1, VEC=True, PREFETCH=False, DOT=True),
    "dot8": dict(BLOCK_P=64, ROWS=64, num_warps=8, num_stages=1, VEC=True, PREFETCH=False, DOT=True),
    "dot4r168": dict(BLOCK_P=64, ROWS=64, num_warps=4, num_stages=1, VEC=True, PREFETCH=False, DOT=True, maxnreg=168),
    "dot4r128": dict(BLOCK_P=64, ROWS=64, num_warps=4, num_stages=1, VEC=True, PREFETCH=False, DOT=True, maxnreg=128),
}


def cute_variants(sdt: str, spec=None, prob=None) -> dict:
    vec = 8 if sdt == "bfloat16" else 4
    extra = {}
    if spec is not None:   # the default of this problem (batch-aware) with PDL on / off (default: off)
        d = backends.get("cute").default_config(spec, prob, "step")
        extra = {"pdl": dict(d, pdl=True), "nopdl": dict(d, pdl=False)}
    return {**extra,
        "default": None,
        "mc4": dict(num_warps=4, lanes_per_row=8, vec=vec, tile_p=64, min_ctas=4),
        "L16": dict(num_warps=4, lanes_per_row=16, vec=vec, tile_p=64),
        "w8": dict(num_warps=8, lanes_per_row=8, vec=vec, tile_p=64),
        "w8mc3": dict(num_warps=8, lanes_per_row=8, vec=vec, tile_p=64, min_ctas=3),
        "v4mc4": dict(num_warps=4, lanes_per_row=8, vec=4, tile_p=64, min_ctas=4),   # 8-byte vectors
        "L4": dict(num_warps=4, lanes_per_row=4, vec=vec, tile_p=64),
        "L32": dict(num_warps=4, lanes_per_row=32, vec=vec, tile_p=64),
        "L4v4mc4": dict(num_warps=4, lanes_per_row=4, vec=4, tile_p=64, min_ctas=4),
    }


def check_cases():
    """(label, spec, problem, pool): realistic and ragged shapes for the oracle checks."""
    mimo = dict(has_mimo_v=True, has_mimo_z=True, has_mimo_out=True)
    base = dict(chunk_size=1, initial_states=True, final_states=True, has_d=True, has_z=True)
    out = []
    for sdt in ("float32", "bfloat16"):   # the timed spec (same compiled kernels), every variant
        out.append((f"R4 N128 P64 {sdt} reduce B64", sb.make_spec(4, sdt), Problem(64, 1, 32, 1, 64), None))
    out.append(("R4 N128 P64 f32in f32state reduce B16", ScanSpec(d_state=128, head_dim=64, rank=4, n_angles=32,
                pairing="half", input_dtype="float32", state_dtype="float32", **mimo, **base),
                Problem(16, 1, 32, 4, 16), None))
    out.append(("R2 N64 P48 norm_reduce bf16state B5 pool", ScanSpec(d_state=64, head_dim=48, rank=2, n_angles=16,
                pairing="interleaved", output_mode="norm_reduce", state_dtype="bfloat16", **mimo, **base),
                Problem(5, 1, 8, 2, 9), 9))
    out.append(("R4 N128 P64 per_rank f32 B3", ScanSpec(d_state=128, head_dim=64, rank=4, n_angles=64,
                pairing="half", output_mode="per_rank", has_mimo_v=True, has_mimo_z=True, **base),
                Problem(3, 1, 32, 32, 3), None))
    out.append(("R8 N256 P128 reduce f32 B3", ScanSpec(d_state=256, head_dim=128, rank=8, n_angles=64,
                pairing="half", **mimo, **base), Problem(3, 1, 8, 1, 3), None))
    return out


def run_checks(variants, rng):
    """variants: [(backend, name, cfg-or-None, state dtypes it applies to)]"""
    res = []
    for label, spec, prob, pool in check_cases():
        case = step_case(spec, prob, rng, device="cuda", pool=pool)
        for be, name, cfg, sdts in variants:
            if spec.state_dtype not in sdts:
                continue
            c = cfg
            if be == "cute" and cfg is not None and "vec" in cfg:
                c = dict(cfg, vec=min(cfg["vec"], 16 // (4 if spec.state_dtype == "float32" else 2)))
            if cfg is not None and spec.d_state * spec.head_dim > 128 * 64:
                continue  # the big case runs the defaults only
            if not label.startswith("R4 N128 P64") or "f32in" in label or "per_rank" in label:
                if name not in ("default", "dot4", "mc4", "L16", "v4mc4"):
                    continue  # other shapes: the defaults and the likely new defaults
            if be == "triton" and cfg is not None:
                pv = 1 << (spec.head_dim - 1).bit_length()
                c = dict(cfg, BLOCK_P=pv, ROWS=pv)
            for inplace in (True, False):
                row = dict(case=label, backend=be, variant=name, inplace=inplace)
                try:
                    rep = run_step_backend(be, case, config=c, inplace=inplace)
                    row.update(ok=bool(rep.ok), worst={r.name: [r.rel_l2, r.rel_max] for r in rep.rows})
                    if not rep.ok:
                        row["table"] = rep.table()
                except Exception as e:
                    row.update(ok=False, error=f"{type(e).__name__}: {str(e)[:400]}")
                res.append(row)
                print(f"check {label:44s} {be:6s} {name:9s} inplace={inplace!s:5s} "
                      f"{'ok' if row['ok'] else 'FAIL ' + row.get('error', row.get('table', ''))[-600:]}", flush=True)
    return res


def timed_calls(mod, spec, cfg, args_sets, producer=False):
    """One call per state set; with `producer` each step follows a kernel that writes its v
    (v *= 1, as a projection writing the token would): what a step waits on in a decode loop."""
    bundles = [prepare_step(spec, **a, inplace=True) for a in args_sets]
    if producer:
        return [(lambda t=t: (t.v.mul_(1.0), mod.step(spec, cfg, t))) for t in bundles]
    return [(lambda t=t: mod.step(spec, cfg, t)) for t in bundles]


def memcheck_dot():
    """compute-sanitizer memcheck of the Triton DOT path (P = 48, pool with padding, in place)."""
    exe = shutil.which("compute-sanitizer") or "/usr/local/cuda/bin/compute-sanitizer"
    if not os.path.exists(exe):
        return dict(skipped="no compute-sanitizer")
    code = (
        "import sys; sys.path.insert(0, '.');"
        "import numpy as np;"
        "from mamba3_kernels.spec import ScanSpec, Problem;"
        "from mamba3_kernels.testing import step_case, run_step_backend;"
        "s=ScanSpec(d_state=64, head_dim=48, rank=4, n_angles=16, pairing='half', has_d=True, has_z=True,"
        "has_mimo_v=True, has_mimo_z=True, has_mimo_out=True, chunk_size=1, initial_states=True, final_states=True,"
        "state_dtype='bfloat16');"
        "c=step_case(s, Problem(3, 1, 4, 2, 8), np.random.default_rng(0), device='cuda', pool=8);"
        "cfg=dict(BLOCK_P=64, ROWS=64, num_warps=4, num_stages=1, VEC=True, PREFETCH=False, DOT=True);"
        "r=run_step_backend('triton', c, config=cfg); r2=run_step_backend('triton', c, config=cfg, inplace=False);"
        "print('ok' if r.ok and r2.ok else r.table() + r2.table())")
    t0 = time.time()
    p = subprocess.run([exe, "--tool", "memcheck", "--error-exitcode", "9", sys.executable, "-c", code],
                       capture_output=True, text=True, timeout=150)
    txt = p.stdout + p.stderr
    return dict(rc=p.returncode, ok=p.returncode == 0 and "ERROR SUMMARY: 0 errors" in txt,
                tail=txt[-1500:], seconds=time.time() - t0)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=None)
    ap.add_argument("--Bs", default="16,64,256,1024")
    ap.add_argument("--skip-cute", action="store_true")
    ap.add_argument("--triton", default=",".join(TRITON))
    ap.add_argument("--cute", default="default,mc4,L16,w8,w8mc3")
    ap.add_argument("--no-memcheck", action="store_true")
    ap.add_argument("--states", default="float32,bfloat16")
    ap.add_argument("--Rs", default="4")
    ap.add_argument("--producer", action="store_true", help="a v-writing kernel before every step (ours "
                    "and upstream's), as in a decode loop")
    ap.add_argument("--no-checks", action="store_true", help="skip the oracle checks (tests ran them)")
    a = ap.parse_args()
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    props = torch.cuda.get_device_properties(0)
    l2 = getattr(props, "L2_cache_size", 50 << 20)
    bw = copy_bandwidth()
    import importlib.metadata as md

    def ver(d):
        try:
            return md.version(d)
        except Exception:
            return None
    cute_ok = not a.skip_cute and backends.get("cute").available()[0]
    meta = dict(gpu=props.name, sms=props.multi_processor_count, torch=torch.__version__, triton=ver("triton"),
                cutlass_dsl=ver("nvidia-cutlass-dsl"), commit=sb.git_commit(), copy_bandwidth_GBps=bw / 1e9,
                shapes=dict(H=sb.H, N=sb.N, P=sb.P, G=sb.G, Rs=a.Rs, inputs="bfloat16"), producer=a.producer, cute=cute_ok)
    print(f"{props.name}: copy {bw / 1e9:.0f} GB/s; triton {meta['triton']}; cute {cute_ok}", flush=True)
    tv = [v for v in a.triton.split(",") if v]
    cv = [v for v in a.cute.split(",") if v] if cute_ok else []

    # 1. oracle checks of every variant
    sdts = tuple(x for x in a.states.split(",") if x)
    variants = [("triton", "default", None, sdts)] if tv else []
    variants += [("triton", n, TRITON[n], sdts) for n in tv]
    if cv:
        variants.append(("cute", "default", None, sdts))
    for sdt in sdts:
        for n in cv:
            if n != "default":
                variants.append(("cute", n, cute_variants(sdt, sb.make_spec(4, sdt), Problem(64, 1, sb.H, sb.G, 64))[n],
                                 (sdt,)))
    t0 = time.time()
    checks = [] if a.no_checks else run_checks(variants, rng)
    print(f"checks: {sum(c['ok'] for c in checks)}/{len(checks)} ok in {time.time() - t0:.0f} s", flush=True)
    bad = {(c["backend"], c["variant"]) for c in checks if not c["ok"]}

    # 2. timing
    rows = []
    Bs = [int(x) for x in a.Bs.split(",") if x]
    Rs = [int(x) for x in a.Rs.split(",") if x]
    for R, sdt in [(R, sdt) for R in Rs for sdt in sdts]:
        spec = sb.make_spec(R, sdt)
        for B in Bs:
            nbytes = sb.step_bytes(B, R, 4 if sdt == "float32" else 2)
            sets = sb.n_sets(nbytes, l2)
            prob = Problem(B, 1, sb.H, sb.G, B)
            base = step_inputs(spec, prob, rng, device="cuda")
            args_sets = []
            for _ in range(sets):
                d = dict(base)
                d["states"] = States(*(x.clone() for x in base["states"]))
                args_sets.append(d)
            todo = [("triton", n, TRITON[n]) for n in tv] + [("cute", n, cute_variants(sdt, spec, prob)[n]) for n in cv]
            todo.append(("upstream-cute", "kernel", None))
            for be, name, cfg in todo:
                row = dict(backend=be, variant=name, R=R, B=B, state=sdt, bytes=nbytes, sets=sets, config=cfg)
                try:
                    if (be, name) in bad:
                        row["skipped"] = "failed its oracle check"
                    else:
                        if be == "upstream-cute":
                            calls = sb.upstream_calls("upstream-cute", spec, B, rng, sets)
                            if a.producer:   # the same extra kernel before each of upstream's steps
                                xv = torch.ones(B, sb.H, sb.P, device="cuda", dtype=torch.bfloat16)
                                calls = [(lambda c=c: (xv.mul_(1.0), c())) for c in calls]
                        else:
                            mod = backends.get(be)
                            c = cfg if cfg is not None else mod.default_config(spec, prob, "step")
                            row["config"] = c
                            calls = timed_calls(mod, spec, c, args_sets, a.producer)
                        t = min(sb.graph_time(calls), sb.graph_time(calls))
                        row.update(us=t * 1e6, frac_copy_bw=nbytes / t / bw)
                except Exception as e:
                    row["error"] = f"{type(e).__name__}: {str(e)[:300]}"
                    traceback.print_exc()
                rows.append(row)
                msg = f"{row['us']:9.1f} us {100 * row['frac_copy_bw']:5.1f}%" if "us" in row else \
                    row.get("skipped", row.get("error", ""))
                print(f"time R={R} {sdt:8s} B={B:5d} {be:13s} {name:9s} {msg}", flush=True)
            del args_sets, base
            torch.cuda.empty_cache()

    mc = None if a.no_memcheck else memcheck_dot()
    if mc is not None:
        print(f"memcheck triton DOT: {mc}", flush=True)
    res = dict(meta=meta, checks=checks, rows=rows, memcheck_triton_dot=mc)
    if a.out:
        with open(a.out, "w") as f:
            json.dump(res, f, indent=1)
        print(f"wrote {a.out}")
    # short table last
    print("\nstate    B     " + " ".join(f"{be[:5]}:{n:9s}" for be, n, _ in
                                       [("triton", n, 0) for n in tv] + [("cute", n, 0) for n in cv] + [("up", "cute", 0)]))
    for R, sdt in [(R, sdt) for R in Rs for sdt in sdts]:
        for B in Bs:
            cells = []
            for be, n in [("triton", n) for n in tv] + [("cute", n) for n in cv] + [("upstream-cute", "kernel")]:
                r = next((r for r in rows if r["backend"] == be and r["variant"] == n and r["B"] == B
                          and r["state"] == sdt and r["R"] == R), None)
                cells.append(f"{r['us']:15.1f}" if r and "us" in r else f"{'-':>15s}")
            print(f"R{R} {sdt[:8]:8s} {B:5d} " + " ".join(cells))


if __name__ == "__main__":
    main()
