"""Batch statistics: per-feature count, mean and biased variance.

This is the one place where jaxbn reduces x over the batch. It keeps the count of
values behind each feature's statistics so that every merge (across devices,
masked entries) weights by counts, never averaging means.

The design, the same for one device and for many (the passes: ``_passes``):

1. The sums of ``d = x - shift`` and ``|d|**2`` over the valid entries, in one
   fused pass over x, around a ``shift`` that every device shares and that does
   not depend on the batch's order: the running mean. Across devices
   (``axis_name``) one all-reduce of ``(count, s1, s2)`` gives the global sums.
2. Another pass, around ``shift + offset``, while a feature's mean is far from
   its shift (at most twice; the predicate is the same on every device). The
   result loses at most about one bit against an exact two-pass computation,
   whatever the order of the batch, and ``E[x^2] - E[x]^2`` is never formed.

The statistics are computed in float32, or float64 for float64 input; complex
input has a complex mean and the real variance ``E|x - mean|^2``. Their
derivatives are given in closed form (a ``jax.custom_jvp`` whose tangent rule
is linear, so JAX transposes it for reverse mode and differentiates it again
for higher orders); the passes themselves are never differentiated.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax
from jax.ad_checkpoint import checkpoint_name

from ._hyperparams import canonical_groups
from ._passes import PassConfig, run_passes
from ._sums import (
    AxisName,
    Moments,
    ShiftedMoments,
    is_complex,
    kept_shape,
    mean_dtype,
    psum_parts,
    weigh,
)

# Name of the per-feature statistics that a training step saves for its
# backward pass (``jax.checkpoint`` policy); everything full-size is recomputed.
SAVED = "jaxbn_statistics"


@partial(jax.custom_jvp, nondiff_argnums=(0,))
def _moments(
    cfg: PassConfig, x: jax.Array, mask: Any, shift: jax.Array
) -> ShiftedMoments:
    return run_passes(cfg, x, mask, shift)


@_moments.defjvp
def _moments_jvp(cfg: PassConfig, primals: tuple, tangents: tuple) -> tuple:
    x, mask, shift = primals
    dx = tangents[0]
    m = ShiftedMoments(
        *(checkpoint_name(a, SAVED) for a in _moments(cfg, x, mask, shift))
    )
    dtype = m.shift.dtype
    t = dx.astype(dtype)
    centred = (x.astype(dtype) - m.shift) - m.offset
    dvar_terms = centred * t if not is_complex(t) else (jnp.conj(centred) * t).real
    if mask is not None:
        t, dvar_terms = weigh(t, mask), weigh(dvar_terms, mask)
    sum_t = jnp.sum(t, cfg.axes, keepdims=True)
    sum_ct = jnp.sum(dvar_terms, cfg.axes, keepdims=True)
    if cfg.axis_name is not None:
        sum_t, sum_ct = psum_parts([sum_t, sum_ct], cfg.axis_name, cfg.groups)
    safe = jnp.maximum(m.count, 1.0)
    tangent = ShiftedMoments(
        jnp.zeros_like(m.count),
        jnp.zeros_like(m.shift),
        sum_t / safe,
        2.0 * sum_ct / safe,
        jnp.zeros_like(m.margin),
    )
    return m, tangent


def shifted_moments(
    x: jax.Array,
    reduction_axes: tuple[int, ...],
    mask: jax.Array | None = None,
    axis_name: AxisName | None = None,
    axis_index_groups: Sequence[Sequence[int]] | None = None,
    shift: jax.Array | None = None,
) -> ShiftedMoments:
    """The statistics of :func:`batch_moments`, mean split as ``shift + offset``.

    Args:
      x: the input, any floating or complex dtype.
      reduction_axes: the batch axes.
      mask: optional boolean array of x's rank, broadcastable to x, or
        non-negative weights (real, the statistics' dtype) of the same kind:
        then the count is the sum of weights and the sums are weighted.
      axis_name: optional named axis (or tuple) to merge the statistics over.
      axis_index_groups: optional groups of indices along ``axis_name``.
      shift: the starting shift (the running mean), x's rank with size-1 batch
        axes; default 0. It must be the same on every device of ``axis_name``.

    Returns:
      ``ShiftedMoments`` with x's rank and size 1 along ``reduction_axes``;
      global when ``axis_name`` is given. ``offset`` and ``var`` carry the
      exact derivatives of the mean and variance; count and shift carry none.
    """
    axes = tuple(sorted(int(a) for a in reduction_axes))
    groups = canonical_groups(axis_index_groups)
    kept = kept_shape(x.shape, axes)
    if shift is None:
        start = jnp.zeros(kept, mean_dtype(x.dtype))
    else:
        start = jnp.broadcast_to(shift.astype(mean_dtype(x.dtype)), kept)
    cfg = PassConfig(
        axes, axis_name, groups, known_count(x, mask, axes, axis_name, groups)
    )
    return _moments(cfg, x, mask, lax.stop_gradient(start))


def known_count(
    x: jax.Array, mask: Any, axes: tuple[int, ...], axis_name: Any, groups: Any
) -> float | None:
    """The count of values per feature if it is known when tracing, else None.

    Without a mask every feature counts every entry of the batch axes, on
    every device of ``axis_name`` alike (JAX's own NameError for an unbound
    axis is left to propagate). With ``axis_index_groups``, or an empty
    batch, the count is summed as with a mask.
    """
    n = math.prod(x.shape[a] for a in axes)
    if mask is not None or groups is not None or n == 0:
        return None
    if axis_name is not None:
        n *= lax.axis_size(axis_name)  # pyright: ignore[reportArgumentType]
    return float(n)


def batch_moments(
    x: jax.Array,
    reduction_axes: tuple[int, ...],
    mask: jax.Array | None = None,
    axis_name: AxisName | None = None,
    axis_index_groups: Sequence[Sequence[int]] | None = None,
) -> Moments:
    """Computes the per-feature count, mean and biased variance of ``x``.

    Args:
      x: the input, any floating or complex dtype; statistics are computed in
        float32, or float64 for float64 input.
      reduction_axes: the batch axes to reduce over.
      mask: optional boolean array of x's rank broadcastable to x; False
        entries are ignored (they may hold NaN).
      axis_name: optional named axis (or tuple of names) of ``jax.vmap``,
        ``jax.shard_map`` or ``jax.pmap`` to synchronize the statistics over.
      axis_index_groups: optional groups of indices along ``axis_name``; each
        group gets its own statistics.

    Returns:
      ``Moments`` with x's rank and size 1 along ``reduction_axes``;
      differentiable (mean and variance) in forward and reverse mode.

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
