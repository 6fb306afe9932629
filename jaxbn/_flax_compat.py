"""What the Flax adapters share: mapping Flax's options onto ``jaxbn.batch_norm``.

The adapters in ``jaxbn.linen`` and ``jaxbn.nnx`` own Flax variables; this module
turns their options into a core :class:`jaxbn.Layer` and their flat variables
into the core's ``params`` / ``batch_stats`` dicts. No maths lives here.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from . import _validation as v
from ._layer import BatchStats, Layer, batch_norm

# Count given to running statistics trained without jaxbn (Flax checkpoints):
# far past any warm-up, so the decay is ``momentum`` as in Flax, and 2**30 more
# updates fit in int32 before ``count`` could overflow.
CONVERGED_COUNT = 2**30


def core_layer(module: Any, dtype: Any) -> Layer:
    """The core layer for a Flax-style module's options, with output ``dtype``.

    Both adapters name their options like Flax (``use_bias``, ``use_scale``, ...)
    plus ``warmup``; ``use_fast_variance`` and ``force_float32_reductions`` are
    accepted for compatibility and ignored (the core is always stable, float32).
    """
    return batch_norm(
        axis=module.axis,
        momentum=module.momentum,
        epsilon=module.epsilon,
        center=module.use_bias,
        scale=module.use_scale,
        warmup=module.warmup,
        axis_name=module.axis_name,
        axis_index_groups=module.axis_index_groups,
        dtype=dtype,
        param_dtype=module.param_dtype,
    )


def feature_shape(x: Any, axis: Any) -> tuple[int, ...]:
    """The shape of x's feature axes (checked like the core checks them)."""
    v.check_x(x)
    axes = v.normalize_axes(v.check_axis_spec(axis), len(x.shape))
    return tuple(x.shape[a] for a in axes)


def initial_stats(features: tuple[int, ...]) -> BatchStats:
    """The core's initial ``batch_stats`` for the given feature shape."""
    axes = tuple(range(1, 1 + len(features)))
    spec = jax.ShapeDtypeStruct((2, *features), jnp.float32)
    return batch_norm(axis=axes).init(spec)[1]


def train_flag(use_running_average: Any) -> bool | jax.Array:
    """Flax's ``use_running_average`` as the core's ``train`` (bool or array)."""
    if isinstance(use_running_average, bool | np.bool_):
        return not bool(use_running_average)
    train = v.check_train(use_running_average)  # a scalar boolean array
    return jnp.logical_not(train)


def converged(
    batch_stats: Mapping[str, Any], count: int = CONVERGED_COUNT
) -> dict[str, Any]:
    """``batch_stats`` (nested dicts) with ``count`` added wherever it is missing.

    Statistics that get a count are also cast to float32, the core's dtype
    (Flax keeps them in ``param_dtype`` when ``force_float32_reductions=False``).
    """
    out: dict[str, Any] = {}
    for name, value in batch_stats.items():
        out[name] = converged(value, count) if isinstance(value, Mapping) else value
    if "mean" in out and "var" in out and "count" not in out:
        out["mean"] = jnp.asarray(out["mean"], jnp.float32)
        out["var"] = jnp.asarray(out["var"], jnp.float32)
        out["count"] = jnp.asarray(count, jnp.int32)
    return out


def check_count(count: Any) -> int:
    """Checks a count given for converged statistics: an int in [0, 2**31 - 2]."""
    if isinstance(count, bool) or not isinstance(count, int):
        raise TypeError(f"count must be a Python int, got {count!r}.")
    if not 0 <= count < 2**31 - 1:
        raise ValueError(
            f"count={count} does not fit an int32 counter that is still to be "
            f"incremented; use a value in [0, {2**31 - 2}], e.g. the default "
            f"{CONVERGED_COUNT}."
        )
    return count
