"""What the Flax adapters share: mapping Flax's options onto ``jaxbn.batch_norm``.

The adapters in ``jaxbn.linen`` and ``jaxbn.nnx`` own Flax variables; this module
turns their options into a core :class:`jaxbn.Layer` and their variables into
the core's ``params`` / ``batch_stats`` dicts. No maths lives here.

Where Flax and the core differ, the adapters behave like Flax:

* training with one value per feature (a batch of one, or x without a batch
  axis) normalizes to the bias, as in Flax, where the core raises;
* integer and boolean x are promoted to float, as in Flax;
* ``count`` exists only with ``warmup=True`` (with ``warmup=False`` the
  variables are exactly Flax's) and is stored as float32, so that
  differentiating a whole module (``nnx.grad(..., graph=False)``,
  ``jax.grad`` over all variables) never meets an integer leaf. float32 counts
  exactly up to ``2**24`` updates, far past any warm-up.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from . import _validation as v
from ._layer import BatchStats, Layer, batch_norm

# dtype of the adapters' ``count`` variable (the core counts in int32). float32
# counts exactly up to 2**24 updates and stays there (2**24 + 1 rounds back),
# which changes nothing: the decay is then ``momentum`` for momentum < 1 - 6e-7.
COUNT_DTYPE = jnp.float32
# Count given to running statistics trained without jaxbn (Flax checkpoints):
# far past any warm-up, so the decay is ``momentum`` as in Flax, and 2**30 more
# updates fit in the core's int32 before ``count`` could overflow. A power of
# two, so float32 holds it exactly.
CONVERGED_COUNT = 2**30


def core_layer(module: Any, dtype: Any, *, initializing: bool = False) -> Layer:
    """The core layer for a Flax-style module's options, with output ``dtype``.

    Both adapters name their options like Flax (``use_bias``, ``use_scale``, ...)
    plus ``warmup``; ``use_fast_variance`` and ``force_float32_reductions`` are
    accepted for compatibility and ignored (the core is always stable, float32).
    Training with a single value per feature is allowed, as in Flax.
    ``initializing`` gives the layer Flax uses during ``init``: statistics of the
    batch alone, with no ``axis_name`` synchronization. A complex output
    ``dtype`` is left to :func:`cast_output` (the core's ``dtype`` is real).
    """
    return batch_norm(
        axis=module.axis,
        momentum=module.momentum,
        epsilon=module.epsilon,
        center=module.use_bias,
        scale=module.use_scale,
        warmup=module.warmup,
        axis_name=None if initializing else module.axis_name,
        axis_index_groups=None if initializing else module.axis_index_groups,
        dtype=dtype if dtype is None or not _is_complex(dtype) else None,
        param_dtype=module.param_dtype,
        allow_one_value=True,
        **variant_options(module),
    )


# The core's training-time variants that the adapters forward, with defaults.
VARIANTS = {
    "running_var": "biased",
    "renorm": False,
    "rmax": None,
    "dmax": None,
    "renorm_momentum": None,
    "virtual_batch_size": None,
    "eval_mode": "running",
    "zero_masked": False,
}


def variant_options(module: Any) -> dict[str, Any]:
    """The module's training-time variant options (see :func:`jaxbn.batch_norm`)."""
    return {k: getattr(module, k, default) for k, default in VARIANTS.items()}


def keeps_count(warmup: Any, momentum: Any, renorm: Any) -> bool:
    """Whether an adapter stores ``count`` (in ``batch_stats``).

    Warm-up, the cumulative average (``momentum=None``) and renorm's schedules
    of ``count`` need it.
    """
    if warmup is None:  # as in jaxbn.batch_norm: on but for None and 1.0
        warmup = momentum is not None and momentum != 1.0
    return bool(warmup) or momentum is None or bool(renorm)


def as_inexact(x: Any) -> Any:
    """x, with integer and boolean dtypes promoted to float as Flax does."""
    if not hasattr(x, "shape") or not hasattr(x, "dtype"):
        v.check_x(x)  # raises the core's TypeError
    if not jnp.issubdtype(x.dtype, jnp.inexact):
        return jnp.asarray(x, jnp.promote_types(x.dtype, jnp.float32))
    return x


def feature_shape(x: Any, axis: Any) -> tuple[int, ...]:
    """The shape of x's feature axes; every axis of x may be a feature axis.

    A single example (no batch axis) is normalized like Flax does: to the bias
    in training (its variance is 0), and with the running statistics in
    evaluation.
    """
    axes = v.normalize_axes(v.check_axis_spec(axis), len(x.shape), True)
    return tuple(x.shape[a] for a in axes)


def _is_complex(dtype: Any) -> bool:
    return jnp.issubdtype(dtype, jnp.complexfloating)


def cast_output(y: jax.Array, dtype: Any) -> jax.Array:
    """The core's output in the adapter's output ``dtype`` (complex included)."""
    return y if y.dtype == dtype else y.astype(dtype)


def core_stats(mean: jax.Array, var: jax.Array, count: Any, x_dtype: Any) -> BatchStats:
    """The core's ``batch_stats`` from the adapters' variables.

    The running mean starts as float32, as in Flax; for complex x the core
    wants a complex mean, and it becomes complex after the first update (as
    Flax's does). ``count`` is the adapters' float32 count (or a Python int);
    the core counts in int32.
    """
    if _is_complex(x_dtype) and not _is_complex(mean.dtype):
        mean = mean.astype(jnp.promote_types(mean.dtype, jnp.complex64))
    # Clipped so that a float32 count rounded up past int32 cannot overflow.
    count = jnp.minimum(jnp.asarray(count, COUNT_DTYPE), float(CONVERGED_COUNT))
    return {"mean": mean, "var": var, "count": count.astype(jnp.int32)}


def stored_count(count: jax.Array) -> jax.Array:
    """The core's int32 count as the adapters store it (float32)."""
    return count.astype(COUNT_DTYPE)


def initial_stats(features: tuple[int, ...]) -> BatchStats:
    """The core's initial ``batch_stats`` for the given feature shape.

    ``mean`` and ``var`` are float32, ``count`` an int32 scalar (the Flax
    adapters keep their own float32 count, and only with warm-up).
    """
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
        out["count"] = jnp.asarray(count, COUNT_DTYPE)
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
