"""Shared pytest setup: markers, caches inside the workspace, fresh RNG per test."""
import os
import pathlib

import numpy as np
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
for var, sub in (("TRITON_CACHE_DIR", "triton"), ("TILELANG_CACHE_DIR", "tilelang")):
    os.environ.setdefault(var, str(ROOT / ".cache" / sub))


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA GPU (cc >= 9.0); skipped without one")
    config.addinivalue_line("markers", "slow: longer CPU tests")


def pytest_collection_modifyitems(config, items):
    try:
        import torch
        has_gpu = torch.cuda.is_available()
    except Exception:
        has_gpu = False
    if has_gpu:
        return
    skip = pytest.mark.skip(reason="no CUDA GPU on this machine: GPU test skipped (runs on the lent H100)")
    for it in items:
        if "gpu" in it.keywords:
            it.add_marker(skip)


@pytest.fixture
def rng():
    """Fresh random inputs every run (seeded from the OS), seed printed on failure."""
    seed = int.from_bytes(os.urandom(4), "little")
    print(f"rng seed {seed}")
    return np.random.default_rng(seed)
