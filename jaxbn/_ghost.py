"""Ghost (virtual) batches: each group of k examples gets its own statistics.

``virtual_batch_size=k`` (Hoffer et al., 2017) splits the batch axis (axis 0)
into ``(B // k, k)``: the group axis is then kept like a feature axis, so the
one statistics helper computes per-group statistics and the one normalize
helper applies them, unchanged. The running statistics receive
``merge_groups``: the count-weighted merge of the groups, which is the
statistics of the whole batch.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import overload

import jax
import jax.numpy as jnp

from ._running import all_finite
from ._statistics import (
    batch_moments,  # noqa: F401  (doctest)
    shifted_moments,  # noqa: F401  (doctest)
)
from ._sums import AxisName, Moments, ShiftedMoments, abs2, psum_parts
from ._training import Running, Step, StepOptions, training_step


@overload
def grouped(a: jax.Array, k: int) -> jax.Array: ...
@overload
def grouped(a: None, k: int) -> None: ...
def grouped(a: jax.Array | None, k: int) -> jax.Array | None:
    """``a`` with axis 0 split into ``(size // k, k)`` (size-1 axes stay 1)."""
    if a is None:
        return None
    head = (a.shape[0] // k, k) if a.shape[0] != 1 else (1, 1)
    return a.reshape(head + tuple(a.shape[1:]))


def ghost_training(
    k: int,
    x: jax.Array,
    mask: jax.Array | None,
    scale: jax.Array | None,
    bias: jax.Array | None,
    running: Running,
    options: StepOptions,
) -> Step:
    """``training_step`` on groups of k examples, with the groups' merged moments.

    Args:
      k: the virtual batch size (it divides ``x.shape[0]``, a batch axis).
      x: the input.
      mask: optional mask or weights of x's rank.
      scale: optional scale of x's rank (per feature or per example).
      bias: optional bias, like ``scale``.
      running: the running statistics, x's rank with size-1 batch axes.
      options: the training step's options for the whole x.

    Returns:
      The :class:`Step`: ``y`` shaped like x, and the merged ``Moments`` (no
      gradient), with x's rank and size-1 batch axes, across the devices of
      ``axis_name`` too, and whether they are finite (merged after the
      passes, so checked here).
    """
    renorm = running.renorm
    if renorm is not None:
        renorm = renorm._replace(
            mean=grouped(renorm.mean, k), std=grouped(renorm.std, k)
        )
    mean = grouped(running.mean, k)
    per_group = options._replace(
        reduction_axes=tuple(a + 1 for a in options.reduction_axes),
        axis_name=None,  # each device's groups are its own
        groups=None,
    )
    y, m = training_step(
        grouped(x, k),
        grouped(mask, k),
        grouped(scale, k),
        grouped(bias, k),
        Running(mean, grouped(running.var, k), renorm),
        per_group,
    )
    merged = merge_groups(m, mean, 0, options.axis_name, options.groups)
    moments = Moments(*(a[0] for a in merged))
    finite = all_finite(moments.mean, moments.var)
    return Step(y.reshape(x.shape), moments, finite, mean_is_finite=False)


def merge_groups(
    m: ShiftedMoments,
    reference: jax.Array,
    axis: int,
    axis_name: AxisName | None = None,
    axis_index_groups: Sequence[Sequence[int]] | None = None,
) -> Moments:
    """The count-weighted merge of per-group statistics along ``axis``.

    The merged variance is the within-group part plus the spread of the group
    means, so the merge is the statistics of all the groups' values together
    (across the devices of ``axis_name`` too). Group means are taken relative
    to ``reference`` (the running mean, the same on every device), which keeps
    their differences exact for a large mean.

    Args:
      m: per-group statistics (no gradient needed), size G along ``axis``.
      reference: broadcastable to ``m.shift``, size 1 along ``axis``.
      axis: the group axis.
      axis_name: optional named axis (or tuple) whose devices are merged too.
      axis_index_groups: optional groups of indices along ``axis_name``.

    Returns:
      ``Moments`` with size 1 along ``axis``.

    Examples:
      >>> import jax.numpy as jnp
      >>> x = jnp.array([[1.0], [3.0], [10.0], [20.0]])
      >>> g = shifted_moments(x.reshape(2, 2, 1), (1,))
      >>> merged = merge_groups(g, jnp.zeros((1, 1, 1)), axis=0)
      >>> m = batch_moments(x, (0,))
      >>> float(merged.mean[0, 0, 0]), float(m.mean[0, 0])
      (8.5, 8.5)
      >>> float(merged.var[0, 0, 0]), float(m.var[0, 0])
      (55.25, 55.25)
    """
    n = m.count
    d = (m.shift - reference.astype(m.shift.dtype)) + m.offset
    total = jnp.sum(n, axis, keepdims=True)
    s1 = jnp.sum(n * d, axis, keepdims=True)
    if axis_name is not None:
        total, s1 = psum_parts([total, s1], axis_name, axis_index_groups)
    safe = jnp.maximum(total, 1.0)
    dm = s1 / safe
    s2 = jnp.sum(n * (m.var + abs2(d - dm)), axis, keepdims=True)
    if axis_name is not None:
        (s2,) = psum_parts([s2], axis_name, axis_index_groups)
    return Moments(total, reference + dm, s2 / safe)
