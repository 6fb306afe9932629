"""Batch statistics: per-feature count, mean and biased variance, in float32.

This is the one place where jaxbn reduces x over the batch. It keeps the count of
values behind each feature's statistics so that every merge (across devices,
masked entries) weights by counts, never averaging means.

Locally, one fused pass over x gives per feature the sums of ``x - shift`` and
``(x - shift)**2``, where the shift is one of the feature's own batch values (the
first; the running mean where that one is masked). Near the data, ``x - shift``
is exact and the single-pass variance ``s2/n - (s1/n)**2`` loses nothing to
cancellation; where the offset ``s1/n`` is still large against the spread (a
fallback shift far from the data), a second pass around ``shift + s1/n`` redoes
the sums (a ``lax.cond``, free when not taken). The unshifted ``E[x^2] - E[x]^2``
is never formed. Across devices (``axis_name``) every device uses the same
shift, the replicated running mean, so one all-reduce of the per-feature
``(count, s1, s2)`` gives the global statistics, weighted by counts; when that
shift is far from the data, the re-centring pass (and its all-reduce) runs
around the global mean just found.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Sequence
from typing import Any, NamedTuple, overload

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


def psum_in_groups(x: jax.Array, axis_name: AxisName, groups: Any) -> jax.Array:
    """``lax.psum`` over ``axis_name``, within ``groups`` if given: one all-reduce.

    ``jax.shard_map`` and ``jax.vmap`` (unlike ``jax.pmap``) do not implement
    ``axis_index_groups``, and inside ``lax.cond`` under ``jax.vmap`` the failure
    would come too late to catch; so everywhere each device puts its value in
    its group's row of a zero table, one ungrouped psum fills every row, and
    each device reads its own group's row back. Needs no axis size, so it also
    serves backward passes (``devices_in_axis`` has checked the groups).
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


def _varying(a: jax.Array) -> frozenset:
    manual = getattr(jax.typeof(a), "mat", None)
    return frozenset() if manual is None else frozenset(manual.varying)


@overload
def varying_as(a: jax.Array, ref: jax.Array) -> jax.Array: ...
@overload
def varying_as(a: None, ref: jax.Array) -> None: ...
def varying_as(a: jax.Array | None, ref: jax.Array) -> jax.Array | None:
    """``a`` marked as varying over the ``jax.shard_map`` axes that ref varies over.

    Needed where values of both kinds must have one type (the branches of a
    ``lax.cond``; a custom VJP whose cotangents are typed like x). Under
    ``jax.vmap`` or outside ``shard_map`` nothing varies and ``a`` is returned.
    """
    if a is None:
        return None
    missing = tuple(sorted(_varying(ref) - _varying(a), key=str))
    return lax.pcast(a, missing, to="varying") if missing else a


def _first_values(x: jax.Array, reduction_axes: tuple[int, ...]) -> jax.Array:
    """X at index 0 of every reduction axis, with x's rank.

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
    take_first = jax.sharding.auto_axes(lambda x: x[index], out_sharding=out)
    return take_first(x)  # pyright: ignore[reportReturnType]


# A second pass is taken when offset**2 > _RECENTRE * var for some feature: the
# single-pass variance then loses about log2(_RECENTRE) bits to cancellation.
_RECENTRE = 64.0


def _kept_shape(shape: tuple[int, ...], reduction_axes: tuple[int, ...]) -> tuple:
    return tuple(1 if i in reduction_axes else d for i, d in enumerate(shape))


def _count(x: jax.Array, mask: jax.Array | None, axes: tuple[int, ...]) -> jax.Array:
    """Valid values per feature (float32), without broadcasting the mask to x."""
    kept = _kept_shape(x.shape, axes)
    if mask is None:
        return jnp.full(kept, math.prod(x.shape[a] for a in axes), jnp.float32)
    repeats = math.prod(x.shape[a] for a in axes if mask.shape[a] == 1)
    count = jnp.sum(mask, axis=axes, keepdims=True, dtype=jnp.float32)
    return jnp.broadcast_to(count * jnp.float32(repeats), kept)


def _shifted_sums(
    x: jax.Array, mask: jax.Array | None, shift: jax.Array, axes: tuple[int, ...]
) -> tuple[jax.Array, jax.Array]:
    """Sums of ``x - shift`` and its square over the valid entries.

    The two reductions get distinct producers (``x + (-shift)`` and ``x -
    shift``): XLA:CPU writes a producer shared by two reductions to memory,
    while an unshared one fuses into its reduction, which then reads only x.
    """
    xf = x.astype(jnp.float32)
    d1 = xf + (-shift)
    d2 = xf - shift
    if mask is not None:
        d1 = jnp.where(mask, d1, 0.0)  # NaN under False reaches no sum
        d2 = jnp.where(mask, d2, 0.0)
    return jnp.sum(d1, axes, keepdims=True), jnp.sum(d2 * d2, axes, keepdims=True)


def shifted_moments(
    x: jax.Array,
    reduction_axes: tuple[int, ...],
    mask: jax.Array | None = None,
    axis_name: AxisName | None = None,
    axis_index_groups: Sequence[Sequence[int]] | None = None,
    fallback_shift: jax.Array | None = None,
) -> ShiftedMoments:
    """The statistics of :func:`batch_moments`, mean split as ``shift + offset``.

    Args:
      x: the input, any floating dtype.
      reduction_axes: the batch axes.
      mask: optional boolean array of x's rank, broadcastable to x.
      axis_name: optional named axis (or tuple) to merge the statistics over.
      axis_index_groups: optional groups of indices along ``axis_name``.
      fallback_shift: float32 shift where a feature's first value is masked (the
        running mean), x's rank with size-1 batch axes; default 0.

    Returns:
      ``ShiftedMoments`` (no gradient flows through the shift) with x's rank and
      size 1 along ``reduction_axes``; global when ``axis_name`` is given.
    """
    axes = tuple(reduction_axes)
    kept = _kept_shape(x.shape, axes)
    fallback = 0.0 if fallback_shift is None else fallback_shift
    if axis_name is None:
        shift = _first_values(x, axes).astype(jnp.float32)
        if mask is not None:
            shift = jnp.where(_first_values(mask, axes), shift, fallback)
    else:
        # One shift for every device (the replicated running mean), so that a
        # single all-reduce of (count, s1, s2) gives the global statistics.
        shift = jnp.zeros(kept, jnp.float32) + fallback
    shift = lax.stop_gradient(jnp.broadcast_to(shift, kept))
    local_count = _count(x, mask, axes)

    def single_pass(shift: jax.Array) -> tuple[jax.Array, ...]:
        s1, s2 = _shifted_sums(x, mask, shift, axes)
        count = local_count
        if axis_name is not None:
            sums = jnp.stack([local_count, s1, s2])
            count, s1, s2 = psum_in_groups(sums, axis_name, axis_index_groups)
        safe_count = jnp.maximum(count, 1.0)
        offset = s1 / safe_count
        var = jnp.maximum(s2 / safe_count - offset * offset, 0.0)
        return count, varying_as(shift, offset), offset, var

    count, shift, offset, var = single_pass(shift)
    # Where the shift was far from the data (a masked first value; across
    # devices, a running mean that lags), redo the sums around ``shift +
    # offset``: a lax.cond, free when not taken, whose predicate is the same on
    # every device.
    count, shift, offset, var = lax.cond(
        jnp.any(offset * offset > _RECENTRE * var),
        lambda n, s, o, v: single_pass(lax.stop_gradient(s + o)),
        lambda n, s, o, v: (n, s, o, v),
        count,
        shift,
        offset,
        var,
    )
    return ShiftedMoments(count, shift, offset, var)


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


def devices_in_axis(axis_name: AxisName | None, groups: Any) -> int:
    """Number of devices whose values are pooled, known at trace time (1 if none).

    Raises:
      ValueError: if ``axis_name`` is not bound, or ``groups`` do not split its
        indices into equal groups with each index once.
    """
    if axis_name is None:
        return 1
    try:
        size = int(lax.axis_size(axis_name))  # pyright: ignore[reportArgumentType]
    except Exception as err:  # unbound axis name
        raise ValueError(
            f"axis_name={axis_name!r} is not bound here. Call apply inside "
            "jax.shard_map, jax.pmap or jax.vmap with that axis_name, or pass "
            "axis_name=None: sharded jax.jit computes global statistics without it."
        ) from err
    if groups is None:
        return size
    members = sorted(int(i) for g in groups for i in g)
    if members != list(range(size)) or len({len(g) for g in groups}) != 1:
        raise ValueError(
            f"axis_index_groups={groups!r} must split the {size} indices of "
            f"axis_name={axis_name!r} into groups of equal size, each index once."
        )
    return len(groups[0])
