"""The fused training path: single-pass statistics and a closed-form backward.

Batch norm is memory-bound, so its cost is the number of passes over x. Let S be
the bytes of x. The training step here makes:

Forward (``fused_training``), three passes, 4S of traffic:

1. ``_statistics.shifted_moments``: per feature, two reductions that read x
   only: the sums of ``x - shift`` and ``(x - shift)**2`` around one of the
   feature's own values, or across devices the running mean (see that module).
2. One elementwise pass reads x and writes ``y = (x - shift) * rsqrt(var +
   epsilon) * scale + (bias - offset * scale * rsqrt(var + epsilon))`` in the
   output dtype.

Across devices (``axis_name``) the statistics are merged there too: one
all-reduce (two when the re-centring pass runs).

XLA:CPU runs reductions as YNNPACK fusions that take the elementwise producers
and per-feature broadcasts in, so each reduction reads only x, except that a
producer or broadcast two fusions share is written to memory first (a full-size
temporary). Every full-size expression here is therefore distinct from the
others in a training step: ``x - shift``, ``x + (-shift)``, ``2x - 2 shift``
and ``x/2 - shift/2`` (each exact up to the power-of-two factor), and the scale
is a separate factor of y, since XLA writes the broadcast of a computed ``scale
* inv_std`` to memory when y feeds a reduction.

Residuals: x in its own dtype (1S; no float32 copy for bfloat16/float16), the
mask as given (not broadcast), and per-feature shift, offset, inverse standard
deviation, count, scale and bias.

Backward (``jax.custom_vjp``), three passes, 6S of traffic: with ``xhat = ((x -
shift) - offset) * r`` and ``n`` the (global) count,

1. two reductions: ``sum(dy)`` (reads dy) and ``sum(dy * (x - shift))`` (reads
   x and dy), which gives ``sum(dy * xhat)``; one all-reduce of both across
   devices;
2. one elementwise pass reads x and dy and writes ``dx = scale * r * (dy -
   sum(dy)/n - xhat * sum(dy * xhat)/n)``, with per-feature coefficients of dy
   and ``x - shift``, for valid entries and ``scale * r * dy`` for masked ones
   (their values do not reach the statistics).

``dscale = sum(dy * xhat)`` and ``dbias = sum(dy)`` are the local sums (the
transpose of a device-invariant parameter sums them across devices). The batch
statistics returned for the running average carry no gradient.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from functools import partial
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from ._normalize import normalize
from ._statistics import ShiftedMoments, psum_in_groups, shifted_moments, varying_as


class _Config(NamedTuple):
    """Static (hashable) settings of one fused call."""

    reduction_axes: tuple[int, ...]
    epsilon: float
    axis_name: Hashable | None
    groups: tuple[tuple[int, ...], ...] | None
    dtype: Any


def fused_training(
    x: jax.Array,
    mask: jax.Array | None,
    scale: jax.Array | None,
    bias: jax.Array | None,
    fallback_shift: jax.Array,
    *,
    reduction_axes: tuple[int, ...],
    epsilon: float,
    axis_name: Hashable | None,
    axis_index_groups: Sequence[Sequence[int]] | None,
    dtype: Any,
) -> tuple[jax.Array, ShiftedMoments]:
    """Normalizes x with its batch statistics; returns ``(y, moments)``.

    Args:
      x: the input, any floating dtype.
      mask: optional boolean array of x's rank, broadcastable to x; statistics use
        its True entries only.
      scale: optional scale, x's rank with size 1 along ``reduction_axes``.
      bias: optional bias, same shape as ``scale``.
      fallback_shift: float32 shift (the running mean) used where a feature's
        first batch value is masked; same shape as ``scale``.
      reduction_axes: the batch axes.
      epsilon: added to the variance.
      axis_name: optional named axis (or tuple) to synchronize statistics over.
      axis_index_groups: optional groups of indices along ``axis_name``.
      dtype: the output dtype.

    Returns:
      ``y`` in ``dtype`` and the ``ShiftedMoments`` (no gradient) of the batch,
      with the global count and variance when ``axis_name`` is given.

    Examples:
      >>> import jax.numpy as jnp
      >>> x = jnp.array([[1.0, 10.0], [3.0, 30.0]])
      >>> y, m = fused_training(x, None, None, None, jnp.zeros((1, 2)),
      ...     reduction_axes=(0,), epsilon=1e-5, axis_name=None,
      ...     axis_index_groups=None, dtype=jnp.float32)
      >>> y
      Array([[-1., -1.],
             [ 1.,  1.]], dtype=float32)
      >>> m.shift + m.offset, m.var
      (Array([[ 2., 20.]], dtype=float32), Array([[  1., 100.]], dtype=float32))
    """
    groups = None
    if axis_index_groups is not None:
        groups = tuple(tuple(int(i) for i in g) for g in axis_index_groups)
    config = _Config(tuple(reduction_axes), float(epsilon), axis_name, groups, dtype)
    fallback_shift = lax.stop_gradient(fallback_shift.astype(jnp.float32))
    if axis_name is not None:
        scale, bias = varying_as(scale, x), varying_as(bias, x)
    return _train(config, x, mask, scale, bias, fallback_shift)


@partial(jax.custom_vjp, nondiff_argnums=(0,))
def _train(
    config: _Config,
    x: jax.Array,
    mask: jax.Array | None,
    scale: jax.Array | None,
    bias: jax.Array | None,
    fallback: jax.Array,
) -> tuple[jax.Array, ShiftedMoments]:
    return _train_fwd(config, x, mask, scale, bias, fallback)[0]


def _train_fwd(
    config: _Config,
    x: jax.Array,
    mask: jax.Array | None,
    scale: jax.Array | None,
    bias: jax.Array | None,
    fallback: jax.Array,
) -> tuple[tuple[jax.Array, ShiftedMoments], tuple]:
    m = shifted_moments(
        x, config.reduction_axes, mask, config.axis_name, config.groups, fallback
    )
    y = normalize(
        x, m.offset, m.var, scale, bias, config.epsilon, config.dtype, m.shift
    )
    r = lax.rsqrt(m.var + config.epsilon)
    bias_dtype = None if bias is None else jnp.zeros((), bias.dtype)
    residuals = (x, mask, scale, bias_dtype, m.count, m.shift, m.offset, r)
    return (y, m), residuals


def _train_bwd(config: _Config, residuals: tuple, cotangents: tuple) -> tuple:
    x, mask, scale, bias_dtype, count, shift, offset, r = residuals
    dy = cotangents[0].astype(jnp.float32)  # the statistics carry no gradient
    axes = config.reduction_axes
    xf = x.astype(jnp.float32)
    # sum(dy * xhat) = r * (sum(dy * (x - shift)) - offset * sum(dy)). ``2x -
    # 2 shift`` is exactly twice ``x - shift``, but not the same expression as
    # the forward's: XLA:CPU would write a shared ``x - shift`` to memory.
    dy_centred = dy * (xf * 2.0 - shift * 2.0)
    if mask is not None:
        # A NaN under False with a zero cotangent must not poison the sums.
        dy_centred = jnp.where(dy == 0.0, 0.0, dy_centred)
    sum_dy = jnp.sum(dy, axes, keepdims=True)
    sum_dy_centred = 0.5 * jnp.sum(dy_centred, axes, keepdims=True)
    sum_dy_xhat = r * (sum_dy_centred - offset * sum_dy)
    dscale = None if scale is None else sum_dy_xhat.astype(scale.dtype)
    dbias = None if bias_dtype is None else sum_dy.astype(bias_dtype.dtype)
    if config.axis_name is not None:
        sums = psum_in_groups(
            jnp.stack([sum_dy, sum_dy_xhat]), config.axis_name, config.groups
        )
        sum_dy, sum_dy_xhat = sums[0], sums[1]
    inv_n = 1.0 / jnp.maximum(count, 1.0)
    gain = r if scale is None else r * scale.astype(jnp.float32)
    # dx = gain * (dy - sum_dy/n - xhat * sum_dy_xhat/n) with xhat = ((x -
    # shift) - offset) * r, as per-feature coefficients of dy and x - shift
    # (again its own expression, ``x/2 - shift/2``).
    slope = gain * r * (sum_dy_xhat * inv_n)
    const = slope * offset - gain * (sum_dy * inv_n)
    dx = gain * dy + ((xf * 0.5 - shift * 0.5) * (-2.0 * slope) + const)
    if mask is not None:
        dx = jnp.where(mask, dx, gain * dy)
    return dx.astype(x.dtype), None, dscale, dbias, None


_train.defvjp(_train_fwd, _train_bwd)
