"""Moving batch-norm weights between jaxbn and other frameworks.

Each ``from_X`` returns jaxbn's ``(params, batch_stats)`` for one layer and each
``to_X`` writes them back in X's layout. The converters take what a user has at
hand: the layer or module itself (a PyTorch module, a Keras layer, an Equinox
or NNX module) or its arrays (a ``state_dict``, ``layer.get_weights()``, linen
and Haiku dicts), read through duck typing, so none of these frameworks is
needed to import this module.

===============  ==========================================  =====================
framework        from                                        to
===============  ==========================================  =====================
PyTorch          ``from_torch(module, prefix=)``             ``to_torch`` (dict)
Keras 3          ``from_keras(layer)``                       ``to_keras(layer=)``
Haiku            ``from_haiku(params, state, name=)``        ``to_haiku``
Equinox          ``from_equinox(module, state)``             ``to_equinox``
Flax linen/NNX   ``from_flax(variables or module)``          ``to_flax``
TensorFlow       ``from_tensorflow(checkpoint, scope=)``,    —
                 ``from_tensorflow_model(checkpoint)``
===============  ==========================================  =====================

The other frameworks keep no update count, so ``from_X`` sets ``count`` to
:data:`CONVERGED_COUNT` (``2**30``) unless told otherwise: the statistics are
taken as converged and jaxbn's warm-up is over, so fine-tuning continues with
the plain decay ``momentum`` as the source framework would (``count=0``
restarts the warm-up, replacing the statistics with those of the first
batches). Momentum is the decay everywhere except in PyTorch, whose momentum is
``1 - decay``: see :func:`torch_momentum` and :func:`momentum_from_torch`
(PyTorch's ``momentum=None``, the cumulative average, is jaxbn's too).

One module per framework (``_torch``, ``_keras``, ``_haiku``, ``_equinox``,
``_flax``, ``_tensorflow`` with its variable names in ``_tensorflow_names``),
the shared reading and checks in ``_common``, where each framework whose layout
is a renaming of keys is a row of ``LAYOUTS``.

Examples:
  >>> import numpy as np, jax.numpy as jnp
  >>> import jaxbn
  >>> from jaxbn import interop
  >>> sd = {"weight": np.ones(3), "bias": np.zeros(3),
  ...       "running_mean": np.zeros(3), "running_var": np.full(3, 4.0)}
  >>> params, stats = interop.from_torch(sd)
  >>> layer = jaxbn.batch_norm(axis=1, momentum=interop.momentum_from_torch(0.1))
  >>> y, _ = layer.apply(params, stats, jnp.full((2, 3), 2.0), train=False)
  >>> jnp.round(y, 4)
  Array([[1., 1., 1.],
         [1., 1., 1.]], dtype=float32)
"""

from ._common import CONVERGED_COUNT as CONVERGED_COUNT
from ._equinox import from_equinox as from_equinox
from ._equinox import to_equinox as to_equinox
from ._flax import from_flax as from_flax
from ._flax import to_flax as to_flax
from ._haiku import from_haiku as from_haiku
from ._haiku import to_haiku as to_haiku
from ._keras import from_keras as from_keras
from ._keras import to_keras as to_keras
from ._tensorflow import from_tensorflow as from_tensorflow
from ._tensorflow import from_tensorflow_model as from_tensorflow_model
from ._torch import from_torch as from_torch
from ._torch import momentum_from_torch as momentum_from_torch
from ._torch import to_torch as to_torch
from ._torch import torch_momentum as torch_momentum

__all__ = [
    "CONVERGED_COUNT",
    "from_equinox",
    "from_flax",
    "from_haiku",
    "from_keras",
    "from_tensorflow",
    "from_tensorflow_model",
    "from_torch",
    "momentum_from_torch",
    "to_equinox",
    "to_flax",
    "to_haiku",
    "to_keras",
    "to_torch",
    "torch_momentum",
]
