"""``jaxbn.linen.BatchNorm``: a drop-in for ``flax.linen.BatchNorm``.

Replace ``nn.BatchNorm`` with ``jaxbn.linen.BatchNorm`` and keep the rest of the
model: the same fields, the same variables (``params``: scale, bias;
``batch_stats``: mean, var, plus jaxbn's ``count`` when the layer keeps one:
with warm-up, on by default) and
the same ``model.apply(variables, x, mutable=['batch_stats'])``. The maths is
:func:`jaxbn.batch_norm`'s; this module only owns the Flax variables.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from functools import cached_property
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax.linen import initializers

from . import _pipeline as pipeline
from ._config import VARIANTS, BatchNormConfig, Clip, Debias, EvalMode, RunningVar
from ._converged import CONVERGED_COUNT as CONVERGED_COUNT
from ._converged import COUNT_DTYPE, check_count, converged
from ._types import Params

__all__ = ["CONVERGED_COUNT", "BatchNorm", "from_flax_variables"]

_NOT_MUTABLE = (
    "jaxbn.linen.BatchNorm is training (use_running_average=False) but "
    "the 'batch_stats' collection is not mutable, so its running "
    "statistics cannot be updated. Pass it as mutable and keep the "
    "update: y, updates = model.apply(variables, x, "
    "mutable=['batch_stats']), then variables = {**variables, "
    "**updates}. For evaluation pass use_running_average=True instead."
)


class BatchNorm(nn.Module):
    """Batch normalization with Flax's interface and jaxbn's core.

    The fields are those of ``flax.linen.BatchNorm`` with the same defaults, plus
    ``warmup``; see :func:`jaxbn.batch_norm` for the maths. Differences from
    Flax:

    * Warm-up (the default ``warmup=None`` turns it on, except with
      ``momentum=None`` or ``1.0``) raises the running-average decay from 0.1
      to ``momentum`` over the first updates, which ``batch_stats['count']`` (a
      float32 scalar, exact up to ``2**24`` updates) counts. ``warmup=False``
      updates exactly like Flax and has exactly Flax's variables (no count,
      unless ``momentum=None``, renorm or ``debias`` needs one).
    * Statistics are always computed in float32 (or wider, for float64 or
      complex x), shifted by the running mean and re-centred when it is
      far from the batch mean (see :func:`jaxbn.batch_norm`):
      ``use_fast_variance`` and ``force_float32_reductions`` are accepted and
      ignored, and running
      statistics are never kept in a lower precision.
    * Training without ``mutable=['batch_stats']`` raises a ``ValueError`` that
      says so, instead of silently dropping or failing on the update.
    * Variables from ``flax.linen.BatchNorm`` (no ``count``) are treated as
      converged statistics (decay ``momentum`` from the first step); call
      :func:`from_flax_variables` once after loading to make this explicit.
    * ``use_running_average`` may also be a scalar boolean array, choosing the
      mode at run time in one compiled function.

    As in Flax, ``init`` records nothing and, in training mode, normalizes with
    the batch's own statistics (without ``axis_name`` synchronization, so it
    runs outside ``shard_map``); a single value per feature normalizes to the
    bias; integer x is promoted to float; complex x is supported.

    Attributes:
      use_running_average: if True, normalize with the stored statistics
        (evaluation); if False, with the batch's, updating them (training).
        Give it here or at call time, not both.
      axis: the feature axis, or a tuple of them.
      momentum: decay of the running average, in ``[0, 1]``, or None.
      epsilon: added to the variance.
      dtype: output dtype; default ``jnp.result_type`` of x and the params.
      param_dtype: dtype of scale and bias.
      use_bias: whether to learn a bias.
      use_scale: whether to learn a scale.
      bias_init: initializer of the bias.
      scale_init: initializer of the scale.
      axis_name: named axis of ``shard_map``/``pmap``/``vmap`` over which to
        synchronize statistics (not used during init, as in Flax).
      axis_index_groups: groups of ``axis_name`` indices with separate statistics.
      use_fast_variance: accepted for compatibility; jaxbn's variance is always
        the stable one, from sums around the running mean (never
        ``E[x**2] - E[x]**2``).
      force_float32_reductions: accepted for compatibility; jaxbn always reduces
        in float32 (float64 for float64 x).
      warmup: whether the running-average decay warms up; the default
        None means on, except with ``momentum=None`` or ``1.0`` (as in
        :func:`jaxbn.batch_norm`).
      running_var, renorm, rmax, dmax, renorm_momentum, virtual_batch_size,
        eval_mode, zero_masked, debias: the core's training-time variants, see
        :func:`jaxbn.batch_norm` (renorm adds ``renorm_mean`` and
        ``renorm_std`` to ``batch_stats``; ``momentum=None`` and renorm keep a
        ``count`` even with ``warmup=False``).

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> import jaxbn.linen
      >>> model = jaxbn.linen.BatchNorm(use_running_average=False, momentum=0.9)
      >>> x = jnp.array([[1.0, 10.0], [3.0, 30.0]])
      >>> variables = model.init(jax.random.key(0), x)
      >>> jax.tree.map(jnp.shape, variables["batch_stats"])
      {'count': (), 'mean': (2,), 'var': (2,)}
      >>> y, updates = model.apply(variables, x, mutable=["batch_stats"])
      >>> jnp.round(y, 4)
      Array([[-1., -1.],
             [ 1.,  1.]], dtype=float32)
      >>> updates["batch_stats"]["mean"], updates["batch_stats"]["count"]
      (Array([ 1.8, 18. ], dtype=float32), Array(1., dtype=float32))
      >>> flax_like = jaxbn.linen.BatchNorm(use_running_average=False, warmup=False)
      >>> flax_vars = flax_like.init(jax.random.key(0), x)
      >>> {name: sorted(flax_vars[name]) for name in sorted(flax_vars)}
      {'batch_stats': ['mean', 'var'], 'params': ['bias', 'scale']}
    """

    use_running_average: bool | None = None
    axis: int | Sequence[int] = -1
    momentum: float | None = 0.99
    epsilon: float = 1e-5
    dtype: Any = None
    param_dtype: Any = jnp.float32
    use_bias: bool = True
    use_scale: bool = True
    bias_init: Any = initializers.zeros
    scale_init: Any = initializers.ones
    axis_name: Any = None
    axis_index_groups: Any = None
    use_fast_variance: bool = True
    force_float32_reductions: bool = True
    warmup: bool | None = BatchNormConfig.warmup
    running_var: RunningVar = BatchNormConfig.running_var
    renorm: bool = BatchNormConfig.renorm
    rmax: Clip | None = BatchNormConfig.rmax
    dmax: Clip | None = BatchNormConfig.dmax
    renorm_momentum: float | None = BatchNormConfig.renorm_momentum
    virtual_batch_size: int | None = BatchNormConfig.virtual_batch_size
    eval_mode: EvalMode = BatchNormConfig.eval_mode
    zero_masked: bool = BatchNormConfig.zero_masked
    debias: Debias | None = BatchNormConfig.debias

    @nn.compact
    def __call__(
        self,
        x: jax.Array,
        use_running_average: bool | jax.Array | None = None,
        *,
        mask: jax.Array | None = None,
        weights: jax.Array | None = None,
        scale: jax.Array | None = None,
        offset: jax.Array | None = None,
    ) -> jax.Array:
        """Normalizes ``x``, updating ``batch_stats`` in training.

        Args:
          x: the input: a floating or complex array (integers are promoted to
            float, as in Flax). It needs no batch axis: a single value per
            feature (a batch of one, or one example under ``nn.vmap`` without
            ``axis_name``) normalizes to the bias in training, as in Flax.
          use_running_average: overrides the field (give it in one place only).
          mask: optional boolean array broadcastable to x (NumPy's rules); the
            statistics use only its True entries.
          weights: optional per-example weights broadcastable to x (see
            :func:`jaxbn.batch_norm`).
          scale: optional call-time scale (with ``use_scale=False``).
          offset: optional call-time offset (with ``use_bias=False``).

        Returns:
          The normalized x, in ``dtype``.

        Raises:
          ValueError: when training (outside ``init``) without
            ``mutable=['batch_stats']``; for ``use_running_average`` given in
            both or neither place; for the core's errors (see
            :func:`jaxbn.batch_norm`).
          TypeError: for the core's type errors (e.g. a non-boolean mask).
        """
        use_running_average = nn.merge_param(
            "use_running_average", self.use_running_average, use_running_average
        )
        train = pipeline.train_flag(use_running_average)
        x = pipeline.as_inexact(x)
        initializing = self.is_initializing()
        mutable = self.is_mutable_collection("batch_stats")
        if not initializing and train is not False and not mutable:
            raise ValueError(_NOT_MUTABLE)
        # Like Flax, init normalizes with the batch's statistics when training
        # (alone, without axis_name) and records nothing.
        config = self.local_config if initializing else self.config
        geo = config.geometry(x)  # checks x; once per call
        features = geo.feature_shape
        params = _params(self, features)
        variables = _stats_variables(self, features)
        values: dict[str, Any] = {
            k: v if isinstance(v, int) else v.value for k, v in variables.items()
        }
        out_dtype = self.dtype
        if out_dtype is None:  # Flax's promotion of x with the params
            out_dtype = pipeline.promoted_dtype(x, *params.values())
        call = pipeline.CallArgs(mask, weights, scale, offset)
        stats = pipeline.AdapterStats(**values)
        y, new = pipeline.call_core(
            config, geo, x, train, params, stats, call, out_dtype
        )
        if train is not False and not initializing:
            for name, variable in variables.items():
                if not isinstance(variable, int):
                    variable.value = getattr(new, name)
        return y

    @cached_property
    def config(self) -> BatchNormConfig:
        """The checked configuration of this module's fields (built once)."""
        return pipeline.adapter_config(
            axis=self.axis,
            momentum=self.momentum,
            epsilon=self.epsilon,
            center=self.use_bias,
            scale=self.use_scale,
            warmup=self.warmup,
            axis_name=self.axis_name,
            axis_index_groups=self.axis_index_groups,
            param_dtype=self.param_dtype,
            variants={name: getattr(self, name) for name in VARIANTS},
        )

    @cached_property
    def local_config(self) -> BatchNormConfig:
        """The configuration without ``axis_name``, which ``init`` uses."""
        return pipeline.local(self.config)


def _params(module: BatchNorm, features: tuple[int, ...]) -> Params:
    """The module's ``params`` (scale, bias), created if needed."""
    params: Params = {}
    if module.use_scale:
        params["scale"] = module.param(
            "scale", module.scale_init, features, module.param_dtype
        )
    if module.use_bias:
        params["bias"] = module.param(
            "bias", module.bias_init, features, module.param_dtype
        )
    return params


def _stats_variables(module: BatchNorm, features: tuple[int, ...]) -> dict[str, Any]:
    """The module's ``batch_stats`` variables by name, created if needed.

    ``count`` is a Python int where the module keeps none (see
    :func:`_count_variable`). (A function, not a method: Flax's summaries list
    every method call of a module.)
    """
    # Statistics saved by flax.linen.BatchNorm have no count.
    from_flax = module.has_variable("batch_stats", "mean") and not module.has_variable(
        "batch_stats", "count"
    )
    f32 = jnp.float32
    found: dict[str, Any] = {
        "mean": module.variable("batch_stats", "mean", jnp.zeros, features, f32),
        "var": module.variable("batch_stats", "var", jnp.ones, features, f32),
        "count": _count_variable(module, from_flax),
    }
    if module.config.renorm:  # batch renormalization's moving averages
        for name, start in (("renorm_mean", jnp.zeros), ("renorm_std", jnp.ones)):
            found[name] = module.variable("batch_stats", name, start, features, f32)
    return found


def _count_variable(module: BatchNorm, from_flax: bool) -> Any:
    """The ``count`` variable of ``module``, or the count (an int) if it has none.

    Without warm-up, cumulative average or renorm there is no count: the
    variables are Flax's. Statistics saved by ``flax.linen.BatchNorm`` have no
    count: they are treated as converged, and the count is created once the
    collection is mutable.
    """
    if not module.config.keeps_count:
        return 0
    first = CONVERGED_COUNT if from_flax else 0
    if from_flax and not module.is_mutable_collection("batch_stats"):
        return first
    return module.variable(
        "batch_stats",
        "count",
        lambda: jnp.asarray(first, COUNT_DTYPE),  # shape=(), float32
    )


def from_flax_variables(
    variables: Mapping[str, Any], count: int = CONVERGED_COUNT
) -> dict[str, Any]:
    """Variables of a model using ``flax.linen.BatchNorm``, ready for jaxbn.

    :func:`jaxbn.mark_converged` is the one way to mark statistics converged;
    on Flax's variables (which have no ``count``) this gives the same result
    and is kept for existing code. The one difference: a ``count`` already
    there is kept here, where ``mark_converged`` sets it.

    Only needed when the layers keep a ``count`` (with warm-up, on by default;
    see :attr:`jaxbn.BatchNormConfig.keeps_count`): with ``warmup=False`` the
    variables are Flax's as they are. Adds ``count`` (float32) to every
    ``batch_stats`` entry that has ``mean`` and ``var`` but no ``count``, and
    leaves everything else as it is (an existing ``count`` is kept). The
    default count, :data:`CONVERGED_COUNT` (``2**30``),
    marks the statistics as converged: warm-up is over and the decay is
    ``momentum`` from the first step, as in Flax, so fine-tuning does not
    overwrite pretrained statistics with the first batch's. Pass ``count=0``
    to restart the warm-up instead.

    Args:
      variables: the variable dict of the Flax model, with a ``batch_stats``
        collection (e.g. restored from a checkpoint).
      count: the count to record, an int in ``[0, 2**31 - 2]``.

    Returns:
      A new variable dict; the input is not modified.

    Raises:
      ValueError: if ``variables`` has no ``batch_stats`` collection, or
        ``count`` is out of range.
      TypeError: if ``count`` is not an int.

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> import flax.linen as nn
      >>> import jaxbn.linen
      >>> x = jnp.ones((4, 3))
      >>> old = nn.BatchNorm(use_running_average=True).init(jax.random.key(0), x)
      >>> variables = jaxbn.linen.from_flax_variables(old)
      >>> variables["batch_stats"]["count"]
      Array(1.0737418e+09, dtype=float32)
      >>> model = jaxbn.linen.BatchNorm(use_running_average=True)
      >>> model.apply(variables, x).shape
      (4, 3)
    """
    count = check_count(count)
    if "batch_stats" not in variables:
        raise ValueError(
            f"variables has collections {sorted(variables)} but no 'batch_stats'; "
            "pass the whole variable dict of the model, e.g. the one returned by "
            "model.init or restored from its checkpoint."
        )
    out = dict(variables)
    out["batch_stats"] = converged(variables["batch_stats"], count)
    return out
