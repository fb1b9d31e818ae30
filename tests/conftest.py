"""Shared pytest setup: markers, caches inside the workspace, fresh RNG per test."""
import os
import pathlib

import numpy as np
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _has_gpu() -> bool:
    try:
        import torch
        return torch.cuda.is_available()
    except Exception:
        return False


# Without a GPU this pytest process is the Triton-interpreter process: TRITON_INTERPRET must be
# set before anything imports triton (it is read at @triton.jit time). AOT compile tests run in
# subprocesses with it removed (CPU-TOOLCHAINS.md: never mix the two in one process).
if not _has_gpu():
    os.environ.setdefault("TRITON_INTERPRET", "1")
for var, sub in (("TRITON_CACHE_DIR", "triton"), ("TILELANG_CACHE_DIR", "tilelang")):
    os.environ.setdefault(var, str(ROOT / ".cache" / sub))


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA GPU (cc >= 9.0); skipped without one")
    config.addinivalue_line("markers", "slow: longer CPU tests")


def pytest_collection_modifyitems(config, items):
    if _has_gpu():
        return
    skip = pytest.mark.skip(reason="no CUDA GPU on this machine: GPU test skipped (runs on the lent H100)")
    for it in items:
        if "gpu" in it.keywords:
            it.add_marker(skip)


@pytest.fixture
def rng():
    """Fresh random inputs every run (seeded from the OS), seed printed on failure.
    MAMBA3_TEST_SEED=<seed> replays a printed seed."""
    seed = int(os.environ.get("MAMBA3_TEST_SEED") or int.from_bytes(os.urandom(4), "little"))
    print(f"rng seed {seed}")
    return np.random.default_rng(seed)
