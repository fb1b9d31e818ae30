"""Decode-step benchmark: our backends vs upstream's Triton and CuTe steps, vs the copy roofline.

    python bench/step.py [--backends triton,cute,tilelang] [--out results.json] [--quick]

Shapes (issue 3): H=32, N=128, P=64, G=1, bf16 inputs, B in {1, 16, 64, 256, 1024},
R in {1, 4}, SSM state fp32 and bf16. Per candidate: median µs per call from CUDA-graph replay
over rotated state sets (together > 3x L2, so every call reads its state from HBM); at B <= 16
also host time per call from Python (back to back, one sync): the public API (backend=),
the backend launch alone, StepPlan, StepPlan.graphed() (replay from its static token buffers,
and with 8 token copies in), `replay()` of a bare one-call graph, upstream's callables, and a
torch `add_` (the host's launch floor, in meta); bytes moved (state read + write + inputs +
outputs), GB/s and the fraction of the measured device copy bandwidth.

Upstream (state-spaces/mamba, put on PYTHONPATH from an ignored folder such as .upstream/):
- `upstream-cute`: `mamba3_step_fn` alone (state update only; its rotation, bias and angle
  update run in a separate Triton helper) -- the figure upstream quotes;
- `upstream-cute+rotary`: the module's decode path: rotary helper + mamba3_step_fn + the three
  state copies (angle, K, V) -- what our one fused kernel replaces;
- `upstream-triton`: `mamba3_siso_step` (SISO only; returns new states).
Upstream TileLang has no step. TileLang and CuTe bundles cannot travel in one device call, so
our TileLang backend is timed in a second process (`--backends tilelang,triton`): Triton is in
both runs as the cross-run yardstick.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import time

import numpy as np
import torch

from common import copy_bandwidth, use_checkout  # noqa: E402  (bench/common.py)

use_checkout()

from mamba3_kernels import backends  # noqa: E402
from mamba3_kernels.spec import Problem, ScanSpec, States  # noqa: E402
from mamba3_kernels.tensors import prepare_step  # noqa: E402
from mamba3_kernels.testing import step_inputs  # noqa: E402

H, N, P, G = 32, 128, 64, 1


def graph_time(calls, reps: int = 20) -> float:
    """Median seconds per call: capture all `calls` (one per state set) in a CUDA graph, replay."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for c in calls:  # warm-up / compile outside the capture
            c()
    torch.cuda.current_stream().wait_stream(s)
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for c in calls:
            c()
    g.replay()
    torch.cuda.synchronize()
    ts = []
    for _ in range(reps):
        st, en = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        st.record()
        g.replay()
        en.record()
        en.synchronize()
        ts.append(st.elapsed_time(en) / 1e3 / len(calls))
    return statistics.median(ts)


def python_call_time(fn, n: int = 300) -> float:
    """Seconds per back-to-back call from Python (host overhead included), one sync at the end."""
    for _ in range(20):
        fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) / n


def graph_replay_call_time(call, n: int = 300) -> float:
    """Seconds per `g.replay()` from Python of a CUDA graph holding one `call`, back to back,
    one sync at the end: the host cost of the graph route for a latency-bound decode loop."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        call()
    torch.cuda.current_stream().wait_stream(s)
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        call()
    return python_call_time(g.replay, n)


def plan_call_times(name, spec, args) -> dict:
    """Host µs per call of the latency routes of the public API: StepPlan (eager, per-token
    checks), plan.graphed() replaying from its static buffers, and the same copying 8 tokens in."""
    import mamba3_kernels as m3
    a = dict(args, states=States(*(x.clone() for x in args["states"])))
    plan = m3.StepPlan(**a, output_mode=spec.output_mode, pairing=spec.pairing, backend=name)
    tok = {n: a[n] for n in ("q", "k", "v", "adt", "dt", "trap", "angles", "z")}
    g = plan.graphed()
    return dict(plan_call_us=python_call_time(lambda: plan(**tok)) * 1e6,
                graphed_call_us=python_call_time(g) * 1e6,
                graphed_copy_call_us=python_call_time(lambda: g(**tok)) * 1e6)


def make_spec(R: int, state_dtype: str) -> ScanSpec:
    return ScanSpec(d_state=N, head_dim=P, rank=R, n_angles=N // 4,
                    pairing="interleaved" if R == 1 else "half", has_d=True, has_z=True,
                    has_mimo_v=R > 1, has_mimo_z=R > 1, has_mimo_out=R > 1, chunk_size=1,
                    initial_states=True, final_states=True, input_dtype="bfloat16",
                    state_dtype=state_dtype)


def step_bytes(B: int, R: int, state_bytes: int) -> int:
    """Minimum bytes of one step: each input read once, each output/state written once."""
    A = N // 4
    ssm = B * H * P * N * state_bytes * 2
    kst = B * R * H * N * 4 * 2
    vst = B * H * P * 2 * 2
    ang = B * H * A * 4 * 2
    inputs = B * R * G * N * 2 * 2 + B * H * P * 2 * 2 + B * H * 4 * 3 + B * H * A * 4
    params = H * R * N * 4 * 2 + H * R * P * 4 * 3 + H * 4
    out = B * H * P * 2
    return ssm + kst + vst + ang + inputs + params + out


def n_sets(bytes_per_set: int, l2: int) -> int:
    return int(min(64, max(2, math.ceil(3 * l2 / bytes_per_set))))


def our_calls(name, spec, B, rng, sets):
    mod = backends.get(name)
    prob = Problem(B, 1, H, G, B)
    cfg = mod.default_config(spec, prob, "step")
    args = step_inputs(spec, prob, rng, device="cuda")
    bundles = []
    for _ in range(sets):
        a = dict(args)
        a["states"] = States(*(x.clone() for x in args["states"]))
        bundles.append(prepare_step(spec, **a, inplace=True))
    calls = [(lambda t=t: mod.step(spec, cfg, t)) for t in bundles]
    return calls, cfg, args


def api_call(name, spec, args):
    import mamba3_kernels as m3
    a = dict(args)
    opts = dict(output_mode=spec.output_mode, pairing=spec.pairing)
    return lambda: m3.step(**a, **opts, backend=name, validate=False)


def upstream_calls(kind, spec, B, rng, sets):
    """Upstream's callables on equivalent inputs (same sizes and dtypes)."""
    R, A = spec.rank, spec.n_angles
    dev, bf = "cuda", torch.bfloat16
    sdt = torch.float32 if spec.state_dtype == "float32" else torch.bfloat16
    x = torch.randn(B, H, P, device=dev, dtype=bf)
    z = torch.randn(B, H, P, device=dev, dtype=bf)
    dt = torch.rand(B, H, device=dev) * 0.1 + 0.01
    Aneg = -torch.rand(B, H, device=dev) - 0.5
    trap = torch.rand(B, H, device=dev)
    D = torch.randn(H, device=dev)
    if kind == "upstream-triton":
        if R != 1:
            return None
        from mamba_ssm.ops.triton.mamba3.mamba3_siso_step import mamba3_siso_step
        q = torch.randn(B, G, N, device=dev, dtype=bf)
        k = torch.randn(B, G, N, device=dev, dtype=bf)
        qb, kb = torch.randn(H, N, device=dev), torch.randn(H, N, device=dev)
        ang = torch.randn(B, H, A, device=dev)
        st = [(torch.rand(B, H, A, device=dev), torch.randn(B, H, P, N, device=dev, dtype=sdt),
               torch.randn(B, H, N, device=dev), torch.randn(B, H, P, device=dev, dtype=bf)) for _ in range(sets)]
        return [(lambda s=s: mamba3_siso_step(q, k, x, Aneg * dt, dt, trap, qb, kb, ang, D, z, s)) for s in st]
    from mamba_ssm.ops.cute.mamba3.mamba3_step_fn import mamba3_step_fn
    Bm = torch.randn(B, R, H, N, device=dev, dtype=bf)
    Cm = torch.randn(B, R, H, N, device=dev, dtype=bf)
    xpj, zpj, opj = (torch.randn(R, H, P, device=dev) for _ in range(3))
    out = torch.empty(B, H, P, device=dev, dtype=bf)
    states = [(torch.randn(B, H, P, N, device=dev, dtype=sdt), torch.randn(B, R, H, N, device=dev, dtype=bf),
               torch.randn(B, H, P, device=dev, dtype=bf), torch.rand(B, H, A, device=dev)) for _ in range(sets)]

    def kernel(s, Bq=Bm, Cq=Cm):
        mamba3_step_fn(s[0], s[1], s[2], Aneg, Bq, Cq, D, x, dt, trap, xpj, outproj=opj, state_out=None,
                       out=out, z=z, zproj=zpj, tile_D=64, num_warps=4)
    if kind == "upstream-cute":
        return [(lambda s=s: kernel(s)) for s in states]
    from mamba_ssm.ops.triton.mamba3.mamba3_mimo_rotary_step import apply_rotary_qk_inference_fwd
    ang_proj = torch.randn(B, H, A, device=dev)
    bq, bk = torch.randn(R, H, N, device=dev), torch.randn(R, H, N, device=dev)
    qg = torch.randn(B, R, G, N, device=dev, dtype=bf).expand(B, R, H, N)
    kg = torch.randn(B, R, G, N, device=dev, dtype=bf).expand(B, R, H, N)

    def full(s):  # Mamba3.step's decode path
        C2, B2, nxt = apply_rotary_qk_inference_fwd(q=qg, k=kg, angle_state=s[3], angle_proj=ang_proj, dt=dt,
                                                    bias_q=bq, bias_k=bk, conjugate=False, inplace=False,
                                                    rotate_pairwise=R == 1)
        kernel(s, B2, C2)
        s[3].copy_(nxt)
        s[1].copy_(B2)
        s[2].copy_(x)
    return [(lambda s=s: full(s)) for s in states]


def git_commit() -> str:
    """The commit measured: $MAMBA3_COMMIT (set by the device job, which has no .git), else git."""
    if os.environ.get("MAMBA3_COMMIT"):
        return os.environ["MAMBA3_COMMIT"]
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                              cwd=os.path.dirname(__file__)).stdout.strip() or "unknown"
    except Exception:
        return "unknown"


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--backends", default="triton,cute,tilelang")
    ap.add_argument("--upstream", default="upstream-cute,upstream-cute+rotary,upstream-triton")
    ap.add_argument("--out", default=None)
    ap.add_argument("--quick", action="store_true", help="B in {1, 64, 256}, R in {1, 4}, fp32 state only")
    ap.add_argument("--Bs", default=None, help="comma-separated batch sizes (default 1,16,64,256,1024)")
    ap.add_argument("--Rs", default="1,4", help="comma-separated MIMO ranks")
    ap.add_argument("--states", default=None, help="comma-separated state dtypes (float32,bfloat16)")
    args = ap.parse_args()
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
    meta = dict(gpu=props.name, sms=props.multi_processor_count, torch=torch.__version__, triton=ver("triton"),
                tilelang=ver("tilelang"), cutlass_dsl=ver("nvidia-cutlass-dsl"), commit=git_commit(),
                copy_bandwidth_GBps=bw / 1e9, shapes=dict(H=H, N=N, P=P, G=G, inputs="bfloat16"))
    one = torch.zeros(1, device="cuda")
    meta["torch_add_call_us"] = python_call_time(lambda: one.add_(1.0), 2000) * 1e6  # the host's launch floor
    print(f"{props.name}: copy bandwidth {bw / 1e9:.0f} GB/s (read + write); a torch add_ from Python "
          f"{meta['torch_add_call_us']:.1f} us per call", flush=True)
    ours = [b for b in args.backends.split(",") if b]
    ups = [u for u in args.upstream.split(",") if u]
    Bs = (1, 64, 256) if args.quick else (1, 16, 64, 256, 1024)
    sdts = ("float32",) if args.quick else ("float32", "bfloat16")
    if args.Bs:
        Bs = tuple(int(x) for x in args.Bs.split(",") if x)
    if args.states:
        sdts = tuple(x for x in args.states.split(",") if x)
    rows = []
    for sdt in sdts:
        for R in (int(x) for x in args.Rs.split(",") if x):
            spec = make_spec(R, sdt)
            for B in Bs:
                nbytes = step_bytes(B, R, 4 if sdt == "float32" else 2)
                sets = n_sets(nbytes, l2)
                for name in ours + ups:
                    row = dict(impl=name, B=B, R=R, state=sdt, bytes=nbytes, sets=sets)
                    try:
                        if name in ours:
                            ok, why = backends.get(name).available()
                            if not ok:
                                row["error"] = f"unavailable: {why}"
                                rows.append(row)
                                continue
                            calls, cfg, a = our_calls(name, spec, B, rng, sets)
                            row["config"] = cfg
                            if B <= 16:
                                row["python_call_us"] = python_call_time(api_call(name, spec, a)) * 1e6
                                row["launch_only_us"] = python_call_time(calls[0]) * 1e6
                                row["graph_replay_call_us"] = graph_replay_call_time(calls[0]) * 1e6
                                row.update(plan_call_times(name, spec, a))
                        else:
                            calls = upstream_calls(name, spec, B, rng, sets)
                            if calls is None:
                                continue
                            if B <= 16:
                                row["python_call_us"] = python_call_time(calls[0]) * 1e6
                        t = graph_time(calls)
                        row.update(us=t * 1e6, GBps=nbytes / t / 1e9, frac_copy_bw=nbytes / t / bw)
                    except Exception as e:  # recorded, never hidden
                        row["error"] = f"{type(e).__name__}: {str(e)[:300]}"
                    rows.append(row)
                    torch.cuda.empty_cache()
                    msg = (f"{row['us']:9.2f} us {row['GBps']:7.0f} GB/s {100 * row['frac_copy_bw']:5.1f}%"
                           if "us" in row else row.get("error", ""))
                    extra = (f"  python call {row['python_call_us']:.1f} us" if "python_call_us" in row else "")
                    if "launch_only_us" in row:
                        extra += (f", launch {row['launch_only_us']:.1f}, StepPlan {row['plan_call_us']:.1f}, "
                                  f"graphed {row['graphed_call_us']:.1f} (copying tokens "
                                  f"{row['graphed_copy_call_us']:.1f}), bare graph replay "
                                  f"{row['graph_replay_call_us']:.1f} us")
                    print(f"{sdt:8s} R={R} B={B:5d} {name:22s} {msg}{extra}", flush=True)
    res = dict(meta=meta, rows=rows)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(res, f, indent=1)
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
