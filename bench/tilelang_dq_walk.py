"""Each TileLang walk of the backward core (backends/tilelang/scan_bwd_core_chunk.py, SISO)
against the Triton walk on the same inputs: the Triton core runs once at its default (32-token
chunks, two N blocks; SEG = seglen / 32), and its own entry states `ent` and exit adjoints `dx`
feed both implementations. Each walk's outputs are checked against one float64 reference of the
two walks (batch row 0, two heads; chunks of each implementation's size, since the d cs shares
and X_c depend on the chunking) and timed alone (CUDA events over back-to-back launches,
median; the TileLang kernels launch through tvm-ffi, so no CUDA graph).

History: the first run (results/tilelang_dq_walk_h100_95d1378.json, tilelang_walks_h100_eeac7f2.json)
timed standalone versions of these kernels written in this file (the per-chunk cumsum read
precomputed, no varlen / partial chunks / S_last store: `git show eeac7f2:bench/tilelang_dq_walk.py`);
it now builds the backend's kernels (varlen, partial chunks, S_last; the cumsum read from the
Triton cs kernel's table, built here by torch).

    PYTHONPATH=$PWD python bench/tilelang_dq_walk.py [--N 128 --P 64] [--variants JSON] [--out f.json]
                                                                         (GPU; carry .carry/tilelang)
    python bench/tilelang_dq_walk.py --aot                               (CPU: build for sm_90a)
"""

import argparse
import json
import os
import sys
import time

import tilelang

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def build(which, N, P, threads, stages, arch=None):
    from mamba3_kernels.backends.tilelang import scan_bwd_core_chunk as walks
    if arch is None:
        from mamba3_kernels.backends.tilelang.step import device_arch
        arch = device_arch()
    return walks.build(which, 1, N, P, arch, threads, stages)


def _rel(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm())


def gpu(args):
    import torch

    from common import events_us, use_checkout, write_report
    use_checkout()
    from mamba3_kernels.backends.triton import scan_bwd_core as core
    torch.manual_seed(0)
    B, L, H, N, P = args.B, args.L, args.H, args.N, args.P
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
                         errors=errors(tro, ref32), us=events_us(lambda: core.launch(call[w]))))
        print(rows[-1], flush=True)
    from mamba3_kernels.backends.tilelang import scan_bwd_core_chunk as walks
    refs = {}
    for which, C, threads, stages in args.variants:
        row = dict(impl=f"tilelang_{which}", C=C, threads=threads, stages=stages)
        try:
            if C != walks.C:
                raise ValueError(f"C: the module's walks take {walks.C}-row chunks")
            t = time.time()
            kern = build(which, N, P, threads, stages)
            row["compile_s"] = round(time.time() - t, 1)
            slots = walks.slot_table(B, L, seglen // C, C, None, device=dev)
            nan = lambda *sh: torch.full(sh, float("nan"), device=dev)  # noqa: E731
            dcs2 = nan(2, B, H, L)
            # the cs table (the Triton cs kernel's layout): row b * L / C + chunk, dense, L % C == 0
            cs = adt.view(B, H, L // C, C).cumsum(-1).permute(0, 2, 1, 3).reshape(B * L // C, H, C).contiguous()
            if which == "dq":
                dqh = nan(B, L, 1, H, N)
                argv = (qh, ks, vt, dy, cs, slots, ent, nan(*ent.shape), dqh, dcs2)
                got = lambda: dict(dqh=dqh[:, :, 0], dcs_q=dcs2[0])  # noqa: E731
            else:
                dks, dvt, dtc = nan(B, L, 1, H, N), nan(B, L, 1, H, P), nan(B * L // C, H)
                argv = (qh, ks, vt, dy, cs, slots, dx, dks, dvt, dcs2, dtc)
                got = lambda: dict(dks=dks[:, :, 0], dvt=dvt[:, :, 0], dcs_kv=dcs2[1], dtc=dtc)  # noqa: E731
            kern(*argv)
            torch.cuda.synchronize()
            g = got()
            row["nan"] = any(bool(torch.isnan(x).any()) for x in g.values())
            if C not in refs:
                refs[C] = reference(C)
            row["errors"] = errors(g, refs[C])
            for n in ("dqh", "dks", "dvt"):
                if n in g:
                    row[f"{n}_rel_vs_triton"] = _rel(g[n], triton_out[n])
            row["us"] = events_us(lambda: kern(*argv))
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
    ap.add_argument("--N", type=int, default=128)
    ap.add_argument("--P", type=int, default=64)
    ap.add_argument("--seglen", type=int, default=512)
    ap.add_argument("--variants", type=json.loads,
                    default=[["dq", 64, 256, 2], ["dkv", 64, 256, 2]],
                    help="[which, C, threads, stages] per TileLang build")
    ap.add_argument("--out", default="tilelang_dq_walk.json")
    args = ap.parse_args()
    if args.aot:
        for which, C, threads, stages in args.variants:
            t = time.time()
            k = build(which, args.N, args.P, threads, stages, arch="sm_90a")
            src = k.get_kernel_source()
            print(which, C, threads, stages, f"built in {time.time() - t:.1f} s", len(src), "chars of CUDA",
                  "wgmma" in src, flush=True)
        return
    gpu(args)


if __name__ == "__main__":
    main()
