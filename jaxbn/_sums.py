"""The statistics' building blocks: their types and dtypes, terms and sums.

What the passes over x (``_passes``) and the statistics with their
derivatives (``_statistics``) share: ``Moments`` and ``ShiftedMoments``, the
dtypes the statistics are computed in, masked and weighted terms, and the sums
across the devices of a named axis, in one all-reduce.
"""

from __future__ import annotations

import math
from collections.abc import Hashable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

AxisName = Hashable | tuple[Hashable, ...]


class Moments(NamedTuple):
    """Per-feature batch statistics, each shaped like x with size-1 batch axes.

    Attributes:
      count: number of values behind each feature (0 where all are masked).
      mean: the batch mean (complex for complex x).
      var: the biased batch variance (real, never negative).
    """

    count: jax.Array
    mean: jax.Array
    var: jax.Array


class ShiftedMoments(NamedTuple):
    """``Moments`` with the mean kept as ``shift + offset`` for accuracy.

    ``shift`` is the running mean, moved to ``shift + offset`` by re-centring
    passes (no gradient), so ``x - shift`` is exact for x near the mean and
    ``offset`` is small: the normalization ``(x - shift) - offset`` keeps the
    precision that a rounded float32 mean of, say, ``1e6 + N(0, 1)`` would
    lose. ``margin`` (a real scalar, batched only under ``jax.vmap``) is the
    largest ``|offset|**2 - var`` (less the shift's resolution) of the last
    pass: positive if a feature was still far from its shift, and +inf if
    some statistic is not finite (then the batch is not recorded).
    """

    count: jax.Array
    shift: jax.Array
    offset: jax.Array
    var: jax.Array
    margin: jax.Array


def real_dtype(dtype: Any) -> np.dtype:
    """The dtype of the statistics' count and variance for input ``dtype``."""
    wide = jnp.dtype(dtype) in (jnp.dtype(jnp.float64), jnp.dtype(jnp.complex128))
    return jnp.dtype(jnp.float64 if wide else jnp.float32)


def mean_dtype(dtype: Any) -> np.dtype:
    """The dtype of the mean for input ``dtype`` (complex for complex input)."""
    real = real_dtype(dtype)
    if jnp.issubdtype(dtype, jnp.complexfloating):
        return jnp.dtype(jnp.complex128 if real == jnp.float64 else jnp.complex64)
    return real


def abs2(z: jax.Array) -> jax.Array:
    """``|z|**2``, real, without a square root."""
    if jnp.issubdtype(z.dtype, jnp.complexfloating):
        return z.real * z.real + z.imag * z.imag
    return z * z


def psum_in_groups(x: jax.Array, axis_name: AxisName, groups: Any) -> jax.Array:
    """``lax.psum`` over ``axis_name``, within ``groups`` if given: one all-reduce.

    ``jax.shard_map`` and ``jax.vmap`` (unlike ``jax.pmap``) do not implement
    ``axis_index_groups``, so everywhere each device puts its value in its
    group's row of a zero table, one ungrouped psum fills every row, and each
    device reads its own group's row back.
    """
    if groups is None:
        return lax.psum(x, axis_name)
    group_of = [0] * sum(len(g) for g in groups)
    for k, g in enumerate(groups):
        for i in g:
            group_of[int(i)] = k
    mine = jnp.asarray(group_of, jnp.int32)[lax.axis_index(axis_name)]
    rows = jnp.arange(len(groups), dtype=jnp.int32).reshape((-1,) + (1,) * x.ndim)
    table = jnp.where(rows == mine, x[None], jnp.zeros_like(x[None]))
    return lax.psum(table, axis_name)[mine]


def psum_parts(parts: list[jax.Array], axis_name: Any, groups: Any) -> list:
    """Sums same-shaped per-feature arrays across devices in one all-reduce."""
    real = [p for a in parts for p in ((a.real, a.imag) if is_complex(a) else (a,))]
    summed = psum_in_groups(jnp.stack(real), axis_name, groups)
    out, i = [], 0
    for a in parts:
        if is_complex(a):
            out.append(lax.complex(summed[i], summed[i + 1]))
            i += 2
        else:
            out.append(summed[i])
            i += 1
    return out


def is_complex(a: jax.Array) -> bool:
    """Whether ``a`` has a complex dtype."""
    return jnp.issubdtype(a.dtype, jnp.complexfloating)


def kept_shape(shape: tuple[int, ...], axes: tuple[int, ...]) -> tuple[int, ...]:
    """``shape`` with size 1 along ``axes``."""
    return tuple(1 if i in axes else d for i, d in enumerate(shape))


def weigh(a: jax.Array, mask: jax.Array) -> jax.Array:
    """``a`` where a boolean mask is True (0 elsewhere), or ``a`` times weights.

    A mask is the 0/1 case of per-example weights; both enter the sums here.
    """
    if mask.dtype == jnp.bool_:
        return jnp.where(mask, a, jnp.zeros((), a.dtype))
    return a * mask.astype(a.real.dtype)


def valid(mask: jax.Array) -> jax.Array:
    """The entries a boolean mask or weights count (True, or weight > 0)."""
    return mask if mask.dtype == jnp.bool_ else mask > 0


def sanitized(x: jax.Array, mask: jax.Array | None) -> jax.Array:
    """X with each masked non-finite entry read as 0 (padding may hold NaN).

    So such an entry reaches neither the statistics nor any gradient.
    """
    if mask is None:
        return x
    return jnp.where(valid(mask) | jnp.isfinite(x), x, jnp.zeros((), x.dtype))


def count_values(
    x: jax.Array, mask: jax.Array | None, axes: tuple[int, ...]
) -> jax.Array:
    """Valid values (sum of weights) per feature, without broadcasting the mask."""
    kept = kept_shape(x.shape, axes)
    dtype = real_dtype(x.dtype)
    if mask is None:
        return jnp.full(kept, math.prod(x.shape[a] for a in axes), dtype)
    repeats = math.prod(x.shape[a] for a in axes if mask.shape[a] == 1)
    count = jnp.sum(mask, axis=axes, keepdims=True, dtype=dtype)
    return jnp.broadcast_to(count * jnp.asarray(repeats, dtype), kept)
