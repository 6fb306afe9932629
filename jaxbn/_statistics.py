"""Batch statistics: per-feature count, mean and biased variance, in float32.

This is the one place where jaxbn reduces over the batch. It keeps the count of
values behind each feature's statistics so that every merge (across devices,
masked entries) weights by counts, never averaging means.

The variance is computed stably. Locally: two passes, mean first, then the mean
of squared deviations. Across devices (``axis_name``): each device's count,
mean and centred sum of squares are merged with Chan et al.'s formula around the
global mean, which costs two all-reduces and never forms ``E[x^2] - E[x]^2``.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

AxisName = Hashable | tuple[Hashable, ...]


class Moments(NamedTuple):
    """Per-feature batch statistics, each shaped like x with size-1 batch axes.

    Attributes:
      count: number of values behind each feature (float32; 0 where all masked).
      mean: the batch mean (float32).
      var: the biased batch variance (float32, never negative).
    """

    count: jax.Array
    mean: jax.Array
    var: jax.Array


def _psum(x: jax.Array, axis_name: AxisName, groups: Any) -> jax.Array:
    return lax.psum(x, axis_name, axis_index_groups=groups)


def batch_moments(
    x: jax.Array,
    reduction_axes: tuple[int, ...],
    mask: jax.Array | None = None,
    axis_name: AxisName | None = None,
    axis_index_groups: Sequence[Sequence[int]] | None = None,
) -> Moments:
    """Computes the per-feature count, mean and biased variance of ``x``.

    Args:
      x: the input, any floating dtype; statistics are computed in float32.
      reduction_axes: the batch axes to reduce over.
      mask: optional boolean array of x's shape; False entries are ignored (they
        may hold NaN).
      axis_name: optional named axis (or tuple of names) of ``jax.vmap``,
        ``jax.shard_map`` or ``jax.pmap`` to synchronize the statistics over.
      axis_index_groups: optional groups of indices along ``axis_name``; each
        group gets its own statistics.

    Returns:
      ``Moments`` with x's rank and size 1 along ``reduction_axes``.

    Examples:
      >>> import jax.numpy as jnp
      >>> x = jnp.array([[1.0, 10.0], [3.0, 10.0]])
      >>> m = batch_moments(x, reduction_axes=(0,))
      >>> m.mean, m.var
      (Array([[ 2., 10.]], dtype=float32), Array([[1., 0.]], dtype=float32))
    """
    xf = x.astype(jnp.float32)
    if mask is None:
        local_n = 1
        for a in reduction_axes:
            local_n *= x.shape[a]
        count = jnp.full(_kept_shape(x.shape, reduction_axes), local_n, jnp.float32)
        total = jnp.sum(xf, axis=reduction_axes, keepdims=True)
    else:
        # Zero the ignored entries first, so NaN there reaches neither the
        # statistics nor their gradients.
        xf = jnp.where(mask, xf, 0.0)
        count = jnp.sum(mask, axis=reduction_axes, keepdims=True, dtype=jnp.float32)
        total = jnp.sum(xf, axis=reduction_axes, keepdims=True)
    safe_count = jnp.maximum(count, 1.0)
    mean = total / safe_count
    centred = xf - mean
    if mask is not None:
        centred = jnp.where(mask, centred, 0.0)
    squares = centred * centred
    m2 = jnp.sum(squares, axis=reduction_axes, keepdims=True)
    if axis_name is None:
        return Moments(count, mean, m2 / safe_count)
    return _merge_across_devices(count, mean, m2, axis_name, axis_index_groups)


def _merge_across_devices(
    count: jax.Array,
    mean: jax.Array,
    m2: jax.Array,
    axis_name: AxisName,
    groups: Any,
) -> Moments:
    """Chan's parallel merge of (count, mean, centred sum of squares); 2 psums."""
    sums = _psum(jnp.stack([count, count * mean]), axis_name, groups)
    global_count = sums[0]
    safe_count = jnp.maximum(global_count, 1.0)
    global_mean = sums[1] / safe_count
    offset = mean - global_mean
    global_m2 = _psum(m2 + count * offset * offset, axis_name, groups)
    return Moments(global_count, global_mean, global_m2 / safe_count)


def _kept_shape(shape: tuple[int, ...], reduction_axes: tuple[int, ...]) -> tuple:
    return tuple(1 if i in reduction_axes else d for i, d in enumerate(shape))


def devices_in_axis(axis_name: AxisName | None, groups: Any) -> int:
    """Number of devices whose values are pooled, known at trace time (1 if none)."""
    if axis_name is None:
        return 1
    if groups is not None:
        return min(len(g) for g in groups)
    try:
        return int(lax.axis_size(axis_name))  # pyright: ignore[reportArgumentType]
    except Exception as err:  # unbound axis name
        raise ValueError(
            f"axis_name={axis_name!r} is not bound here. Call apply inside "
            "jax.shard_map, jax.pmap or jax.vmap with that axis_name, or pass "
            "axis_name=None: sharded jax.jit computes global statistics without it."
        ) from err
