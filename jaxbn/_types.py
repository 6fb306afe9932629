"""The types of the functional layer: ``Layer(init, apply)`` and its pieces."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, NamedTuple, NotRequired, Protocol, TypedDict

import jax
from jax.typing import ArrayLike

from ._config import BatchNormConfig

# A layer's learned parameters: ``{"scale", "bias"}``, each feature-shaped in
# ``param_dtype`` (a key is absent when the layer learns no such parameter).
Params = dict[str, jax.Array]


class BatchStats(TypedDict):
    """A layer's running statistics (a plain dict at run time).

    Attributes:
      mean: the running mean, feature-shaped (float32; float64 for float64 x;
        complex for complex x).
      var: the running (biased, unless ``running_var="unbiased"``) variance.
      count: the updates so far, an int32 scalar (the Flax adapters keep a
        float32 one; see :func:`jaxbn.batch_norm`).
      renorm_mean: renorm's moving mean (with ``renorm=True`` only).
      renorm_std: renorm's moving standard deviation (with ``renorm=True``).
    """

    mean: jax.Array
    var: jax.Array
    count: jax.Array
    renorm_mean: NotRequired[jax.Array]
    renorm_std: NotRequired[jax.Array]


# What ``apply`` takes: its own outputs, or any mapping of arrays (a restored
# checkpoint, ``dict(stats, mean=...)``), whose keys, shapes and dtypes are
# checked when traced.
ParamsLike = Mapping[str, Any]
BatchStatsLike = Mapping[str, Any]


class InitFn(Protocol):
    """``init(x, *, key=None) -> (params, batch_stats)``."""

    def __call__(
        self, x: Any, *, key: jax.Array | None = None
    ) -> tuple[Params, BatchStats]: ...


class ApplyFn(Protocol):
    """``apply(params, batch_stats, x, *, train, mask, weights, scale, offset)``.

    Returns ``(y, batch_stats)``; ``mask``, ``weights``, ``scale`` and
    ``offset`` default to None (see :func:`jaxbn.batch_norm`).
    """

    def __call__(
        self,
        params: ParamsLike,
        batch_stats: BatchStatsLike,
        x: jax.Array,
        *,
        train: bool | jax.Array,
        mask: ArrayLike | None = None,
        weights: ArrayLike | None = None,
        scale: ArrayLike | None = None,
        offset: ArrayLike | None = None,
    ) -> tuple[jax.Array, BatchStats]: ...


class Layer(NamedTuple):
    """A batch-norm layer as a pair of pure functions.

    Attributes:
      init: ``init(x, *, key=None) -> (params, batch_stats)``; reads only
        ``x.shape`` and ``x.dtype``.
      apply: ``apply(params, batch_stats, x, *, train, mask=None, weights=None,
        scale=None, offset=None) -> (y, batch_stats)``; always returns the
        (possibly unchanged) statistics.
    """

    init: InitFn
    apply: ApplyFn

    @property
    def config(self) -> BatchNormConfig:
        """The layer's checked options, a :class:`jaxbn.BatchNormConfig`.

        Raises:
          AttributeError: for a ``Layer`` not built by :func:`jaxbn.batch_norm`.
        """
        bound = getattr(self.apply, "args", ())
        if bound and isinstance(bound[0], BatchNormConfig):
            return bound[0]
        raise AttributeError(
            "this Layer was not built by jaxbn.batch_norm, so it has no config."
        )
