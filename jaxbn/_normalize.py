"""Normalization: ``((x - shift) - offset) * rsqrt(var + epsilon) * scale + bias``.

The one place where jaxbn applies statistics to x, in training and evaluation
alike. The mean is subtracted first, in the statistics' dtype (float32, or
float64 / complex for such input): the reassociated ``x * a + b`` cancels
catastrophically when the mean is large compared with the spread.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from ._statistics import mean_dtype


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
    inv_std = lax.rsqrt(var + jnp.asarray(epsilon, real))
    xc = x.astype(compute)
    centred = xc - mean if shift is None else (xc - shift) - mean
    multiplier = inv_std if scale is None else inv_std * scale.astype(real)
    y = centred * multiplier
    if bias is not None:
        y = y + bias.astype(real)
    return y.astype(dtype)
