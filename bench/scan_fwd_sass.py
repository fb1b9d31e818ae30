"""AOT (no GPU) static profile of the chunked-scan forward kernels: registers, spills and SASS
instruction counts (all, barriers, shared-memory, MUFU, MMA, global loads) per kernel, for a
spec / config. A free proxy for the per-chunk latency of the chunk loops.

    python bench/scan_fwd_sass.py '{"CHUNK": 32}' ...   (JSON config overrides; SISO bench spec)
"""
from __future__ import annotations

import collections
import json
import os
import re
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def sass_text(cubin: bytes) -> str:
    """cuobjdump -sass of a cubin (the cuobjdump Triton ships)."""
    import triton
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        return subprocess.run([tool, "-sass", f.name], capture_output=True, text=True, check=True).stdout


def sass_counts(cubin: bytes) -> dict:
    txt = sass_text(cubin)
    ins = []  # (address, opcode, line)
    for line in txt.splitlines():
        m = re.match(r"\s*/\*([0-9a-f]+)\*/\s+(@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)", line)
        if m:
            ins.append((int(m.group(1), 16), m.group(3).split(".")[0], line))
    # the largest backward branch is the chunk loop: count its body separately
    lo = hi = None
    for a, op, line in ins:
        m = re.search(r"BRA\s+(?:\S+\s+)?`?\(?\.?L_x_(\d+)|BRA\s+0x([0-9a-f]+)", line)
        if op == "BRA":
            t = re.search(r"0x([0-9a-f]+)", line)
            if t:
                ta = int(t.group(1), 16)
                if ta < a and (lo is None or a - ta > hi - lo):
                    lo, hi = ta, a
    loop = collections.Counter(op for a, op, _ in ins if lo is not None and lo <= a <= hi)
    ops = collections.Counter(op for _, op, _ in ins)
    tot = sum(ops.values())
    pick = lambda *ks: sum(ops[k] for k in ks)  # noqa: E731
    lp = lambda *ks: sum(loop[k] for k in ks)  # noqa: E731
    return dict(loop=sum(loop.values()), loop_bar=lp("BAR"), loop_ldg=lp("LDG"), loop_mufu=lp("MUFU"),
                loop_smem=lp("LDS", "LDSM", "STS", "STSM"), loop_top=loop.most_common(14), total=tot, bar=pick("BAR"), lds=pick("LDS", "LDSM"), sts=pick("STS", "STSM"),
                mufu=pick("MUFU"), mma=pick("HMMA", "HGMMA"), ldg=pick("LDG"), stg=pick("STG"),
                shfl=pick("SHFL"), ldl=pick("LDL"), stl=pick("STL"), top=ops.most_common(12))


def profile(spec, cfg, prob):
    import triton
    from triton.backends.compiler import GPUTarget
    from mamba3_kernels.backends.triton import _resource_usage
    from mamba3_kernels.backends.triton import aot as _aot
    from mamba3_kernels.backends.triton import scan_fwd as sf
    t = sf.meta_tensors(spec, prob)
    calls, _ = sf.plan(spec, cfg, t, device="meta")
    out = []
    for c in calls:
        sig, attrs, consts = _aot.signature(c)   # as the JIT specialises at launch
        src = triton.compiler.ASTSource(fn=c["kernel"], signature=sig, constexprs=consts, attrs=attrs)
        opts = {"num_warps": c["num_warps"], "num_stages": c["num_stages"]}
        if c.get("maxnreg"):
            opts["maxnreg"] = c["maxnreg"]
        k = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=opts)
        use = _resource_usage(k.asm["cubin"])
        out.append(dict(name=c["name"], run=c["run"], regs=use["registers"],
                        spills=(use["local"] or 0) + (use["stack"] or 0),
                        shared=int(getattr(k.metadata, "shared", 0) or 0), **sass_counts(k.asm["cubin"])))
    return out


def bench_spec(kind="siso", G=1, N=128, **kw):
    from mamba3_kernels.spec import Problem, ScanSpec
    if kind == "siso":
        spec = ScanSpec(d_state=N, head_dim=64, n_angles=N // 4, has_d=True, has_z=True, shared_angles=True, **kw)
    else:
        spec = ScanSpec(rank=4, d_state=N, head_dim=64, n_angles=N // 4, pairing="half", has_d=True, has_z=True,
                        shared_angles=True, has_mimo_v=True, has_mimo_z=True, has_mimo_out=True, **kw)
    return spec, Problem(4, 4096, 32, G, 4)


if __name__ == "__main__":
    from mamba3_kernels.backends.triton import scan_fwd as sf
    kind = os.environ.get("KIND", "siso")
    G = int(os.environ.get("G", "1"))
    N = int(os.environ.get("N", "128"))
    spec, prob = bench_spec(kind, G, N)
    for arg in sys.argv[1:] or ["{}"]:
        over = json.loads(arg)
        cfg = dict(sf.default_config(spec, prob), **over)
        for r in profile(spec, cfg, prob):
            if not r["run"]:
                continue
            top = " ".join(f"{k}:{v}" for k, v in r.pop("loop_top"))
            r.pop("top")
            print(f"{arg:<40} {r['name']:<20} regs {r['regs']:>3} spill {r['spills']:>4} smem {r['shared']:>6} "
                  f"tot {r['total']:>5} bar {r['bar']:>3} lds {r['lds']:>3} sts {r['sts']:>3} mufu {r['mufu']:>3} "
                  f"mma {r['mma']:>3} ldg {r['ldg']:>3} shfl {r['shfl']:>3} | loop {r['loop']} bar {r['loop_bar']} "
                  f"ldg {r['loop_ldg']} mufu {r['loop_mufu']} smem {r['loop_smem']}")
            print("      ", top)
