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
from jax.sharding import PartitionSpec as P

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


class ShiftedMoments(NamedTuple):
    """``Moments`` with the mean kept as ``shift + offset`` for accuracy.

    ``shift`` is one of the batch's own values per feature (no gradient), so
    ``x - shift`` is exact for x near the mean and ``offset`` is small: the
    normalization ``(x - shift) - offset`` then keeps the precision that a
    rounded float32 mean of, say, ``1e6 + N(0, 1)`` would lose.
    """

    count: jax.Array
    shift: jax.Array
    offset: jax.Array
    var: jax.Array


def _psum(x: jax.Array, axis_name: AxisName, groups: Any) -> jax.Array:
    """``lax.psum`` over ``axis_name``, within ``groups`` if given: one all-reduce.

    ``jax.shard_map`` (unlike ``jax.pmap``) does not implement
    ``axis_index_groups``; there each device puts its value in its group's row
    of a zero table, one ungrouped psum fills every row, and each device reads
    its own group's row back.
    """
    if groups is None:
        return lax.psum(x, axis_name)
    try:
        return lax.psum(x, axis_name, axis_index_groups=groups)
    except NotImplementedError:
        pass
    size = int(lax.axis_size(axis_name))  # pyright: ignore[reportArgumentType]
    members = sorted(int(i) for g in groups for i in g)
    if members != list(range(size)) or len({len(g) for g in groups}) != 1:
        raise ValueError(
            f"axis_index_groups={groups!r} must split the {size} indices of "
            f"axis_name={axis_name!r} into groups of equal size, each index once."
        )
    group_of = [0] * size
    for k, g in enumerate(groups):
        for i in g:
            group_of[int(i)] = k
    mine = jnp.asarray(group_of, jnp.int32)[lax.axis_index(axis_name)]
    rows = jnp.arange(len(groups), dtype=jnp.int32).reshape((-1,) + (1,) * x.ndim)
    table = jnp.where(rows == mine, x[None], jnp.zeros_like(x[None]))
    return lax.psum(table, axis_name)[mine]


def _first_values(x: jax.Array, reduction_axes: tuple[int, ...]) -> jax.Array:
    """x at index 0 of every reduction axis, with x's rank.

    Under a mesh with Explicit axes, slicing a batch axis that is sharded is not
    allowed directly; the slice then runs under ``auto_axes`` (one row moves).
    """
    index = tuple(
        slice(0, 1) if i in reduction_axes else slice(None) for i in range(x.ndim)
    )
    spec = tuple(getattr(getattr(jax.typeof(x), "sharding", None), "spec", ()) or ())
    spec = spec + (None,) * (x.ndim - len(spec))
    if not any(spec[i] is not None for i in reduction_axes):
        return x[index]
    out = P(*(None if i in reduction_axes else s for i, s in enumerate(spec)))
    return jax.sharding.auto_axes(lambda x: x[index], out_sharding=out)(x)


def shifted_moments(
    x: jax.Array,
    reduction_axes: tuple[int, ...],
    mask: jax.Array | None = None,
    axis_name: AxisName | None = None,
    axis_index_groups: Sequence[Sequence[int]] | None = None,
    fallback_shift: jax.Array | None = None,
) -> ShiftedMoments:
    """The statistics of :func:`batch_moments`, mean split as ``shift + offset``.

    The shift is each feature's first batch value (or ``fallback_shift``, else 0,
    where that value is masked). Locally the offset and variance are computed
    in two passes over ``x - shift``; across devices, counts, means and centred
    sums of squares are merged with Chan et al.'s formula (two ``psum``).
    """
    xf = x.astype(jnp.float32)
    shift = _first_values(xf, reduction_axes)
    if mask is not None:
        fallback = jnp.zeros_like(shift) if fallback_shift is None else fallback_shift
        shift = jnp.where(_first_values(mask, reduction_axes), shift, fallback)
    shift = lax.stop_gradient(shift)
    xs = xf - shift
    if mask is None:
        local_n = 1
        for a in reduction_axes:
            local_n *= x.shape[a]
        count = jnp.full(shift.shape, local_n, jnp.float32)
    else:
        # Zero the ignored entries first, so NaN there reaches neither the
        # statistics nor their gradients.
        xs = jnp.where(mask, xs, 0.0)
        count = jnp.sum(mask, axis=reduction_axes, keepdims=True, dtype=jnp.float32)
    safe_count = jnp.maximum(count, 1.0)
    offset = jnp.sum(xs, axis=reduction_axes, keepdims=True) / safe_count
    centred = xs - offset
    if mask is not None:
        centred = jnp.where(mask, centred, 0.0)
    m2 = jnp.sum(centred * centred, axis=reduction_axes, keepdims=True)
    if axis_name is None:
        return ShiftedMoments(count, shift, offset, m2 / safe_count)
    # Chan's parallel merge: two all-reduces. The first gives the global count
    # and a rounded global mean ``g``; the second sums each device's squares
    # around ``g``, and also the gaps ``mean - g``, so the exact global mean is
    # ``g + offset`` with a small offset. ``g`` is the same on every device, so
    # the results are too (shard_map can return them with out_specs P()).
    mean = shift + offset
    sums = _psum(jnp.stack([count, count * mean]), axis_name, axis_index_groups)
    global_count = jnp.maximum(sums[0], 1.0)
    common = lax.stop_gradient(sums[1] / global_count)
    gap = (shift - common) + offset  # exact where shift is close to common
    both = _psum(
        jnp.stack([m2 + count * gap * gap, count * gap]), axis_name, axis_index_groups
    )
    global_offset = both[1] / global_count
    global_m2 = both[0] - global_count * global_offset * global_offset
    global_var = jnp.maximum(global_m2 / global_count, 0.0)
    return ShiftedMoments(sums[0], common, global_offset, global_var)


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
    m = shifted_moments(x, reduction_axes, mask, axis_name, axis_index_groups)
    return Moments(m.count, m.shift + m.offset, m.var)


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
