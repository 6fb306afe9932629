"""The types of the functional layer: ``Layer(init, apply)`` and its pieces."""

from __future__ import annotations

from typing import Any, NamedTuple, Protocol

import jax
from jax.typing import ArrayLike

from ._config import BatchNormConfig

Params = dict[str, jax.Array]
BatchStats = dict[str, jax.Array]


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
        params: Params,
        batch_stats: BatchStats,
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
