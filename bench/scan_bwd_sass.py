"""AOT (no GPU) static profile of the scan backward's own stage kernels (prep, output, post, the
per-sequence loops and their segment sums): registers, spills, SASS instruction counts and the
barriers / shared-memory accesses / global loads of each, for the benchmark specs and JSON config
overrides. The counterpart of bench/scan_fwd_sass.py; session 18 found post's and the sequence
loops' CTA barriers with it (bench/notes/scan_bwd.md).

    KIND=siso|mimo G=1 N=128 python bench/scan_bwd_sass.py '{}' '{"post_num_warps": 4, "POST_BT": 8}'
        [--seq]   (--seq: also the order of global loads / stores / barriers in post's SASS)

Run it with the Python whose Triton the GPU runs (.venv-triton36 here) for the GPU's build.
"""
from __future__ import annotations

import json
import os
import re
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from scan_fwd_sass import bench_spec, sass_counts, sass_text  # noqa: E402


def stage_builds(spec, prob, over: dict):
    """(call name, compiled kernel) of every stage call the backward's default config (with
    `over`) makes for the benchmark problem, built for sm_90a as the JIT specialises them."""
    import torch
    import triton
    from triton.backends.compiler import GPUTarget
    from mamba3_kernels.backends.triton import aot
    from mamba3_kernels.backends.triton import scan_bwd as sb
    from mamba3_kernels.backends.triton import scan_fwd as sf
    t = sf.meta_tensors(spec, prob)
    B, L, H, P = t.v.shape
    cfg = dict(sb.default_config(spec, prob), **over)
    ydt = sb.saved_y_dtype(spec, sf.default_config(spec, prob), cfg) if spec.rank == 1 else torch.float32
    grads = dict(out=torch.empty(t.out.shape, dtype=t.v.dtype, device="meta"), _config=cfg,
                 _y=torch.empty((B, L, spec.rank, H, P), dtype=ydt, device="meta"), angle=None, k=None, v=None)
    calls, _ = sb.stage_calls(spec, cfg, t, grads, "meta")
    for c in calls:
        if not c.get("run", True):
            continue
        sig, attrs, consts = aot.signature(c)
        src = triton.compiler.ASTSource(fn=c["kernel"], signature=sig, constexprs=consts, attrs=attrs)
        yield c, triton.compile(src, target=GPUTarget("cuda", 90, 32),
                                options={"num_warps": c["num_warps"], "num_stages": c.get("num_stages", 1)})


def memory_sequence(cubin: bytes) -> list:
    """The kernel's global loads / stores, barriers, shared accesses and branches in SASS order,
    runs of one opcode folded: [(opcode, count, first address)]."""
    out = []
    for line in sass_text(cubin).splitlines():
        m = re.match(r"\s*/\*([0-9a-f]+)\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)", line)
        if not m or m.group(2).split(".")[0] not in ("LDG", "STG", "BAR", "LDS", "STS", "BRA"):
            continue
        op, addr = m.group(2), int(m.group(1), 16)
        if out and out[-1][0] == op:
            out[-1][1] += 1
        else:
            out.append([op, 1, addr])
    return out


if __name__ == "__main__":
    from mamba3_kernels.backends.triton import _resource_usage
    args = [a for a in sys.argv[1:] if a != "--seq"]
    spec, prob = bench_spec(os.environ.get("KIND", "siso"), int(os.environ.get("G", "1")),
                            int(os.environ.get("N", "128")))
    for arg in args or ["{}"]:
        for c, k in stage_builds(spec, prob, json.loads(arg)):
            use = _resource_usage(k.asm["cubin"])
            r = sass_counts(k.asm["cubin"])
            print(f"{arg:<36} {c['name']:<18} warps {c['num_warps']} regs {use['registers']:>3} "
                  f"spill {(use['local'] or 0) + (use['stack'] or 0):>4} tot {r['total']:>5} bar {r['bar']:>3} "
                  f"lds {r['lds']:>3} sts {r['sts']:>3} ldg {r['ldg']:>3} stg {r['stg']:>3}")
            if "--seq" in sys.argv and c["name"] == "bwd_post":
                print("    " + " ".join(f"{op}x{n}" for op, n, _ in memory_sequence(k.asm["cubin"])))
