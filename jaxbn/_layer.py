"""The functional batch-norm layer: ``jaxbn.batch_norm(...) -> Layer(init, apply)``.

``batch_norm`` checks its options once, into a :class:`BatchNormConfig`, and
binds the module-level ``init`` and ``apply`` of ``_apply`` to it. Its
docstring holds the maths, once.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial

from jax.typing import DTypeLike

from ._apply import apply, init
from ._config import (
    AxisName,
    BatchNormConfig,
    Clip,
    Debias,
    EvalMode,
    Initializer,
    RunningVar,
)
from ._types import Layer


def batch_norm(
    axis: int | Sequence[int] = BatchNormConfig.axis,
    *,
    momentum: float | None = BatchNormConfig.momentum,
    epsilon: float = BatchNormConfig.epsilon,
    center: bool = BatchNormConfig.center,
    scale: bool = BatchNormConfig.scale,
    warmup: bool | None = BatchNormConfig.warmup,
    allow_one_value: bool = BatchNormConfig.allow_one_value,
    axis_name: AxisName = BatchNormConfig.axis_name,
    axis_index_groups: Sequence[Sequence[int]] | None = None,
    dtype: DTypeLike | None = BatchNormConfig.dtype,
    param_dtype: DTypeLike = BatchNormConfig.param_dtype,
    scale_init: Initializer = BatchNormConfig.scale_init,
    bias_init: Initializer = BatchNormConfig.bias_init,
    running_var: RunningVar = BatchNormConfig.running_var,
    renorm: bool = BatchNormConfig.renorm,
    rmax: Clip | None = BatchNormConfig.rmax,
    dmax: Clip | None = BatchNormConfig.dmax,
    renorm_momentum: float | None = BatchNormConfig.renorm_momentum,
    virtual_batch_size: int | None = BatchNormConfig.virtual_batch_size,
    eval_mode: EvalMode = BatchNormConfig.eval_mode,
    zero_masked: bool = BatchNormConfig.zero_masked,
    debias: Debias | None = BatchNormConfig.debias,
) -> Layer:
    r"""Batch normalization (Ioffe & Szegedy, 2015) as pure ``init``/``apply``.

    For each feature (each index along ``axis``), training normalizes with the
    batch's statistics, reduced over every other axis (and over the devices of
    ``axis_name``), computed in float32 whatever x's dtype:

    .. math::

       \mu = \frac{1}{n}\sum_i x_i, \qquad
       \sigma^2 = \frac{1}{n}\sum_i (x_i - \mu)^2, \qquad
       y = (x - \mu)\,\frac{\gamma}{\sqrt{\sigma^2 + \epsilon}} + \beta .

    The variance is biased (divided by ``n``). It is computed from the sums of
    ``x - K`` and ``|x - K|**2`` around the running mean ``K`` (a shift that
    does not depend on the batch's order and that every device shares), redone
    around the batch mean when ``K`` is more than one standard deviation away
    (at most twice), so it is never negative, loses at most about one bit
    against an exact two-pass computation, and stays accurate when the mean is
    large. The statistics are float32 whatever x's dtype (float64 for float64
    x; for complex x the mean is complex and ``sigma^2 = E|x - mu|^2``). A
    feature with no valid value (all masked, empty batch) is normalized with
    the running statistics; an overflowing variance gives ``y = bias``. The
    training path supports every JAX transformation (``grad``, ``jvp``,
    ``hessian``, ``vmap``, ...): its derivatives are closed-form. Evaluation
    (``train=False``) uses the running statistics instead, in one elementwise
    pass with no reduction over the batch, and returns them unchanged.

    Each training update moves the running statistics ``s`` (mean and var)
    towards the batch's: ``s <- d * s + (1 - d) * batch_s`` and adds one to
    ``count``. With ``warmup=False`` the decay is ``d = momentum``; with
    ``warmup=True`` it is ``d = min(momentum, (1 + count) / (10 + count))``
    (TensorFlow's ``ExponentialMovingAverage(num_updates=...)``), so early
    running statistics follow the network as it learns instead of staying near
    their initial values: with ``momentum=0.999`` a plain running average still
    holds 90% of its initial value after 100 steps. ``momentum=None`` keeps the
    exact average of all the batches seen, ``d = count / (1 + count)``
    (PyTorch's ``momentum=None``), and ``momentum=1.0`` freezes the running
    statistics: training then normalizes with the batch's statistics and
    returns ``batch_stats`` unchanged (``train=False`` normalizes with the
    running statistics instead). A batch whose statistics are
    not finite, or whose entries are all masked, leaves the running statistics
    and ``count`` unchanged; the output still carries the NaN, so the loss shows
    it (skip such steps with ``optax.apply_if_finite``).

    Args:
      axis: the feature axis, or a tuple of them (negative counts from the end).
      momentum: decay of the running average, in ``[0, 1]``; ``1.0`` freezes
        the running statistics; None keeps their cumulative average.
      epsilon: added to the variance, ``> 0``.
      center: whether to learn a bias (``params["bias"]``).
      scale: whether to learn a scale (``params["scale"]``).
      warmup: whether the decay warms up as above; default (None): on, except
        for ``momentum=None`` or ``1.0``, with which it is an error.
      allow_one_value: whether training on one value per feature (a batch of
        one, or x with no batch axis) is allowed: it normalizes to the bias
        (variance 0), as ``flax.linen.BatchNorm`` does. By default it raises,
        since such "statistics" are almost always a mistake.
      axis_name: a named axis (or tuple) of ``jax.vmap``, ``jax.shard_map`` or
        ``jax.pmap`` over which to synchronize statistics. Sharded ``jax.jit``
        needs none: its statistics are already global.
      axis_index_groups: groups of indices of ``axis_name``, each with its own
        statistics.
      dtype: output dtype; default x's dtype.
      param_dtype: dtype of ``scale`` and ``bias``.
      scale_init: initializer ``(key, shape, dtype) -> Array`` of the scale.
      bias_init: initializer ``(key, shape, dtype) -> Array`` of the bias.
      running_var: ``"biased"`` (default) averages the batch variance used to
        normalize; ``"unbiased"`` averages ``n / (n - 1)`` times it, with n
        the number of values per feature (PyTorch's convention); the
        normalization uses the biased variance either way.
      renorm: batch renormalization (Ioffe, 2017): training normalizes to
        ``(x_hat * r + d) * scale + bias`` with ``r = clip(s_B / s, 1/rmax,
        rmax)`` and ``d = clip((mu_B - mu) / s, -dmax, dmax)``, where ``s_B =
        sqrt(var_B + epsilon)`` and ``mu, s`` are the renorm moving averages
        ``batch_stats["renorm_mean"]`` and ``["renorm_std"]``; r and d carry no
        gradient. Evaluation is unchanged (running mean and var).
      rmax: renorm's clip of r, ``>= 1`` (default 3.0), or a function of
        ``count`` (int32 updates so far) for a warm-up schedule.
      dmax: renorm's clip of d, ``>= 0`` (default 5.0), or a function of count.
      renorm_momentum: the constant decay of the renorm moving averages
        (default 0.99; no warm-up).
      virtual_batch_size: ghost batch norm (Hoffer et al., 2017): training
        splits axis 0 into groups of this many examples and normalizes each
        with its own statistics (per device under ``axis_name``); the running
        statistics receive the count-weighted merge of the groups (across
        devices too), i.e. the whole batch's. Evaluation is unchanged.
      eval_mode: ``"running"`` (default): evaluation normalizes with the
        running statistics; ``"batch"``: with the batch's statistics, as in
        training (mask, weights, ``axis_name``, ghost batches), and leaves
        ``batch_stats`` unchanged (Haiku's ``test_local_stats``, PyTorch's
        ``track_running_stats=False``); with ``renorm`` it applies r and d
        too: evaluation computes the training step's output.
      zero_masked: whether ``y`` is set to 0 where the mask is False (or the
        weight 0), in training and evaluation: zeroed padding.
      debias: evaluation undoes the pull of the initial statistics on a
        plain moving average: with ``p = momentum**count``, the mean becomes
        ``mean / (1 - p)`` (``"mean"``, TensorFlow's
        ``zero_debias_moving_mean``), and with ``"mean_and_var"`` the
        variance, which starts at 1, ``(var - p) / (1 - p)`` too: both are
        then the plain average of the batches seen (nothing changes while
        ``count`` is 0). Equinox's ``mode="batch"`` divides its variance by
        ``1 - p`` as well, which overstates it early on. Needs a momentum
        in ``[0, 1)`` and ``warmup=False``; the stored statistics stay the
        plain averages (``recalibrate`` and ``fold`` read those).

    Every option after ``axis`` is keyword-only. The options are checked once,
    into a frozen :class:`jaxbn.BatchNormConfig` (``layer.config``).

    Returns:
      A ``Layer(init, apply)``. ``init(x, *, key=None)`` returns ``(params,
      batch_stats)`` with ``params = {"scale", "bias"}`` (param_dtype, feature
      shape; a key is absent when disabled) and ``batch_stats = {"mean": zeros,
      "var": ones, "count": 0}`` (float32 feature shape, float64 for float64
      x, a complex mean for complex x; int32 scalar count, which counts
      exactly; with ``renorm`` also ``"renorm_mean"`` and ``"renorm_std"``;
      typed :class:`jaxbn.BatchStats`). ``jaxbn.linen`` and ``jaxbn.nnx``
      keep their count in float32 instead: Flax code differentiates and
      averages whole variable trees (``nnx.grad`` of a module, ``lax.pmean``
      of ``batch_stats``), which an integer leaf breaks; float32 counts
      exactly to ``2**24`` updates, past which the decay no longer changes.
      ``key``
      defaults to ``jax.random.key(0)`` and is used only by random initializers.
      ``apply(params, batch_stats, x, *, train, mask=None, weights=None,
      scale=None, offset=None)`` returns
      ``(y, batch_stats)``. ``train`` is a Python bool, or a scalar boolean array to
      choose the mode at run time with one compiled function (``lax.cond``: only the
      chosen branch runs). ``mask``, a boolean array broadcastable to x, restricts
      the statistics to its True entries; entries under False are normalized like
      the others, except that a non-finite one (NaN padding) is read as 0, so it
      reaches neither the statistics nor any gradient. In evaluation ``mask`` is
      checked and otherwise ignored. ``weights``, a real non-negative array
      broadcastable to x (TensorFlow's ``batch_weights``), makes the statistics
      weighted: ``mean = sum(w x) / sum(w)``, ``var = sum(w |x - mean|^2) /
      sum(w)``, and the count behind ``running_var="unbiased"`` is ``sum(w)``; a
      mask is the 0/1 case and the two combine (weights under False count 0). In
      evaluation weights are checked and ignored. ``scale`` and ``offset``,
      real arrays broadcastable to x (per feature, or per example for FiLM-style
      conditioning), replace the learned scale and bias of a layer built with
      ``scale=False`` / ``center=False`` (conditional batch norm, Haiku's and
      Sonnet's ``scale=``/``offset=``); gradients flow to them.

    Raises:
      TypeError: for an integer or boolean x; a non-floating dtype or
        param_dtype; a ``train`` that is not a bool or a scalar boolean array; a
        non-boolean mask; statistics of the wrong dtype (e.g. a real mean for
        complex x); non-floating weights, scale or offset; ``renorm`` with
        complex x.
      ValueError: for an axis out of range or repeated; momentum outside
        ``[0, 1]``; ``warmup=True`` with momentum None or 1.0; a non-positive
        epsilon; params or batch_stats with missing keys or wrong shapes; a mask
        that does not broadcast to x; weights that do not broadcast to x or are
        negative (when concrete); a call-time scale or offset that does not
        broadcast to x or that the layer also learns; an unknown ``eval_mode``
        or ``running_var``; ``rmax < 1``, ``dmax < 0``, or renorm options
        without ``renorm``; a ``virtual_batch_size`` that does not divide the
        batch; training (``train=True``) with one value per feature, counting
        the devices of ``axis_name`` (unless ``allow_one_value``).

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> import jaxbn
      >>> layer = jaxbn.batch_norm(momentum=0.9)
      >>> x = jnp.array([[1.0, 10.0], [3.0, 30.0]])
      >>> params, stats = layer.init(x)
      >>> y, stats = layer.apply(params, stats, x, train=True)
      >>> jnp.round(y, 4)  # (x - mean) / sqrt(var + 1e-5), rounded
      Array([[-1., -1.],
             [ 1.,  1.]], dtype=float32)
      >>> stats["mean"], stats["count"]  # first update: d = 1/10
      (Array([ 1.8, 18. ], dtype=float32), Array(1, dtype=int32))
      >>> y, same = layer.apply(params, stats, x, train=False)
      >>> same is stats
      True
      >>> layer.init(jax.ShapeDtypeStruct((8, 3), jnp.bfloat16))[1]["var"]
      Array([1., 1., 1.], dtype=float32)
    """
    config = BatchNormConfig(
        axis=axis,  # pyright: ignore[reportArgumentType]
        momentum=momentum,
        epsilon=epsilon,
        center=center,
        scale=scale,
        warmup=warmup,
        allow_one_value=allow_one_value,
        axis_name=axis_name,
        axis_index_groups=axis_index_groups,  # pyright: ignore[reportArgumentType]
        dtype=dtype,
        param_dtype=param_dtype,
        scale_init=scale_init,
        bias_init=bias_init,
        running_var=running_var,
        renorm=renorm,
        rmax=rmax,
        dmax=dmax,
        renorm_momentum=renorm_momentum,
        virtual_batch_size=virtual_batch_size,
        eval_mode=eval_mode,
        zero_masked=zero_masked,
        debias=debias,
    )
    return layer_of(config)


def layer_of(config: BatchNormConfig) -> Layer:
    """The ``Layer`` of a configuration: :func:`init` and :func:`apply` bound to it."""
    return Layer(init=partial(init, config), apply=partial(apply, config))
