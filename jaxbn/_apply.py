"""A layer's ``init`` and ``apply`` as module-level functions of its configuration.

:func:`jaxbn.batch_norm` binds :func:`init` and :func:`apply` to a
:class:`BatchNormConfig`. ``apply`` checks the call's inputs (``_inputs``),
then runs the training step (``_training``, or ``_ghost`` for virtual batches)
or the evaluation (``_normalize``) and moves the running statistics
(``_running``). The adapters call :func:`run`, which is ``apply`` with their
own output dtype.
"""

from __future__ import annotations

from functools import partial
from typing import Any, NamedTuple, cast

import jax
import jax.numpy as jnp
from jax import lax
from jax.typing import ArrayLike

from . import _inputs as inputs
from ._config import BatchNormConfig, Geometry
from ._ghost import ghost_training
from ._normalize import RenormOperands, clip_bound, normalize
from ._running import update_running_stats
from ._statistics import devices_in_axis
from ._sums import Moments, real_dtype, sanitized, valid
from ._training import Running, StepOptions, batch_step, every_feature_has_values
from ._types import BatchStats, BatchStatsLike, Params, ParamsLike


def init(
    config: BatchNormConfig, x: Any, *, key: jax.Array | None = None
) -> tuple[Params, BatchStats]:
    """``Layer.init``: the initial ``(params, batch_stats)`` for x's shape and dtype."""
    feature_shape = config.geometry(x).feature_shape
    key = jax.random.key(0) if key is None else key
    scale_key, bias_key = jax.random.split(key)
    params: Params = {}
    if config.scale:
        made = config.scale_init(scale_key, feature_shape, config.param_dtype)
        params["scale"] = jnp.asarray(made, config.param_dtype)
    if config.center:
        made = config.bias_init(bias_key, feature_shape, config.param_dtype)
        params["bias"] = jnp.asarray(made, config.param_dtype)
    return params, initial_stats(config, feature_shape, x.dtype)


def initial_stats(
    config: BatchNormConfig, feature_shape: tuple[int, ...], x_dtype: Any
) -> BatchStats:
    """Fresh statistics: mean 0, var 1, count 0 (and renorm's, if any).

    Shaped ``feature_shape``, float32 (float64 for float64 x, a complex mean
    for complex x); count an int32 scalar.
    """
    mean_dtype, var_dtype = config.stats_dtypes(x_dtype)
    stats: BatchStats = {
        "mean": jnp.zeros(feature_shape, mean_dtype),  # shape=features
        "var": jnp.ones(feature_shape, var_dtype),  # shape=features
        "count": jnp.zeros((), jnp.int32),  # shape=(), int32: updates so far
    }
    if config.renorm:
        stats["renorm_mean"] = jnp.zeros_like(stats["mean"])
        stats["renorm_std"] = jnp.ones_like(stats["var"])
    return stats


class Operands(NamedTuple):
    """What both branches of a run-time ``train`` flag take (``lax.cond``).

    Attributes:
      x: the input.
      mask: the mask or weights of x's rank, or None.
      stats: the running statistics.
    """

    x: jax.Array
    mask: jax.Array | None
    stats: BatchStats


class Affine(NamedTuple):
    """The scale and bias of one ``apply``, with x's rank (either may be None).

    Attributes:
      scale: the learned scale, or the call-time ``scale``.
      bias: the learned bias, or the call-time ``offset``.
    """

    scale: jax.Array | None
    bias: jax.Array | None


def apply(
    config: BatchNormConfig,
    params: ParamsLike,
    batch_stats: BatchStatsLike,
    x: jax.Array,
    *,
    train: bool | jax.Array,
    mask: ArrayLike | None = None,
    weights: ArrayLike | None = None,
    scale: ArrayLike | None = None,
    offset: ArrayLike | None = None,
) -> tuple[jax.Array, BatchStats]:
    """``Layer.apply``: normalizes x; returns ``(y, batch_stats)``.

    See :func:`jaxbn.batch_norm` for the arguments, the maths and the errors.
    """
    return run(
        config,
        config.geometry(x),
        params,
        batch_stats,
        x,
        train=train,
        mask=mask,
        weights=weights,
        scale=scale,
        offset=offset,
        dtype=None,
    )


def run(
    config: BatchNormConfig,
    geo: Geometry,
    params: ParamsLike,
    batch_stats: BatchStatsLike,
    x: jax.Array,
    *,
    train: bool | jax.Array,
    mask: ArrayLike | None,
    weights: ArrayLike | None,
    scale: ArrayLike | None,
    offset: ArrayLike | None,
    dtype: Any,
    count_dtype: Any = jnp.int32,
) -> tuple[jax.Array, BatchStats]:
    """:func:`apply` with x's geometry and the output ``dtype`` given by the caller.

    ``geo`` is ``config.geometry(x)`` (which checks x), computed once per call
    by the caller. ``dtype=None`` is the configuration's, else x's. The
    adapters' entry point: they also give the dtype of their own ``count``
    (float32 for the Flax adapters), which the update then keeps, with no
    conversion to int32 and back in every call.
    """
    train = inputs.check_train(train)
    inputs.check_mapping(
        "params",
        params,
        config.params_spec(geo.feature_shape),
        geo.axes,
        config.axis,
        False,
    )
    spec = config.stats_spec(geo.feature_shape, x.dtype)
    spec["count"] = ((), (jnp.dtype(count_dtype),))
    inputs.check_mapping("batch_stats", batch_stats, spec, geo.axes, config.axis, True)
    params, batch_stats = cast(Params, params), cast(BatchStats, batch_stats)
    mask, affine = _call_inputs(config, geo, params, x, mask, weights, scale, offset)
    if dtype is None:
        dtype = x.dtype if config.dtype is None else config.dtype
    _check_batch(config, geo, x, train)
    plan = Plan(
        config, geo, jnp.dtype(dtype), train if isinstance(train, bool) else None
    )
    flag = None if isinstance(train, bool) else train
    y, stats = _compute(plan, Operands(x, mask, batch_stats), affine, flag)
    # Evaluation returns the very statistics it was given (not a copy).
    return y, batch_stats if train is False else stats


class Plan(NamedTuple):
    """What a checked call computes, known when tracing (hashable).

    Attributes:
      config: the layer's configuration.
      geo: where x's features are.
      dtype: the output dtype.
      train: the Python ``train`` flag, or None for a traced one.
    """

    config: BatchNormConfig
    geo: Geometry
    dtype: Any
    train: bool | None


@partial(jax.jit, static_argnums=0)
def _compute(
    plan: Plan, operands: Operands, affine: Affine, flag: jax.Array | None
) -> tuple[jax.Array, BatchStats]:
    """The checked call's computation, as one jitted function.

    Inside a user's ``jax.jit`` it is inlined; called eagerly (a notebook, a
    debugger) it is one dispatch of a cached compiled program per plan and
    shapes, rather than one per operation, with the transformations'
    bookkeeping (``jax.checkpoint``, ``custom_jvp``) done once when tracing.
    """
    config, geo, dtype, train = plan
    branches = (
        partial(_training, config, geo, affine, dtype),
        partial(_evaluate, config, geo, affine, dtype),
    )
    if train is not None:
        y, stats = branches[0](operands) if train else branches[1](operands)
    else:
        y, stats = lax.cond(flag, *branches, operands)
    mask = operands.mask
    if config.zero_masked and mask is not None:
        y = jnp.where(valid(mask), y, jnp.zeros((), y.dtype))
    return y, stats


def _call_inputs(
    config: BatchNormConfig,
    geo: Geometry,
    params: Params,
    x: jax.Array,
    mask: Any,
    weights: Any,
    scale: Any,
    offset: Any,
) -> tuple[jax.Array | None, Affine]:
    """Checks mask, weights, scale and offset; combines a mask with weights.

    Returns:
      The mask (boolean, or weights) of x's rank or None, and the ``Affine``.
    """
    shape = tuple(x.shape)
    if mask is not None:
        mask = inputs.check_mask(mask, shape)
    if weights is not None:
        w = inputs.check_weights(weights, shape, real_dtype(x.dtype))
        # A mask is the 0/1 case of weights: the two combine.
        mask = w if mask is None else jnp.where(mask, w, jnp.zeros((), w.dtype))
    learned_scale, learned_bias = params.get("scale"), params.get("bias")
    gamma = None if learned_scale is None else learned_scale.reshape(geo.kept)
    beta = None if learned_bias is None else learned_bias.reshape(geo.kept)
    if scale is not None:
        gamma = inputs.check_external("scale", scale, shape, config.scale)
    if offset is not None:
        beta = inputs.check_external("offset", offset, shape, config.center)
    return mask, Affine(gamma, beta)


def _check_batch(
    config: BatchNormConfig, geo: Geometry, x: jax.Array, train: bool | jax.Array
) -> None:
    """Ghost batches must divide the batch; a batch variance needs two values."""
    if config.virtual_batch_size is not None:
        inputs.check_ghost_groups(tuple(x.shape), geo.axes, config.virtual_batch_size)
    uses_batch = train is True or config.eval_uses_batch
    if uses_batch and not config.allow_one_value:
        devices = devices_in_axis(config.axis_name, config.axis_index_groups)
        if config.virtual_batch_size is not None:
            devices = 1  # each ghost batch is normalized on its own device
        inputs.check_enough_values(
            tuple(x.shape), geo.reduction_axes, devices, config.virtual_batch_size
        )


def _training(
    config: BatchNormConfig,
    geo: Geometry,
    affine: Affine,
    dtype: Any,
    operands: Operands,
) -> tuple[jax.Array, BatchStats]:
    """The training step on ``(x, mask, stats)``: the batch's statistics."""
    x, mask, stats = operands
    mean, var = stats["mean"].reshape(geo.kept), stats["var"].reshape(geo.kept)
    running = Running(mean, var, _renorm_operands(config, stats, geo.kept, x.dtype))
    options = StepOptions(
        geo.reduction_axes,
        config.epsilon,
        config.axis_name,
        config.axis_index_groups,
        dtype,
    )
    k = config.virtual_batch_size
    if k is None:
        step = batch_step(x, mask, *affine, running, options)
    else:
        step = ghost_training(k, x, mask, *affine, running, options)
    if config.freezes_running_stats:  # bitwise unchanged, count included
        return step.y, stats
    flat = Moments(*(a.reshape(geo.feature_shape) for a in step.moments))
    has_values = every_feature_has_values(x, mask, geo.reduction_axes)
    new = update_running_stats(
        stats, flat, config, step.finite, has_values, step.mean_is_finite
    )
    return step.y, new


def _evaluate(
    config: BatchNormConfig,
    geo: Geometry,
    affine: Affine,
    dtype: Any,
    operands: Operands,
) -> tuple[jax.Array, BatchStats]:
    """Evaluation on ``(x, mask, stats)``: the running statistics, unchanged."""
    x, mask, stats = operands
    if config.eval_uses_batch:  # normalize with the batch's statistics, no update
        return _training(config, geo, affine, dtype, operands)[0], stats
    mean, var = _running_for_evaluation(config, stats)
    mean, var = mean.reshape(geo.kept), var.reshape(geo.kept)
    x = sanitized(x, mask)
    y = normalize(x, mean, var, *affine, config.epsilon, dtype)
    return y, stats


def _running_for_evaluation(
    config: BatchNormConfig, stats: BatchStats
) -> tuple[jax.Array, jax.Array]:
    """The running mean and variance, debiased if the configuration says so.

    After ``c`` updates with a constant momentum ``m`` a running average
    started at ``v0`` is ``m**c * v0 + (1 - m) * sum(...)``: the average of
    the batches alone is ``(v - m**c * v0) / (1 - m**c)``. The mean starts at
    0, so it is divided; the variance starts at 1.
    """
    mean, var = stats["mean"], stats["var"]
    if config.debias is None:
        return mean, var
    assert config.momentum is not None
    count = stats["count"].astype(var.dtype)
    pull = jnp.asarray(config.momentum, var.dtype) ** count  # 1 while count is 0
    factor = jnp.where(count > 0, 1.0 - pull, jnp.ones_like(pull))
    mean = mean / factor.astype(mean.dtype)
    if config.debias == "mean_and_var":
        var = jnp.where(count > 0, (var - pull) / factor, var)
    return mean, var


def _renorm_operands(
    config: BatchNormConfig, stats: BatchStats, kept: tuple[int, ...], x_dtype: Any
) -> RenormOperands | None:
    """Renorm's operands shaped for x, or None without renorm."""
    options = config.renorm_options
    if options is None:
        return None
    inputs.check_real_for_renorm(x_dtype)
    assert "renorm_mean" in stats and "renorm_std" in stats  # checked by the spec
    return RenormOperands(
        stats["renorm_mean"].reshape(kept),
        stats["renorm_std"].reshape(kept),
        clip_bound("rmax", options.rmax, stats["count"].astype(jnp.int32)),
        clip_bound("dmax", options.dmax, stats["count"].astype(jnp.int32)),
    )
