"""Experiment: the backward core's dq walk (SISO) in TileLang with 64-row chunks, timed against
the Triton dq kernel on the same inputs. The question it answers: does an explicit-layout walk
(wgmma on 64-row tiles, the state as an accumulator fragment, operands staged in shared memory
by the compiler's pipeliner) beat Triton's (32-row chunks, two N blocks, 255 registers)?

What it computes, per segment (entry state S from the Triton core's own `ent`, SPEC §9 /
backends/triton/scan_bwd_core_chunk.py's docstring), per chunk c of C = 64 tokens:

    gm     = (dy vt^T) o e^{cs_i - cs_j} [i > j]
    inter  = e^{cs_i} dy S              (S split into bf16 hi + lo: two products, fp32-accurate)
    dqh    = gm ks + inter              (fp32 out)
    dcs_i  = qh_i . inter_i             (dq's share of d cs)
    S     <- e^T S + (vt e^{T - cs})^T ks   (vt e^{T-cs} split hi + lo)

Simplifications against the Triton kernel (not a backend, not wired into the scan): R = 1, no
varlen, L a multiple of the segment length, the whole N per program, the per-chunk cumsum cs
read precomputed (the Triton kernel reads adt and sums in registers: the same bytes), and the
per-segment store of the last chunk's entry state left out (one P x N per segment).

    PYTHONPATH=$PWD python bench/tilelang_dq_walk.py [--out f.json]      (GPU)
    python bench/tilelang_dq_walk.py --aot                               (CPU: build for sm_90a)
"""

import argparse
import json
import os
import sys
import time

import tilelang
import tilelang.language as T

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def dq_walk(B, L, H, N, P, C, SEGC, threads=128, stages=2):
    """The TileLang program: grid (B * L / (SEGC * C) segment slots, H)."""
    NSEG = L // (SEGC * C)
    NSLOT = B * NSEG
    bf16, f32 = "bfloat16", "float32"

    @T.prim_func
    def main(QH: T.Tensor((B, L, H, N), bf16), KS: T.Tensor((B, L, H, N), bf16),
             VT: T.Tensor((B, L, H, P), bf16), DY: T.Tensor((B, L, H, P), bf16),
             CS: T.Tensor((B, H, L), f32), ENT: T.Tensor((NSLOT, H, P, N), f32),
             DQH: T.Tensor((B, L, H, N), f32), DCS: T.Tensor((B, H, L), f32)):
        with T.Kernel(NSLOT, H, threads=threads) as (slot, h):
            q_s = T.alloc_shared([C, N], bf16)
            k_s = T.alloc_shared([C, N], bf16)
            v_s = T.alloc_shared([C, P], bf16)
            d_s = T.alloc_shared([C, P], bf16)
            cs_s = T.alloc_shared([C], f32)
            gm_s = T.alloc_shared([C, C], bf16)
            sh_s = T.alloc_shared([P, N], bf16)
            sl_s = T.alloc_shared([P, N], bf16)
            wh_s = T.alloc_shared([C, P], bf16)
            wl_s = T.alloc_shared([C, P], bf16)
            st = T.alloc_fragment([P, N], f32)
            gm = T.alloc_fragment([C, C], f32)
            acc = T.alloc_fragment([C, N], f32)
            prod = T.alloc_fragment([C, N], f32)
            dcs = T.alloc_fragment([C], f32)
            b = slot // NSEG
            t0 = (slot % NSEG) * (SEGC * C)
            T.copy(ENT[slot, h, :, :], st)
            for ci in T.Pipelined(SEGC, num_stages=stages):
                tc = t0 + ci * C
                T.copy(QH[b, tc:tc + C, h, :], q_s)
                T.copy(KS[b, tc:tc + C, h, :], k_s)
                T.copy(VT[b, tc:tc + C, h, :], v_s)
                T.copy(DY[b, tc:tc + C, h, :], d_s)
                T.copy(CS[b, h, tc:tc + C], cs_s)
                # intra-chunk: gm = (dy vt^T) o decay, strictly causal
                T.gemm(d_s, v_s, gm, transpose_B=True, clear_accum=True)
                for i, j in T.Parallel(C, C):
                    gm[i, j] = T.if_then_else(i > j, gm[i, j] * T.exp(cs_s[i] - cs_s[j]), 0.0)
                T.copy(gm, gm_s)
                # inter-chunk: e^{cs} dy S with S as bf16 hi + lo
                for p, n in T.Parallel(P, N):
                    sh_s[p, n] = T.cast(st[p, n], bf16)
                for p, n in T.Parallel(P, N):
                    sl_s[p, n] = T.cast(st[p, n] - T.cast(sh_s[p, n], f32), bf16)
                T.gemm(d_s, sh_s, acc, clear_accum=True)
                T.gemm(d_s, sl_s, acc)
                for i, n in T.Parallel(C, N):
                    acc[i, n] = acc[i, n] * T.exp(cs_s[i])
                for i, n in T.Parallel(C, N):
                    prod[i, n] = acc[i, n] * T.cast(q_s[i, n], f32)
                T.reduce_sum(prod, dcs, dim=1)
                T.copy(dcs, DCS[b, h, tc:tc + C])
                T.gemm(gm_s, k_s, acc)
                T.copy(acc, DQH[b, tc:tc + C, h, :])
                # state update: S <- e^T S + (vt e^{T - cs})^T ks
                for i, p in T.Parallel(C, P):
                    wh_s[i, p] = T.cast(T.cast(v_s[i, p], f32) * T.exp(cs_s[C - 1] - cs_s[i]), bf16)
                for i, p in T.Parallel(C, P):
                    wl_s[i, p] = T.cast(T.cast(v_s[i, p], f32) * T.exp(cs_s[C - 1] - cs_s[i])
                                        - T.cast(wh_s[i, p], f32), bf16)
                for p, n in T.Parallel(P, N):
                    st[p, n] = st[p, n] * T.exp(cs_s[C - 1])
                T.gemm(wh_s, k_s, st, transpose_A=True)
                T.gemm(wl_s, k_s, st, transpose_A=True)

    return main


def build(B, L, H, N, P, C, SEGC, threads=128, stages=2, arch=None):
    from tvm.target import Target
    if arch is None:
        from mamba3_kernels.backends.tilelang.step import device_arch
        arch = device_arch()
    target = {"kind": "cuda", "arch": arch}
    with Target(target):
        return tilelang.compile(dq_walk(B, L, H, N, P, C, SEGC, threads, stages), target=target,
                                execution_backend="tvm_ffi")


def _rel(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm())


def gpu(args):
    import torch

    from common import use_checkout, write_report
    use_checkout()
    from mamba3_kernels.backends.triton import scan_bwd_core as core
    torch.manual_seed(0)
    B, L, H, N, P = args.B, args.L, args.H, 128, 64
    dev = "cuda"
    seglen = args.seglen
    bf = torch.bfloat16
    qh = torch.randn(B, L, 1, H, N, device=dev).to(bf)
    ks = (torch.randn(B, L, 1, H, N, device=dev) * 0.1).to(bf)
    vt = torch.randn(B, L, 1, H, P, device=dev).to(bf)
    dy = torch.randn(B, L, 1, H, P, device=dev).to(bf)
    adt = -torch.rand(B, H, L, device=dev) * 0.05
    s0 = torch.randn(B, H, P, N, device=dev)
    cfg = dict(core.default_config(1, N, P, "bfloat16"), SEG=seglen // 32)
    cfg = core.effective_config(cfg, qh, ks, vt, adt, dy, s0, None, None, True, False)
    calls, out = core.plan(qh, ks, vt, adt, dy, s0, None, None, cfg, True)
    for c in calls:
        if c["run"]:
            core.launch(c)
    torch.cuda.synchronize()
    dq_call = next(c for c in calls if c["name"] == "scan_bwd_core_dq")
    ent = dict(dq_call["args"])["ent_ptr"]
    dcs_tr = dict(dq_call["args"])["dcs_ptr"]
    nnb = core.n_blocks(N, cfg)
    dqh_tr = out["dqh"][:, :, 0].clone()
    dcs_tr = dcs_tr[:nnb].sum(0).clone()

    def timed(fn, reps=20, iters=10):
        """Median us per call: CUDA events around `iters` back-to-back calls, `reps` times (the
        inputs, ~400 MB, stream from HBM; the TileLang call goes through tvm-ffi, so no graph)."""
        for _ in range(3):
            fn()
        ts = []
        for _ in range(reps):
            a, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            for _ in range(iters):
                fn()
            e.record()
            torch.cuda.synchronize()
            ts.append(a.elapsed_time(e) * 1000 / iters)
        ts.sort()
        return ts[len(ts) // 2]

    def reference(C, heads=(0, 5)):
        """float64 dqh and dcs (chunks of C) for batch row 0 and `heads`, from the same ent."""
        nseg = L // seglen
        out = {}
        for h in heads:
            dq_r = torch.zeros(L, N, dtype=torch.float64, device=dev)
            dcs_r = torch.zeros(L, dtype=torch.float64, device=dev)
            for sg in range(nseg):
                S = ent[sg, h].double()
                for c0 in range(sg * seglen, (sg + 1) * seglen, C):
                    sl = slice(c0, c0 + C)
                    q, k = qh[0, sl, 0, h].double(), ks[0, sl, 0, h].double()
                    v, d = vt[0, sl, 0, h].double(), dy[0, sl, 0, h].double()
                    cs = torch.cumsum(adt[0, h, sl].double(), 0)
                    dec = torch.exp(cs[:, None] - cs[None, :]) * torch.tril(torch.ones(C, C, device=dev), -1).double()
                    inter = torch.exp(cs)[:, None] * (d @ S)
                    dq_r[sl] = ((d @ v.T) * dec) @ k + inter
                    dcs_r[sl] = (q * inter).sum(1)
                    S = S * torch.exp(cs[-1]) + (v * torch.exp(cs[-1] - cs)[:, None]).T @ k
            out[h] = (dq_r, dcs_r)
        return out

    def check(dqh, dcs, ref, nnb_dcs=None):
        """rel_l2 of dqh and dcs against `reference` (batch row 0, its heads)."""
        e = {}
        for h, (dq_r, dcs_r) in ref.items():
            e[f"dqh_h{h}"] = _rel(dqh[0, :, h], dq_r)
            if dcs is not None:
                e[f"dcs_h{h}"] = _rel(dcs[0, h], dcs_r)
        return e

    rows = [dict(impl="triton_dq", config={k: v for k, v in cfg.items() if k in ("CHUNK", "SEG", "BLOCK_N", "num_warps")},
                 errors=check(dqh_tr.view(B, L, H, N), dcs_tr, reference(32)),
                 us=timed(lambda: core.launch(dq_call)))]
    print(rows[-1], flush=True)
    q3, k3, v3, d3 = (x[:, :, 0].contiguous() for x in (qh, ks, vt, dy))
    refs = {}
    for C, threads, stages in args.variants:
        row = dict(impl="tilelang_dq", C=C, threads=threads, stages=stages)
        try:
            t = time.time()
            kern = build(B, L, H, N, P, C, seglen // C, threads, stages)
            row["compile_s"] = round(time.time() - t, 1)
            csx = torch.cumsum(adt.view(B, H, L // C, C), -1).view(B, H, L).contiguous()
            dqh = torch.full((B, L, H, N), float("nan"), device=dev)
            dcs = torch.full((B, H, L), float("nan"), device=dev)
            kern(q3, k3, v3, d3, csx, ent, dqh, dcs)
            torch.cuda.synchronize()
            row["nan"] = bool(torch.isnan(dqh).any() or torch.isnan(dcs).any())
            if C not in refs:
                refs[C] = reference(C)
            row["errors"] = check(dqh, dcs, refs[C])
            row["dqh_rel_vs_triton"] = _rel(dqh, dqh_tr)
            row["us"] = timed(lambda: kern(q3, k3, v3, d3, csx, ent, dqh, dcs))
        except Exception as e:   # report and go on to the next variant
            row["error"] = repr(e)[:600]
        print(row, flush=True)
        rows.append(row)
    write_report(args.out, rows, tilelang=tilelang.__version__, B=B, L=L, H=H, N=N, P=P, seglen=seglen)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--aot", action="store_true")
    ap.add_argument("--B", type=int, default=4)
    ap.add_argument("--L", type=int, default=4096)
    ap.add_argument("--H", type=int, default=32)
    ap.add_argument("--seglen", type=int, default=512)
    ap.add_argument("--variants", type=json.loads, default=[[64, 128, 2], [64, 128, 1], [64, 256, 2]])
    ap.add_argument("--out", default="tilelang_dq_walk.json")
    args = ap.parse_args()
    if args.aot:
        for C, threads, stages in args.variants:
            t = time.time()
            k = build(2, 1024, 4, 128, 64, C, 512 // C, threads, stages, arch="sm_90a")
            src = k.get_kernel_source()
            print(C, threads, stages, f"built in {time.time() - t:.1f} s", len(src), "chars of CUDA",
                  "wgmma" in src, flush=True)
        return
    gpu(args)


if __name__ == "__main__":
    main()
