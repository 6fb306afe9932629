"""The running-average update of ``batch_stats``, with warm-up and guards.

The decay is ``d = momentum``, or with warm-up ``d = min(momentum, (1 + count) /
(10 + count))``, or for ``momentum=None`` ``d = count / (1 + count)``: the exact
average of all the batches seen (PyTorch's cumulative moving average). A batch
whose statistics are not finite, or that has no valid value, leaves the running
statistics and ``count`` unchanged; a feature with no valid value keeps its
statistics.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from ._config import BatchNormConfig
from ._sums import Moments
from ._types import BatchStats


def decay_rule(count: Any, momentum: Any, warmup: bool, minimum: Callable) -> Any:
    """The decay formula, once, for any number type (jax arrays or floats).

    ``count`` is the number of updates so far as a float of that type and
    ``momentum`` the final decay (None: the cumulative average); ``minimum``
    is that type's ``min``. :func:`decay` calls it with float32 arrays, and
    :func:`jaxbn.describe` with Python floats.
    """
    if momentum is None:
        return count / (1.0 + count)
    if not warmup:
        return momentum
    return minimum(momentum, (1.0 + count) / (10.0 + count))


def decay(count: jax.Array, momentum: float | None, warmup: bool) -> jax.Array:
    """The decay of the running average before the ``count``-th+1 update.

    Args:
      count: int32 number of updates so far.
      momentum: the final decay, or None for the cumulative average.
      warmup: whether to use TensorFlow's ``num_updates`` warm-up rule.

    Returns:
      A float32 scalar decay in ``[0, momentum]`` (``[0, 1)`` for None).

    Examples:
      >>> import jax.numpy as jnp
      >>> [round(float(decay(jnp.int32(c), 0.999, True)), 3) for c in (0, 90, 10**5)]
      [0.1, 0.91, 0.999]
      >>> [round(float(decay(jnp.int32(c), None, False)), 3) for c in (0, 1, 3)]
      [0.0, 0.5, 0.75]
    """
    final = None if momentum is None else jnp.float32(momentum)
    if final is not None and not warmup:
        return final  # pyright: ignore[reportReturnType]
    c = count.astype(jnp.float32)
    return decay_rule(c, final, warmup, jnp.minimum)


def all_finite(*arrays: jax.Array) -> jax.Array:
    """Whether every entry of the arrays is finite: a scalar boolean."""
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(a)) for a in arrays]))


def update_running_stats(
    batch_stats: BatchStats,
    moments: Moments,
    config: BatchNormConfig,
    finite: jax.Array,
    every_feature_has_values: bool = False,
    mean_is_finite: bool = False,
) -> BatchStats:
    """Returns ``batch_stats`` moved towards ``moments`` (no gradient flows).

    The decay is :func:`decay` of the layer's ``momentum`` and ``warmup``. With
    ``running_var="unbiased"`` the variance stored is ``n / (n - 1)`` times the
    batch's (n: the count of values, or the sum of weights; n <= 1 keeps the
    biased variance). With ``renorm``, ``renorm_mean`` and ``renorm_std`` move
    towards the batch's mean and ``sqrt(var + epsilon)`` with the constant
    decay ``renorm_momentum``.

    Args:
      batch_stats: ``{"mean", "var", "count"}`` as made by ``init``.
      moments: the batch's ``Moments``, already reshaped to the feature shape.
      config: the layer's configuration.
      finite: a scalar boolean, whether every statistic of the batch is
        finite (the passes tell it: ``isfinite(ShiftedMoments.margin)``).
      every_feature_has_values: every feature is known, at trace time, to
        have values (no mask, a non-empty batch), so the per-feature checks
        of the count are left out of the program.
      mean_is_finite: the batch mean is finite even in a batch that is not
        taken (the passes' mean is: a non-finite feature's offset is 0), so
        it needs no guard.

    Returns:
      The new ``batch_stats``.
    """
    count, mean, var = (lax.stop_gradient(m) for m in moments)
    biased = var
    if config.unbiased:
        # n / (n - 1) * var is at most the sum of squares, finite where var
        # is; the clamp only guards rounding at the edge of the float range.
        factor = jnp.where(count > 1.0, count / jnp.maximum(count - 1.0, 1.0), 1.0)
        var = jnp.minimum(var * factor, jnp.finfo(var.dtype).max)
    d = decay(batch_stats["count"], config.momentum, bool(config.warmup))
    if every_feature_has_values:
        recorded = finite
        moving = finite
    else:
        some = count > 0
        recorded = finite & jnp.any(some)
        moving = finite & some

    def blend(d: jax.Array) -> Callable[..., jax.Array]:
        # ``k * old + (1 - k) * new`` with ``k = d`` where the batch is taken
        # and 1 where it is not: exact at k = 0 (momentum 0: the batch's
        # statistics) and at k = 1 (the old value, bitwise). A batch not taken
        # may hold NaN or inf, so its values are read as 0 first. Arithmetic
        # rather than a select between old and new: on a mesh with Explicit
        # axes the two may be sharded differently (x's features sharded, the
        # statistics replicated), which a select refuses.
        real = batch_stats["var"].dtype
        d = jnp.broadcast_to(d.astype(real), moving.shape)  # scalar if moving is
        k = lax.select(moving, d, jnp.ones_like(d))
        taken = 1.0 - k
        # Broadcast once, for every statistic.
        k = jnp.broadcast_to(k, var.shape)
        taken = jnp.broadcast_to(taken, var.shape)

        def moved(
            old: jax.Array, new: jax.Array, known_finite: bool = False
        ) -> jax.Array:
            # ``known_finite``: finite in every batch (the mean: the passes set
            # a non-finite feature's offset to 0), so no select is needed.
            if not known_finite:
                new = lax.select(moving, new, jnp.zeros_like(new))
            return (k * old + taken * new).astype(old.dtype)

        return moved

    moved = blend(d)
    new_stats: BatchStats = {
        "mean": moved(batch_stats["mean"], mean, known_finite=mean_is_finite),
        "var": moved(batch_stats["var"], var),
        "count": batch_stats["count"] + recorded.astype(batch_stats["count"].dtype),
    }
    if config.renorm_options is not None:
        assert "renorm_mean" in batch_stats and "renorm_std" in batch_stats
        moved_renorm = blend(jnp.float32(config.renorm_options.momentum))
        std = jnp.sqrt(biased + jnp.asarray(config.epsilon, biased.dtype))
        new_stats["renorm_mean"] = moved_renorm(batch_stats["renorm_mean"], mean)
        new_stats["renorm_std"] = moved_renorm(batch_stats["renorm_std"], std)
    return new_stats
