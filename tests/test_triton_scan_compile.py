"""Triton chunked-scan forward: every kernel builds for sm_90a (AOT, no GPU) in its default
config, and no default config spills (after the spill guard's fallback, SPILL_GUARD in
backends/triton/scan_fwd.py, which the workers apply as the GPU path does).

The kernels are compiled in two worker subprocesses without TRITON_INTERPRET (AOT and the
interpreter must not share a process; two workers use both CI cores). Per kernel the registers,
spill bytes (local memory / stack per thread) and shared memory are recorded (printed with -s,
and written to .cache/scan_fwd_compile.json). Grid: a pairwise-style cover of N {16..256},
P {32, 64, 128}, R {1, 2, 4, 8}, the output modes, pairings, input dtypes, varlen, euler and
initial / final states, plus the benchmark's shapes.
"""
from __future__ import annotations

import json
import os
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
MIMO = dict(has_mimo_v=True, has_mimo_z=True, has_mimo_out=True)


sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import aot_workers  # noqa: E402

def _c(name, B=4, L=4096, H=32, G=1, **spec):
    return {"name": name, "problem": [B, L, H, G, B], "spec": spec}


def cases():
    out = [
        # the benchmark's shapes
        _c("bench-siso-N128-P64", d_state=128, head_dim=64, n_angles=32, has_d=True, has_z=True, shared_angles=True),
        _c("bench-siso-N128-P64-B1L16k", B=1, L=16384, d_state=128, head_dim=64, n_angles=32, has_d=True,
           has_z=True, shared_angles=True, final_states=True),
        _c("bench-siso-G8-N64", G=8, d_state=64, head_dim=64, n_angles=16, has_d=True, has_z=True,
           shared_angles=True),
        _c("bench-mimo-R4-N128-P64", L=2048, rank=4, d_state=128, head_dim=64, n_angles=32, pairing="half",
           has_d=True, has_z=True, shared_angles=True, **MIMO),
        _c("bench-mimo-R4-norm", L=2048, rank=4, d_state=128, head_dim=64, n_angles=32, pairing="half",
           has_d=True, has_z=True, output_mode="norm_reduce", **MIMO),
        # N = 128 SISO specs where the pipelined load orders spill (ptxas, AOT at this size):
        # the default must fall back to a spill-free load order (SPILL_GUARD, scan_fwd.fallback)
        _c("siso-N128-A64-interleaved", d_state=128, head_dim=64, n_angles=64, has_d=True, has_z=True,
           shared_angles=True),
        _c("siso-N128-A64-half", d_state=128, head_dim=64, n_angles=64, pairing="half", has_d=True, has_z=True),
        _c("siso-N128-A32-per-head", d_state=128, head_dim=64, n_angles=32, has_d=True, has_z=True),
        _c("siso-N128-A16-shared", d_state=128, head_dim=64, n_angles=16, has_d=True, has_z=True,
           shared_angles=True),
        # odd corners
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
            modes = ("reduce", "norm_reduce") if R == 1 else ("reduce", "per_rank", "norm_reduce")
            mode = modes[i % len(modes)]
            kw = dict(MIMO) if R > 1 else {}
            if mode == "per_rank":
                kw.pop("has_mimo_out")
            out.append(_c(f"N{N}-P{P}-R{R}-{mode}", B=2, L=4096, H=16, d_state=N, head_dim=P, rank=R,
                          n_angles=(N // 4, N // 2)[i % 2], pairing=("interleaved", "half")[i % 2],
                          has_d=True, has_z=True, output_mode=mode, initial_states=i % 3 == 0,
                          final_states=i % 2 == 0, **kw))
    return out


def _worker(idx, n, out_path):
    """Compile cases idx, idx+n, ... (run in a subprocess, no TRITON_INTERPRET)."""
    from mamba3_kernels.backends.triton import scan_fwd as sf
    from mamba3_kernels.spec import Problem, ScanSpec
    res = []
    for k, c in enumerate(cases()):
        if k % n != idx:
            continue
        spec = ScanSpec(**c["spec"])
        B, L, H, G, S = c["problem"]
        prob = Problem(B, L, H, G, S)
        cfg = d = sf.default_config(spec, prob)
        try:
            ks = sf.compile(spec, cfg, prob, arch="sm_90a")
            while cfg.get("SPILL_GUARD"):   # what scan_fwd.effective_config does on the GPU
                spilled = {k["name"] for k in ks if k["spills"]}   # run or not: another problem runs it
                nxt = sf.fallback(cfg, spilled) if spilled else None
                if nxt is None:
                    break
                cfg = nxt
                ks = sf.compile(spec, cfg, prob, arch="sm_90a")
            res.append(dict(name=c["name"], config=cfg, fell_back=cfg != d, kernels=ks))
        except Exception as e:  # reported by the test
            res.append(dict(name=c["name"], config=cfg, error=f"{type(e).__name__}: {e}"[:2000]))
    with open(out_path, "w") as f:
        json.dump(res, f)


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    pytest.importorskip("triton")
    return aot_workers.run(__file__, tmp_path_factory.mktemp("scan_aot"), "scan_fwd_compile.json")


def test_every_kernel_builds(results):
    errors = aot_workers.build_errors(results)
    assert not errors, "\n".join(errors)
    assert len(results) == len(cases())
    for r in results:
        names = {k["name"] for k in r["kernels"]}
        assert {"scan_chunk_state", "scan_state_passing", "scan_chunk_output"} <= names, names
        assert names <= {"scan_gates", "scan_chunk_state", "scan_state_passing", "scan_chunk_output",
                         "scan_norm_epilogue"}


def test_no_default_config_spills(results):
    bad = aot_workers.spills(results)
    assert not bad, "\n".join(bad)
    print("fell back to a spill-free load order:", [r["name"] for r in results if r.get("fell_back")])


def test_shared_memory_fits_an_sm(results):
    bad = aot_workers.oversized_shared(results)
    assert not bad, "\n".join(bad)


if __name__ == "__main__":
    _worker(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3])
