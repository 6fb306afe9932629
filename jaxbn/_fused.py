"""The fused training path: single-pass statistics and a closed-form backward.

Batch norm is memory-bound, so its cost is the number of passes over x. Let S be
the bytes of x. The training step here makes:

Forward (``fused_training``), two passes, 3S of traffic:

1. One fused reduction reads x and produces, per feature, the sums of
   ``x - shift`` and ``(x - shift)**2`` (and the count, from the mask, when there
   is one). The shift is each feature's first batch value (or the running mean
   where that value is masked), so ``x - shift`` is exact near the mean and the
   single-pass variance ``s2/n - (s1/n)**2`` does not cancel catastrophically.
   If a feature's offset ``s1/n`` is still large against its spread (the shift
   was a fallback far from the data), a second pass around ``shift + s1/n``
   recomputes the sums (a ``lax.cond``: it costs nothing when not taken).
2. One elementwise pass reads x and writes ``y = ((x - shift) - offset) *
   (scale * rsqrt(var + epsilon)) + bias`` in the output dtype.

Across devices (``axis_name``) the per-device count, mean and centred sum of
squares are merged with Chan et al.'s formula: two all-reduces, as in
``_statistics``.

Residuals: x in its own dtype (1S; no float32 copy for bfloat16/float16), the
mask as given (not broadcast), and per-feature shift, offset, inverse standard
deviation, count, scale and bias.

Backward (``jax.custom_vjp``), two passes, 5S of traffic: with ``xhat = ((x -
shift) - offset) * r`` recomputed on the fly and ``n`` the (global) count,

1. one fused reduction reads x and dy: ``sum(dy)`` and ``sum(dy * xhat)``, one
   all-reduce of both across devices;
2. one elementwise pass reads x and dy and writes ``dx = scale * r * (dy -
   sum(dy)/n - xhat * sum(dy * xhat)/n)`` for valid entries and ``scale * r *
   dy`` for masked ones (their values do not reach the statistics).

``dscale = sum(dy * xhat)`` and ``dbias = sum(dy)`` are the local sums (the
transpose of a device-invariant parameter sums them across devices). The batch
statistics returned for the running average carry no gradient.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Sequence
from functools import partial
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from ._normalize import normalize
from ._statistics import ShiftedMoments
from ._statistics import _first_values as _first_values
from ._statistics import _psum as psum_in_groups

# A second pass is taken when offset**2 > _RECENTRE * var for some feature: the
# single-pass variance then loses about log2(_RECENTRE) bits to cancellation.
_RECENTRE = 64.0


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
        scale, bias = _varying_as(scale, x), _varying_as(bias, x)
    return _train(config, x, mask, scale, bias, fallback_shift)


def _varying(a: jax.Array) -> frozenset:
    manual = getattr(jax.typeof(a), "mat", None)
    return frozenset() if manual is None else frozenset(manual.varying)


def _varying_as(a: jax.Array | None, x: jax.Array) -> jax.Array | None:
    """``a`` marked as varying over the ``jax.shard_map`` axes that x varies over.

    The backward returns each device's own gradient of scale and bias, typed
    like x; the transpose of this cast then sums them across devices, as
    autodiff would. Under ``jax.vmap`` nothing varies and ``a`` is returned.
    """
    if a is None:
        return None
    missing = tuple(sorted(_varying(x) - _varying(a), key=str))
    return lax.pcast(a, missing, to="varying") if missing else a


def _psum(x: jax.Array, config: _Config) -> jax.Array:
    return psum_in_groups(x, config.axis_name, config.groups)


def _psum_backward(x: jax.Array, config: _Config) -> jax.Array:
    """``_psum`` for the backward, where ``jax.vmap`` binds no axis size.

    Grouped sums that the collective does not implement (``jax.vmap``,
    ``jax.shard_map``) go through a table with one row per group, as in
    ``_statistics._psum``; the forward has already checked the groups.
    """
    groups = config.groups
    if groups is None:
        return lax.psum(x, config.axis_name)
    try:
        return lax.psum(x, config.axis_name, axis_index_groups=groups)
    except NotImplementedError:
        pass
    group_of = [0] * sum(len(g) for g in groups)
    for k, g in enumerate(groups):
        for i in g:
            group_of[i] = k
    mine = jnp.asarray(group_of, jnp.int32)[lax.axis_index(config.axis_name)]
    rows = jnp.arange(len(groups), dtype=jnp.int32).reshape((-1,) + (1,) * x.ndim)
    table = jnp.where(rows == mine, x[None], jnp.zeros_like(x[None]))
    return lax.psum(table, config.axis_name)[mine]


def _kept(x: jax.Array, reduction_axes: tuple[int, ...]) -> tuple[int, ...]:
    return tuple(1 if i in reduction_axes else d for i, d in enumerate(x.shape))


def _count(x: jax.Array, mask: jax.Array | None, axes: tuple[int, ...]) -> jax.Array:
    """Valid values per feature (float32), without broadcasting the mask to x."""
    kept = _kept(x, axes)
    if mask is None:
        n = math.prod(x.shape[a] for a in axes)
        return jnp.full(kept, n, jnp.float32)
    repeats = math.prod(x.shape[a] for a in axes if mask.shape[a] == 1)
    count = jnp.sum(mask, axis=axes, keepdims=True, dtype=jnp.float32)
    return jnp.broadcast_to(count * jnp.float32(repeats), kept)


def _shifted_sums(
    x: jax.Array, mask: jax.Array | None, shift: jax.Array, axes: tuple[int, ...]
) -> tuple[jax.Array, jax.Array]:
    """Sums of ``x - shift`` and its square over valid entries.

    The two reductions are given distinct producers (``x + (-shift)`` and ``x -
    shift``): XLA:CPU writes a producer shared by two reductions to memory,
    while an unshared one is fused into its reduction, which then reads only x.
    """
    xf = x.astype(jnp.float32)
    d1 = xf + (-shift)
    d2 = xf - shift
    if mask is not None:
        d1 = jnp.where(mask, d1, 0.0)  # NaN under False reaches no sum
        d2 = jnp.where(mask, d2, 0.0)
    return jnp.sum(d1, axes, keepdims=True), jnp.sum(d2 * d2, axes, keepdims=True)


def _moments(
    config: _Config, x: jax.Array, mask: jax.Array | None, fallback: jax.Array
) -> ShiftedMoments:
    axes = config.reduction_axes
    kept = _kept(x, axes)
    shift = _first_values(x, axes).astype(jnp.float32)
    if mask is not None:
        shift = jnp.where(_first_values(mask, axes), shift, fallback)
    shift = jnp.broadcast_to(shift, kept)
    count = _count(x, mask, axes)
    safe_count = jnp.maximum(count, 1.0)

    def single_pass(shift: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        s1, s2 = _shifted_sums(x, mask, shift, axes)
        offset = s1 / safe_count
        return shift, offset, jnp.maximum(s2 / safe_count - offset * offset, 0.0)

    shift, offset, var = single_pass(shift)
    shift, offset, var = lax.cond(
        jnp.any(offset * offset > _RECENTRE * var),
        lambda s, o, v: single_pass(s + o),
        lambda s, o, v: (s, o, v),
        shift,
        offset,
        var,
    )
    if config.axis_name is None:
        return ShiftedMoments(count, shift, offset, var)
    # Chan's parallel merge, as in ``_statistics.shifted_moments``: two
    # all-reduces, around a common rounded global mean so that every device
    # returns the same statistics.
    sums = _psum(jnp.stack([count, count * (shift + offset)]), config)
    global_count = jnp.maximum(sums[0], 1.0)
    common = sums[1] / global_count
    gap = (shift - common) + offset  # exact where shift is close to common
    both = _psum(jnp.stack([count * (var + gap * gap), count * gap]), config)
    global_offset = both[1] / global_count
    global_m2 = both[0] - global_count * global_offset * global_offset
    global_var = jnp.maximum(global_m2 / global_count, 0.0)
    return ShiftedMoments(sums[0], common, global_offset, global_var)


@partial(jax.custom_vjp, nondiff_argnums=(0,))
def _train(
    config: _Config,
    x: jax.Array,
    mask: jax.Array | None,
    scale: jax.Array | None,
    bias: jax.Array | None,
    fallback: jax.Array,
) -> tuple[jax.Array, ShiftedMoments]:
    y, moments, _ = _forward(config, x, mask, scale, bias, fallback)
    return y, moments


def _forward(
    config: _Config,
    x: jax.Array,
    mask: jax.Array | None,
    scale: jax.Array | None,
    bias: jax.Array | None,
    fallback: jax.Array,
) -> tuple[jax.Array, ShiftedMoments, jax.Array]:
    m = _moments(config, x, mask, fallback)
    y = normalize(
        x, m.offset, m.var, scale, bias, config.epsilon, config.dtype, m.shift
    )
    return y, m, lax.rsqrt(m.var + config.epsilon)


def _train_fwd(
    config: _Config,
    x: jax.Array,
    mask: jax.Array | None,
    scale: jax.Array | None,
    bias: jax.Array | None,
    fallback: jax.Array,
) -> tuple[tuple[jax.Array, ShiftedMoments], tuple]:
    y, m, r = _forward(config, x, mask, scale, bias, fallback)
    bias_dtype = None if bias is None else jnp.zeros((), bias.dtype)
    residuals = (x, mask, scale, bias_dtype, m.count, m.shift, m.offset, r)
    return (y, m), residuals


def _train_bwd(config: _Config, residuals: tuple, cotangents: tuple) -> tuple:
    x, mask, scale, bias_dtype, count, shift, offset, r = residuals
    dy = cotangents[0].astype(jnp.float32)  # the statistics carry no gradient
    axes = config.reduction_axes
    centred = x.astype(jnp.float32) - shift
    # sum(dy * xhat) = r * (sum(dy * (x - shift)) - offset * sum(dy)): the
    # reductions read x and dy only, with no full-size xhat written first.
    dy_centred = dy * centred
    if mask is not None:
        # A NaN under False with a zero cotangent must not poison the sums.
        dy_centred = jnp.where(dy == 0.0, 0.0, dy_centred)
    sum_dy = jnp.sum(dy, axes, keepdims=True)
    sum_dy_xhat = r * (jnp.sum(dy_centred, axes, keepdims=True) - offset * sum_dy)
    dscale = None if scale is None else sum_dy_xhat.astype(scale.dtype)
    dbias = None if bias_dtype is None else sum_dy.astype(bias_dtype.dtype)
    if config.axis_name is not None:
        sums = _psum_backward(jnp.stack([sum_dy, sum_dy_xhat]), config)
        sum_dy, sum_dy_xhat = sums[0], sums[1]
    inv_n = 1.0 / jnp.maximum(count, 1.0)
    gain = r if scale is None else r * scale.astype(jnp.float32)
    # Its own ``x + (-shift)``, not ``centred``: a producer shared with the
    # reduction above would be written to memory.
    xhat = ((x.astype(jnp.float32) + (-shift)) - offset) * r
    dx = gain * (dy - sum_dy * inv_n - xhat * (sum_dy_xhat * inv_n))
    if mask is not None:
        dx = jnp.where(mask, dx, gain * dy)
    return dx.astype(x.dtype), None, dscale, dbias, None


_train.defvjp(_train_fwd, _train_bwd)
