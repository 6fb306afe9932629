"""``jaxbn.nnx.BatchNorm``: a drop-in for ``flax.nnx.BatchNorm``.

Replace ``nnx.BatchNorm`` with ``jaxbn.nnx.BatchNorm`` and keep the rest of the
model: the same constructor, ``model.train()`` / ``model.eval()``, ``nnx.jit``
and ``nnx.Optimizer``. The running statistics are ``nnx.BatchStat`` variables
``mean``, ``var`` and, with ``warmup=True``, jaxbn's ``count``. The maths is
:func:`jaxbn.batch_norm`'s; this module only owns the variables.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from types import MappingProxyType
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from flax.nnx.nn import dtypes, initializers

from . import _flax_compat as compat
from ._flax_compat import CONVERGED_COUNT as CONVERGED_COUNT

__all__ = ["CONVERGED_COUNT", "BatchNorm", "mark_converged"]

_ZEROS = initializers.zeros_init()
_ONES = initializers.ones_init()
_NO_MODE = (
    "No use_running_average was given to jaxbn.nnx.BatchNorm. Pass it to the "
    "constructor (use_running_average=False to train), at call time "
    "(bn(x, use_running_average=True)), or switch the whole model with "
    "model.train() / model.eval()."
)


class BatchNorm(nnx.Module):
    """Batch normalization with Flax NNX's interface and jaxbn's core.

    The arguments are those of ``flax.nnx.BatchNorm`` with the same defaults,
    plus ``warmup``; see :func:`jaxbn.batch_norm` for the maths. Differences
    from Flax:

    * ``warmup=True`` (default) warms the running-average decay up from 0.1 to
      ``momentum`` over the first updates, counted by the ``count``
      ``nnx.BatchStat`` (a float32 scalar, exact up to ``2**24`` updates, so
      that ``nnx.grad`` of a whole module works). ``warmup=False`` updates
      exactly like Flax and has exactly Flax's variables (no ``count``).
    * Statistics are computed from x in float32 (or wider, for float64 or
      complex x), shifted by the running mean and re-centred when it is far
      from the batch mean, whatever ``dtype``: ``use_fast_variance``
      is accepted and ignored, and ``promote_dtype`` only decides the output
      dtype (by default the promotion of x, the statistics and the params, as
      in Flax).
    * ``use_running_average`` may also be a scalar boolean array, choosing the
      mode at run time in one compiled function.

    As in Flax, a single value per feature (a batch of one, or one example
    under ``nnx.vmap`` without ``axis_name``) normalizes to the bias in
    training, integer x is promoted to float and complex x is supported.

    Args:
      num_features: the number of features (for several feature axes, their
        product).
      use_running_average: True normalizes with the stored statistics
        (evaluation), False with the batch's, updating them (training); set by
        ``model.eval()`` / ``model.train()``, overridden at call time.
      axis: the feature axis, or a tuple of them.
      momentum: decay of the running average, in ``[0, 1]``, or None.
      epsilon: added to the variance.
      dtype: output dtype; default from ``promote_dtype``.
      param_dtype: dtype of scale and bias.
      use_bias: whether to learn a bias.
      use_scale: whether to learn a scale.
      bias_init: initializer of the bias.
      scale_init: initializer of the scale.
      axis_name: named axis of ``shard_map``/``pmap``/``vmap`` over which to
        synchronize statistics.
      axis_index_groups: groups of ``axis_name`` indices with separate statistics.
      use_fast_variance: accepted for compatibility; jaxbn's variance is always
        the stable two-pass one.
      promote_dtype: Flax's dtype promotion ``(args, dtype=...) -> args`` of
        ``(x, mean, var, scale, bias)``; its dtype for x is the output dtype.
      rngs: the ``nnx.Rngs`` whose ``params`` stream initializes scale and bias.
      bias_metadata: metadata of the bias ``nnx.Param``.
      scale_metadata: metadata of the scale ``nnx.Param``.
      warmup: whether the running-average decay warms up; the default
        None means on, except with ``momentum=None`` or ``1.0`` (as in
        :func:`jaxbn.batch_norm`).
      running_var, renorm, rmax, dmax, renorm_momentum, virtual_batch_size,
        eval_mode, zero_masked: the core's training-time variants, see
        :func:`jaxbn.batch_norm` (renorm adds the ``renorm_mean`` and
        ``renorm_std`` batch statistics; ``momentum=None`` and renorm keep a
        ``count`` even with ``warmup=False``).

    Raises:
      ValueError, TypeError: for invalid hyperparameters, when constructed (see
        :func:`jaxbn.batch_norm`).

    Examples:
      >>> import jax.numpy as jnp
      >>> from flax import nnx
      >>> import jaxbn.nnx
      >>> bn = jaxbn.nnx.BatchNorm(2, momentum=0.9, rngs=nnx.Rngs(0))
      >>> x = jnp.array([[1.0, 10.0], [3.0, 30.0]])
      >>> jnp.round(bn(x), 4)
      Array([[-1., -1.],
             [ 1.,  1.]], dtype=float32)
      >>> bn.mean[...], bn.count[...]
      (Array([ 1.8, 18. ], dtype=float32), Array(1., dtype=float32))
      >>> bn.eval()
      >>> y = bn(x)
      >>> bn.count[...]  # evaluation leaves the statistics alone
      Array(1., dtype=float32)
    """

    def __init__(
        self,
        num_features: int,
        *,
        use_running_average: bool | None = False,
        axis: int | Sequence[int] = -1,
        momentum: float | None = 0.99,
        epsilon: float = 1e-5,
        dtype: Any = None,
        param_dtype: Any = jnp.float32,
        use_bias: bool = True,
        use_scale: bool = True,
        bias_init: Any = _ZEROS,
        scale_init: Any = _ONES,
        axis_name: Any = None,
        axis_index_groups: Any = None,
        use_fast_variance: bool = True,
        promote_dtype: Any = dtypes.promote_dtype,
        rngs: nnx.Rngs,
        bias_metadata: Mapping[str, Any] = MappingProxyType({}),
        scale_metadata: Mapping[str, Any] = MappingProxyType({}),
        warmup: bool | None = None,
        running_var: str = "biased",
        renorm: bool = False,
        rmax: Any = None,
        dmax: Any = None,
        renorm_momentum: float | None = None,
        virtual_batch_size: int | None = None,
        eval_mode: str = "running",
        zero_masked: bool = False,
    ):
        feature_shape = (num_features,)
        stats = compat.initial_stats(feature_shape)
        self.mean = nnx.BatchStat(stats["mean"])  # shape=(num_features,), f32
        self.var = nnx.BatchStat(stats["var"])  # shape=(num_features,), f32
        self.count: nnx.BatchStat[jax.Array]  # only with warmup=True (or below)
        self.keeps_count = compat.keeps_count(warmup, momentum, renorm)
        if self.keeps_count:  # with warmup=False the variables are Flax's
            # shape=(), float32: updates so far (float, so grad never sees an int)
            self.count = nnx.BatchStat(jnp.zeros((), compat.COUNT_DTYPE))

        self.scale: nnx.Param[jax.Array] | None
        if use_scale:
            key = rngs.params()
            self.scale = nnx.Param(
                scale_init(key, feature_shape, param_dtype), **scale_metadata
            )
        else:
            self.scale = nnx.data(None)
        self.bias: nnx.Param[jax.Array] | None
        if use_bias:
            key = rngs.params()
            self.bias = nnx.Param(
                bias_init(key, feature_shape, param_dtype), **bias_metadata
            )
        else:
            self.bias = nnx.data(None)

        self.num_features = num_features
        self.use_running_average = use_running_average
        self.axis = axis
        self.momentum = momentum
        self.epsilon = epsilon
        self.dtype = dtype
        self.param_dtype = param_dtype
        self.use_bias = use_bias
        self.use_scale = use_scale
        self.axis_name = axis_name
        self.axis_index_groups = axis_index_groups
        self.use_fast_variance = use_fast_variance
        self.promote_dtype = promote_dtype
        self.warmup = warmup
        self.running_var, self.eval_mode = running_var, eval_mode
        self.renorm, self.rmax, self.dmax = renorm, rmax, dmax
        self.renorm_momentum = renorm_momentum
        self.virtual_batch_size, self.zero_masked = virtual_batch_size, zero_masked
        self.renorm_mean: nnx.BatchStat[jax.Array]  # only with renorm=True
        self.renorm_std: nnx.BatchStat[jax.Array]
        if renorm:  # shape=(num_features,), f32: renorm's moving averages
            self.renorm_mean = nnx.BatchStat(stats["mean"])
            self.renorm_std = nnx.BatchStat(stats["var"])
        compat.core_layer(self, dtype)  # checks the hyperparameters now

    def __call__(
        self,
        x: jax.Array,
        use_running_average: bool | jax.Array | None = None,
        *,
        mask: jax.Array | None = None,
        weights: jax.Array | None = None,
        scale: jax.Array | None = None,
        offset: jax.Array | None = None,
    ) -> jax.Array:
        """Normalizes ``x``, updating the statistics in training.

        Args:
          x: the input: a floating or complex array (integers are promoted to
            float, as in Flax), with or without batch axes.
          use_running_average: overrides the attribute for this call.
          mask: optional boolean array broadcastable to x (NumPy's rules); the
            statistics use only its True entries.
          weights: optional per-example weights broadcastable to x (see
            :func:`jaxbn.batch_norm`).
          scale: optional call-time scale (with ``use_scale=False``).
          offset: optional call-time offset (with ``use_bias=False``).

        Returns:
          The normalized x.

        Raises:
          ValueError: if x's features do not number ``num_features``; if no
            mode is set; for the core's errors (see :func:`jaxbn.batch_norm`).
          TypeError: for the core's type errors (e.g. a non-boolean mask).
        """
        if use_running_average is None:
            use_running_average = self.use_running_average
        if use_running_average is None:
            raise ValueError(_NO_MODE)
        train = compat.train_flag(use_running_average)
        x = compat.as_inexact(x)
        features = compat.feature_shape(x, self.axis)
        if math.prod(features) != self.num_features:
            raise ValueError(
                f"x of shape {tuple(x.shape)} has {math.prod(features)} features "
                f"along axis {self.axis!r} but this BatchNorm was built with "
                f"num_features={self.num_features}; build it with "
                f"num_features={math.prod(features)} or check axis."
            )
        learned_scale = None if self.scale is None else self.scale[...]
        bias = None if self.bias is None else self.bias[...]
        params = {}
        if learned_scale is not None:
            params["scale"] = learned_scale.reshape(features)
        if bias is not None:
            params["bias"] = bias.reshape(features)
        stats = compat.core_stats(
            self.mean[...].reshape(features),
            self.var[...].reshape(features),
            self.count[...] if self.keeps_count else 0,
            x.dtype,
        )
        if self.renorm:
            stats["renorm_mean"] = self.renorm_mean[...].reshape(features)
            stats["renorm_std"] = self.renorm_std[...].reshape(features)

        def output_dtype(args: tuple) -> jax.Array:  # Flax's promotion
            x, _, _, scale, bias = self.promote_dtype(args, dtype=self.dtype)
            dtype = dtypes.canonicalize_dtype(x, scale, bias, dtype=self.dtype)
            return jnp.zeros((), dtype)

        out_dtype = jax.eval_shape(
            output_dtype, (x, stats["mean"], stats["var"], learned_scale, bias)
        ).dtype
        layer = compat.core_layer(self, out_dtype)
        y, stats = layer.apply(
            params,
            stats,
            x,
            train=train,
            mask=mask,
            weights=weights,
            scale=scale,
            offset=offset,
        )
        y = compat.cast_output(y, out_dtype)
        if train is not False:
            _store(self.mean, stats["mean"])
            _store(self.var, stats["var"])
            if self.renorm:
                _store(self.renorm_mean, stats["renorm_mean"])
                _store(self.renorm_std, stats["renorm_std"])
            if self.keeps_count:
                self.count[...] = compat.stored_count(stats["count"])
        return y

    def set_view(self, use_running_average: bool | None = None) -> None:
        """Sets the mode for ``nnx.view`` (like ``flax.nnx.BatchNorm``).

        Args:
          use_running_average: the new mode; None keeps the current one.
        """
        if use_running_average is not None:
            self.use_running_average = use_running_average


def _store(variable: nnx.BatchStat, value: jax.Array) -> None:
    """Writes running statistics into ``variable`` in its dtype and shape.

    A complex mean (complex x) replaces a real one, as in Flax Linen: writing
    it into the float32 array would drop its imaginary part.
    """
    value = value.reshape(variable.shape)
    if jnp.iscomplexobj(value) and not jnp.iscomplexobj(variable[...]):
        variable.set_value(value)
    else:
        variable[...] = value.astype(variable.dtype)


def mark_converged(module: nnx.Module, count: int = CONVERGED_COUNT) -> None:
    """Marks the statistics of every ``jaxbn.nnx.BatchNorm`` in ``module`` converged.

    Only layers with ``warmup=True`` have a ``count``; the others are left alone.

    Use it after loading statistics trained with ``flax.nnx.BatchNorm`` (which
    have no ``count``) into a model built with jaxbn, e.g. with
    ``nnx.update(model, flax_state)``: it sets every ``count`` to
    :data:`CONVERGED_COUNT` (``2**30``), so warm-up is over and the decay is
    ``momentum`` from the first step, as in Flax, and fine-tuning does not
    overwrite pretrained statistics with the first batch's.

    Args:
      module: the model, changed in place.
      count: the count to set, an int in ``[0, 2**31 - 2]``.

    Raises:
      TypeError, ValueError: if ``count`` is not such an int.

    Examples:
      >>> from flax import nnx
      >>> import jaxbn.nnx
      >>> bn = jaxbn.nnx.BatchNorm(3, rngs=nnx.Rngs(0))
      >>> jaxbn.nnx.mark_converged(bn)
      >>> bn.count[...]
      Array(1.0737418e+09, dtype=float32)
    """
    count = compat.check_count(count)
    for _, child in nnx.iter_modules(module):
        if isinstance(child, BatchNorm) and child.keeps_count:
            child.count[...] = jnp.asarray(count, compat.COUNT_DTYPE)
