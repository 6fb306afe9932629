"""An independent NumPy float64 reference of batch normalization, for the tests."""

from __future__ import annotations

from typing import Any

import jax
import numpy as np


def feature_axes(axis: int | tuple[int, ...], ndim: int) -> tuple[int, ...]:
    raw = (axis,) if isinstance(axis, int) else axis
    return tuple(sorted(a % ndim for a in raw))


def moments(
    x: np.ndarray, axis: int | tuple[int, ...], mask: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Count, mean and biased variance in float64, in the feature shape."""
    x = np.asarray(x, np.float64)
    feats = feature_axes(axis, x.ndim)
    red = tuple(i for i in range(x.ndim) if i not in feats)
    if mask is None:
        mask = np.ones(x.shape, bool)
    mask = np.broadcast_to(mask, x.shape)
    xz = np.where(mask, x, 0.0)
    n = mask.sum(axis=red)
    mean = xz.sum(axis=red) / np.maximum(n, 1)
    kept = tuple(x.shape[i] if i in feats else 1 for i in range(x.ndim))
    dev = np.where(mask, x - mean.reshape(kept), 0.0)
    var = (dev * dev).sum(axis=red) / np.maximum(n, 1)
    return n, mean, var


def normalize(
    x: np.ndarray,
    axis: int | tuple[int, ...],
    mean: np.ndarray,
    var: np.ndarray,
    scale: np.ndarray | None = None,
    bias: np.ndarray | None = None,
    epsilon: float = 1e-5,
) -> np.ndarray:
    x = np.asarray(x, np.float64)
    feats = feature_axes(axis, x.ndim)
    kept = tuple(x.shape[i] if i in feats else 1 for i in range(x.ndim))
    y = (x - np.reshape(mean, kept)) / np.sqrt(np.reshape(var, kept) + epsilon)
    if scale is not None:
        y = y * np.reshape(np.asarray(scale, np.float64), kept)
    if bias is not None:
        y = y + np.reshape(np.asarray(bias, np.float64), kept)
    return y


def train_step(
    x: np.ndarray,
    axis: int | tuple[int, ...],
    stats: dict[str, np.ndarray],
    momentum: float,
    warmup: bool,
    scale: np.ndarray | None = None,
    bias: np.ndarray | None = None,
    epsilon: float = 1e-5,
    mask: np.ndarray | None = None,
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """One training step: output and updated running statistics (float64)."""
    n, mean, var = moments(x, axis, mask)
    y = normalize(x, axis, mean, var, scale, bias, epsilon)
    count = int(stats["count"])
    d = min(momentum, (1 + count) / (10 + count)) if warmup else momentum
    new = {
        "mean": d * stats["mean"] + (1 - d) * mean,
        "var": d * stats["var"] + (1 - d) * var,
        "count": count + 1,
    }
    if mask is not None:
        keep = n == 0
        new["mean"] = np.where(keep, stats["mean"], new["mean"])
        new["var"] = np.where(keep, stats["var"], new["var"])
    return y, new


def loss_grad_fd(
    x: np.ndarray,
    axis: int | tuple[int, ...],
    cotangent: np.ndarray,
    scale: np.ndarray,
    bias: np.ndarray,
    epsilon: float = 1e-5,
    step: float = 1e-6,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Float64 central finite differences of sum(y * cotangent) (train mode)."""

    def loss(x: np.ndarray, s: np.ndarray, b: np.ndarray) -> float:
        _, mean, var = moments(x, axis)
        return float((normalize(x, axis, mean, var, s, b, epsilon) * cotangent).sum())

    def grad_of(arr: np.ndarray, f) -> np.ndarray:
        g = np.zeros_like(arr, np.float64)
        flat = g.reshape(-1)
        for i in range(arr.size):
            up = np.array(arr, np.float64)
            down = np.array(arr, np.float64)
            up.reshape(-1)[i] += step
            down.reshape(-1)[i] -= step
            flat[i] = (f(up) - f(down)) / (2 * step)
        return g

    x = np.asarray(x, np.float64)
    s = np.asarray(scale, np.float64)
    b = np.asarray(bias, np.float64)
    return (
        grad_of(x, lambda v: loss(v, s, b)),
        grad_of(s, lambda v: loss(x, v, b)),
        grad_of(b, lambda v: loss(x, s, v)),
    )


def close(actual: Any, desired: Any, rtol: float = 1e-5, atol: float = 1e-5) -> None:
    """The tests' one comparison: trees of arrays, leaf by leaf, in float64.

    ``rtol`` and ``atol`` default to float32's error after a few operations
    (about 100 ulps at 1); a test passes its own where it has a reason to.
    """
    jax.tree.map(
        lambda a, d: np.testing.assert_allclose(
            np.asarray(a, np.complex128 if np.iscomplexobj(a) else np.float64),
            np.asarray(d, np.complex128 if np.iscomplexobj(d) else np.float64),
            rtol=rtol,
            atol=atol,
        ),
        actual,
        desired,
    )
