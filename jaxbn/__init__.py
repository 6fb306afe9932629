"""jaxbn: batch normalization for JAX and Flax that cannot be used wrongly.

The functional core is :func:`jaxbn.batch_norm`, a factory returning a
``Layer(init, apply)`` of pure functions whose ``apply`` always returns the output
together with the updated ``batch_stats``; its options are checked once, into a
:class:`jaxbn.BatchNormConfig` (``layer.config``).

Public modules:

* ``jaxbn``: the core (``batch_norm``, ``batch_moments``, ``decay``), the
  tools on trained statistics (``describe``, ``reset_stats``,
  ``mark_converged``, ``recalibrate``, ``fold``, ``fold_kernel``) and the
  types that public functions return.
* ``jaxbn.linen``: ``BatchNorm``, a drop-in for ``flax.linen.BatchNorm``.
* ``jaxbn.nnx``: ``BatchNorm``, a drop-in for ``flax.nnx.BatchNorm``.
* ``jaxbn.equinox``: ``BatchNorm``, a drop-in for ``equinox.nn.BatchNorm``
  (needs equinox).
* ``jaxbn.interop``: converters of one layer's variables from and to PyTorch,
  Keras, Haiku, Equinox, Flax and TensorFlow.
"""

from ._config import BatchNormConfig as BatchNormConfig
from ._config import Geometry as Geometry
from ._converged import mark_converged as mark_converged
from ._describe import StatsReport as StatsReport
from ._describe import describe as describe
from ._describe import reset_stats as reset_stats
from ._fold import fold as fold
from ._fold import fold_kernel as fold_kernel
from ._hyperparams import RenormOptions as RenormOptions
from ._layer import batch_norm as batch_norm
from ._recalibrate import recalibrate as recalibrate
from ._running import decay as decay
from ._statistics import batch_moments as batch_moments
from ._sums import Moments as Moments
from ._types import ApplyFn as ApplyFn
from ._types import BatchStats as BatchStats
from ._types import InitFn as InitFn
from ._types import Layer as Layer
from ._types import Params as Params

__version__ = "0.2.0"

__all__ = [
    "ApplyFn",
    "BatchNormConfig",
    "BatchStats",
    "Geometry",
    "InitFn",
    "Layer",
    "Moments",
    "Params",
    "RenormOptions",
    "StatsReport",
    "batch_moments",
    "batch_norm",
    "decay",
    "describe",
    "fold",
    "fold_kernel",
    "mark_converged",
    "recalibrate",
    "reset_stats",
]
