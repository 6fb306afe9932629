"""Normalization: ``((x - shift) - offset) * rsqrt(var + epsilon) * scale + bias``.

The one place where jaxbn applies statistics to x, in training and evaluation
alike; batch renormalization's correction (``renorm_correction``) enters it as
a change of scale and bias. The mean is subtracted first, in the statistics'
dtype (float32, or float64 / complex for such input): the reassociated
``x * a + b`` cancels catastrophically when the mean is large compared with the
spread.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from ._sums import mean_dtype


class RenormOperands(NamedTuple):
    """Batch renormalization's traced operands, shaped for x.

    Attributes:
      mean: the renorm moving average of the mean (``renorm_mean``).
      std: the renorm moving average of the standard deviation (``renorm_std``).
      rmax: the clip of r now, a float32 scalar.
      dmax: the clip of d now, a float32 scalar.
    """

    mean: jax.Array
    std: jax.Array
    rmax: jax.Array
    dmax: jax.Array


def clip_bound(name: str, value: Any, count: jax.Array) -> jax.Array:
    """``value``, or ``value(count)`` for a schedule, as a float32 scalar.

    Raises:
      ValueError: if a schedule does not return a scalar.
    """
    out = jnp.asarray(value(count) if callable(value) else value, jnp.float32)
    if out.shape != ():
        raise ValueError(f"{name}(count) must return a scalar, got shape {out.shape}.")
    return out


def inverse_std(var: jax.Array, epsilon: float) -> jax.Array:
    """``rsqrt(var + epsilon)``: exactly 0 where the variance is infinite.

    An overflowing batch has ``var = inf``, and ``rsqrt(inf)`` is 0, so such
    a feature normalizes to the bias, with zero gradient
    (``tests/test_overflow.py``; with jaxlib 0.10.2 XLA:CPU's ``rsqrt`` gives
    0 for inf, eager and jitted, at every width, where an earlier version gave
    NaN and ``1 / sqrt`` was used: three more ops per use). An expensive
    operation ends the expression, so XLA computes the per-feature value once
    rather than once per element of every full-size pass that reads it.
    """
    real = var.dtype
    return lax.rsqrt(var + jnp.asarray(epsilon, real))


def normalize(
    x: jax.Array,
    mean: jax.Array,
    var: jax.Array,
    scale: jax.Array | None,
    bias: jax.Array | None,
    epsilon: float,
    dtype: jnp.dtype,
    shift: jax.Array | None = None,
) -> jax.Array:
    """Normalizes ``x`` with per-feature statistics in one elementwise pass.

    Args:
      x: the input.
      mean: the mean (float32 or wider, complex for complex x), broadcastable to
        x with the same rank.
      var: the real variance, same shape as ``mean``. An infinite variance (an
        overflowing batch) gives ``y = bias``.
      scale: optional scale (gamma), same shape as ``mean``.
      bias: optional bias (beta), same shape as ``mean``.
      epsilon: added to the variance.
      dtype: the output dtype.
      shift: optional per-feature shift; then ``mean`` is the mean of ``x -
        shift`` and x is centred as ``(x - shift) - mean``, which keeps
        precision when the mean is large.

    Returns:
      The normalized array, in ``dtype``.

    Examples:
      >>> import jax.numpy as jnp
      >>> x = jnp.array([[0.0], [2.0]])
      >>> normalize(x, jnp.array([[1.0]]), jnp.array([[1.0]]), None, None,
      ...           epsilon=0.0, dtype=jnp.float32)
      Array([[-1.],
             [ 1.]], dtype=float32)
    """
    compute = jnp.promote_types(mean.dtype, mean_dtype(x.dtype))
    real = jnp.promote_types(var.dtype, jnp.finfo(compute).dtype)
    inv_std = inverse_std(var.astype(real), epsilon)
    xc = x.astype(compute)
    centred = xc - mean if shift is None else (xc - shift) - mean
    multiplier = inv_std if scale is None else inv_std * scale.astype(real)
    y = centred * multiplier
    if bias is not None:
        y = y + bias.astype(real)
    return y.astype(dtype)


def renorm_correction(
    count: jax.Array,
    mean: jax.Array,
    var: jax.Array,
    renorm: RenormOperands,
    epsilon: float,
) -> tuple[jax.Array, jax.Array]:
    """Batch renormalization's ``(r, d)`` (Ioffe, 2017), without gradient.

    With ``s = sqrt(var + epsilon)`` for the batch and ``S = max(renorm_std,
    sqrt(epsilon))`` for the renorm moving average: ``r = clip(s / S, 1/rmax,
    rmax)`` and ``d = clip((mean - renorm_mean) / S, -dmax, dmax)``. A feature
    with no valid value (``count == 0``) gets ``r = 1, d = 0``.

    Args:
      count: per-feature count of the batch.
      mean: the batch mean, same shape.
      var: the batch variance, same shape.
      renorm: the :class:`RenormOperands`, mean and std shaped like ``mean``.
      epsilon: the layer's epsilon.

    Returns:
      ``(r, d)``, shaped like ``mean``, with ``lax.stop_gradient`` applied.

    Examples:
      >>> import jax.numpy as jnp
      >>> one = jnp.ones((1, 1))
      >>> operands = RenormOperands(one, one, jnp.float32(3.0), jnp.float32(1.0))
      >>> r, d = renorm_correction(one, 3 * one, 16 * one, operands, epsilon=0.0)
      >>> float(r[0, 0]), float(d[0, 0])
      (3.0, 1.0)
    """
    renorm_mean, renorm_std, rmax, dmax = renorm
    real = var.dtype
    eps = jnp.asarray(epsilon, real)
    ref_std = jnp.maximum(renorm_std.astype(real), jnp.sqrt(eps))
    rmax, dmax = rmax.astype(real), dmax.astype(real)
    r = jnp.clip(jnp.sqrt(var + eps) / ref_std, 1.0 / rmax, rmax)
    d = jnp.clip((mean.astype(real) - renorm_mean.astype(real)) / ref_std, -dmax, dmax)
    seen = count > 0
    r = jnp.where(seen, r, jnp.ones_like(r))
    d = jnp.where(seen, d, jnp.zeros_like(d))
    return lax.stop_gradient(r), lax.stop_gradient(d)


def corrected(
    scale: jax.Array | None,
    bias: jax.Array | None,
    r: jax.Array,
    d: jax.Array,
) -> tuple[jax.Array, jax.Array]:
    """``(scale * r, scale * d + bias)``: ``(x_hat * r + d) * scale + bias``."""
    if scale is None:
        return r, d if bias is None else d + bias.astype(d.dtype)
    s = scale.astype(r.dtype)
    return s * r, s * d if bias is None else s * d + bias.astype(d.dtype)
