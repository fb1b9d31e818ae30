"""Shared float64 math of the oracle: angle wrap, rotary pairing, gates, output modes.

Pure NumPy (SPEC §2-§4). Every other oracle module takes these from here, so a rule (the
pairing convention, the wrap, the gate) is written once. The recurrent and chunked forms
bind the names at import, so a test can patch one form alone (see tests/test_mutants.py).
"""
from __future__ import annotations

import numpy as np

TWO_PI = 2.0 * np.pi


def wrap_angle(x):
    """Wrap into [0, 2 pi): x - 2 pi floor(x / 2 pi) (SPEC §2.1)."""
    y = x - TWO_PI * np.floor(x / TWO_PI)
    # floor rounding can leave y == 2 pi for tiny negative x
    return np.where(y >= TWO_PI, y - TWO_PI, y)


def pair_indices(n: int, a: int, pairing: str):
    """Index arrays (i0, i1) of the A rotated pairs: interleaved (2j, 2j+1), half (j, j + N/2)."""
    j = np.arange(a)
    if pairing == "interleaved":
        return 2 * j, 2 * j + 1
    if pairing == "half":
        return j, j + n // 2
    raise ValueError(f"pairing: expected 'interleaved' or 'half', got {pairing!r}")


def rotate(x, theta, pairing: str, inverse: bool = False):
    """Rotate the A pairs of x[..., N] by theta[..., A] (broadcast); dims outside pass through.

    x0' = x0 cos - x1 sin, x1' = x0 sin + x1 cos; inverse uses -theta.
    """
    a = theta.shape[-1]
    out = np.array(x, dtype=np.float64, copy=True)
    if a == 0:
        return out
    i0, i1 = pair_indices(x.shape[-1], a, pairing)
    c, s = np.cos(theta), np.sin(theta)
    if inverse:
        s = -s
    x0, x1 = x[..., i0], x[..., i1]
    out[..., i0] = x0 * c - x1 * s
    out[..., i1] = x0 * s + x1 * c
    return out


def rotate_dtheta(x, d, theta, pairing: str):
    """d<d, Rot(theta) x>/d theta per pair: d0 (-x0 s - x1 c) + d1 (x0 c - x1 s) (SPEC §9.1)."""
    a = theta.shape[-1]
    if a == 0:
        return np.zeros(np.broadcast_shapes(x.shape[:-1], theta.shape[:-1]) + (0,))
    i0, i1 = pair_indices(x.shape[-1], a, pairing)
    c, s = np.cos(theta), np.sin(theta)
    x0, x1, d0, d1 = x[..., i0], x[..., i1], d[..., i0], d[..., i1]
    return d0 * (-x0 * s - x1 * c) + d1 * (x0 * c - x1 * s)


def sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def silu(x):
    return x * sigmoid(x)


def dsilu(x):
    s = sigmoid(x)
    return s * (1.0 + x * (1.0 - s))


def discretize(adt, dt, trap, euler: bool):
    """(alpha, beta, gamma, lam) of the exponential-trapezoidal step (SPEC §2.4); euler: lam = 1."""
    lam = np.ones_like(dt) if euler else sigmoid(trap)
    alpha = np.exp(adt)
    return alpha, alpha * dt * (1.0 - lam), dt * lam, lam


def angle_increment(raw, dt):
    """phi = pi tanh(raw) dt (SPEC §2.1); raw (..., A), dt (...)."""
    return np.pi * np.tanh(raw) * dt[..., None]


def rms_norm_stats(y, eps):
    """rstd over the last axis: 1 / sqrt(mean(y^2) + eps)."""
    return 1.0 / np.sqrt(np.mean(y * y, axis=-1, keepdims=True) + eps)


def apply_output(mode, y, z, mz, mo, w, eps):
    """The MIMO output modes of SPEC §3 on per-rank y[..., R, P].

    z[..., P] or None; mz, mo (R, P) broadcastable (ones when absent); w (P) for the norm.
    Returns out[..., P] ("reduce", "norm_reduce") or out[..., R, P] ("per_rank").
    """
    gate = silu(z[..., None, :] * mz) if z is not None else 1.0
    if mode == "per_rank":
        return y * gate
    if mode == "norm_reduce":
        y = y * rms_norm_stats(y, eps) * w
    return np.sum(y * gate * mo, axis=-2)


def reduce_to(g, shape):
    """Sum a broadcast gradient g back to `shape` (leading extra axes and size-1 axes)."""
    g = np.asarray(g)
    extra = g.ndim - len(shape)
    if extra:
        g = g.sum(axis=tuple(range(extra)))
    axes = tuple(i for i, n in enumerate(shape) if n == 1 and g.shape[i] != 1)
    if axes:
        g = g.sum(axis=axes, keepdims=True)
    return g


def apply_output_adjoint(mode, y, z, mz, mo, w, eps, dout):
    """Gradients of apply_output: (dy, dz, dmz, dmo, dw), the parameter grads reduced to the
    parameters' own (broadcast) shapes; None where a term does not apply."""
    if z is not None:
        u = z[..., None, :] * mz
        gate = silu(u)
    else:
        u, gate = None, np.ones_like(y)
    dmo = dw = None
    if mode == "per_rank":
        dy = dout * gate
        dgate = dout * y
    else:
        dout_r = dout[..., None, :]
        if mode == "norm_reduce":
            rstd = rms_norm_stats(y, eps)
            xhat = y * rstd
            n = xhat * w
            dn = dout_r * gate * mo
            dgate = dout_r * n * mo
            dmo = reduce_to(dout_r * n * gate, np.shape(mo))
            dnw = dn * w
            dw = reduce_to(dn * xhat, np.shape(w))
            dy = rstd * (dnw - xhat * np.mean(dnw * xhat, axis=-1, keepdims=True))
        else:
            dy = dout_r * gate * mo
            dgate = dout_r * y * mo
            dmo = reduce_to(dout_r * y * gate, np.shape(mo))
    dz = dmz = None
    if z is not None:
        du = dgate * dsilu(u)
        dz = np.sum(du * mz, axis=-2)
        dmz = reduce_to(du * z[..., None, :], np.shape(mz))
    return dy, dz, dmz, dmo, dw


def bias_rotate(x, bias, theta, pairing: str):
    """(x', Rot(theta) x') with x' = x + bias: the bias goes in BEFORE the rotation (SPEC §2.2)."""
    xp = x + bias
    return xp, rotate(xp, theta, pairing)


def skip_term(d, v, vt):
    """D times the projected value vt = v * MIMO_V (SPEC §3: D multiplies the projected v)."""
    del v
    return d * vt
