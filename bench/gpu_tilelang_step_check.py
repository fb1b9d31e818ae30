"""GPU check + timing of the TileLang decode step (backends/tilelang) against the float64 oracle.

Run on the lent H100 (see /work/shared/device/README.md):
    source .carry/tilelang/activate.sh && pip install -q --no-deps --no-build-isolation -e . \
        && PYTHONUNBUFFERED=1 python bench/gpu_tilelang_step_check.py

Sections (in this order, within a time budget; JSON written under $OUT as each ends):
  prewarm   every kernel the run needs is compiled in parallel worker processes first (TileLang's
            disk cache then serves the main process in ~0.3 s per kernel).
  correct   realistic shapes: B in {1, 64, 257}, H=32, N in {64, 128}, P in {48, 64}, R in {1, 4},
            fp32 & bf16 state, the three output modes, GQA, a state pool with a padding slot,
            in place and not, plus a few odd small shapes; all through
            mamba3_kernels.testing.step_case + run_step_backend (poisoned outputs, oracle on the
            exact inputs). Prints the worst rel_l2 / rel_max per case.
  timing    default config, H=32 N=128 P=64, R in {1, 4}, fp32 / bf16 state, B in {1, 16, 64, 256}:
            CUDA-graph replay over several state sets (together > L2, so states come from HBM),
            median us per call, GB/s of all bytes moved and of the ssm state alone, fraction of the
            device-to-device copy bandwidth; plain Python calls (launch overhead included); the
            Triton backend's default config on the same tensors when it is available.
  sanitize  compute-sanitizer memcheck and racecheck over small cases (masked tails, odd shapes,
            padding slots, in place and not), in a subprocess.
  configs   every config of space() (up to 10) for R=4 and R=1 fp32: checked (B=5) and timed at
            B=1 and B=64.
Usage: gpu_tilelang_step_check.py [--budget SECONDS] [--sections a,b,...]
"""
import argparse
import json
import math
import os
import statistics
import sys
import time
import traceback

from common import copy_bandwidth, use_checkout  # noqa: E402  (bench/common.py)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.environ.get("OUT") or os.path.join(ROOT, "bench", "results")
os.environ.setdefault("TILELANG_CACHE_DIR", "/tmp/m3-tilelang-cache")
os.environ.setdefault("CUDA_HOME", "/usr/local/cuda")
T0 = time.time()
H = 32


def ensure_package():
    use_checkout()


def left(budget):
    return budget - (time.time() - T0)


def save(name, obj):
    os.makedirs(OUT, exist_ok=True)
    with open(os.path.join(OUT, f"tilelang_step_{name}.json"), "w") as f:
        json.dump(obj, f, indent=1, default=str)


def mkspec(R, N, P, sd="float32", mode="reduce", pairing="half", A=None, z=True, d=True, mimo=None,
           idt="bfloat16", euler=False, shared=False):
    from mamba3_kernels.spec import ScanSpec
    if mimo is None:
        mimo = R > 1
    mv = mz = mo = False
    if mimo:
        mv, mz, mo = True, z, mode != "per_rank"
    return ScanSpec(d_state=N, head_dim=P, rank=R, n_angles=(N // 4 if A is None else A), pairing=pairing,
                    discretization="euler" if euler else "trapezoidal", has_d=d, has_z=z,
                    has_mimo_v=mv, has_mimo_z=mz, has_mimo_out=mo, output_mode=mode,
                    shared_angles=shared, input_dtype=idt, state_dtype=sd, initial_states=True,
                    final_states=True, chunk_size=1)


# (label, spec, G, batches, pool extra rows or 0, in-place)
def correctness_cases():
    S = mkspec
    return [
        ("siso N128 P64 f32 inter", S(1, 128, 64, pairing="interleaved"), 1, (1, 64, 257), 0, True),
        ("siso N64 P48 bf16 inter G4", S(1, 64, 48, "bfloat16", pairing="interleaved"), 4, (1, 64, 257), 9, True),
        ("siso N128 P48 bf16 norm G2", S(1, 128, 48, "bfloat16", "norm_reduce", A=64), 2, (1, 64), 0, True),
        ("mimo4 N128 P64 f32 reduce", S(4, 128, 64), 1, (1, 64, 257), 0, True),
        ("mimo4 N128 P64 f32 norm", S(4, 128, 64, mode="norm_reduce"), 1, (1, 64, 257), 5, True),
        ("mimo4 N64 P48 bf16 per_rank G2", S(4, 64, 48, "bfloat16", "per_rank"), 2, (1, 64, 257), 7, True),
        ("mimo4 N64 P64 f32 euler A0 noZD", S(4, 64, 64, euler=True, A=0, z=False, d=False), 1, (64,), 3, True),
        ("mimo4 N128 P48 bf16 shared-ang fp16", S(4, 128, 48, "bfloat16", shared=True, idt="float16"), 8,
         (64, 257), 0, True),
        ("siso N64 P64 fp32-in", S(1, 64, 64, idt="float32", pairing="interleaved", A=32), 1, (1, 64), 0, True),
        ("siso N128 P64 f32 out-of-place", S(1, 128, 64, pairing="interleaved"), 1, (64,), 0, False),
        ("mimo4 N64 P48 bf16 out-of-place pool", S(4, 64, 48, "bfloat16"), 2, (64,), 11, False),
        ("odd N6 P6 R3", S(3, 6, 6, A=3, pairing="interleaved"), 1, (5,), 2, True),
        ("odd N16 P16 R2 per_rank", S(2, 16, 16, "bfloat16", "per_rank", A=8), 2, (5,), 0, True),
        ("odd N48 P40 R1 norm", S(1, 48, 40, mode="norm_reduce", A=24), 1, (5,), 3, True),
    ]


def timing_specs():
    S = mkspec
    return [("siso f32", S(1, 128, 64, pairing="interleaved")), ("siso bf16", S(1, 128, 64, "bfloat16", pairing="interleaved")),
            ("mimo4 f32", S(4, 128, 64)), ("mimo4 bf16", S(4, 128, 64, "bfloat16"))]


def sweep_specs():
    return [("mimo4 f32", mkspec(4, 128, 64)), ("siso f32", mkspec(1, 128, 64, pairing="interleaved"))]


# ------------------------------------------------------------------------------------------
# prewarm: compile in parallel processes

def _compile_one(args):
    key, arch = args
    t = time.time()
    try:
        ensure_package()
        from mamba3_kernels.backends import tilelang as TLB
        TLB._kernels().get_kernel(key, arch)
        return key, time.time() - t, ""
    except Exception as e:
        return key, time.time() - t, f"{type(e).__name__}: {e}"


def prewarm(keys, arch):
    import multiprocessing as mp
    keys = list(dict.fromkeys(keys))
    n = max(1, min(len(keys), (os.cpu_count() or 2) - 1, 14))
    t = time.time()
    with mp.get_context("spawn").Pool(n) as pool:
        res = pool.map(_compile_one, [(k, arch) for k in keys], chunksize=1)
    errs = [(str(k[:16]), e) for k, _, e in res if e]
    print(f"prewarm: {len(keys)} kernels on {n} processes in {time.time() - t:.1f}s"
          f" (max {max(r[1] for r in res):.1f}s each); {len(errs)} failed", flush=True)
    for k, e in errs:
        print("  compile failed:", k, e[:300])
    return {"n": len(keys), "wall_s": time.time() - t, "errors": errs}


def all_keys():
    from mamba3_kernels.backends import tilelang as TLB
    from mamba3_kernels.spec import Problem
    K = TLB._kernels()
    keys = []
    for _, spec, G, _, _, inplace in correctness_cases():
        keys.append(K.kernel_key(spec, TLB.default_config(spec), inplace, H, G))
    for _, spec in timing_specs():
        for B in (1, 64):
            cfg = TLB.default_config(spec, Problem(B, 1, H, 1, B))
            keys.append(K.kernel_key(spec, cfg, True, H, 1))
    for _, spec, G, _, _, inplace in sanitize_cases():
        keys.append(K.kernel_key(spec, TLB.default_config(spec), inplace, H, G))
    for _, spec in sweep_specs():
        for cfg in TLB.space(spec)[:10]:
            keys.append(K.kernel_key(spec, cfg, True, H, 1))
    return keys


# ------------------------------------------------------------------------------------------
# correctness

def correct(budget):
    import numpy as np
    from mamba3_kernels.spec import Problem
    from mamba3_kernels.testing import run_step_backend, step_case
    rows = []
    rng = np.random.default_rng(int.from_bytes(os.urandom(4), "little"))
    print(f"\n{'case':<40} {'B':>4} {'pool':>4} {'worst tensor':<12} {'rel_l2':>9} {'rel_max':>9}  ok", flush=True)
    for label, spec, G, batches, extra, inplace in correctness_cases():
        for B in batches:
            if left(budget) < 5:
                print("correct: out of time", flush=True)
                return rows
            pool = B + extra if extra else None
            rec = dict(case=label, B=B, H=H, G=G, pool=pool, inplace=inplace, spec=spec.describe())
            try:
                case = step_case(spec, Problem(B, 1, H, G, pool or B), rng, device="cuda", pool=pool)
                rep = run_step_backend("tilelang", case, None, inplace=inplace)
                worst = max(rep.rows, key=lambda r: max(r.rel_l2 / r.bound_l2, r.rel_max / r.bound_max))
                rec.update(ok=rep.ok, rows=rep.to_json(), worst=worst.name, rel_l2=worst.rel_l2,
                           rel_max=worst.rel_max)
                print(f"{label:<40} {B:>4} {str(pool or '-'):>4} {worst.name:<12} {worst.rel_l2:9.2e} "
                      f"{worst.rel_max:9.2e}  {'yes' if rep.ok else 'NO'}", flush=True)
                if not rep.ok:
                    print(rep.table(), flush=True)
            except Exception as e:
                rec.update(ok=False, error=f"{type(e).__name__}: {e}", trace=traceback.format_exc()[-2000:])
                print(f"{label:<40} {B:>4} ERROR {type(e).__name__}: {str(e)[:300]}", flush=True)
            rows.append(rec)
    return rows


# ------------------------------------------------------------------------------------------
# timing

def make_bundles(spec, B, G, n_sets, device="cuda"):
    """n_sets independent StepTensors (random inputs + states), in place."""
    import torch
    from mamba3_kernels.spec import States
    from mamba3_kernels.tensors import prepare_step
    R, N, P, A = spec.rank, spec.d_state, spec.head_dim, spec.n_angles
    idt = getattr(torch, spec.input_dtype)
    sdt = getattr(torch, spec.state_dtype)
    f32 = torch.float32
    g = torch.Generator(device=device)
    g.manual_seed(0)

    def rn(*shape, dtype=f32, scale=1.0):
        return (torch.randn(*shape, generator=g, device=device) * scale).to(dtype)

    params = dict(q_bias=rn(H, R, N, scale=0.5), k_bias=rn(H, R, N, scale=0.5),
                  d=rn(H) if spec.has_d else None,
                  mimo_v=(1 + rn(H, R, P, scale=0.5)) if spec.has_mimo_v else None,
                  mimo_z=(1 + rn(H, R, P, scale=0.5)) if spec.has_mimo_z else None,
                  mimo_out=rn(H, R, P, scale=1.0 / R) if spec.has_mimo_out else None,
                  norm_weight=(1 + rn(H, P, scale=0.3)) if spec.output_mode == "norm_reduce" else None)
    out = []
    for _ in range(n_sets):
        dt = torch.exp(torch.empty(B, H, device=device).uniform_(math.log(0.01), math.log(0.5), generator=g))
        args = dict(q=rn(B, R, G, N, dtype=idt), k=rn(B, R, G, N, dtype=idt), v=rn(B, H, P, dtype=idt),
                    adt=-dt * 1.5, dt=dt, trap=None if spec.discretization == "euler" else rn(B, H),
                    angles=(rn(B, A) if spec.shared_angles else rn(B, H, A)) if A else None, z=rn(B, H, P, dtype=idt) if spec.has_z else None,
                    state_indices=None, **params)
        states = States(torch.rand(B, H, A, device=device) * 6.28, rn(B, H, P, N, dtype=sdt, scale=0.5),
                        rn(B, R, H, N), rn(B, H, P, dtype=idt))
        out.append(prepare_step(spec, states=states, **args, inplace=True))
    return out


def bytes_moved(spec, B, G):
    R, N, P, A = spec.rank, spec.d_state, spec.head_dim, spec.n_angles
    ib = 2 if spec.input_dtype in ("bfloat16", "float16") else 4
    sb = 4 if spec.state_dtype == "float32" else 2
    ssm = 2 * B * H * P * N * sb
    other = (2 * B * R * H * N * 4 + 2 * B * H * P * ib + 2 * B * H * A * 4      # k, v, angle states
             + 2 * B * R * G * N * ib + B * H * P * ib * (2 if spec.has_z else 1)  # q, k, v, z
             + B * H * P * ib * (R if spec.output_mode == "per_rank" else 1)        # out
             + 3 * B * H * 4 + B * H * A * 4)                                       # adt dt trap angles
    return ssm, ssm + other


def graph_time(fn_i, n_sets, calls, reps=15):
    """Median us per call of a CUDA graph holding `calls` launches cycling over n_sets inputs."""
    import torch
    for i in range(n_sets):
        fn_i(i)
    torch.cuda.synchronize()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for i in range(2):
            fn_i(i % n_sets)
    torch.cuda.current_stream().wait_stream(s)
    torch.cuda.synchronize()
    gr = torch.cuda.CUDAGraph()
    with torch.cuda.graph(gr):
        for c in range(calls):
            fn_i(c % n_sets)
    gr.replay()
    torch.cuda.synchronize()
    ts = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        gr.replay()
        b.record()
        b.synchronize()
        ts.append(a.elapsed_time(b) * 1e3 / calls)
    del gr
    return statistics.median(ts)


def event_time(fn_i, n_sets, calls):
    """Median over 5 samples of (events around `calls` plain launches) / calls, in us."""
    import torch
    for i in range(n_sets):
        fn_i(i)
    torch.cuda.synchronize()
    ts = []
    for _ in range(5):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        for c in range(calls):
            fn_i(c % n_sets)
        b.record()
        b.synchronize()
        ts.append(a.elapsed_time(b) * 1e3 / calls)
    return statistics.median(ts)


def eager_time(fn_i, n_sets, calls=200):
    import torch
    torch.cuda.synchronize()
    t = time.perf_counter()
    for c in range(calls):
        fn_i(c % n_sets)
    torch.cuda.synchronize()
    return (time.perf_counter() - t) * 1e6 / calls


def n_sets_for(total_bytes, l2=50 << 20):
    return int(min(64, max(2, math.ceil(3 * l2 / max(1, total_bytes)))))


def time_spec(name, spec, B, G, cfg, copy_gbs, with_triton=True, eager=True):
    import torch
    from mamba3_kernels import backends
    from mamba3_kernels.backends import tilelang as TLB
    from mamba3_kernels.spec import Problem
    cfg = cfg or TLB.default_config(spec, Problem(B, 1, H, G, B))
    ssm_b, tot_b = bytes_moved(spec, B, G)
    n_sets = n_sets_for(tot_b)
    bund = make_bundles(spec, B, G, n_sets)
    calls = max(n_sets, min(200, int(2e6 // max(tot_b, 1)) + 8))
    rec = dict(name=name, B=B, H=H, G=G, config=cfg, spec=spec.describe(), n_sets=n_sets, calls=calls,
               bytes_total=tot_b, bytes_ssm=ssm_b)
    try:
        us = graph_time(lambda i, bund=bund: TLB.step(spec, cfg, bund[i]), n_sets, calls)
        rec["mode"] = "cuda-graph"
    except Exception as e:      # capture failed: events around plain calls (launch overhead in)
        rec["graph_error"] = f"{type(e).__name__}: {e}"[:300]
        rec["mode"] = "events"
        us = event_time(lambda i, bund=bund: TLB.step(spec, cfg, bund[i]), n_sets, calls)
    rec.update(us=us, gbs_total=tot_b / us / 1e3, gbs_ssm=ssm_b / us / 1e3, frac_copy=tot_b / us / 1e3 / copy_gbs)
    if eager:
        rec["eager_us"] = eager_time(lambda i, bund=bund: TLB.step(spec, cfg, bund[i]), n_sets)
    if with_triton:
        try:
            tr = backends.get("triton")
            ok, why = tr.available()
            if ok and tr.supports(spec, "step")[0]:
                tcfg = tr.default_config(spec, None, "step")
                rec["triton_us"] = graph_time(lambda i, bund=bund: tr.step(spec, tcfg, bund[i]), n_sets, calls)
                rec["triton_config"] = tcfg
        except Exception as e:
            rec["triton_error"] = f"{type(e).__name__}: {e}"[:300]
    del bund
    torch.cuda.empty_cache()
    return rec


def timing(budget):
    rows = []
    copy_gbs = copy_bandwidth() / 1e9
    print(f"\ndevice-to-device copy: {copy_gbs:.0f} GB/s (read + write)", flush=True)
    print(f"{'spec':<11} {'B':>4} {'us':>8} {'GB/s':>7} {'ssmGB/s':>8} {'%copy':>6} {'eager us':>9} {'triton us':>9}",
          flush=True)
    for name, spec in timing_specs():
        for B in (1, 16, 64, 256):
            if left(budget) < 8:
                print("timing: out of time", flush=True)
                return {"copy_gbs": copy_gbs, "rows": rows}
            try:
                r = time_spec(name, spec, B, 1, None, copy_gbs)
                rows.append(r)
                print(f"{name:<11} {B:>4} {r['us']:8.2f} {r['gbs_total']:7.0f} {r['gbs_ssm']:8.0f} "
                      f"{100 * r['frac_copy']:5.1f}% {r.get('eager_us', float('nan')):9.1f} "
                      f"{r.get('triton_us', float('nan')):9.2f}", flush=True)
            except Exception as e:
                rows.append(dict(name=name, B=B, error=f"{type(e).__name__}: {e}", trace=traceback.format_exc()[-1500:]))
                print(f"{name:<11} {B:>4} ERROR {type(e).__name__}: {str(e)[:300]}", flush=True)
    return {"copy_gbs": copy_gbs, "rows": rows}


def configs(budget, copy_gbs=None):
    import numpy as np
    from mamba3_kernels.backends import tilelang as TLB
    from mamba3_kernels.spec import Problem
    from mamba3_kernels.testing import run_step_backend, step_case
    copy_gbs = copy_gbs or copy_bandwidth() / 1e9
    rows = []
    rng = np.random.default_rng(1)
    print(f"\n{'spec':<10} {'config':<40} {'ok':>3} {'B=1 us':>8} {'B=64 us':>8} {'%copy':>6}", flush=True)
    for name, spec in sweep_specs():
        for cfg in TLB.space(spec)[:10]:
            if left(budget) < 6:
                print("configs: out of time", flush=True)
                return rows
            rec = dict(name=name, config=cfg)
            try:
                case = step_case(spec, Problem(5, 1, H, 1, 8), rng, device="cuda", pool=8)
                rec["ok"] = run_step_backend("tilelang", case, cfg, inplace=True).ok
                r1 = time_spec(name, spec, 1, 1, cfg, copy_gbs, with_triton=False, eager=False)
                r64 = time_spec(name, spec, 64, 1, cfg, copy_gbs, with_triton=False, eager=False)
                rec.update(us_b1=r1["us"], us_b64=r64["us"], frac_copy_b64=r64["frac_copy"])
                print(f"{name:<10} {json.dumps(cfg):<40} {'yes' if rec['ok'] else 'NO':>3} {r1['us']:8.2f} "
                      f"{r64['us']:8.2f} {100 * r64['frac_copy']:5.1f}%", flush=True)
            except Exception as e:
                rec["error"] = f"{type(e).__name__}: {e}"
                print(f"{name:<10} {json.dumps(cfg):<40} ERROR {str(e)[:200]}", flush=True)
            rows.append(rec)
    return rows


def sanitize_cases():
    S = mkspec
    return [("san N6 P6 R3 pool", S(3, 6, 6, A=3, pairing="interleaved"), 1, 5, 3, True),
            ("san N64 P48 R4 bf16 oop pool", S(4, 64, 48, "bfloat16", "per_rank"), 2, 4, 3, False),
            ("san N48 P40 R1 norm pool", S(1, 48, 40, mode="norm_reduce", A=24), 1, 4, 2, True)]


def sancases():
    """Run inside compute-sanitizer: small cases (masked tails, padding slots, odd shapes)."""
    import numpy as np
    from mamba3_kernels.spec import Problem
    from mamba3_kernels.testing import run_step_backend, step_case
    rng = np.random.default_rng(3)
    for label, spec, G, B, extra, inplace in sanitize_cases():
        case = step_case(spec, Problem(B, 1, H, G, B + extra), rng, device="cuda", pool=B + extra)
        rep = run_step_backend("tilelang", case, None, inplace=inplace)
        print(f"[sancase] {label}: {'ok' if rep.ok else 'NOT OK'}", flush=True)


def sanitize(budget):
    import subprocess
    rows = []
    for tool in ("memcheck", "racecheck"):
        t = left(budget)
        if t < 25:
            print(f"sanitize {tool}: out of time", flush=True)
            break
        import shutil
        exe = shutil.which("compute-sanitizer") or "/usr/local/cuda/bin/compute-sanitizer"
        cmd = [exe, "--tool", tool, "--error-exitcode", "9", sys.executable,
               os.path.abspath(__file__), "--sections", "sancases"]
        t0 = time.time()
        try:
            p = subprocess.run(cmd, capture_output=True, text=True, timeout=t - 5)
            txt = (p.stdout + p.stderr)
            lines = [l for l in txt.splitlines() if "INFO" not in l and "memory cache" not in l]
            summ = [l for l in lines if "ERROR SUMMARY" in l or "RACECHECK SUMMARY" in l or "[sancase]" in l
                    or "Invalid" in l or "hazard" in l.lower()]
            rows.append(dict(tool=tool, rc=p.returncode, s=time.time() - t0, summary=summ[:20],
                             tail="\n".join(lines[-30:])))
            print(f"sanitize {tool}: rc={p.returncode} in {time.time() - t0:.0f}s", flush=True)
            for l in summ[:12]:
                print("   ", l[:200], flush=True)
            if p.returncode not in (0, 9):
                print("\n".join(lines[-15:]), flush=True)
        except subprocess.TimeoutExpired:
            rows.append(dict(tool=tool, rc="timeout", s=time.time() - t0))
            print(f"sanitize {tool}: timed out", flush=True)
        except FileNotFoundError as e:
            rows.append(dict(tool=tool, rc="missing", error=str(e)))
            print(f"sanitize: {e}", flush=True)
            break
    return rows


GROUPS = (("correct",), ("timing", "configs"), ("sanitize",))   # one subprocess each, in order
NEEDS = {"correct": 0, "timing": 50, "configs": 30, "sanitize": 55}  # seconds each section needs


def main():
    global T0
    ap = argparse.ArgumentParser()
    ap.add_argument("--budget", type=float, default=240.0)
    ap.add_argument("--sections", default="prewarm,correct,timing,configs,sanitize")
    ap.add_argument("--t0", type=float, default=None, help="start time shared with the parent")
    ap.add_argument("--reserve", type=float, default=0.0, help="seconds kept for later groups")
    a = ap.parse_args()
    if a.t0:
        T0 = a.t0
    secs = a.sections.split(",")
    ensure_package()
    if secs == ["sancases"]:
        sancases()
        return
    order = [s for g in GROUPS for s in g]

    def deadline(name):  # a section ends by budget - (what the sections after it need)
        later = order[order.index(name) + 1:]
        return a.budget - a.reserve - sum(NEEDS[k] for k in later if k in secs)

    if a.t0 is None:     # parent: prewarm, then each group in its own process (a fault stays there)
        import torch
        from mamba3_kernels.backends import tilelang as TLB
        env = {"gpu": torch.cuda.get_device_name(), "cc": list(torch.cuda.get_device_capability()),
               "torch": torch.__version__, "available": TLB.available()}
        try:
            import tilelang
            env["tilelang"] = tilelang.__version__
        except Exception as e:
            env["tilelang"] = f"not importable: {e}"
        print(json.dumps(env), flush=True)
        save("env", env)
        if "prewarm" in secs:
            save("prewarm", prewarm(all_keys(), TLB._kernels().device_arch()))
        import subprocess
        for g in GROUPS:
            g = [x for x in g if x in secs]
            if not g:
                continue
            rest = a.budget - (time.time() - T0)
            if rest < 10:
                print(f"no time left for {g}", flush=True)
                continue
            later = [x for x in order[order.index(g[-1]) + 1:] if x in secs]
            cmd = [sys.executable, os.path.abspath(__file__), "--sections", ",".join(g), "--t0", str(T0),
                   "--budget", str(a.budget), "--reserve", str(sum(NEEDS[x] for x in later))]
            try:
                p = subprocess.run(cmd, timeout=rest)
                if p.returncode:
                    print(f"[{','.join(g)}] exited with {p.returncode}", flush=True)
            except subprocess.TimeoutExpired:
                print(f"[{','.join(g)}] killed at the time budget", flush=True)
        print(f"\ntotal {time.time() - T0:.0f}s", flush=True)
        return
    # child: run the given sections
    copy_gbs = None
    if "correct" in secs:
        rows = correct(deadline("correct"))
        save("correct", rows)
        bad = [r for r in rows if not r.get("ok")]
        print(f"correct: {len(rows) - len(bad)}/{len(rows)} cases within bounds", flush=True)
    if "timing" in secs:
        res = timing(deadline("timing"))
        copy_gbs = res["copy_gbs"]
        save("timing", res)
    if "configs" in secs:
        save("configs", configs(deadline("configs"), copy_gbs))
    if "sanitize" in secs:
        save("sanitize", sanitize(deadline("sanitize")))


if __name__ == "__main__":
    main()
