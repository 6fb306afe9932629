"""Batch statistics: per-feature count, mean and biased variance.

This is the one place where jaxbn reduces x over the batch. It keeps the count of
values behind each feature's statistics so that every merge (across devices,
masked entries) weights by counts, never averaging means.

The design, the same for one device and for many:

1. One fused pass over x gives, per feature, the sums of ``d = x - shift`` and
   ``|d|**2`` over the valid entries, around a ``shift`` that every device
   shares and that does not depend on the batch's order: the running mean.
   Across devices (``axis_name``) one all-reduce of ``(count, s1, s2)`` gives
   the global sums.
2. With ``offset = s1/n``, the variance is ``s2/n - |offset|**2``. It loses
   ``log2(1 + |offset|**2 / var)`` bits to cancellation, so when any feature's
   ``|offset|**2`` exceeds ``var`` (plus the float resolution of the shift
   itself) the pass is redone around ``shift + offset``, at most twice. The
   passes are one ``lax.while_loop`` whose body is the pass: it runs once, and
   again only when needed (its predicate is the same on every device), so the
   pass is compiled once. The result loses at most about one bit against an
   exact two-pass computation, whatever the order of the batch, and
   ``E[x^2] - E[x]^2`` is never formed.
3. The same reduction across the features that decides another pass also
   records whether every mean and variance is finite and whether any feature
   has a value (``ShiftedMoments.flags``), so the running-average update needs
   no reduction of its own.

The statistics are computed in float32, or float64 for float64 input; complex
input has a complex mean and the real variance ``E|x - mean|^2``. Their
derivatives are given in closed form (a ``jax.custom_jvp`` whose tangent rule
is linear, so JAX transposes it for reverse mode and differentiates it again
for higher orders); the passes themselves are never differentiated.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Sequence
from functools import partial
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.ad_checkpoint import checkpoint_name

from ._hyperparams import canonical_groups
from ._xla_cpu import shifted_pair

AxisName = Hashable | tuple[Hashable, ...]

# Name of the per-feature statistics that a training step saves for its
# backward pass (``jax.checkpoint`` policy); everything full-size is recomputed.
SAVED = "jaxbn_statistics"
# Re-centre while |offset|**2 > _RECENTRE * var (+ resolution): at most one bit.
_RECENTRE = 1.0
_MAX_RECENTRES = 2
# Bits of ``ShiftedMoments.flags``, each set if it holds for some feature.
FAR = 1  # the mean is far from the shift (another pass would help)
NOT_FINITE = 2  # a mean or a variance is NaN or infinite
COUNTED = 4  # the feature has a valid value (count > 0)
_FACTS = FAR | NOT_FINITE | COUNTED
_PASS_SHIFT = 3  # inside the loop, the passes done are the flags' higher bits


class Moments(NamedTuple):
    """Per-feature batch statistics, each shaped like x with size-1 batch axes.

    Attributes:
      count: number of values behind each feature (0 where all are masked).
      mean: the batch mean (complex for complex x).
      var: the biased batch variance (real, never negative).
    """

    count: jax.Array
    mean: jax.Array
    var: jax.Array


class ShiftedMoments(NamedTuple):
    """``Moments`` with the mean kept as ``shift + offset`` for accuracy.

    ``shift`` is the running mean, moved to ``shift + offset`` by re-centring
    passes (no gradient), so ``x - shift`` is exact for x near the mean and
    ``offset`` is small: the normalization ``(x - shift) - offset`` keeps the
    precision that a rounded float32 mean of, say, ``1e6 + N(0, 1)`` would
    lose. ``flags`` (a scalar, batched only under ``jax.vmap``) has the bits
    ``FAR``, ``NOT_FINITE`` and ``COUNTED`` of what the last pass found in
    some feature, as a small integer in the count's float dtype (so that,
    like the other fields, it has a tangent: zero).
    """

    count: jax.Array
    shift: jax.Array
    offset: jax.Array
    var: jax.Array
    flags: jax.Array


def real_dtype(dtype: Any) -> np.dtype:
    """The dtype of the statistics' count and variance for input ``dtype``."""
    wide = jnp.dtype(dtype) in (jnp.dtype(jnp.float64), jnp.dtype(jnp.complex128))
    return jnp.dtype(jnp.float64 if wide else jnp.float32)


def mean_dtype(dtype: Any) -> np.dtype:
    """The dtype of the mean for input ``dtype`` (complex for complex input)."""
    real = real_dtype(dtype)
    if jnp.issubdtype(dtype, jnp.complexfloating):
        return jnp.dtype(jnp.complex128 if real == jnp.float64 else jnp.complex64)
    return real


def abs2(z: jax.Array) -> jax.Array:
    """``|z|**2``, real, without a square root."""
    if jnp.issubdtype(z.dtype, jnp.complexfloating):
        return z.real * z.real + z.imag * z.imag
    return z * z


def psum_in_groups(x: jax.Array, axis_name: AxisName, groups: Any) -> jax.Array:
    """``lax.psum`` over ``axis_name``, within ``groups`` if given: one all-reduce.

    ``jax.shard_map`` and ``jax.vmap`` (unlike ``jax.pmap``) do not implement
    ``axis_index_groups``, so everywhere each device puts its value in its
    group's row of a zero table, one ungrouped psum fills every row, and each
    device reads its own group's row back.
    """
    if groups is None:
        return lax.psum(x, axis_name)
    group_of = [0] * sum(len(g) for g in groups)
    for k, g in enumerate(groups):
        for i in g:
            group_of[int(i)] = k
    mine = jnp.asarray(group_of, jnp.int32)[lax.axis_index(axis_name)]
    rows = jnp.arange(len(groups), dtype=jnp.int32).reshape((-1,) + (1,) * x.ndim)
    table = jnp.where(rows == mine, x[None], jnp.zeros_like(x[None]))
    return lax.psum(table, axis_name)[mine]


def psum_parts(parts: list[jax.Array], axis_name: Any, groups: Any) -> list:
    """Sums same-shaped per-feature arrays across devices in one all-reduce."""
    real = [p for a in parts for p in ((a.real, a.imag) if _is_complex(a) else (a,))]
    summed = psum_in_groups(jnp.stack(real), axis_name, groups)
    out, i = [], 0
    for a in parts:
        if _is_complex(a):
            out.append(lax.complex(summed[i], summed[i + 1]))
            i += 2
        else:
            out.append(summed[i])
            i += 1
    return out


def _is_complex(a: jax.Array) -> bool:
    return jnp.issubdtype(a.dtype, jnp.complexfloating)


def _kept_shape(shape: tuple[int, ...], axes: tuple[int, ...]) -> tuple[int, ...]:
    return tuple(1 if i in axes else d for i, d in enumerate(shape))


def weigh(a: jax.Array, mask: jax.Array) -> jax.Array:
    """``a`` where a boolean mask is True (0 elsewhere), or ``a`` times weights.

    A mask is the 0/1 case of per-example weights; both enter the sums here.
    """
    if mask.dtype == jnp.bool_:
        return jnp.where(mask, a, jnp.zeros((), a.dtype))
    return a * mask.astype(a.real.dtype)


def valid(mask: jax.Array) -> jax.Array:
    """The entries a boolean mask or weights count (True, or weight > 0)."""
    return mask if mask.dtype == jnp.bool_ else mask > 0


def sanitized(x: jax.Array, mask: jax.Array | None) -> jax.Array:
    """X with each masked non-finite entry read as 0 (padding may hold NaN).

    So such an entry reaches neither the statistics nor any gradient.
    """
    if mask is None:
        return x
    return jnp.where(valid(mask) | jnp.isfinite(x), x, jnp.zeros((), x.dtype))


def _count(x: jax.Array, mask: jax.Array | None, axes: tuple[int, ...]) -> jax.Array:
    """Valid values (sum of weights) per feature, without broadcasting the mask."""
    kept = _kept_shape(x.shape, axes)
    dtype = real_dtype(x.dtype)
    if mask is None:
        return jnp.full(kept, math.prod(x.shape[a] for a in axes), dtype)
    repeats = math.prod(x.shape[a] for a in axes if mask.shape[a] == 1)
    count = jnp.sum(mask, axis=axes, keepdims=True, dtype=dtype)
    return jnp.broadcast_to(count * jnp.asarray(repeats, dtype), kept)


class _Config(NamedTuple):
    """Static (hashable) settings of one statistics call."""

    axes: tuple[int, ...]
    axis_name: Any
    groups: tuple[tuple[int, ...], ...] | None


def _one_pass(
    cfg: _Config, xs: jax.Array, mask: Any, local_count: jax.Array, shift: jax.Array
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
    (which, for a scalar, it tries at length in every simplification round).
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


def _passes(cfg: _Config, x: jax.Array, mask: Any, shift: jax.Array) -> ShiftedMoments:
    """The sums and re-centring passes; never differentiated.

    The passes are one ``lax.while_loop`` whose body runs once around the
    running mean, and again while a feature's mean is far from its shift:
    the pass's kernels are compiled once.
    """
    xs = x.astype(mean_dtype(x.dtype))
    local_count = _count(x, mask, cfg.axes)

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

    kept = jnp.zeros_like(shift.real if _is_complex(shift) else shift)
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


@partial(jax.custom_jvp, nondiff_argnums=(0,))
def _moments(cfg: _Config, x: jax.Array, mask: Any, shift: jax.Array) -> ShiftedMoments:
    return _passes(cfg, x, mask, shift)


@_moments.defjvp
def _moments_jvp(cfg: _Config, primals: tuple, tangents: tuple) -> tuple:
    x, mask, shift = primals
    dx = tangents[0]
    m = ShiftedMoments(
        *(checkpoint_name(a, SAVED) for a in _moments(cfg, x, mask, shift))
    )
    dtype = m.shift.dtype
    t = dx.astype(dtype)
    centred = (x.astype(dtype) - m.shift) - m.offset
    dvar_terms = centred * t if not _is_complex(t) else (jnp.conj(centred) * t).real
    if mask is not None:
        t, dvar_terms = weigh(t, mask), weigh(dvar_terms, mask)
    sum_t = jnp.sum(t, cfg.axes, keepdims=True)
    sum_ct = jnp.sum(dvar_terms, cfg.axes, keepdims=True)
    if cfg.axis_name is not None:
        sum_t, sum_ct = psum_parts([sum_t, sum_ct], cfg.axis_name, cfg.groups)
    safe = jnp.maximum(m.count, 1.0)
    tangent = ShiftedMoments(
        jnp.zeros_like(m.count),
        jnp.zeros_like(m.shift),
        sum_t / safe,
        2.0 * sum_ct / safe,
        jnp.zeros_like(m.flags),
    )
    return m, tangent


def shifted_moments(
    x: jax.Array,
    reduction_axes: tuple[int, ...],
    mask: jax.Array | None = None,
    axis_name: AxisName | None = None,
    axis_index_groups: Sequence[Sequence[int]] | None = None,
    shift: jax.Array | None = None,
) -> ShiftedMoments:
    """The statistics of :func:`batch_moments`, mean split as ``shift + offset``.

    Args:
      x: the input, any floating or complex dtype.
      reduction_axes: the batch axes.
      mask: optional boolean array of x's rank, broadcastable to x, or
        non-negative weights (real, the statistics' dtype) of the same kind:
        then the count is the sum of weights and the sums are weighted.
      axis_name: optional named axis (or tuple) to merge the statistics over.
      axis_index_groups: optional groups of indices along ``axis_name``.
      shift: the starting shift (the running mean), x's rank with size-1 batch
        axes; default 0. It must be the same on every device of ``axis_name``.

    Returns:
      ``ShiftedMoments`` with x's rank and size 1 along ``reduction_axes``;
      global when ``axis_name`` is given. ``offset`` and ``var`` carry the
      exact derivatives of the mean and variance; count and shift carry none.
    """
    axes = tuple(sorted(int(a) for a in reduction_axes))
    groups = canonical_groups(axis_index_groups)
    kept = _kept_shape(x.shape, axes)
    start = jnp.zeros(kept, mean_dtype(x.dtype))
    if shift is not None:
        start = start + shift.astype(start.dtype)
    return _moments(_Config(axes, axis_name, groups), x, mask, lax.stop_gradient(start))


def batch_moments(
    x: jax.Array,
    reduction_axes: tuple[int, ...],
    mask: jax.Array | None = None,
    axis_name: AxisName | None = None,
    axis_index_groups: Sequence[Sequence[int]] | None = None,
) -> Moments:
    """Computes the per-feature count, mean and biased variance of ``x``.

    Args:
      x: the input, any floating or complex dtype; statistics are computed in
        float32, or float64 for float64 input.
      reduction_axes: the batch axes to reduce over.
      mask: optional boolean array of x's rank broadcastable to x; False
        entries are ignored (they may hold NaN).
      axis_name: optional named axis (or tuple of names) of ``jax.vmap``,
        ``jax.shard_map`` or ``jax.pmap`` to synchronize the statistics over.
      axis_index_groups: optional groups of indices along ``axis_name``; each
        group gets its own statistics.

    Returns:
      ``Moments`` with x's rank and size 1 along ``reduction_axes``;
      differentiable (mean and variance) in forward and reverse mode.

    Examples:
      >>> import jax.numpy as jnp
      >>> x = jnp.array([[1.0, 10.0], [3.0, 10.0]])
      >>> m = batch_moments(x, reduction_axes=(0,))
      >>> m.mean, m.var
      (Array([[ 2., 10.]], dtype=float32), Array([[1., 0.]], dtype=float32))
    """
    m = shifted_moments(x, reduction_axes, mask, axis_name, axis_index_groups)
    return Moments(m.count, m.shift + m.offset, m.var)


def devices_in_axis(axis_name: AxisName | None, groups: Any) -> int:
    """Number of devices whose values are pooled, known at trace time (1 if none).

    Raises:
      ValueError: if ``axis_name`` is not bound, or ``groups`` do not split its
        indices into equal groups with each index once.
    """
    if axis_name is None:
        return 1
    try:
        size = int(lax.axis_size(axis_name))  # pyright: ignore[reportArgumentType]
    except Exception as err:  # unbound axis name
        raise ValueError(
            f"axis_name={axis_name!r} is not bound here. Call apply inside "
            "jax.shard_map, jax.pmap or jax.vmap with that axis_name, or pass "
            "axis_name=None: sharded jax.jit computes global statistics without it."
        ) from err
    if groups is None:
        return size
    members = sorted(int(i) for g in groups for i in g)
    if members != list(range(size)) or len({len(g) for g in groups}) != 1:
        raise ValueError(
            f"axis_index_groups={groups!r} must split the {size} indices of "
            f"axis_name={axis_name!r} into groups of equal size, each index once."
        )
    return len(groups[0])
