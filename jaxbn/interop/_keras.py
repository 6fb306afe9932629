"""Converters between jaxbn's variables and Keras 3 ``BatchNormalization`` weights.

Keras is not imported: the converters read and write the list of
``layer.get_weights()`` / ``layer.set_weights(...)`` (or a dict by name).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np

from ._common import CONVERGED_COUNT, LAYOUTS, jaxbn_variables, split_jaxbn

_NAMES = LAYOUTS["keras"]
_RENORM = ("moving_stddev", "renorm_mean", "renorm_stddev")


def from_keras(
    weights: Any, *, count: int = CONVERGED_COUNT
) -> tuple[dict[str, jax.Array], dict[str, jax.Array]]:
    """Jaxbn ``(params, batch_stats)`` from a Keras 3 ``BatchNormalization``.

    ``gamma``/``beta`` become ``scale``/``bias``; ``moving_mean`` and
    ``moving_variance`` become ``mean`` and ``var`` (Keras also averages the
    biased batch variance, with ``momentum`` as the decay, like jaxbn).
    ``count`` is set to ``count``, by default ``CONVERGED_COUNT`` (``2**30``):
    the statistics are taken as converged, so jaxbn's decay is plain
    ``momentum``, as Keras would continue. Build the jaxbn layer with Keras's
    ``axis``, ``momentum`` and ``epsilon`` (Keras's default is ``1e-3``,
    jaxbn's ``1e-5``).

    Args:
      weights: the ``keras.layers.BatchNormalization`` layer itself (its
        variables are read by name, whatever its ``scale`` and ``center``),
        or ``layer.get_weights()``, the list ``[gamma, beta, moving_mean,
        moving_variance]`` (``gamma`` absent with ``scale=False``, ``beta``
        with ``center=False``; a 3-element list is ambiguous and needs a dict),
        or a dict by name, e.g. ``{v.name: v for v in layer.weights}``
        (names may carry a path: ``"bn/gamma"``).
      count: the ``count`` to record, an int in ``[0, 2**31 - 2]``.

    Returns:
      ``(params, batch_stats)`` as jax arrays.

    Raises:
      ValueError: for a missing moving statistic, renormalization weights
        (``renorm=True`` is not supported), a 3-element or too long list, or
        mismatched shapes.
      TypeError: for non-floating arrays or a bad count.

    Examples:
      >>> import numpy as np
      >>> from jaxbn import interop
      >>> w = [np.ones(2), np.zeros(2), np.array([0.5, 1.0]), np.array([2.0, 4.0])]
      >>> params, stats = interop.from_keras(w)
      >>> sorted(params), stats["mean"]
      (['bias', 'scale'], Array([0.5, 1. ], dtype=float32))
    """
    if _is_layer(weights):  # a BatchNormalization layer: its variables by name
        weights = {v.name: v for v in weights.weights}
    if isinstance(weights, Mapping):
        named = {str(k).rsplit("/", 1)[-1]: v for k, v in weights.items()}
        renorm = sorted(set(named) & set(_RENORM))
        if renorm:
            raise ValueError(
                f"weights hold {renorm}, the state of Keras's renorm=True, which "
                "jaxbn does not implement; convert a layer built with renorm=False."
            )
        unknown = sorted(set(named) - set(_NAMES))
        if unknown:
            raise ValueError(
                f"weights has unexpected names {unknown}; expected a subset of "
                f"{list(_NAMES)}."
            )
        for k in ("moving_mean", "moving_variance"):
            if k not in named:
                raise ValueError(
                    f"weights has no {k!r} (names: {sorted(named)}); pass all the "
                    "weights of one BatchNormalization layer."
                )
        values = [named.get(k) for k in _NAMES]
    elif isinstance(weights, Sequence) and not isinstance(weights, str):
        n = len(weights)
        if n == 4:
            values = list(weights)
        elif n == 2:
            values = [None, None, *weights]
        elif n == 3:
            raise ValueError(
                "weights is a list of 3 arrays, which is [gamma, moving_mean, "
                "moving_variance] or [beta, moving_mean, moving_variance] "
                "depending on the layer's scale and center; pass a dict by name "
                "instead: {v.name: v for v in layer.weights}."
            )
        else:
            raise ValueError(
                f"weights is a list of {n} arrays; a BatchNormalization layer "
                "without renorm has 2 to 4 ([gamma, beta, moving_mean, "
                "moving_variance], the affine ones optional)."
            )
    else:
        raise TypeError(
            "weights must be a keras BatchNormalization layer, "
            "layer.get_weights() (a list of arrays) or a dict by name, got "
            f"{type(weights).__name__}."
        )
    return jaxbn_variables(*values, count=count, names=_NAMES)


def to_keras(
    params: Mapping[str, Any], batch_stats: Mapping[str, Any], layer: Any = None
) -> list[np.ndarray]:
    """Keras 3 ``BatchNormalization`` weights, for ``layer.set_weights(...)``.

    The list is in ``layer.get_weights()`` order: ``gamma`` (if jaxbn has a
    ``scale``), ``beta`` (if it has a ``bias``), ``moving_mean``,
    ``moving_variance``; the Keras layer must be built with matching ``scale``
    and ``center``. jaxbn's ``count`` has no Keras counterpart and is dropped.

    Args:
      params: jaxbn's ``params`` of one layer.
      batch_stats: its ``batch_stats``.
      layer: optionally a built ``BatchNormalization`` layer to write them
        into (``layer.set_weights``).

    Returns:
      A list of NumPy arrays (also written into ``layer`` when given).

    Raises:
      ValueError: for missing statistics, unknown keys or mismatched shapes.

    Examples:
      >>> import jax.numpy as jnp
      >>> import jaxbn
      >>> from jaxbn import interop
      >>> params, stats = jaxbn.batch_norm(scale=False).init(jnp.zeros((4, 3)))
      >>> [w.tolist() for w in interop.to_keras(params, stats)]
      [[0.0, 0.0, 0.0], [0.0, 0.0, 0.0], [1.0, 1.0, 1.0]]
    """
    scale, bias, mean, var, _ = split_jaxbn(params, batch_stats)
    weights = [w for w in (scale, bias) if w is not None] + [mean, var]
    if layer is not None:
        if not _is_layer(layer):
            raise TypeError(
                f"layer must be a keras BatchNormalization layer, got "
                f"{type(layer).__name__}."
            )
        layer.set_weights(weights)
    return weights


def _is_layer(obj: Any) -> bool:
    """Whether obj is a Keras layer (duck typing: variables and set_weights)."""
    return (
        hasattr(obj, "get_weights")
        and hasattr(obj, "set_weights")
        and hasattr(obj, "weights")
    )


__all__ = ["from_keras", "to_keras"]
