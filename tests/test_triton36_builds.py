"""The default configs as Triton 3.6 builds them: the version on the GPU image (CI's own Triton is
newer and allocates registers differently: 3.9 spills load orders that 3.6 fits, and the runtime
spill guards of scan_fwd / scan_bwd_core decide on the GPU's builds). The forward's and the
backward core's AOT compile grids (tests/test_triton_scan_compile.py,
tests/test_triton_scan_bwd_core_compile.py, and the whole backward's,
tests/test_triton_scan_bwd_compile.py) are built again by a Triton 3.6 interpreter
(`make test` sets up .venv-triton36 and MAMBA3_TRITON36_PYTHON): every kernel builds, nothing
spills after the guards' fallback, and on the benchmark's shapes no fallback is needed (the GPU
runs the intended, pipelined load orders; a change that made 3.6 spill there would silently cost
the GPU its fast path).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)
import aot_workers  # noqa: E402

PY36 = os.environ.get("MAMBA3_TRITON36_PYTHON")
pytestmark = pytest.mark.skipif(not PY36, reason="no Triton 3.6 interpreter (MAMBA3_TRITON36_PYTHON): "
                                "`make test` sets up .venv-triton36 and sets it")
ENV = {"TRITON_CACHE_DIR": os.path.join(ROOT, ".cache", "triton36"), "PYTHONPATH": ROOT}


def _version():
    out = subprocess.run([PY36, "-c", "import triton; print(triton.__version__)"], capture_output=True, text=True,
                         env=dict(os.environ, **ENV))
    return out.stdout.strip()


@pytest.fixture(scope="module")
def fwd(tmp_path_factory):
    assert _version().startswith("3.6"), _version()
    return aot_workers.run(os.path.join(HERE, "test_triton_scan_compile.py"), tmp_path_factory.mktemp("fwd36"),
                           "scan_fwd_compile_triton36.json", python=PY36, env_extra=ENV)


@pytest.fixture(scope="module")
def core(tmp_path_factory):
    return aot_workers.run(os.path.join(HERE, "test_triton_scan_bwd_core_compile.py"),
                           tmp_path_factory.mktemp("core36"), "scan_bwd_core_compile_triton36.json", python=PY36,
                           env_extra=ENV)


@pytest.fixture(scope="module")
def bwd(tmp_path_factory):
    return aot_workers.run(os.path.join(HERE, "test_triton_scan_bwd_compile.py"), tmp_path_factory.mktemp("bwd36"),
                           "scan_bwd_compile_triton36.json", python=PY36, env_extra=ENV)


@pytest.mark.parametrize("part", ["fwd", "core", "bwd"])
def test_builds_without_spills(part, request):
    res = request.getfixturevalue(part)
    errors = aot_workers.build_errors(res)
    assert not errors, "\n".join(errors)
    bad = aot_workers.spills(res)
    assert not bad, "\n".join(bad)
    print(f"{part}: fell back under 3.6:", [r["name"] for r in res if r.get("fell_back")])


def test_benchmark_shapes_need_no_fallback(fwd, core):
    """The benchmark's shapes keep their default (pipelined) load orders under 3.6."""
    bench = [r for r in fwd if r["name"].startswith("bench-")]
    assert len(bench) >= 4
    fell = [r["name"] for r in bench if r.get("fell_back")]
    assert not fell, json.dumps([r for r in bench if r.get("fell_back")])[:2000]
    fell = [r["name"] for r in core if r.get("fell_back") and r["name"] in ("R1-N128-P64-bfloat16", "R4-N128-P64-bfloat16")]
    assert not fell, fell
