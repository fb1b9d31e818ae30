"""Triton scan backward (issue 5): every backward kernel -- this pipeline's own (seq_fwd,
output, prep, post, seq_bwd) and the core's -- builds for sm_90a (AOT, no GPU) in the default
configs (plus post's other operand path, POST_RECOMPUTE flipped, at the benchmark heads), and none
spills.

Compiled in two worker subprocesses without TRITON_INTERPRET (AOT and the interpreter must not
share a process). Per kernel: registers, spill bytes, shared memory (printed with -s, written
to .cache/scan_bwd_compile.json). Grid: the benchmark's shapes plus a pairwise-style cover of
N {16..256}, P {32, 64, 128}, R {1, 2, 4, 8}, the output modes, pairings, dtypes, varlen,
euler and initial / final states.
"""
from __future__ import annotations

import json
import os
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
MIMO = dict(has_mimo_v=True, has_mimo_z=True, has_mimo_out=True)
OWN = {"bwd_seq_fwd_sums", "bwd_seq_fwd", "bwd_output", "bwd_prep", "bwd_post", "bwd_seq_bwd_sums", "bwd_seq_bwd"}
# save_y with Z / MIMO_Out / norm: SISO's phase 4 storing y too; MIMO's output-mode kernel
SAVE_Y = {1: "save_y:scan_chunk_output", 2: "save_y_output_fwd"}


sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import aot_workers  # noqa: E402

def _c(name, B=2, L=2048, H=16, G=1, over=None, **spec):
    return {"name": name, "problem": [B, L, H, G, B], "spec": spec, "over": over or {}}


def cases():
    out = [
        _c("bench-siso-N128-P64", d_state=128, head_dim=64, n_angles=32, has_d=True, has_z=True,
           shared_angles=True),
        _c("bench-siso-N128-P64-states", B=1, d_state=128, head_dim=64, n_angles=32, has_d=True, has_z=True,
           shared_angles=True, initial_states=True, final_states=True),
        _c("bench-mimo-R4-N128-P64", rank=4, d_state=128, head_dim=64, n_angles=32, pairing="half",
           has_d=True, has_z=True, shared_angles=True, **MIMO),
        _c("bench-mimo-R4-norm", rank=4, d_state=128, head_dim=64, n_angles=32, pairing="half",
           has_d=True, has_z=True, output_mode="norm_reduce", **MIMO),
        # post's other operand path (POST_RECOMPUTE flipped), as the backward's space offers it
        _c("bench-mimo-R4-post-read", rank=4, d_state=128, head_dim=64, n_angles=32, pairing="half",
           has_d=True, has_z=True, shared_angles=True, **MIMO, over=dict(POST_RECOMPUTE=False)),
        _c("bench-siso-post-recompute", d_state=128, head_dim=64, n_angles=32, has_d=True, has_z=True,
           shared_angles=True, over=dict(POST_RECOMPUTE=True)),
        _c("siso-fp32-init-final", d_state=64, head_dim=64, n_angles=16, has_d=True, has_z=True,
           initial_states=True, final_states=True, input_dtype="float32"),
        _c("siso-fp16-varlen-euler", B=1, d_state=32, head_dim=32, n_angles=3, pairing="half",
           discretization="euler", varlen=True, initial_states=True, final_states=True, input_dtype="float16"),
        _c("R3-per_rank-N16-P48", rank=3, d_state=16, head_dim=48, n_angles=8, has_z=True, has_mimo_v=True,
           has_mimo_z=True, output_mode="per_rank"),
    ]
    Ns, Ps, Rs = (16, 32, 64, 128, 256), (32, 64, 128), (1, 2, 4, 8)
    i = 0
    for N in Ns:
        for P in Ps:
            R = Rs[i % 4]
            i += 1
            if i % 2:   # half the pairwise grid keeps the CPU time of the test in bounds
                continue
            modes = ("reduce", "norm_reduce") if R == 1 else ("reduce", "per_rank", "norm_reduce")
            mode = modes[i % len(modes)]
            kw = dict(MIMO) if R > 1 else {}
            if mode == "per_rank":
                kw.pop("has_mimo_out")
            out.append(_c(f"N{N}-P{P}-R{R}-{mode}", d_state=N, head_dim=P, rank=R,
                          n_angles=(N // 4, N // 2)[i % 2], pairing=("interleaved", "half")[(i // 2) % 2],
                          has_d=True, has_z=True, output_mode=mode, initial_states=i % 3 == 0,
                          final_states=i % 4 == 0, **kw))
    return out


def _worker(idx, n, out_path):
    from mamba3_kernels.backends.triton import scan_bwd as sb

    from mamba3_kernels.spec import Problem, ScanSpec
    res = []
    for k, c in enumerate(cases()):
        if k % n != idx:
            continue
        spec = ScanSpec(**c["spec"])
        prob = Problem(*c["problem"])
        cfg = dict(sb.default_config(spec, prob), **c["over"])
        try:
            ks = sb.compile(spec, cfg, prob, arch="sm_90a")
            res.append(dict(name=c["name"], config={k: v for k, v in cfg.items() if k != "CORE"}, kernels=ks))
        except Exception as e:  # noqa: BLE001 (reported by the test)
            res.append(dict(name=c["name"], config={}, error=f"{type(e).__name__}: {e}"[:2000]))
    with open(out_path, "w") as f:
        json.dump(res, f)


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    pytest.importorskip("triton")
    return aot_workers.run(__file__, tmp_path_factory.mktemp("scan_bwd_aot"), "scan_bwd_compile.json")


def test_every_kernel_builds(results):
    errors = aot_workers.build_errors(results)
    assert not errors, "\n".join(errors)
    assert len(results) == len(cases())
    for r in results:
        names = {k["name"] for k in r["kernels"]}
        assert OWN <= names, names
        assert any(n.startswith("core:") for n in names), names
        spec = next(c["spec"] for c in cases() if c["name"] == r["name"])
        want = bool(spec.get("has_z") or spec.get("has_mimo_out") or spec.get("output_mode") == "norm_reduce")
        assert (SAVE_Y[min(2, spec.get("rank", 1))] in names) == want, (r["name"], names)


def test_no_default_config_spills(results):
    bad = aot_workers.spills(results)
    assert not bad, "\n".join(bad)


def test_shared_memory_fits_an_sm(results):
    bad = aot_workers.oversized_shared(results)
    assert not bad, "\n".join(bad)


if __name__ == "__main__":
    _worker(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3])
