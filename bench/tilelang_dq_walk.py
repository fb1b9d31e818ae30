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


def dkv_walk(B, L, H, N, P, C, SEGC, threads=128, stages=2):
    """The dkv walk (backwards over a segment's chunks from its exit adjoint D = phase 2's dx):

        sdv    = dy vt^T;  gm = sdv o decay;  a = (qh ks^T) o decay     (strictly causal)
        inter  = e^{T - cs_j} vt_j D        (D split bf16 hi + lo)
        dks    = gm^T qh + inter;   interv = e^{T - cs_j} ks_j D^T;   dvt = a^T dy + interv
        x_j    = vt_j . interv_j;   dcs = rowsum(a o sdv) - colsum(a o sdv) - x;   dtc_c = sum_j x_j
        D     <- e^T D + (dy e^{cs})^T qh   (dy e^{cs} split hi + lo)
    Grid (segment slots, H); outputs dks, dvt (fp32), dcs (dkv's share), dtc (per chunk)."""
    NSEG = L // (SEGC * C)
    NSLOT = B * NSEG
    bf16, f32 = "bfloat16", "float32"

    @T.prim_func
    def main(QH: T.Tensor((B, L, H, N), bf16), KS: T.Tensor((B, L, H, N), bf16),
             VT: T.Tensor((B, L, H, P), bf16), DY: T.Tensor((B, L, H, P), bf16),
             CS: T.Tensor((B, H, L), f32), DX: T.Tensor((NSLOT, H, P, N), f32),
             DKS: T.Tensor((B, L, H, N), f32), DVT: T.Tensor((B, L, H, P), f32), DCS: T.Tensor((B, H, L), f32),
             DTC: T.Tensor((NSLOT * SEGC, H), f32)):
        with T.Kernel(NSLOT, H, threads=threads) as (slot, h):
            q_s = T.alloc_shared([C, N], bf16)
            k_s = T.alloc_shared([C, N], bf16)
            v_s = T.alloc_shared([C, P], bf16)
            d_s = T.alloc_shared([C, P], bf16)
            cs_s = T.alloc_shared([C], f32)
            gm_s = T.alloc_shared([C, C], bf16)
            a_s = T.alloc_shared([C, C], bf16)
            sh_s = T.alloc_shared([P, N], bf16)
            sl_s = T.alloc_shared([P, N], bf16)
            wh_s = T.alloc_shared([C, P], bf16)
            wl_s = T.alloc_shared([C, P], bf16)
            st = T.alloc_fragment([P, N], f32)
            sdv = T.alloc_fragment([C, C], f32)
            am = T.alloc_fragment([C, C], f32)
            w = T.alloc_fragment([C, C], f32)
            accv = T.alloc_fragment([C, P], f32)
            acck = T.alloc_fragment([C, N], f32)
            xv = T.alloc_fragment([C, P], f32)
            x = T.alloc_fragment([C], f32)
            rs = T.alloc_fragment([C], f32)
            cl = T.alloc_fragment([C], f32)
            xs = T.alloc_fragment([1], f32)
            r_s = T.alloc_shared([C], f32)
            c_s = T.alloc_shared([C], f32)
            x_s = T.alloc_shared([C], f32)
            b = slot // NSEG
            t0 = (slot % NSEG) * (SEGC * C)
            T.copy(DX[slot, h, :, :], st)
            for kk in T.Pipelined(SEGC, num_stages=stages):
                ci = SEGC - 1 - kk
                tc = t0 + ci * C
                T.copy(QH[b, tc:tc + C, h, :], q_s)
                T.copy(KS[b, tc:tc + C, h, :], k_s)
                T.copy(VT[b, tc:tc + C, h, :], v_s)
                T.copy(DY[b, tc:tc + C, h, :], d_s)
                T.copy(CS[b, h, tc:tc + C], cs_s)
                for p, n in T.Parallel(P, N):
                    sh_s[p, n] = T.cast(st[p, n], bf16)
                for p, n in T.Parallel(P, N):
                    sl_s[p, n] = T.cast(st[p, n] - T.cast(sh_s[p, n], f32), bf16)
                T.gemm(d_s, v_s, sdv, transpose_B=True, clear_accum=True)
                T.gemm(q_s, k_s, am, transpose_B=True, clear_accum=True)
                for i, j in T.Parallel(C, C):
                    am[i, j] = T.if_then_else(i > j, am[i, j] * T.exp(cs_s[i] - cs_s[j]), 0.0)
                for i, j in T.Parallel(C, C):
                    w[i, j] = am[i, j] * sdv[i, j]
                for i, j in T.Parallel(C, C):
                    sdv[i, j] = T.if_then_else(i > j, sdv[i, j] * T.exp(cs_s[i] - cs_s[j]), 0.0)
                T.copy(sdv, gm_s)
                T.copy(am, a_s)
                T.reduce_sum(w, rs, dim=1)
                T.reduce_sum(w, cl, dim=0)
                # dks = gm^T qh + e^{T - cs} vt D
                T.gemm(v_s, sh_s, acck, clear_accum=True)
                T.gemm(v_s, sl_s, acck)
                for j, n in T.Parallel(C, N):
                    acck[j, n] = acck[j, n] * T.exp(cs_s[C - 1] - cs_s[j])
                T.gemm(gm_s, q_s, acck, transpose_A=True)
                T.copy(acck, DKS[b, tc:tc + C, h, :])
                # dvt = a^T dy + e^{T - cs} ks D^T
                T.gemm(k_s, sh_s, accv, transpose_B=True, clear_accum=True)
                T.gemm(k_s, sl_s, accv, transpose_B=True)
                for j, p in T.Parallel(C, P):
                    accv[j, p] = accv[j, p] * T.exp(cs_s[C - 1] - cs_s[j])
                for j, p in T.Parallel(C, P):
                    xv[j, p] = accv[j, p] * T.cast(v_s[j, p], f32)
                T.reduce_sum(xv, x, dim=1)
                T.gemm(a_s, d_s, accv, transpose_A=True)
                T.copy(accv, DVT[b, tc:tc + C, h, :])
                T.copy(rs, r_s)   # (row / column sums and x come in different fragment layouts)
                T.copy(cl, c_s)
                T.copy(x, x_s)
                for i in T.Parallel(C):
                    DCS[b, h, tc + i] = r_s[i] - c_s[i] - x_s[i]
                T.reduce_sum(x, xs, dim=0)
                DTC[slot * SEGC + ci, h] = xs[0]
                # D <- e^T D + (dy e^{cs})^T qh
                for i, p in T.Parallel(C, P):
                    wh_s[i, p] = T.cast(T.cast(d_s[i, p], f32) * T.exp(cs_s[i]), bf16)
                for i, p in T.Parallel(C, P):
                    wl_s[i, p] = T.cast(T.cast(d_s[i, p], f32) * T.exp(cs_s[i]) - T.cast(wh_s[i, p], f32), bf16)
                for p, n in T.Parallel(P, N):
                    st[p, n] = st[p, n] * T.exp(cs_s[C - 1])
                T.gemm(wh_s, q_s, st, transpose_A=True)
                T.gemm(wl_s, q_s, st, transpose_A=True)

    return main


def build(B, L, H, N, P, C, SEGC, threads=128, stages=2, arch=None, which="dq"):
    from tvm.target import Target
    if arch is None:
        from mamba3_kernels.backends.tilelang.step import device_arch
        arch = device_arch()
    target = {"kind": "cuda", "arch": arch}
    with Target(target):
        prog = (dq_walk if which == "dq" else dkv_walk)(B, L, H, N, P, C, SEGC, threads, stages)
        return tilelang.compile(prog, target=target,
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
    dsf = torch.randn(B, H, P, N, device=dev)
    cfg = dict(core.default_config(1, N, P, "bfloat16"), SEG=seglen // 32)
    cfg = core.effective_config(cfg, qh, ks, vt, adt, dy, s0, dsf, None, True, False)
    calls, out = core.plan(qh, ks, vt, adt, dy, s0, dsf, None, cfg, True)
    for c in calls:
        if c["run"]:
            core.launch(c)
    torch.cuda.synchronize()
    call = {c["name"].replace("scan_bwd_core_", ""): c for c in calls}
    ent, dx = dict(call["dq"]["args"])["ent_ptr"], dict(call["dkv"]["args"])["dx_ptr"]
    nnb = core.n_blocks(N, cfg)
    dcs_all, dtc_all = dict(call["dq"]["args"])["dcs_ptr"], dict(call["dkv"]["args"])["dtc_ptr"]
    triton_out = dict(dqh=out["dqh"][:, :, 0], dcs_q=dcs_all[:nnb].sum(0), dks=out["dks"][:, :, 0],
                      dvt=out["dvt"][:, :, 0], dcs_kv=dcs_all[nnb:].sum(0), dtc=dtc_all.sum(0))

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
        """float64 outputs of both walks with chunks of C, batch row 0, `heads` (same ent / dx):
        {name: {h: tensor}} for dqh, dcs_q, dks, dvt, dcs_kv, dtc (per chunk of the row's segments)."""
        nseg = L // seglen
        tri = torch.tril(torch.ones(C, C, device=dev, dtype=torch.float64), -1)
        r = {n: {} for n in ("dqh", "dcs_q", "dks", "dvt", "dcs_kv", "dtc")}
        for h in heads:
            o = dict(dqh=torch.zeros(L, N), dcs_q=torch.zeros(L), dks=torch.zeros(L, N), dvt=torch.zeros(L, P),
                     dcs_kv=torch.zeros(L), dtc=torch.zeros(L // C))
            o = {n: x.double().to(dev) for n, x in o.items()}
            for sg in range(nseg):
                S, D = ent[sg, h].double(), dx[sg, h].double()
                starts = list(range(sg * seglen, (sg + 1) * seglen, C))
                ops = []
                for c0 in starts:
                    sl = slice(c0, c0 + C)
                    q, k = qh[0, sl, 0, h].double(), ks[0, sl, 0, h].double()
                    v, d = vt[0, sl, 0, h].double(), dy[0, sl, 0, h].double()
                    cs = torch.cumsum(adt[0, h, sl].double(), 0)
                    dec = torch.exp(cs[:, None] - cs[None, :]) * tri
                    ops.append((sl, q, k, v, d, cs, dec))
                    inter = torch.exp(cs)[:, None] * (d @ S)
                    o["dqh"][sl] = ((d @ v.T) * dec) @ k + inter
                    o["dcs_q"][sl] = (q * inter).sum(1)
                    S = S * torch.exp(cs[-1]) + (v * torch.exp(cs[-1] - cs)[:, None]).T @ k
                for sl, q, k, v, d, cs, dec in reversed(ops):
                    e = torch.exp(cs[-1] - cs)[:, None]
                    sdv = d @ v.T
                    a = (q @ k.T) * dec
                    o["dks"][sl] = ((sdv * dec).T @ q) + e * (v @ D)
                    interv = e * (k @ D.T)
                    x = (v * interv).sum(1)
                    o["dvt"][sl] = a.T @ d + interv
                    w = a * sdv
                    o["dcs_kv"][sl] = w.sum(1) - w.sum(0) - x
                    o["dtc"][sl.start // C] = x.sum()
                    D = D * torch.exp(cs[-1]) + (d * torch.exp(cs)[:, None]).T @ q
            for n in r:
                r[n][h] = o[n]
        return r

    def errors(got, ref):
        """rel_l2 per output and head against `reference` (got: {name: tensor in kernel layout})."""
        e = {}
        for n, g in got.items():
            for h, rv in ref[n].items():
                x = g[0, :, h] if n in ("dqh", "dks", "dvt") else (g[0, h] if n != "dtc" else g[:len(rv), h])
                e[f"{n}_h{h}"] = _rel(x, rv)
        return e

    keep = ("CHUNK", "SEG", "BLOCK_N", "num_warps", "dq_num_stages", "dkv_num_stages")
    ref32 = reference(32)
    rows = []
    for w, names in (("dq", ("dqh", "dcs_q")), ("dkv", ("dks", "dvt", "dcs_kv", "dtc"))):
        tro = {n: triton_out[n] for n in names}
        rows.append(dict(impl=f"triton_{w}", config={k: cfg[k] for k in keep if k in cfg},
                         errors=errors(tro, ref32), us=timed(lambda: core.launch(call[w]))))
        print(rows[-1], flush=True)
    q3, k3, v3, d3 = (x[:, :, 0].contiguous() for x in (qh, ks, vt, dy))
    refs = {}
    for which, C, threads, stages in args.variants:
        row = dict(impl=f"tilelang_{which}", C=C, threads=threads, stages=stages)
        try:
            t = time.time()
            kern = build(B, L, H, N, P, C, seglen // C, threads, stages, which=which)
            row["compile_s"] = round(time.time() - t, 1)
            csx = torch.cumsum(adt.view(B, H, L // C, C), -1).view(B, H, L).contiguous()
            nan = lambda *sh: torch.full(sh, float("nan"), device=dev)  # noqa: E731
            if which == "dq":
                got = dict(dqh=nan(B, L, H, N), dcs_q=nan(B, H, L))
                argv = (q3, k3, v3, d3, csx, ent, got["dqh"], got["dcs_q"])
            else:
                got = dict(dks=nan(B, L, H, N), dvt=nan(B, L, H, P), dcs_kv=nan(B, H, L), dtc=nan(B * L // C, H))
                argv = (q3, k3, v3, d3, csx, dx, got["dks"], got["dvt"], got["dcs_kv"], got["dtc"])
            kern(*argv)
            torch.cuda.synchronize()
            row["nan"] = any(bool(torch.isnan(x).any()) for x in got.values())
            if C not in refs:
                refs[C] = reference(C)
            row["errors"] = errors(got, refs[C])
            for n in ("dqh", "dks", "dvt"):
                if n in got:
                    row[f"{n}_rel_vs_triton"] = _rel(got[n], triton_out[n])
            row["us"] = timed(lambda: kern(*argv))
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
    ap.add_argument("--variants", type=json.loads,
                    default=[["dq", 64, 256, 2], ["dq", 64, 256, 3], ["dq", 128, 256, 2], ["dkv", 64, 256, 2],
                             ["dkv", 64, 256, 3]],
                    help="[which, C, threads, stages] per TileLang build")
    ap.add_argument("--out", default="tilelang_dq_walk.json")
    args = ap.parse_args()
    if args.aot:
        for which, C, threads, stages in args.variants:
            t = time.time()
            k = build(2, 1024, 4, 128, 64, C, 512 // C, threads, stages, arch="sm_90a", which=which)
            src = k.get_kernel_source()
            print(which, C, threads, stages, f"built in {time.time() - t:.1f} s", len(src), "chars of CUDA",
                  "wgmma" in src, flush=True)
        return
    gpu(args)


if __name__ == "__main__":
    main()
