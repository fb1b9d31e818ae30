"""Backward core of the scan (issue 5): every kernel builds for sm_90a (AOT, no GPU) in its
default config, and no default config spills (after the spill guard's fallback, as the GPU runs it).

Compiled in two worker subprocesses without TRITON_INTERPRET (AOT and the interpreter must not
share a process). Per kernel the registers, spill bytes (local memory / stack per thread) and
shared memory are recorded (printed with -s, and written to .cache/scan_bwd_core_compile.json).
Grid: R {1, 4} x N {64, 128} x P 64 x {bf16, fp32}, plus corners: varlen without states,
R 8, N 256, P 128, N 16 / P 48 (padded tiles); the FUSED walks (one dqkv kernel for dq and dkv)
at the benchmark heads (a tuning candidate, under the same no-spill rule once guarded).
"""
from __future__ import annotations

import json
import os
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
KERNELS = {"scan_bwd_core_local", "scan_bwd_core_pass", "scan_bwd_core_dq", "scan_bwd_core_dkv",
           "scan_bwd_core_dadt"}


sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import aot_workers  # noqa: E402

def cases():
    out = []
    for R in (1, 4):
        for N in (64, 128):
            for dt in ("bfloat16", "float32"):
                out.append({"name": f"R{R}-N{N}-P64-{dt}", "R": R, "N": N, "P": 64, "dtype": dt, "kw": {}})
    out += [
        {"name": "R2-N128-P64-bf16-varlen-nostates", "R": 2, "N": 128, "P": 64, "dtype": "bfloat16",
         "kw": {"varlen": True, "s0": False, "ds_final": False, "want_ds0": False}},
        {"name": "R8-N128-P64-bf16", "R": 8, "N": 128, "P": 64, "dtype": "bfloat16", "kw": {}},
        {"name": "R1-N256-P64-bf16", "R": 1, "N": 256, "P": 64, "dtype": "bfloat16", "kw": {}},
        {"name": "R1-N128-P128-bf16", "R": 1, "N": 128, "P": 128, "dtype": "bfloat16", "kw": {}},
        {"name": "R4-N16-P48-fp32", "R": 4, "N": 16, "P": 48, "dtype": "float32", "kw": {}},
        {"name": "R1-N128-P64-bf16-fused", "R": 1, "N": 128, "P": 64, "dtype": "bfloat16", "kw": {},
         "over": {"FUSED": True}},
        {"name": "R4-N128-P64-bf16-fused", "R": 4, "N": 128, "P": 64, "dtype": "bfloat16", "kw": {},
         "over": {"FUSED": True}},
    ]
    return out


def _worker(idx, n, out_path):
    """Compile cases idx, idx+n, ... (run in a subprocess, no TRITON_INTERPRET)."""
    from mamba3_kernels.backends.triton import scan_bwd_core as core
    res = []
    for k, c in enumerate(cases()):
        if k % n != idx:
            continue
        cfg = d = dict(core.default_config(c["R"], c["N"], c["P"], c["dtype"]), **c.get("over", {}))
        try:   # the spill guard's config, as on the GPU (scan_bwd_core.compile_guarded)
            cfg, ks = core.compile_guarded(c["R"], c["N"], c["P"], c["dtype"], cfg, arch="sm_90a", **c["kw"])
            res.append({"name": c["name"], "config": cfg, "fell_back": cfg != d, "kernels": ks})
        except Exception as e:  # noqa: BLE001 (reported by the test)
            res.append({"name": c["name"], "config": cfg, "error": f"{type(e).__name__}: {e}"[:2000]})
    with open(out_path, "w") as f:
        json.dump(res, f)


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    pytest.importorskip("triton")
    return aot_workers.run(__file__, tmp_path_factory.mktemp("bwd_core_aot"), "scan_bwd_core_compile.json")


def test_every_kernel_builds(results):
    errors = aot_workers.build_errors(results)
    assert not errors, "\n".join(errors)
    assert len(results) == len(cases())
    for r in results:
        want = KERNELS if not r["config"].get("FUSED") else \
            KERNELS - {"scan_bwd_core_dq", "scan_bwd_core_dkv"} | {"scan_bwd_core_dqkv"}
        assert {k["name"] for k in r["kernels"]} == want, r["name"]


def test_no_default_config_spills(results):
    bad = aot_workers.spills(results)
    assert not bad, "\n".join(bad)
    print("fell back (spill guard):", [r["name"] for r in results if r.get("fell_back")])


def test_shared_memory_fits_an_sm(results):
    bad = aot_workers.oversized_shared(results)
    assert not bad, "\n".join(bad)


if __name__ == "__main__":
    _worker(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3])
