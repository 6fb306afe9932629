"""Statistics trained elsewhere: the count that marks them converged.

Flax, PyTorch, Keras, Haiku and Equinox keep no update count. Statistics
brought from them into jaxbn get ``CONVERGED_COUNT``, far past any warm-up, so
the decay is ``momentum`` from the first step, as the source framework would
continue. :func:`mark_converged` is the public way to set it on a whole
model; the Flax adapters (``from_flax_variables``) and the converters of
``jaxbn.interop`` use the same count.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp

from ._trees import (
    is_nnx_module,
    iter_layers,
    nnx_norm_layers,
    replace_layers,
    stats_root,
)

# Far past any warm-up, so the decay is ``momentum`` as in Flax, and 2**30 more
# updates fit in the core's int32 before ``count`` could overflow. A power of
# two, so float32 holds it exactly.
CONVERGED_COUNT = 2**30
# dtype of the Flax adapters' ``count`` variable (the core counts in int32), so
# that differentiating a whole module never meets an integer leaf. float32
# counts exactly up to 2**24 updates and stays there (2**24 + 1 rounds back),
# which changes nothing: the decay is then ``momentum`` for momentum < 1 - 6e-7.
COUNT_DTYPE = jnp.float32


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


def mark_converged(stats: Any, count: int = CONVERGED_COUNT) -> Any:
    """Marks running statistics trained elsewhere as converged: the one way.

    Flax, PyTorch, Keras, Haiku and Equinox keep no update count. Statistics
    loaded from them into a jaxbn model that counts (warm-up, on by default)
    would otherwise be warmed up again, the first batches overwriting them.
    This sets every batch norm's ``count`` to ``count``, by default
    ``2**30``: warm-up is over and the decay is ``momentum`` from the first
    step, as the source framework would continue. Pass ``count=0`` to restart
    the warm-up instead.

    Args:
      stats: a tree of dicts as for :func:`jaxbn.describe` (linen variables, whose
        other collections are kept, or the core's ``batch_stats``), or a
        ``flax.nnx`` model, changed in place. A layer with a ``count`` keeps
        its dtype; one without (saved by Flax) gets a float32 ``count``, the
        Flax adapters' dtype. An nnx layer without a ``count`` (a
        ``flax.nnx.BatchNorm``, or a jaxbn one that keeps none) is left alone.
      count: the count, an int in ``[0, 2**31 - 2]``.

    Returns:
      The new tree, or None for an nnx model.

    Raises:
      TypeError: if ``stats`` is neither a tree of dicts nor an nnx model, or
        ``count`` not an int.
      ValueError: if it holds no statistics, or ``count`` is out of range.

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> import flax.linen as nn
      >>> import jaxbn, jaxbn.linen
      >>> x = jnp.ones((4, 3))
      >>> flax_vars = nn.BatchNorm(use_running_average=True).init(
      ...     jax.random.key(0), x)
      >>> variables = jaxbn.mark_converged(flax_vars)
      >>> variables["batch_stats"]["count"]
      Array(1.0737418e+09, dtype=float32)
      >>> model = jaxbn.linen.BatchNorm(use_running_average=True)
      >>> model.apply(variables, x).shape
      (4, 3)
    """
    count = check_count(count)
    if is_nnx_module(stats):
        layers = nnx_norm_layers(stats)
        if not layers:
            raise ValueError("the nnx model has no batch norm to mark converged.")
        for _, m in layers:
            if getattr(m, "count", None) is not None:
                m.count[...] = jnp.asarray(count, m.count[...].dtype)
        return None
    if not isinstance(stats, Mapping):
        raise TypeError(
            f"stats must be a tree of dicts (linen variables or the core's "
            f"batch_stats) or an nnx model, got {type(stats).__name__}."
        )
    root = stats_root(stats)
    found = dict(iter_layers(root))
    if not found:
        raise ValueError(
            "stats hold no batch-norm statistics ('mean' and 'var'); pass the "
            "model's variable dict or its batch_stats."
        )
    marked = {}
    for path, layer in found.items():
        if "count" in layer:
            new = dict(layer)
            new["count"] = jnp.asarray(count, jnp.asarray(layer["count"]).dtype)
        else:  # saved by Flax: :func:`converged`'s rule
            new = converged(layer, count)
        marked[path] = dict(sorted(new.items()))
    if root is stats:
        return replace_layers(stats, marked)
    return {**stats, "batch_stats": replace_layers(root, marked)}
