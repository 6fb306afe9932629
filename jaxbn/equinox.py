"""``jaxbn.equinox.BatchNorm``: a drop-in for ``equinox.nn.BatchNorm``.

Replace ``eqx.nn.BatchNorm`` with ``jaxbn.equinox.BatchNorm`` and keep the rest
of the model: the same constructor, ``eqx.nn.make_with_state``, the
``eqx.nn.State`` threaded through calls, ``eqx.nn.inference_mode`` and
``eqx.nn.Sequential``. The maths is :func:`jaxbn.batch_norm`'s (with warm-up);
this module only owns the Equinox state. Requires ``equinox``.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from typing import Any

import jax
import jax.numpy as jnp

try:
    import equinox as eqx
except ImportError as e:  # pragma: no cover - depends on the environment
    raise ImportError(
        "jaxbn.equinox needs equinox: pip install equinox (or jaxbn[interop])."
    ) from e

from . import _pipeline as pipeline
from ._apply import initial_stats
from ._config import BatchNormConfig
from ._hyperparams import check_float_dtype
from ._inputs import check_x

__all__ = ["BatchNorm"]

_EMA = (
    "mode='ema' normalizes training batches with a running average, "
    "which jaxbn does not do: jaxbn.equinox.BatchNorm always trains "
    "with the batch's statistics (Equinox's mode='batch') and "
    "evaluates with the running ones. Drop mode= or pass "
    "mode='batch'."
)


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

    Training normalizes with the batch's mean and biased variance (Equinox's
    ``mode="batch"``) and updates the running statistics with jaxbn's warm-up
    (``warmup=False``: a plain moving average with decay ``momentum``, like
    Equinox's before its zero-debiasing); inference normalizes with them as
    they are. They are stored in the ``eqx.nn.State`` as jaxbn's
    ``{"mean", "var", "count"}`` (float32 whatever ``dtype``).

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
      mode: ``"batch"``; accepted for Equinox's signature. ``"ema"``
        (normalizing training batches with a running average) is refused.
      warmup: whether the running-average decay warms up (jaxbn's default).
      running_var, renorm, rmax, dmax, renorm_momentum, virtual_batch_size,
        eval_mode, zero_masked: the core's training-time variants, see
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
    momentum: float = eqx.field(static=True)
    warmup: bool = eqx.field(static=True)
    running_var: str = eqx.field(static=True)
    renorm: bool = eqx.field(static=True)
    rmax: Any = eqx.field(static=True)
    dmax: Any = eqx.field(static=True)
    renorm_momentum: float | None = eqx.field(static=True)
    virtual_batch_size: int | None = eqx.field(static=True)
    eval_mode: str = eqx.field(static=True)
    zero_masked: bool = eqx.field(static=True)
    config: BatchNormConfig = eqx.field(static=True)

    def __init__(
        self,
        input_size: int,
        axis_name: Hashable | Sequence[Hashable] | None = None,
        eps: float = 1e-5,
        channelwise_affine: bool = True,
        momentum: float = 0.99,
        inference: bool = False,
        dtype: Any = None,
        mode: str = "batch",
        *,
        warmup: bool = True,
        running_var: str = "biased",
        renorm: bool = False,
        rmax: Any = None,
        dmax: Any = None,
        renorm_momentum: float | None = None,
        virtual_batch_size: int | None = None,
        eval_mode: str = "running",
        zero_masked: bool = False,
    ):
        _check_equinox_options(input_size, mode)
        dtype = check_float_dtype("dtype", dtype, allow_none=True)
        dtype = jnp.float32 if dtype is None else dtype
        self.input_size, self.eps, self.momentum = input_size, eps, momentum
        self.axis_name = tuple(axis_name) if isinstance(axis_name, list) else axis_name
        self.channelwise_affine, self.warmup = bool(channelwise_affine), bool(warmup)
        self.inference = inference
        self.running_var, self.renorm, self.rmax, self.dmax = (
            running_var,
            renorm,
            rmax,
            dmax,
        )
        self.renorm_momentum, self.virtual_batch_size = (
            renorm_momentum,
            virtual_batch_size,
        )
        self.eval_mode, self.zero_masked = eval_mode, zero_masked
        self.config = pipeline.adapter_config(  # checks the hyperparameters now
            axis=0 if self.axis_name is not None else 1,
            momentum=momentum,
            epsilon=eps,
            center=self.channelwise_affine,
            scale=self.channelwise_affine,
            warmup=self.warmup,
            axis_name=self.axis_name,
            param_dtype=dtype,
            allow_one_value=False,
            variants=self,
        )
        affine = self.channelwise_affine
        self.weight = jnp.ones((input_size,), dtype) if affine else None
        self.bias = jnp.zeros((input_size,), dtype) if affine else None
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
        params = {}
        if self.weight is not None and self.bias is not None:
            params = {"scale": self.weight, "bias": self.bias}
        stats = state.get(self.state_index)
        current = pipeline.AdapterStats(
            stats["mean"],
            stats["var"],
            stats["count"],
            stats.get("renorm_mean"),
            stats.get("renorm_std"),
        )
        dtype = jnp.result_type(x.dtype, self.config.param_dtype)
        call = pipeline.CallArgs(mask, weights, scale, offset)
        y, new = pipeline.normalize(self.config, x, train, params, current, call, dtype)
        if train is not False:
            updated = {k: v for k, v in new._asdict().items() if v is not None}
            state = state.set(self.state_index, updated)
        return y, state


def _check_equinox_options(input_size: Any, mode: Any) -> None:
    """Checks the options jaxbn's configuration does not hold."""
    if isinstance(input_size, bool) or not isinstance(input_size, int):
        raise TypeError(f"input_size must be an int, got {input_size!r}.")
    if input_size < 1:
        raise ValueError(f"input_size={input_size} must be at least 1.")
    if mode == "ema":
        raise ValueError(_EMA)
    if mode not in ("batch", "legacy"):
        raise ValueError(f"mode={mode!r} is not valid; use mode='batch'.")


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
