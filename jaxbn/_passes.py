"""The passes over x: the sums around a shift, re-centred while far, in one loop.

One fused pass over x gives, per feature, the sums of ``d = x - shift`` and
``|d|**2`` over the valid entries (across devices: one all-reduce of ``(count,
s1, s2)``). With ``offset = s1/n``, the variance is ``s2/n - |offset|**2``; it
loses ``log2(1 + |offset|**2 / var)`` bits to cancellation, so when any
feature's ``|offset|**2`` exceeds ``var`` (plus the float resolution of the
shift itself) the pass is redone around ``shift + offset``, at most twice.

The passes are one ``lax.while_loop`` whose body is the pass (a do-while): it
runs once around the running mean, and again only when needed, and the pass is
compiled once. The reduction across the features that decides another pass
also records whether every statistic is finite and whether any feature has a
value (``ShiftedMoments.flags``), so the running-average update needs no
reduction of its own.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from ._sums import (
    COUNTED,
    FAR,
    NOT_FINITE,
    ShiftedMoments,
    abs2,
    count_values,
    is_complex,
    mean_dtype,
    psum_parts,
    weigh,
)
from ._xla_cpu import shifted_pair

# Re-centre while |offset|**2 > _RECENTRE * var (+ resolution): at most one bit.
_RECENTRE = 1.0
_MAX_RECENTRES = 2
_FACTS = FAR | NOT_FINITE | COUNTED
_PASS_SHIFT = 3  # inside the loop, the passes done are the flags' higher bits


class PassConfig(NamedTuple):
    """Static (hashable) settings of one statistics call."""

    axes: tuple[int, ...]
    axis_name: Any
    groups: tuple[tuple[int, ...], ...] | None


def _one_pass(
    cfg: PassConfig, xs: jax.Array, mask: Any, local_count: jax.Array, shift: jax.Array
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """One fused pass over x around ``shift``: ``(count, offset, var)``."""
    d1, d2 = shifted_pair(xs, shift)
    d2 = abs2(d2)
    if mask is not None:
        d1, d2 = weigh(d1, mask), weigh(d2, mask)
    s1 = jnp.sum(d1, cfg.axes, keepdims=True)
    s2 = jnp.sum(d2, cfg.axes, keepdims=True)
    # Typed like the sums (sharding, shard_map variance), for selects.
    count = local_count + jnp.zeros_like(s2)
    if cfg.axis_name is not None:
        count, s1, s2 = psum_parts([count, s1, s2], cfg.axis_name, cfg.groups)
    safe = jnp.maximum(count, 1.0)
    offset = s1 / safe
    var = jnp.maximum(s2 / safe - abs2(offset), 0.0)
    # A sum of squares that overflows (finite x, |x - shift| ~ 1e19 in
    # float32) makes the variance inf, exactly: the offset is then set to
    # 0, so that x - shift stays finite and normalizes to the bias.
    # (NaN input keeps s2 NaN, never inf.)
    overflow = s2 == jnp.inf
    offset = lax.select(overflow, jnp.zeros_like(offset), offset)
    var = lax.select(overflow, jnp.full_like(var, jnp.inf), var)
    return count, offset, var


def _flags(passes: jax.Array, count: jax.Array, m: tuple[jax.Array, ...]) -> jax.Array:
    """The flags of the statistics ``m = (shift, offset, var)`` after a pass.

    One reduction across the features (a max of each feature's bit, per
    bit) serves both the loop's test and the running-average update's. The
    passes done so far are the higher bits; the result has shape (1,), not (),
    so that XLA's loop analysis does not take the flags for a loop counter
    (which, for a scalar, jaxlib 0.10.2 tries at length in every
    simplification round: ``ComputeWhileLoopTripCount`` in a profile).
    """
    shift, offset, var = m
    resolution = (4.0 * float(jnp.finfo(var.dtype).eps)) ** 2
    far = abs2(offset) > _RECENTRE * var + resolution * abs2(shift)
    finite = jnp.isfinite(shift + offset) & jnp.isfinite(var)
    # A max per bit, not an OR: sharded features need an all-reduce, and
    # XLA:CPU's all-reduce has no OR.
    bits = jnp.stack([far, ~finite, count > 0]).astype(jnp.int32)
    seen = jnp.max(bits, axis=tuple(range(1, bits.ndim)))
    facts = seen[0] * FAR + seen[1] * NOT_FINITE + seen[2] * COUNTED
    return (facts | ((passes + 1) << _PASS_SHIFT)).reshape(1)


def run_passes(
    cfg: PassConfig, x: jax.Array, mask: Any, shift: jax.Array
) -> ShiftedMoments:
    """The sums and re-centring passes; never differentiated.

    The passes are one ``lax.while_loop`` whose body runs once around the
    running mean, and again while a feature's mean is far from its shift:
    the pass's kernels are compiled once.

    Args:
      cfg: the batch axes, and the named axis (and its groups) to sum over.
      x: the input.
      mask: None, a boolean mask or weights, broadcastable to x.
      shift: the starting shift, x's rank with size-1 batch axes, the same on
        every device.

    Returns:
      The ``ShiftedMoments``, with the flags of the last pass.

    Examples:
      >>> import jax.numpy as jnp
      >>> x = 1e6 + jnp.array([[-1.0, 0.0], [1.0, jnp.nan], [3.0, 0.0]])
      >>> m = run_passes(PassConfig((0,), None, None), x, None, jnp.zeros((1, 2)))
      >>> [float(a[0, 0]) for a in (m.shift, m.offset, m.var)]  # re-centred
      [1000001.0, 0.0, 2.6666667]
      >>> int(m.flags) == COUNTED | NOT_FINITE
      True
    """
    xs = x.astype(mean_dtype(x.dtype))
    local_count = count_values(x, mask, cfg.axes)

    def again(state: tuple) -> jax.Array:
        flags = state[0][0]
        far = (flags & FAR) != 0
        if cfg.groups is not None:
            # Each group has its own statistics; every device must still take
            # the same number of passes, since each pass has an all-reduce.
            far = lax.pmax(far.astype(jnp.int32), cfg.axis_name) > 0
        passes = flags >> _PASS_SHIFT
        return (passes == 0) | ((passes <= _MAX_RECENTRES) & far)

    def one_more(state: tuple) -> tuple:
        flags, _, shift, offset, _ = state
        shift = shift + offset
        count, offset, var = _one_pass(cfg, xs, mask, local_count, shift)
        flags = _flags(flags[0] >> _PASS_SHIFT, count, (shift, offset, var))
        return flags, count, shift, offset, var

    kept = jnp.zeros_like(shift.real if is_complex(shift) else shift)
    state = (jnp.zeros(1, jnp.int32), kept, shift, jnp.zeros_like(shift), kept)
    if cfg.axis_name is not None or _manual(x, mask, shift):
        for _ in range(2):  # a value the body mixes with a varying one varies
            out = jax.eval_shape(one_more, state)
            state = jax.tree.map(_typed_like, state, out)
    flags, count, shift, offset, var = lax.while_loop(again, one_more, state)
    facts = (flags[0] & _FACTS).astype(count.dtype)
    return ShiftedMoments(count, shift, offset, var, facts)


def _manual(*arrays: Any) -> bool:
    """Whether any of the arrays varies over a manual mesh axis (shard_map)."""
    return any(
        getattr(jax.typeof(a).manual_axis_type, "varying", ())
        for a in arrays
        if a is not None
    )


def _typed_like(value: jax.Array, target: jax.ShapeDtypeStruct) -> jax.Array:
    """``value`` varying over the manual mesh axes that ``target`` varies over.

    (Inside ``jax.shard_map``, a loop's initial state must have its body's types.)
    """
    want = getattr(target.manual_axis_type, "varying", ())
    have = getattr(jax.typeof(value).manual_axis_type, "varying", ())
    missing = tuple(a for a in want if a not in have)
    return lax.pcast(value, missing, to="varying") if missing else value
