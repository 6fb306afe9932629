"""Converters between jaxbn's variables and an Equinox batch norm with its state.

Both ``equinox.nn.BatchNorm`` (modes ``"batch"`` and ``"ema"``) and
``jaxbn.equinox.BatchNorm`` are read by duck typing; writing uses
``equinox.tree_at``, imported only then.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from ._common import CONVERGED_COUNT, LAYOUTS, jaxbn_variables, split_jaxbn

_NAMES = LAYOUTS["equinox"]


def _kind(module: Any) -> str:
    if hasattr(module, "state_index") and hasattr(module, "config"):
        return "jaxbn"
    mode = getattr(module, "mode", None)
    if mode == "batch" and getattr(module, "batch_state_index", None) is not None:
        return "batch"
    if mode == "ema" and getattr(module, "ema_state_index", None) is not None:
        return "ema"
    raise TypeError(
        f"module of type {type(module).__name__} is neither an "
        "equinox.nn.BatchNorm nor a jaxbn.equinox.BatchNorm."
    )


def from_equinox(
    module: Any, state: Any, *, count: int = CONVERGED_COUNT
) -> tuple[dict[str, jax.Array], dict[str, jax.Array]]:
    """Jaxbn ``(params, batch_stats)`` from an Equinox batch norm and its state.

    ``weight``/``bias`` become ``scale``/``bias`` (absent with
    ``channelwise_affine=False``). The statistics are those Equinox evaluates
    with: in ``mode="batch"`` its running averages divided by ``1 - momentum **
    counter`` (its zero-debiasing), in ``mode="ema"`` its averages as stored.
    ``count`` is set to ``count`` (default ``CONVERGED_COUNT``, ``2**30``: the
    statistics are taken as converged). A layer never trained gets ``count =
    0``: in ``mode="batch"`` (``counter == 0``) with its stored averages
    (initially 0 and 1), in ``mode="ema"`` (first-time flag set) with jaxbn's
    initial ``(0, 1)``, since Equinox's buffers are then uninitialised. A
    ``jaxbn.equinox.BatchNorm`` gives its statistics and ``count`` as they are.
    Build the jaxbn layer with ``axis=0`` per example under ``vmap`` (``axis=1``
    for a batch), Equinox's ``momentum`` and ``eps``.

    Args:
      module: an ``equinox.nn.BatchNorm`` or ``jaxbn.equinox.BatchNorm``.
      state: the ``eqx.nn.State`` holding its statistics.
      count: the ``count`` to record, an int in ``[0, 2**31 - 2]``.

    Returns:
      ``(params, batch_stats)`` as jax arrays.

    Raises:
      TypeError: if ``module`` is not such a batch norm, or for a bad count.
    """
    kind = _kind(module)
    if kind == "jaxbn":
        stats = state.get(module.state_index)
        params, batch_stats = jaxbn_variables(
            module.weight, module.bias, stats["mean"], stats["var"], 0, _NAMES
        )
        batch_stats["count"] = jnp.asarray(stats["count"], jnp.int32)
        return params, batch_stats
    if kind == "batch":
        counter = state.get(module.batch_counter)
        mean, var = state.get(module.batch_state_index)
        # Equinox's own inference rule, so jaxbn evaluates with the same values.
        debias = jnp.where(counter == 0, 1, 1 - module.momentum**counter)
        mean, var = mean / debias, var / debias
        trained = bool(counter > 0)
    else:
        trained = not bool(state.get(module.ema_first_time_index))
        mean, var = state.get(module.ema_state_index)
        if not trained:
            mean, var = jnp.zeros_like(mean), jnp.ones_like(var)
    return jaxbn_variables(
        module.weight, module.bias, mean, var, count if trained else 0, _NAMES
    )


def to_equinox(
    params: Mapping[str, Any], batch_stats: Mapping[str, Any], module: Any, state: Any
) -> tuple[Any, Any]:
    """An Equinox batch norm and state holding jaxbn's variables.

    Returns a copy of ``module`` with ``weight``/``bias`` replaced (cast to the
    module's dtype) and a new state with its statistics set so that Equinox
    evaluates with jaxbn's ``mean`` and ``var`` exactly. For
    ``equinox.nn.BatchNorm`` in ``mode="batch"`` the ``counter`` becomes
    ``CONVERGED_COUNT`` when ``count > 0`` (``momentum ** counter`` is then 0 in
    float32, so Equinox's zero-debiasing divides by 1 and later updates are a
    plain moving average) and 0 when ``count == 0`` (a fresh counter; Equinox
    reads the averages as they are). In ``mode="ema"`` the first-time flag is
    set when ``count == 0``. A ``jaxbn.equinox.BatchNorm`` gets all three
    statistics as they are.

    Args:
      params: jaxbn's ``params`` of one layer.
      batch_stats: its ``batch_stats``.
      module: the ``equinox.nn.BatchNorm`` or ``jaxbn.equinox.BatchNorm`` to fill.
      state: the ``eqx.nn.State`` holding its statistics.

    Returns:
      ``(module, state)``, new objects.

    Raises:
      TypeError: if ``module`` is not such a batch norm.
      ValueError: if jaxbn's params and the module's ``channelwise_affine``
        disagree, or for mismatched shapes.
    """
    import equinox as eqx

    kind = _kind(module)
    scale, bias, mean, var, count = split_jaxbn(params, batch_stats)
    affine = module.weight is not None
    if (scale is not None and bias is not None) != affine or (
        (scale is None) != (bias is None)
    ):
        raise ValueError(
            f"jaxbn's params have keys {sorted(params)} but the module has "
            f"channelwise_affine={affine}; Equinox needs both scale and bias "
            "(channelwise_affine=True) or neither."
        )
    size = module.input_size
    if mean.shape != (size,):
        raise ValueError(
            f"jaxbn's mean has shape {mean.shape} but the module has "
            f"input_size={size}; convert into a module of the same size."
        )
    if affine:
        dtype = module.weight.dtype
        module = eqx.tree_at(
            lambda m: (m.weight, m.bias),
            module,
            (jnp.asarray(scale, dtype), jnp.asarray(bias, dtype)),
        )
    if kind == "jaxbn":
        stats = {
            "mean": jnp.asarray(mean),
            "var": jnp.asarray(var),
            "count": jnp.asarray(count, jnp.int32),
        }
        return module, state.set(module.state_index, stats)
    if kind == "batch":
        old_mean, _ = state.get(module.batch_state_index)
        hidden = (jnp.asarray(mean, old_mean.dtype), jnp.asarray(var, old_mean.dtype))
        counter = state.get(module.batch_counter)
        # full_like keeps the counter's weak type, which State.set checks.
        new_counter = lax.full_like(counter, CONVERGED_COUNT if count > 0 else 0)
        state = state.set(module.batch_counter, new_counter)
        return module, state.set(module.batch_state_index, hidden)
    old_mean, _ = state.get(module.ema_state_index)
    averages = (jnp.asarray(mean, old_mean.dtype), jnp.asarray(var, old_mean.dtype))
    state = state.set(module.ema_first_time_index, jnp.asarray(count == 0))
    return module, state.set(module.ema_state_index, averages)


__all__ = ["from_equinox", "to_equinox"]
