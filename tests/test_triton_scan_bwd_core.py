"""Core of the scan backward (issue 5): the float64 reference and the Triton kernels.

Reference: reference/core_adjoint.py's quadratic form vs its token recurrence, and its
gradients vs central finite differences (dense and varlen, with and without s0 / ds_final).
"""
from __future__ import annotations

import numpy as np
import pytest
from mamba3_kernels.reference import core_adjoint as ca


def _inputs(rng, B, L, R, H, N, P, S=None, s0=True, dsf=True):
    X = B if S is None else S
    return {
        "qh": rng.standard_normal((B, L, R, H, N)), "ks": rng.standard_normal((B, L, R, H, N)),
        "vt": rng.standard_normal((B, L, R, H, P)), "adt": -rng.uniform(0.01, 1.0, (B, H, L)),
        "dy": rng.standard_normal((B, L, R, H, P)),
        "s0": rng.standard_normal((X, H, P, N)) if s0 else None,
        "ds_final": rng.standard_normal((X, H, P, N)) if dsf else None}


def test_reference_forward_matches_recurrence():
    rng = np.random.default_rng(0)
    for R in (1, 2, 4):
        x = _inputs(rng, 1, 9, R, 1, 5, 3)
        sl = (0, slice(None), slice(None), 0)
        y, sf = ca.forward_seq(x["qh"][sl], x["ks"][sl], x["vt"][sl], x["adt"][0, 0], x["s0"][0, 0])
        y2, sf2 = ca.recurrent_seq(x["qh"][sl], x["ks"][sl], x["vt"][sl], x["adt"][0, 0], x["s0"][0, 0])
        np.testing.assert_allclose(y, y2, rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(sf, sf2, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("R,s0,dsf,varlen", [(1, True, True, False), (2, False, True, False),
                                             (4, True, False, False), (2, True, True, True)])
def test_reference_gradients_finite_differences(R, s0, dsf, varlen):
    rng = np.random.default_rng(R + 10 * s0 + 100 * dsf + 1000 * varlen)
    cu = np.array([0, 3, 3, 8, 9], np.int32) if varlen else None
    L = 9 if varlen else 6
    B, H = (1, 2) if varlen else (2, 1)
    x = _inputs(rng, B, L, R, H, 3, 2, S=4 if varlen else None, s0=s0, dsf=dsf)
    g = ca.core_backward(**x, cu_seqlens=cu)
    eps = 1e-6
    names = {"qh": "dqh", "ks": "dks", "vt": "dvt", "adt": "dadt", "s0": "ds0"}
    for name, gname in names.items():
        if x[name] is None:
            continue
        arr = x[name]
        num = np.zeros(arr.shape)
        for idx in np.ndindex(arr.shape):
            old = arr[idx]
            arr[idx] = old + eps
            lp = ca.core_loss(**x, cu_seqlens=cu)
            arr[idx] = old - eps
            lm = ca.core_loss(**x, cu_seqlens=cu)
            arr[idx] = old
            num[idx] = (lp - lm) / (2 * eps)
        np.testing.assert_allclose(g[gname], num, rtol=1e-6, atol=1e-6, err_msg=gname)
    if not s0:
        assert g["ds0"].shape == (4 if varlen else B, H, 2, 3)
