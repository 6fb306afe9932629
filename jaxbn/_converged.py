"""Statistics trained elsewhere: the count that marks them converged.

Flax, PyTorch, Keras, Haiku and Equinox keep no update count. Statistics
brought from them into jaxbn get ``CONVERGED_COUNT``, far past any warm-up, so
the decay is ``momentum`` from the first step, as the source framework would
continue. Shared by the Flax adapters (``from_flax_variables``,
``mark_converged``) and the converters of ``jaxbn.interop``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp

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
