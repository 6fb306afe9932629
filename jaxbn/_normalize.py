"""Normalization: ``(x - mean) * (scale * rsqrt(var + epsilon)) + bias``.

The one place where jaxbn applies statistics to x. The mean is subtracted first,
in float32, in training and evaluation alike: the reassociated ``x * a + b``
cancels catastrophically when the mean is large compared with the spread.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax


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
      mean: float32 mean, broadcastable to x with the same rank.
      var: float32 variance, same shape as ``mean``.
      scale: optional scale (gamma), same shape as ``mean``.
      bias: optional bias (beta), same shape as ``mean``.
      epsilon: added to the variance.
      dtype: the output dtype.
      shift: optional float32 per-feature shift; then ``mean`` is the mean of
        ``x - shift`` and x is centred as ``(x - shift) - mean``, which keeps
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
    inv_std = lax.rsqrt(var.astype(jnp.float32) + epsilon)
    multiplier = inv_std if scale is None else inv_std * scale.astype(jnp.float32)
    xf = x.astype(jnp.float32)
    if shift is None:
        y = (xf - mean) * multiplier
        if bias is not None:
            y = y + bias.astype(jnp.float32)
        return y.astype(dtype)
    # ``mean`` is the small offset of x's mean from ``shift``, so it folds into
    # the bias without cancellation. The scale is applied on its own: XLA:CPU
    # writes a full-size broadcast of ``inv_std * scale`` to memory when the
    # output feeds a reduction (a loss), but broadcasts a parameter in place.
    y = (xf - shift) * inv_std
    if scale is not None:
        y = y * scale.astype(jnp.float32)
    offset = mean * multiplier
    if bias is not None:
        return (y + (bias.astype(jnp.float32) - offset)).astype(dtype)
    return (y - offset).astype(dtype)
