"""``jaxbn.nnx.BatchNorm``: a drop-in for ``flax.nnx.BatchNorm``.

Replace ``nnx.BatchNorm`` with ``jaxbn.nnx.BatchNorm`` and keep the rest of the
model: the same constructor, ``model.train()`` / ``model.eval()``, ``nnx.jit``
and ``nnx.Optimizer``. The running statistics are ``nnx.BatchStat`` variables
``mean``, ``var`` and, when the layer keeps one (with warm-up, on by
default), jaxbn's ``count``. The maths is
:func:`jaxbn.batch_norm`'s; this module only owns the variables.

``jaxbn.nnx.mark_converged`` is :func:`jaxbn.mark_converged` (the same
function, kept under this name for existing code): call it after loading
statistics trained by ``flax.nnx.BatchNorm``.
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

from . import _pipeline as pipeline
from ._config import BatchNormConfig, Clip, Debias, EvalMode, Geometry, RunningVar
from ._converged import CONVERGED_COUNT as CONVERGED_COUNT
from ._converged import COUNT_DTYPE
from ._converged import mark_converged as mark_converged
from ._types import Params

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

    * Warm-up (the default ``warmup=None`` turns it on, except with
      ``momentum=None`` or ``1.0``) raises the running-average decay from 0.1
      to ``momentum`` over the first updates, counted by the ``count``
      ``nnx.BatchStat`` (a float32 scalar, exact up to ``2**24`` updates, so
      that ``nnx.grad`` of a whole module works). ``warmup=False`` updates
      exactly like Flax and has exactly Flax's variables (no ``count``, unless
      ``momentum=None``, renorm or ``debias`` needs one).
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
        the stable one, from sums around the running mean (never
        ``E[x**2] - E[x]**2``).
      promote_dtype: Flax's dtype promotion ``(args, dtype=...) -> args`` of
        ``(x, mean, var, scale, bias)``; its dtype for x is the output dtype.
      rngs: the ``nnx.Rngs`` whose ``params`` stream initializes scale and bias.
      bias_metadata: metadata of the bias ``nnx.Param``.
      scale_metadata: metadata of the scale ``nnx.Param``.
      warmup: whether the running-average decay warms up; the default
        None means on, except with ``momentum=None`` or ``1.0`` (as in
        :func:`jaxbn.batch_norm`).
      running_var, renorm, rmax, dmax, renorm_momentum, virtual_batch_size,
        eval_mode, zero_masked, debias: the core's training-time variants, see
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

    mean: nnx.BatchStat[jax.Array]
    var: nnx.BatchStat[jax.Array]
    count: nnx.BatchStat[jax.Array]  # only when the configuration keeps one
    renorm_mean: nnx.BatchStat[jax.Array]  # only with renorm=True
    renorm_std: nnx.BatchStat[jax.Array]
    scale: nnx.Param[jax.Array] | None
    bias: nnx.Param[jax.Array] | None

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
        warmup: bool | None = BatchNormConfig.warmup,
        running_var: RunningVar = BatchNormConfig.running_var,
        renorm: bool = BatchNormConfig.renorm,
        rmax: Clip | None = BatchNormConfig.rmax,
        dmax: Clip | None = BatchNormConfig.dmax,
        renorm_momentum: float | None = BatchNormConfig.renorm_momentum,
        virtual_batch_size: int | None = BatchNormConfig.virtual_batch_size,
        eval_mode: EvalMode = BatchNormConfig.eval_mode,
        zero_masked: bool = BatchNormConfig.zero_masked,
        debias: Debias | None = BatchNormConfig.debias,
    ):
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
        # Checks the hyperparameters now, once; the variants live in the config.
        self.config: BatchNormConfig = pipeline.adapter_config(
            axis=axis,
            momentum=momentum,
            epsilon=epsilon,
            center=use_bias,
            scale=use_scale,
            warmup=warmup,
            axis_name=axis_name,
            axis_index_groups=axis_index_groups,
            param_dtype=param_dtype,
            variants={
                "running_var": running_var,
                "renorm": renorm,
                "rmax": rmax,
                "dmax": dmax,
                "renorm_momentum": renorm_momentum,
                "virtual_batch_size": virtual_batch_size,
                "eval_mode": eval_mode,
                "zero_masked": zero_masked,
                "debias": debias,
            },
        )
        self.keeps_count = self.config.keeps_count
        _make_variables(
            self, rngs, scale_init, bias_init, scale_metadata, bias_metadata
        )

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
        train = pipeline.train_flag(use_running_average)
        x = pipeline.as_inexact(x)
        geo = self.config.geometry(x)  # checks x; once per call
        _check_features(self, geo, x)
        params: Params = {}
        if self.scale is not None:
            params["scale"] = self.scale[...]
        if self.bias is not None:
            params["bias"] = self.bias[...]
        stats = _current_stats(self)
        out_dtype = _output_dtype(self, x, stats, params)
        call = pipeline.CallArgs(mask, weights, scale, offset)
        y, new = pipeline.call_core(
            self.config, geo, x, train, params, stats, call, out_dtype
        )
        if train is not False:
            _write_back(self, new)
        return y

    def set_view(self, use_running_average: bool | None = None) -> None:
        """Sets the mode for ``nnx.view`` (like ``flax.nnx.BatchNorm``).

        Args:
          use_running_average: the new mode; None keeps the current one.
        """
        if use_running_average is not None:
            self.use_running_average = use_running_average


def _make_variables(
    module: BatchNorm,
    rngs: nnx.Rngs,
    scale_init: Any,
    bias_init: Any,
    scale_metadata: Mapping[str, Any],
    bias_metadata: Mapping[str, Any],
) -> None:
    """Creates the module's ``nnx.BatchStat`` and ``nnx.Param`` variables."""
    features, f32 = (module.num_features,), jnp.float32
    module.mean = nnx.BatchStat(jnp.zeros(features, f32))  # shape=(features,)
    module.var = nnx.BatchStat(jnp.ones(features, f32))  # shape=(features,)
    if module.keeps_count:  # without it the variables are Flax's
        # shape=(), float32: updates so far (float, so grad never sees an int)
        module.count = nnx.BatchStat(jnp.zeros((), COUNT_DTYPE))
    if module.config.renorm:  # shape=(features,), f32: renorm's moving averages
        module.renorm_mean = nnx.BatchStat(jnp.zeros(features, f32))
        module.renorm_std = nnx.BatchStat(jnp.ones(features, f32))
    module.scale = nnx.data(None)
    if module.use_scale:
        made = scale_init(rngs.params(), features, module.param_dtype)
        module.scale = nnx.Param(made, **scale_metadata)
    module.bias = nnx.data(None)
    if module.use_bias:
        made = bias_init(rngs.params(), features, module.param_dtype)
        module.bias = nnx.Param(made, **bias_metadata)


def _check_features(module: BatchNorm, geo: Geometry, x: jax.Array) -> None:
    """Checks that x has ``num_features`` features along the module's axis."""
    features = geo.feature_shape
    if math.prod(features) != module.num_features:
        raise ValueError(
            f"x of shape {tuple(x.shape)} has {math.prod(features)} features "
            f"along axis {module.axis!r} but this BatchNorm was built with "
            f"num_features={module.num_features}; build it with "
            f"num_features={math.prod(features)} or check axis."
        )


def _current_stats(module: BatchNorm) -> pipeline.AdapterStats:
    """The module's running statistics (count 0 where it keeps none)."""
    return pipeline.AdapterStats(
        module.mean[...],
        module.var[...],
        module.count[...] if module.keeps_count else 0,
        module.renorm_mean[...] if module.config.renorm else None,
        module.renorm_std[...] if module.config.renorm else None,
    )


def _write_back(module: BatchNorm, new: pipeline.AdapterStats) -> None:
    """Stores the statistics of a training step in the module's variables."""
    for name in ("mean", "var", "renorm_mean", "renorm_std"):
        if getattr(new, name) is not None:
            _store(getattr(module, name), getattr(new, name))
    if module.keeps_count:
        module.count[...] = new.count


def _output_dtype(
    module: BatchNorm, x: jax.Array, stats: pipeline.AdapterStats, params: Params
) -> Any:
    """Flax's promotion of ``(x, mean, var, scale, bias)``: the output dtype.

    With Flax's own ``promote_dtype`` (the default) that is ``module.dtype``,
    or the standard promotion of the five dtypes, computed from the dtypes
    alone; a custom ``promote_dtype`` is traced (``jax.eval_shape``) to see
    what it gives, which costs an eager call about 2 ms.
    """
    args = (x, stats.mean, stats.var, params.get("scale"), params.get("bias"))
    if module.promote_dtype is dtypes.promote_dtype:
        if module.dtype is not None:
            return jnp.dtype(module.dtype)
        return pipeline.promoted_dtype(*(a for a in args if a is not None))

    def promoted(args: tuple) -> jax.Array:
        x, _, _, scale, bias = module.promote_dtype(args, dtype=module.dtype)
        dtype = dtypes.canonicalize_dtype(x, scale, bias, dtype=module.dtype)
        return jnp.zeros((), dtype)

    # Flax's promote_dtype under the standard rule, also when the caller runs
    # under jax.numpy_dtype_promotion("strict") (see pipeline.promoted_dtype).
    with jax.numpy_dtype_promotion("standard"):
        return jax.eval_shape(promoted, args).dtype


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
