"""Expressions shaped for XLA:CPU's fusion choices: the one place for such tricks.

The maths elsewhere in jaxbn is written plainly and calls these helpers where
the shape of an expression, not its value, matters to XLA:CPU. Each helper
names what it prevents, and ``tests/test_fusion.py`` compiles the plain and the
shaped form side by side and asserts that the plain one still costs what is
described here: when an XLA upgrade makes a trick useless, that test fails and
the trick can go.

XLA:CPU fuses an elementwise producer into the reduction that consumes it, so
that the reduction reads only x. A producer (or a full-size broadcast) that two
fusions share is instead written to memory first: a full-size temporary and an
extra pass.
"""

from __future__ import annotations

import jax


def shifted_pair(x: jax.Array, shift: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``x - shift`` twice, as two distinct expressions, for two reductions.

    The sums of ``x - shift`` and of its square are two reductions; given one
    shared ``x - shift`` XLA:CPU writes it to memory (a full-size temporary,
    one more pass over x). ``x + (-shift)`` is bitwise the same value but a
    different expression, so each reduction gets its own producer.

    Args:
      x: the input (already in the statistics dtype).
      shift: a per-feature shift, broadcastable to x.

    Returns:
      ``(x + (-shift), x - shift)``, equal values.
    """
    return x + (-shift), x - shift


def scaled(centred: jax.Array, inv_std: jax.Array, scale: jax.Array | None) -> jax.Array:
    """``centred * inv_std * scale`` with the learned scale a factor of its own.

    The product ``inv_std * scale`` is per-feature, but when the output feeds a
    reduction (a loss, the next layer's statistics) XLA:CPU writes its
    full-size broadcast to memory; a parameter's broadcast it keeps in place.

    Args:
      centred: the centred input (float).
      inv_std: per-feature ``rsqrt(var + epsilon)``, broadcastable.
      scale: optional per-feature scale, broadcastable, already in the
        computation dtype.

    Returns:
      The scaled input.
    """
    y = centred * inv_std
    return y if scale is None else y * scale


def centred_pair(
    x: jax.Array, shift: jax.Array, offset: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """``(x - shift) - offset`` twice, as two distinct expressions.

    The backward pass of a training step uses the centred input twice: in the
    reduction ``sum(dy * c)`` and in the elementwise pass that writes dx. One
    shared expression would be written to memory between them (a full-size
    temporary). ``(x - shift) - offset`` and ``(x + (-shift)) + (-offset)``
    are bitwise equal and distinct.

    Args:
      x: the input (in the statistics dtype).
      shift: the per-feature shift, broadcastable to x.
      offset: the per-feature offset of the mean from the shift.

    Returns:
      Two equal arrays ``(x - shift) - offset``.
    """
    return (x - shift) - offset, (x + (-shift)) + (-offset)
