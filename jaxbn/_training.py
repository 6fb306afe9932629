"""The training step: batch statistics, normalization, and what autodiff saves.

Batch norm is memory-bound, so its cost is the number of passes over x. Let S be
the bytes of x. A training forward reads x three times and writes y once (4S of
traffic): the statistics' two fused reductions (``_statistics``; a re-centring
pass more, rarely, when the running mean is far from the batch mean), and one
elementwise pass that reads x and writes y. The backward reads x and dy twice
and writes dx: two reductions and one elementwise pass.

Every JAX transformation applies: the statistics have a closed-form, linear
tangent rule (``jax.custom_jvp`` in ``_statistics``), and the normalization is
plain elementwise ``jnp``, so ``jax.jvp``, ``jax.grad``, ``jax.linearize``,
``jax.hessian`` and ``jax.vmap`` all see ordinary code. For reverse mode the
step is wrapped in ``jax.checkpoint`` with a policy that saves only the
per-feature statistics: the residuals are x itself (1S, in x's own dtype) and
the mask, and the backward recomputes ``x - shift`` elementwise where it needs
it instead of storing full-size intermediates, and never re-runs the passes.
"""

from __future__ import annotations

import math
from collections.abc import Hashable
from functools import partial
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.ad_checkpoint import checkpoint_name

from ._hyperparams import Groups
from ._normalize import (
    RenormOperands,
    corrected,
    inverse_std,
    normalize,
    renorm_correction,
)
from ._statistics import SAVED, shifted_moments
from ._sums import Moments, ShiftedMoments, psum_parts, sanitized, weigh
from ._xla_cpu import centred_pair

_SAVE_STATISTICS = jax.checkpoint_policies.save_only_these_names(SAVED)


class StepOptions(NamedTuple):
    """The static (hashable) settings of one training step.

    Attributes:
      reduction_axes: the batch axes.
      epsilon: added to the variance.
      axis_name: optional named axis (or tuple) to synchronize statistics over.
      groups: optional groups of indices along ``axis_name``.
      dtype: the output dtype.
    """

    reduction_axes: tuple[int, ...]
    epsilon: float
    axis_name: Hashable | None
    groups: Groups | None
    dtype: Any


class Running(NamedTuple):
    """The running statistics a training step reads, shaped for x (no gradient).

    Attributes:
      mean: the running mean: the shift around which the sums are taken (the
        same on every device), and the mean of a feature with no valid value.
      var: the running variance, for a feature with no valid value.
      renorm: batch renormalization's operands, or None.
    """

    mean: jax.Array
    var: jax.Array
    renorm: RenormOperands | None = None


class Step(NamedTuple):
    """What a training step gives the running-average update.

    The whole batch's step (:func:`batch_step`) and the ghost batches'
    (``_ghost.ghost_training``) both return one.

    Attributes:
      y: the normalized x, in the step's output dtype.
      moments: the batch's count, mean and variance (no gradient), of x's
        rank with size-1 batch axes, global across ``axis_name``.
      finite: a scalar boolean, whether every statistic of the batch is finite.
      mean_is_finite: whether the mean is finite even in a batch that is not
        (known when tracing), so the update needs no guard for it.
    """

    y: jax.Array
    moments: Moments
    finite: jax.Array
    mean_is_finite: bool


def batch_step(
    x: jax.Array,
    mask: jax.Array | None,
    scale: jax.Array | None,
    bias: jax.Array | None,
    running: Running,
    options: StepOptions,
) -> Step:
    """:func:`training_step` on the whole batch, as a :class:`Step`."""
    y, m = training_step(x, mask, scale, bias, running, options)
    # The passes' margin is +inf where a statistic is not finite, and their
    # mean is finite even then (a non-finite feature's offset is 0).
    moments = Moments(m.count, m.shift + m.offset, m.var)
    return Step(y, moments, jnp.isfinite(m.margin), mean_is_finite=True)


def training_step(
    x: jax.Array,
    mask: jax.Array | None,
    scale: jax.Array | None,
    bias: jax.Array | None,
    running: Running,
    options: StepOptions,
) -> tuple[jax.Array, ShiftedMoments]:
    """Normalizes x with its batch statistics; returns ``(y, moments)``.

    A feature with no valid value (all masked, or an empty batch) is normalized
    with the running statistics, as evaluation would.

    Args:
      x: the input, any floating or complex dtype.
      mask: optional boolean array of x's rank, broadcastable to x; statistics use
        its True entries only. Or non-negative per-entry weights (real, the
        statistics' dtype): weighted statistics, the count a sum of weights.
      scale: optional scale, x's rank with size 1 along the reduction axes.
      bias: optional bias, same shape as ``scale``.
      running: the :class:`Running` statistics, shaped like ``scale``.
      options: the :class:`StepOptions`.

    Returns:
      ``y`` in ``options.dtype`` and the ``ShiftedMoments`` (no gradient) of
      the batch, global when ``options.axis_name`` is given.

    Examples:
      >>> import jax.numpy as jnp
      >>> x = jnp.array([[1.0, 10.0], [3.0, 30.0]])
      >>> running = Running(jnp.zeros((1, 2)), jnp.ones((1, 2)))
      >>> options = StepOptions((0,), 1e-5, None, None, jnp.float32)
      >>> y, m = training_step(x, None, None, None, running, options)
      >>> jnp.round(y, 4)
      Array([[-1., -1.],
             [ 1.,  1.]], dtype=float32)
      >>> m.shift + m.offset, m.var
      (Array([[ 2., 20.]], dtype=float32), Array([[  1., 100.]], dtype=float32))
    """
    running = lax.stop_gradient(running)
    if jnp.iscomplexobj(x):
        # jax.checkpoint's CSE barrier does not take complex values (jax
        # 0.10.2); complex input keeps autodiff's own residuals.
        return _train(options, sanitized(x, mask), mask, scale, bias, running)
    return _checkpointed(options, x, mask, scale, bias, running)


@partial(jax.checkpoint, policy=_SAVE_STATISTICS, static_argnums=(0,))
def _checkpointed(
    static: StepOptions,
    x: jax.Array,
    mask: jax.Array | None,
    scale: jax.Array | None,
    bias: jax.Array | None,
    running: Running,
) -> tuple[jax.Array, ShiftedMoments]:
    return _train(static, sanitized(x, mask), mask, scale, bias, running)


def every_feature_has_values(
    x: jax.Array, mask: jax.Array | None, axes: tuple[int, ...]
) -> bool:
    """Whether every feature has values, known when tracing: no mask, no empty axis."""
    return mask is None and all(x.shape[a] > 0 for a in axes)


def _forward(
    static: StepOptions,
    x: jax.Array,
    mask: jax.Array | None,
    scale: jax.Array | None,
    bias: jax.Array | None,
    running: Running,
) -> tuple[jax.Array, ShiftedMoments, ShiftedMoments, jax.Array, Any]:
    """``(y, moments, saved, variance, renorm's (r, d) or None)``.

    ``saved`` is ``moments`` named for the checkpoint policy; the variance and
    ``(r, d)`` are computed from it, for the tangent rule only. y and the
    returned moments use the unnamed ones: a saved value that the forward
    also uses gets a ``reduce_precision`` from ``jax.checkpoint``, one more
    compiled kernel per statistic.
    """
    axes, epsilon, axis_name, groups, dtype = static
    m = shifted_moments(x, axes, mask, axis_name, groups, running.mean)
    saved = ShiftedMoments(*(checkpoint_name(a, SAVED) for a in m))
    var, corr = _variance_used(static, x, mask, running, m)
    if corr is not None:  # renorm: (x_hat * r + d) * scale + bias
        scale, bias = corrected(scale, bias, *corr)
    y = normalize(x, m.offset, var, scale, bias, epsilon, dtype, m.shift)
    return (y, m, saved, *_variance_used(static, x, mask, running, saved))


def _variance_used(
    static: StepOptions,
    x: jax.Array,
    mask: jax.Array | None,
    running: Running,
    m: ShiftedMoments,
) -> tuple[jax.Array, Any]:
    """The variance that normalizes x, and renorm's ``(r, d)`` or None."""
    # Features with no valid value have offset 0 around the running mean
    # already; they take the running variance too. Without a mask every
    # feature of a non-empty batch has values: no select to compile.
    var = m.var
    if not every_feature_has_values(x, mask, static.reduction_axes):
        var = jnp.where(m.count > 0, m.var, running.var.astype(m.var.dtype))
    if running.renorm is None:
        return var, None
    mean = m.shift + m.offset
    return var, renorm_correction(m.count, mean, var, running.renorm, static.epsilon)


def _inverse_count(
    static: StepOptions, x: jax.Array, mask: jax.Array | None, count: jax.Array
) -> Any:
    """``1 / max(count, 1)``; a Python float when the count is known when tracing.

    (Without a mask or a named axis: then no per-feature kernel computes it.)
    """
    axes = static.reduction_axes
    if static.axis_name is None and every_feature_has_values(x, mask, axes):
        return 1.0 / math.prod(x.shape[a] for a in axes)
    return 1.0 / jnp.maximum(count, 1.0)


@partial(jax.custom_jvp, nondiff_argnums=(0,))
def _train(
    static: StepOptions,
    x: jax.Array,
    mask: jax.Array | None,
    scale: jax.Array | None,
    bias: jax.Array | None,
    running: Running,
) -> tuple[jax.Array, ShiftedMoments]:
    y, m, _, _, _ = _forward(static, x, mask, scale, bias, running)
    return y, lax.stop_gradient(m)


@_train.defjvp
def _train_jvp(static: StepOptions, primals: tuple, tangents: tuple) -> tuple:
    """The tangent of y, linear in (dx, dscale, dbias), shaped for its transpose.

    With ``c = (x - shift) - offset``, ``r = rsqrt(var + epsilon)``, ``g =
    scale * r`` and sums over the valid entries divided by the count n:

        dy = g * dx + c * (dscale * r - g * r**2 * sum(Re(conj(c) dx))/n)
             + (dbias - g * sum(dx)/n)

    Every full-size term is a full-size array times a per-feature one, so the
    transpose (reverse mode) needs just two reductions, ``sum(dy)`` and
    ``sum(dy * c)``, shared by the parameter and input gradients, and one
    elementwise pass for dx: the closed-form backward. Batch renormalization's
    ``(r, d)`` (no gradient) make ``g = scale * r_bn * r`` and add ``dscale *
    d`` to the per-feature constant.
    """
    x, mask, scale, bias, running = primals
    dx, _, dscale, dbias, _ = tangents
    axes, epsilon, axis_name, groups, _ = static
    y, moments, m, var, corr = _forward(static, x, mask, scale, bias, running)
    real = var.dtype
    r = inverse_std(var, epsilon)
    g = r if scale is None else r * scale.astype(real)
    if corr is not None:
        g = g * corr[0]
    xc = x.astype(m.shift.dtype)
    t = dx.astype(m.shift.dtype)
    # Two expressions for the same centred x (see ``_xla_cpu.centred_pair``):
    # one feeds the reduction of the transpose, the other its elementwise pass.
    centred, c_sum = centred_pair(xc, m.shift, m.offset)
    tc = t * jnp.conj(c_sum) if jnp.iscomplexobj(t) else t * c_sum
    tc = tc.real
    if mask is not None:
        t, tc = weigh(t, mask), weigh(tc, mask)
    sum_t = jnp.sum(t, axes, keepdims=True)
    sum_tc = jnp.sum(tc, axes, keepdims=True)
    if axis_name is not None:
        sum_t, sum_tc = psum_parts([sum_t, sum_tc], axis_name, groups)
    inv_n = _inverse_count(static, x, mask, m.count)
    per_c = -(g * r * r) * (sum_tc * inv_n)
    if dscale is not None:
        dscale_r = dscale.astype(real) * r
        per_c = per_c + (dscale_r if corr is None else dscale_r * corr[0])
    # An overflowed feature (r = 0) has a constant output, so this factor is
    # 0; but its sums may be inf (and sum(c * dy) in the transpose too), and
    # 0 * inf would be NaN. The select's transpose zeroes the cotangent sum
    # before it meets r, for the input's and the scale's gradients alike.
    # (jnp.where: a call-time scale may make per_c larger than r, or sharded
    # differently.)
    per_c = jnp.where(r == 0, jnp.zeros_like(per_c), per_c)
    per_1 = -g * (sum_t * inv_n)
    if dbias is not None:
        per_1 = per_1 + dbias.astype(real)
    if corr is not None and dscale is not None:
        per_1 = per_1 + dscale.astype(real) * corr[1]
    dy = g * dx.astype(m.shift.dtype) + centred * per_c + per_1
    zeros = jax.tree.map(jnp.zeros_like, moments)
    return (y, lax.stop_gradient(moments)), (dy.astype(y.dtype), zeros)
