"""Converters between jaxbn's variables and ``flax.linen``/``flax.nnx`` BatchNorm.

Linen variables are plain dicts; an NNX module is read and written through its
``scale``, ``bias``, ``mean`` and ``var`` variables (duck typing).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp

from ._common import (
    CONVERGED_COUNT,
    LAYOUTS,
    as_numpy,
    jaxbn_variables,
    split_jaxbn,
)


def from_flax(
    variables: Any, *, count: int = CONVERGED_COUNT
) -> tuple[dict[str, jax.Array], dict[str, jax.Array]]:
    """Jaxbn ``(params, batch_stats)`` from a Flax BatchNorm (linen or NNX).

    The names are the same (``scale``, ``bias``, ``mean``, ``var``; Flax also
    averages the biased variance with ``momentum`` as the decay). ``count`` is
    set to ``count``, by default ``CONVERGED_COUNT`` (``2**30``): the
    statistics are taken as converged, so jaxbn continues exactly as Flax.
    A jaxbn adapter's own ``count`` (``jaxbn.nnx.BatchNorm``, or linen
    variables that have one) is kept. For a whole linen model, see
    :func:`jaxbn.linen.from_flax_variables`.

    Args:
      variables: the variables of one ``flax.linen.BatchNorm``, ``{"params":
        {"scale", "bias"}, "batch_stats": {"mean", "var"}}``, or a
        ``flax.nnx.BatchNorm`` module.
      count: the ``count`` to record, an int in ``[0, 2**31 - 2]``.

    Returns:
      ``(params, batch_stats)`` as jax arrays.

    Raises:
      ValueError: for missing statistics or mismatched shapes.
      TypeError: for an unrecognised input, non-floating arrays or a bad count.

    Examples:
      >>> import numpy as np
      >>> from jaxbn import interop
      >>> v = {"params": {"scale": np.ones(2), "bias": np.zeros(2)},
      ...      "batch_stats": {"mean": np.zeros(2), "var": np.full(2, 3.0)}}
      >>> params, stats = interop.from_flax(v)
      >>> stats["var"], stats["count"]
      (Array([3., 3.], dtype=float32), Array(1073741824, dtype=int32))
    """
    if isinstance(variables, Mapping):
        own = variables.get("params", {})
        stats = variables.get("batch_stats")
        if not isinstance(stats, Mapping) or "mean" not in stats or "var" not in stats:
            raise ValueError(
                "variables has no batch_stats {'mean', 'var'} (top-level keys: "
                f"{sorted(variables)}); pass the variables of one BatchNorm, "
                "e.g. variables['params']['BatchNorm_0'] and "
                "variables['batch_stats']['BatchNorm_0'] under those two keys."
            )
        scale, bias = own.get("scale"), own.get("bias")
        mean, var, stored = stats["mean"], stats["var"], stats.get("count")
    elif hasattr(variables, "mean") and hasattr(variables, "var"):
        scale = getattr(variables, "scale", None)
        bias = getattr(variables, "bias", None)
        mean, var = variables.mean, variables.var
        stored = getattr(variables, "count", None)
    else:
        raise TypeError(
            f"variables of type {type(variables).__name__} is neither the "
            "variables dict of a flax.linen.BatchNorm nor a flax.nnx.BatchNorm."
        )
    shape = as_numpy(mean, "mean").shape
    params, batch_stats = jaxbn_variables(
        scale, bias, mean, var, count, LAYOUTS["flax"], shape
    )
    if stored is not None:
        batch_stats["count"] = jnp.asarray(as_numpy(stored, "count"), jnp.int32)
    return params, batch_stats


def to_flax(
    params: Mapping[str, Any], batch_stats: Mapping[str, Any], module: Any = None
) -> Any:
    """Flax BatchNorm variables from jaxbn's, as linen variables or into an NNX module.

    Without ``module``, returns the variables of one ``flax.linen.BatchNorm``
    (``{"params": {"scale", "bias"}, "batch_stats": {"mean", "var"}}``; jaxbn's
    ``count``, which Flax lacks, is dropped). With ``module`` (a
    ``flax.nnx.BatchNorm`` or ``jaxbn.nnx.BatchNorm``), sets its variables in
    place (and its ``count``, where it has one) and returns it.

    Args:
      params: jaxbn's ``params`` of one layer.
      batch_stats: its ``batch_stats``.
      module: an NNX batch norm to fill, or None.

    Returns:
      The linen variables, or ``module``.

    Raises:
      ValueError: for missing statistics, mismatched shapes, or a scale or bias
        that the NNX module lacks (or the reverse).

    Examples:
      >>> import jax.numpy as jnp
      >>> import jaxbn
      >>> from jaxbn import interop
      >>> params, stats = jaxbn.batch_norm().init(jnp.zeros((4, 3)))
      >>> v = interop.to_flax(params, stats)
      >>> sorted(v["params"]), sorted(v["batch_stats"])
      (['bias', 'scale'], ['mean', 'var'])
    """
    scale, bias, mean, var, count = split_jaxbn(params, batch_stats)
    if module is None:
        own = {}
        if scale is not None:
            own["scale"] = jnp.asarray(scale)
        if bias is not None:
            own["bias"] = jnp.asarray(bias)
        return {
            "params": own,
            "batch_stats": {"mean": jnp.asarray(mean), "var": jnp.asarray(var)},
        }
    values = {"scale": scale, "bias": bias, "mean": mean, "var": var}
    for name, value in values.items():
        target = getattr(module, name, None)
        if (value is None) != (target is None):
            raise ValueError(
                f"jaxbn's {name} is {'absent' if value is None else 'present'} but "
                f"the module's is {'absent' if target is None else 'present'}; "
                "build the module with use_scale/use_bias matching jaxbn's."
            )
        if value is None or target is None:
            continue
        old = target[...]
        if value.size != old.size:
            raise ValueError(
                f"jaxbn's {name} has shape {value.shape} but the module's has shape "
                f"{old.shape}; convert into a module with as many features."
            )
        target[...] = jnp.asarray(value.reshape(old.shape), old.dtype)
    if getattr(module, "count", None) is not None:
        module.count[...] = jnp.asarray(count, jnp.int32)
    return module


__all__ = ["from_flax", "to_flax"]
