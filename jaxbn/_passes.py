"""The passes over x: the sums around a shift, re-centred while far, in one loop.

One fused pass over x gives, per feature, the sums of ``d = x - shift`` and
``|d|**2`` over the valid entries (across devices: one all-reduce). With
``offset = s1/n``, the variance is ``s2/n - |offset|**2``; it loses
``log2(1 + |offset|**2 / var)`` bits to cancellation, so when any feature's
``|offset|**2`` exceeds ``var`` (plus the float resolution of the shift
itself) the pass is redone around ``shift + offset``, at most twice.

The passes are one ``lax.while_loop`` whose body is the pass (a do-while): it
runs once around the running mean, and again only when needed, and the pass is
compiled once. The loop's one reduction across the features, the largest
``margin`` by which a feature is far, is infinite when a statistic is not
finite, so it also tells the running-average update whether to take the batch.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from ._sums import (
    ShiftedMoments,
    abs2,
    count_values,
    mean_dtype,
    psum_parts,
    real_dtype,
    weigh,
)
from ._xla_cpu import shifted_pair

# Re-centre while |offset|**2 > var (+ resolution): at most one bit is lost.
_MAX_PASSES = 3


class PassConfig(NamedTuple):
    """Static (hashable) settings of one statistics call.

    Attributes:
      axes: the batch axes.
      axis_name: the named axis (or tuple) to sum over, or None.
      groups: groups of indices along ``axis_name``, or None.
      count: the number of values per feature when it is known when tracing
        (no mask; across the devices of ``axis_name`` too), else None.
    """

    axes: tuple[int, ...]
    axis_name: Any
    groups: tuple[tuple[int, ...], ...] | None
    count: float | None


class _State(NamedTuple):
    """The loop's carry: the statistics of the last pass, and how many.

    ``count`` is carried only when it is not known when tracing (else None).
    ``passes`` and ``margin`` are scalars: as shape-(1,) arrays (which XLA's
    search for a loop counter skips) they cost 9 more ops per batch norm,
    and a paired compile of ResNet-50's train step was 6% slower with them
    (``benchmarks.ab``, jaxlib 0.10.2).
    """

    passes: jax.Array
    count: jax.Array | None
    shift: jax.Array
    offset: jax.Array
    var: jax.Array
    margin: jax.Array


def _one_pass(
    cfg: PassConfig, xs: jax.Array, mask: Any, local_count: Any, shift: jax.Array
) -> tuple[jax.Array | None, jax.Array, jax.Array, jax.Array]:
    """One fused pass over x around ``shift``: ``(count or None, offset, var, margin)``.

    ``margin`` is the largest ``|offset|**2 - var - resolution`` across the
    features: > 0 if a feature is far from its shift. A scalar reduction
    across the features (a max, which feature-sharded ``jit`` turns into an
    all-reduce). A feature whose sums are not finite counts as +inf: the
    margin is infinite exactly when some statistic is not finite, which
    tells the update to skip the batch. Such a batch takes every pass, so
    that its finite features are still re-centred.
    """
    d1, d2 = shifted_pair(xs, shift)
    d2 = abs2(d2)
    if mask is not None:
        d1, d2 = weigh(d1, mask), weigh(d2, mask)
    s1 = jnp.sum(d1, cfg.axes, keepdims=True)
    s2 = jnp.sum(d2, cfg.axes, keepdims=True)
    if cfg.count is not None:
        count = None
        if cfg.axis_name is not None:
            s1, s2 = psum_parts([s1, s2], cfg.axis_name, cfg.groups)
        inv_n = 1.0 / cfg.count
    else:
        count = local_count
        if cfg.axis_name is not None:
            count, s1, s2 = psum_parts([count, s1, s2], cfg.axis_name, cfg.groups)
        inv_n = 1.0 / jnp.maximum(count, 1.0)
    # A sum of squares that overflows (finite x, |x - shift| ~ 1e19 in
    # float32) makes the variance inf; the offset is then 0, so that x - shift
    # stays finite and normalizes to the bias. (NaN input keeps s2 NaN.) The
    # one test of finiteness serves the offset and the margin: the variance
    # is finite exactly where s2 is.
    finite = jnp.isfinite(s2)
    offset = lax.select(finite, s1 * inv_n, jnp.zeros_like(s1))
    offset2 = abs2(offset)
    var = jnp.maximum(s2 * inv_n - offset2, 0.0)
    resolution = (4.0 * float(jnp.finfo(var.dtype).eps)) ** 2
    far = offset2 - var - resolution * abs2(shift)
    margin = jnp.max(lax.select(finite, far, jnp.full_like(far, jnp.inf)))
    return count, offset, var, margin


def run_passes(
    cfg: PassConfig, x: jax.Array, mask: Any, shift: jax.Array
) -> ShiftedMoments:
    """The sums and re-centring passes; never differentiated.

    Args:
      cfg: the batch axes, the named axis (and its groups) to sum over, and
        the count if it is known when tracing.
      x: the input.
      mask: None, a boolean mask or weights, broadcastable to x.
      shift: the starting shift, x's rank with size-1 batch axes, the same on
        every device.

    Returns:
      The ``ShiftedMoments`` of the last pass.

    Examples:
      >>> import jax.numpy as jnp
      >>> x = 1e6 + jnp.array([[-1.0, 0.0], [1.0, jnp.nan], [3.0, 0.0]])
      >>> cfg = PassConfig((0,), None, None, 3.0)
      >>> m = run_passes(cfg, x, None, jnp.zeros((1, 2)))
      >>> [float(a[0, 0]) for a in (m.shift, m.offset, m.var)]  # re-centred
      [1000001.0, 0.0, 2.6666667]
      >>> bool(jnp.isinf(m.margin))  # a statistic is not finite
      True
    """
    xs = x.astype(mean_dtype(x.dtype))
    local_count = None if cfg.count is not None else count_values(x, mask, cfg.axes)

    def again(state: _State) -> jax.Array:
        far = state.margin > 0  # +inf before the first pass
        if cfg.groups is not None:
            # Each group has its own statistics; every device must still take
            # the same number of passes, since each pass has an all-reduce.
            far = lax.pmax(far.astype(jnp.int32), cfg.axis_name) > 0
        return (state.passes < _MAX_PASSES) & far

    def one_more(state: _State) -> _State:
        shift = state.shift + state.offset
        count, offset, var, margin = _one_pass(cfg, xs, mask, local_count, shift)
        return _State(state.passes + 1, count, shift, offset, var, margin)

    real = real_dtype(x.dtype)
    zero = jnp.zeros(shift.shape, real)
    state = _State(
        passes=jnp.zeros((), jnp.int32),
        count=None if cfg.count is not None else zero,
        shift=shift,
        offset=zero if zero.dtype == shift.dtype else jnp.zeros_like(shift),
        var=zero,
        margin=jnp.full((), jnp.inf, real),
    )
    if _typed(x, mask, shift):
        for _ in range(2):  # a value the body mixes with a typed one is typed
            state = jax.tree.map(_typed_like, state, jax.eval_shape(one_more, state))
    out = lax.while_loop(again, one_more, state)
    count = out.count
    if count is None:
        assert cfg.count is not None
        count = jnp.full(shift.shape, cfg.count, real)
    return ShiftedMoments(count, out.shift, out.offset, out.var, out.margin)


def _typed(*arrays: Any) -> bool:
    """Whether any array's type carries a mesh: manual axes, or Explicit sharding."""
    for a in arrays:
        if a is None:
            continue
        aval = jax.typeof(a)
        if getattr(aval.manual_axis_type, "varying", ()):
            return True
        spec = getattr(getattr(aval, "sharding", None), "spec", ())
        if any(s is not None for s in spec):
            return True
    return False


def _typed_like(value: jax.Array, target: jax.ShapeDtypeStruct) -> jax.Array:
    """``value`` with ``target``'s type: its manual axes and Explicit sharding.

    (A loop's initial state must have its body's types: inside
    ``jax.shard_map`` the manual axes it varies over, and on a mesh with
    Explicit axes its sharding, e.g. x's features sharded over ``"model"``
    while the running statistics are replicated.)
    """
    want = getattr(target.manual_axis_type, "varying", ())
    have = getattr(jax.typeof(value).manual_axis_type, "varying", ())
    missing = tuple(a for a in want if a not in have)
    if missing:
        value = lax.pcast(value, missing, to="varying")
    sharding = getattr(target, "sharding", None)
    spec = getattr(sharding, "spec", None)
    if spec is not None and jax.typeof(value).sharding.spec != spec:
        value = jax.sharding.reshard(value, sharding)
    return value
