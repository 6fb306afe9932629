"""``jaxbn.equinox.BatchNorm``: a drop-in for ``equinox.nn.BatchNorm``.

Replace ``eqx.nn.BatchNorm`` with ``jaxbn.equinox.BatchNorm`` and keep the rest
of the model: the same constructor, ``eqx.nn.make_with_state``, the
``eqx.nn.State`` threaded through calls, ``eqx.nn.inference_mode`` and
``eqx.nn.Sequential``. The maths is :func:`jaxbn.batch_norm`'s (with warm-up);
this module only owns the Equinox state. Requires ``equinox``.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from typing import Any, Literal

import jax
import jax.numpy as jnp
from jax import lax

try:
    import equinox as eqx
except ImportError as e:  # pragma: no cover - depends on the environment
    raise ImportError(
        "jaxbn.equinox needs equinox: pip install equinox (or jaxbn[interop])."
    ) from e

from jax.typing import DTypeLike

from . import _pipeline as pipeline
from ._apply import initial_stats
from ._config import BatchNormConfig, Clip, Debias, EvalMode, Geometry, RunningVar
from ._hyperparams import check_float_dtype
from ._inputs import check_x
from ._normalize import normalize
from ._statistics import batch_moments
from ._types import Params

__all__ = ["BatchNorm"]


class BatchNorm(eqx.nn.StatefulLayer):
    """Batch normalization with Equinox's interface and jaxbn's core.

    The layout follows ``axis_name``:

    * ``axis_name`` given (Equinox's way): ``x`` is one example of shape
      ``(input_size, *spatial)`` and the layer is called under
      ``jax.vmap(..., axis_name=axis_name)`` (or ``pmap``/``shard_map``), with
      statistics over the spatial axes and the named axis, exactly as Equinox.
    * ``axis_name=None`` (the default, which Equinox lacks): ``x`` is a whole
      batch of shape ``(batch, input_size, *spatial)``, with statistics over
      every axis but axis 1; no ``vmap`` is needed. Under a sharded ``jax.jit``
      the statistics are still global.

    Training normalizes with the batch's mean and biased variance and updates
    the running statistics; inference normalizes with them. Which running
    statistics depends on ``mode``:

    * ``mode`` not given: jaxbn's warm-up of the decay (see
      :func:`jaxbn.batch_norm`; ``warmup=False`` gives a plain moving average).
      Note that Equinox's own default when ``mode`` is not given is its legacy
      ``"ema"``; jaxbn's is this.
    * ``mode="batch"``: Equinox's ``mode="batch"``: a plain moving average
      (``warmup=False``) that inference debiases (``debias="mean_and_var"``).
      Training is Equinox's exactly; inference differs in the variance:
      Equinox divides the running variance, which starts at 1, by ``1 -
      momentum**count`` (after one step at momentum 0.99 that is 100 times
      the batch's variance), where jaxbn takes ``(var - momentum**count) /
      (1 - momentum**count)``, the batches' own average.
    * ``mode="ema"`` (and ``"legacy"``): Equinox's legacy batch norm,
      matched: the first training step takes the batch's statistics, each
      later one normalizes with ``momentum * running + (1 - momentum) *
      batch`` and stores it. A plain average (no warm-up), and none of the
      core's variants or call-time inputs (a ValueError says so).

    A batch with one value per channel (a batch of one under ``vmap``)
    normalizes to the bias, as in Equinox. The statistics are stored in the
    ``eqx.nn.State`` as jaxbn's ``{"mean", "var", "count"}`` (float32 whatever
    ``dtype``; an int32 count), not in Equinox's private state indices.

    Args:
      input_size: the number of channels.
      axis_name: the named axis (or axes) of the ``vmap``/``pmap``/``shard_map``
        that holds the batch, or None for a batched ``x`` (see above).
      eps: added to the variance.
      channelwise_affine: whether to learn ``weight`` and ``bias``.
      momentum: decay of the running averages, in ``[0, 1)`` (Equinox's
        convention).
      inference: False normalizes with the batch's statistics and updates them;
        True uses the running ones. Set by ``eqx.nn.inference_mode``,
        overridden at call time.
      dtype: dtype of ``weight`` and ``bias`` (default float32).
      mode: None (jaxbn's running averages), ``"batch"`` or ``"ema"``
        (``"legacy"``), Equinox's, see above.
      warmup: whether the running-average decay warms up; default on, except
        with ``mode="batch"`` or ``momentum=None``.
      running_var, renorm, rmax, dmax, renorm_momentum, virtual_batch_size,
        eval_mode, zero_masked, debias: the core's training-time variants, see
        :func:`jaxbn.batch_norm` (renorm adds ``renorm_mean`` and
        ``renorm_std`` to the state's statistics).

    Raises:
      ValueError, TypeError: for invalid hyperparameters, when constructed.

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> import equinox as eqx
      >>> import jaxbn.equinox
      >>> bn, state = eqx.nn.make_with_state(jaxbn.equinox.BatchNorm)(2, momentum=0.9)
      >>> x = jnp.array([[1.0, 10.0], [3.0, 30.0]])  # (batch, channels)
      >>> y, state = bn(x, state)
      >>> jnp.round(y, 4)
      Array([[-1., -1.],
             [ 1.,  1.]], dtype=float32)
      >>> state.get(bn.state_index)["mean"]  # first update: decay 1/10
      Array([ 1.8, 18. ], dtype=float32)
      >>> per_example = eqx.nn.make_with_state(jaxbn.equinox.BatchNorm)(2, "batch")
      >>> bn, state = per_example
      >>> y, state = jax.vmap(bn, axis_name="batch", in_axes=(0, None),
      ...                     out_axes=(0, None))(x, state)
      >>> jnp.round(y, 4)  # the same batch, one example per vmap lane
      Array([[-1., -1.],
             [ 1.,  1.]], dtype=float32)
    """

    weight: jax.Array | None
    bias: jax.Array | None
    state_index: eqx.nn.StateIndex
    inference: bool
    axis_name: Hashable | tuple[Hashable, ...] | None = eqx.field(static=True)
    input_size: int = eqx.field(static=True)
    eps: float = eqx.field(static=True)
    channelwise_affine: bool = eqx.field(static=True)
    momentum: float | None = eqx.field(static=True)
    mode: Literal["batch", "ema"] | None = eqx.field(static=True)
    config: BatchNormConfig = eqx.field(static=True)

    def __init__(
        self,
        input_size: int,
        axis_name: Hashable | Sequence[Hashable] | None = None,
        eps: float = 1e-5,
        channelwise_affine: bool = True,
        momentum: float | None = 0.99,
        inference: bool = False,
        dtype: DTypeLike | None = None,
        mode: Literal["batch", "ema", "legacy"] | None = None,
        *,
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
        _check_equinox_options(input_size, mode)
        variants = {
            "running_var": running_var,
            "renorm": renorm,
            "rmax": rmax,
            "dmax": dmax,
            "renorm_momentum": renorm_momentum,
            "virtual_batch_size": virtual_batch_size,
            "eval_mode": eval_mode,
            "zero_masked": zero_masked,
            "debias": debias,
        }
        self.mode = "ema" if mode == "legacy" else mode  # as Equinox reads it
        if self.mode == "batch":  # Equinox's maths: a debiased plain average
            warmup = _equinox_batch_mode(warmup, variants)
        if self.mode == "ema":  # Equinox's maths: training mixes in the average
            warmup = _equinox_ema_mode(warmup, momentum, variants)
        checked = check_float_dtype("dtype", dtype, allow_none=True)
        param_dtype = jnp.dtype(jnp.float32) if checked is None else checked
        self.input_size = input_size
        self.eps = eps
        self.momentum = momentum
        self.axis_name = tuple(axis_name) if isinstance(axis_name, list) else axis_name
        self.channelwise_affine = bool(channelwise_affine)
        self.inference = inference
        self.config = pipeline.adapter_config(  # checks the hyperparameters now
            axis=0 if self.axis_name is not None else 1,
            momentum=momentum,
            epsilon=eps,
            center=self.channelwise_affine,
            scale=self.channelwise_affine,
            warmup=warmup,
            axis_name=self.axis_name,
            param_dtype=param_dtype,
            variants=variants,
        )
        affine = self.channelwise_affine
        self.weight = jnp.ones((input_size,), param_dtype) if affine else None
        self.bias = jnp.zeros((input_size,), param_dtype) if affine else None
        stats = initial_stats(self.config, (input_size,), jnp.float32)
        self.state_index = eqx.nn.StateIndex(stats)  # mean, var f32; count int32

    def __call__(
        self,
        x: jax.Array,
        state: eqx.nn.State,
        *,
        key: jax.Array | None = None,
        inference: bool | jax.Array | None = None,
        mask: jax.Array | None = None,
        weights: jax.Array | None = None,
        scale: jax.Array | None = None,
        offset: jax.Array | None = None,
    ) -> tuple[jax.Array, eqx.nn.State]:
        """Normalizes ``x``; in training also updates the statistics in ``state``.

        Args:
          x: ``(input_size, *spatial)`` per example with ``axis_name``, else
            ``(batch, input_size, *spatial)``.
          state: the ``eqx.nn.State`` holding this layer's statistics.
          key: ignored (Equinox's signature).
          inference: overrides ``self.inference`` for this call; a Python bool or
            a scalar boolean array (one compiled function for both modes).
          mask: optional boolean array broadcastable to x; the statistics use
            only its True entries.
          weights: optional per-example weights broadcastable to x.
          scale: optional call-time scale (with ``channelwise_affine=False``).
          offset: optional call-time offset (with ``channelwise_affine=False``).

        Returns:
          ``(y, state)``: y has x's shape and the promotion of x's and the
          weight's dtypes; state is unchanged in inference.

        Raises:
          ValueError: if x's channel axis does not have ``input_size`` entries,
            if a batched x has fewer than 2 dimensions, or for the core's errors
            (e.g. a training batch with one value per channel).
          TypeError: for a non-floating x or a non-boolean ``inference``.
        """
        del key
        evaluating = self.inference if inference is None else inference
        train = pipeline.train_flag(evaluating)
        _check_layout(self, x)
        geo = self.config.geometry(x)  # once per call
        params: Params = {}
        if self.weight is not None and self.bias is not None:
            params = {"scale": self.weight, "bias": self.bias}
        stats = dict(state.get(self.state_index))
        current = pipeline.AdapterStats(
            stats["mean"],
            stats["var"],
            stats["count"],
            stats.get("renorm_mean"),
            stats.get("renorm_std"),
        )
        dtype = pipeline.promoted_dtype(x.dtype, self.config.param_dtype)
        call = pipeline.CallArgs(mask, weights, scale, offset)
        if self.mode == "ema":
            y, updated = _ema(self.config, geo, x, train, params, stats, call, dtype)
        else:
            y, new = pipeline.call_core(
                self.config, geo, x, train, params, current, call, dtype
            )
            updated = {k: v for k, v in new._asdict().items() if v is not None}
        if train is not False:
            state = state.set(self.state_index, updated)
        return y, state


def _check_equinox_options(input_size: Any, mode: Any) -> None:
    """Checks the options jaxbn's configuration does not hold."""
    if isinstance(input_size, bool) or not isinstance(input_size, int):
        raise TypeError(f"input_size must be an int, got {input_size!r}.")
    if input_size < 1:
        raise ValueError(f"input_size={input_size} must be at least 1.")
    if mode not in (None, "batch", "ema", "legacy"):
        raise ValueError(
            f"mode={mode!r} is not valid; use mode='batch' or 'ema' (Equinox's "
            "maths) or leave it unset (jaxbn's warm-up)."
        )


def _equinox_batch_mode(warmup: bool | None, variants: dict[str, Any]) -> bool:
    """``mode="batch"``: no warm-up, mean and variance debiased, as Equinox.

    Sets ``variants["debias"]``; returns ``warmup`` (False).
    """
    debias = variants["debias"]
    if warmup or debias not in (None, "mean_and_var"):
        raise ValueError(
            f"mode='batch' is Equinox's zero-debiased moving average (warmup="
            f"False, debias='mean_and_var'), but warmup={warmup!r} and debias="
            f"{debias!r} were given; leave mode unset for jaxbn's warm-up, or "
            "drop these options."
        )
    variants["debias"] = "mean_and_var"
    return False


def _equinox_ema_mode(
    warmup: bool | None, momentum: float | None, variants: dict[str, Any]
) -> bool:
    """``mode="ema"``: a plain average, and none of the core's variants."""
    given = [k for k, v in variants.items() if v != getattr(BatchNormConfig, k)]
    if warmup or given or momentum is None or momentum == 1.0:
        raise ValueError(
            f"mode='ema' is Equinox's legacy batch norm, matched exactly: a "
            f"plain moving average with momentum in [0, 1), without the core's "
            f"variants; got warmup={warmup!r}, momentum={momentum!r} and "
            f"{given or 'no variants'}. Leave mode unset to use them."
        )
    return False


def _ema(
    config: BatchNormConfig,
    geo: Geometry,
    x: jax.Array,
    train: bool | jax.Array,
    params: Params,
    stats: dict,
    call: pipeline.CallArgs,
    dtype: Any,
) -> tuple[jax.Array, dict]:
    """Equinox's ``mode="ema"``: training normalizes with the updated average.

    The first training step takes the batch's statistics; each later one
    ``momentum * running + (1 - momentum) * batch`` (gradients flow through
    the batch's part), which it also stores. Built from the one statistics
    helper and the one normalize helper.
    """
    if any(a is not None for a in call):
        raise ValueError(
            "mode='ema' takes no mask, weights, scale or offset at call time; "
            "leave mode unset to use them."
        )
    gamma, beta = (params.get(k) for k in ("scale", "bias"))
    gamma = None if gamma is None else gamma.reshape(geo.kept)
    beta = None if beta is None else beta.reshape(geo.kept)
    out = x.dtype if jnp.issubdtype(dtype, jnp.complexfloating) else dtype

    def training(stats: dict) -> tuple[jax.Array, dict]:
        m = batch_moments(x, geo.reduction_axes, None, config.axis_name)
        d = jnp.where(stats["count"] > 0, jnp.float32(config.momentum), 0.0)
        mean = d * stats["mean"] + (1.0 - d) * m.mean.reshape(geo.feature_shape)
        var = d * stats["var"] + (1.0 - d) * m.var.reshape(geo.feature_shape)
        kept = (mean.reshape(geo.kept), var.reshape(geo.kept))
        y = normalize(x, *kept, gamma, beta, config.epsilon, out)
        new = {"mean": mean, "var": var, "count": stats["count"] + 1}
        return y, jax.tree.map(lax.stop_gradient, new)

    def evaluation(stats: dict) -> tuple[jax.Array, dict]:
        kept = (stats["mean"].reshape(geo.kept), stats["var"].reshape(geo.kept))
        return normalize(x, *kept, gamma, beta, config.epsilon, out), stats

    if isinstance(train, bool):
        y, new = training(stats) if train else evaluation(stats)
    else:
        y, new = lax.cond(train, training, evaluation, stats)
    return y.astype(dtype), new


def _check_layout(module: BatchNorm, x: Any) -> None:
    """X must be ``(input_size, ...)`` per example, or a batch of those."""
    channel = 0 if module.axis_name is not None else 1
    if channel == 1 and len(getattr(x, "shape", ())) < 2:
        raise ValueError(
            f"x of shape {tuple(getattr(x, 'shape', ()))} has no batch axis: with "
            "axis_name=None jaxbn.equinox.BatchNorm takes a batch of shape "
            "(batch, input_size, ...). For one example per call, build it "
            "with axis_name='batch' and call it under jax.vmap(..., "
            "axis_name='batch')."
        )
    check_x(x)
    if len(x.shape) <= channel or x.shape[channel] != module.input_size:
        layout = "(input_size, ...)" if channel == 0 else "(batch, input_size, ...)"
        raise ValueError(
            f"x of shape {tuple(x.shape)} should be {layout} with "
            f"input_size={module.input_size} on axis {channel}; build the layer "
            "with the number of channels of x."
        )
