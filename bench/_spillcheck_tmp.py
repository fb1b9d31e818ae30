import json, sys, os
sys.path.insert(0, "bench")
import torch
from scan import make_inputs, ours_bundle
from mamba3_kernels.backends.triton import scan_fwd as sf
out = []
for kind, B, L in (("siso", 4, 4096), ("siso", 8, 2048), ("siso", 1, 16384), ("mimo", 4, 4096)):
    a = make_inputs(kind, B, L, 32, 1, 128, 64, 4 if kind == "mimo" else 1)
    spec, prob, t = ours_bundle(kind, a)
    d = sf.default_config(spec, prob)
    for over in ({}, {"PREFETCH": 3}, {"PREFETCH": 1}, {"PREFETCH": 3, "EXACT_DIAG": False}, {"PREFETCH": 1, "EXACT_DIAG": False}, {"PREFETCH": 2, "EXACT_DIAG": False}):
        cfg = dict(d, **over, SPILL_GUARD=False)
        for c in sf.plan(spec, cfg, t)[0]:
            if c["name"] == "scan_chunk_output":
                k = c["kernel"].warmup(*[v for _, v in c["args"]], grid=c["grid"], **c["constexprs"], num_warps=c["num_warps"], num_stages=c["num_stages"])
                k._init_handles()
                out.append(dict(kind=kind, B=B, L=L, over=over, regs=k.n_regs, spills=k.n_spills))
                print(out[-1], flush=True)
    del t, a
json.dump(out, open(os.environ.get("OUT", ".") + "/spillcheck.json", "w"), indent=1)
