"""The XLA:CPU expression choices: the one place for expressions shaped for its fusion.

The maths elsewhere in jaxbn is written plainly and calls these helpers where
the shape of an expression, not its value, matters to XLA:CPU. Each helper
names what it prevents, and ``tests/test_fusion.py`` compiles the plain and the
shaped form side by side (counting the full-size arrays the compiled step
writes) and asserts that the plain one still costs what is described here: when
an XLA upgrade makes a trick useless, that test fails and the trick can go. (A
third trick, applying the learned scale as a factor of its own, went that way:
with jax 0.10.2 it wrote one more full-size array, not one fewer.)

XLA:CPU fuses an elementwise producer into the reduction that consumes it, so
that the reduction reads only x. A producer that two fusions share is instead
written to memory first: one more full-size write and read. (It does not show
as a temporary in ``memory_analysis``: XLA writes it into the output's buffer.)
"""

from __future__ import annotations

import jax


def shifted_pair(x: jax.Array, shift: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``x - shift`` twice, as two distinct expressions, for two reductions.

    The sums of ``x - shift`` and of its square are two reductions; given one
    shared ``x - shift`` XLA:CPU writes it to memory (one more full-size write
    and read). ``x + (-shift)`` is bitwise the same value but a
    different expression, so each reduction gets its own producer.

    Args:
      x: the input (already in the statistics dtype).
      shift: a per-feature shift, broadcastable to x.

    Returns:
      ``(x + (-shift), x - shift)``, equal values.
    """
    return x + (-shift), x - shift


def centred_pair(
    x: jax.Array, shift: jax.Array, offset: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """``(x - shift) - offset`` twice, as two distinct expressions.

    The backward pass of a training step uses the centred input twice: in the
    reduction ``sum(dy * c)`` and in the elementwise pass that writes dx. One
    shared expression would be written to memory between them (one more
    full-size write and read). ``(x - shift) - offset`` and ``(x + (-shift)) +
    (-offset)`` are bitwise equal and distinct.

    Args:
      x: the input (in the statistics dtype).
      shift: the per-feature shift, broadcastable to x.
      offset: the per-feature offset of the mean from the shift.

    Returns:
      Two equal arrays ``(x - shift) - offset``.
    """
    return (x - shift) - offset, (x + (-shift)) + (-offset)
