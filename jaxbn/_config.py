"""The layer's configuration: every option checked once, everything derived once.

``jaxbn.batch_norm(...)`` builds a :class:`BatchNormConfig` and binds the
module-level ``init``/``apply`` of ``_apply`` to it; the adapters build theirs
once, when constructed. Each option is declared once, as a field here: its
name, its type (a ``Literal`` for a string choice) and its default, which the
factory's and the adapters' signatures read (``BatchNormConfig.running_var``
is ``"biased"``); its check is in ``_hyperparams`` and its documentation in
:func:`jaxbn.batch_norm`. A training-time variant is marked ``_VARIANT``
and then reaches every adapter under its own name (:data:`VARIANTS`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Hashable, Sequence
from typing import Any, Literal, NamedTuple, get_args

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike, DTypeLike

from . import _hyperparams as hp
from ._inputs import Axes, Spec, check_x, normalize_axes
from ._sums import mean_dtype, real_dtype

Initializer = Callable[..., jax.Array]
AxisName = Hashable | tuple[Hashable, ...] | None
RunningVar = Literal["biased", "unbiased"]
EvalMode = Literal["running", "batch"]
Debias = Literal["mean", "mean_and_var"]
# renorm's rmax and dmax: a number, or a function of the int32 count.
Clip = float | Callable[[jax.Array], ArrayLike]
# Marks the training-time variants: the options every adapter takes under the
# core's own name (the others are renamed, e.g. ``center`` is ``use_bias``).
_VARIANT = {"variant": True}


def _ones(key: jax.Array, shape: Sequence[int], dtype: Any = jnp.float32) -> jax.Array:
    del key
    return jnp.ones(shape, dtype)


def _zeros(key: jax.Array, shape: Sequence[int], dtype: Any = jnp.float32) -> jax.Array:
    del key
    return jnp.zeros(shape, dtype)


class Geometry(NamedTuple):
    """Where the features of one input are.

    Attributes:
      axes: the feature axes, sorted and non-negative.
      feature_shape: x's sizes along them (the shape of params and statistics).
      kept: x's rank with size 1 along the batch axes (statistics shaped for x).
      reduction_axes: the batch axes.
    """

    axes: Axes
    feature_shape: tuple[int, ...]
    kept: tuple[int, ...]
    reduction_axes: Axes


@dataclasses.dataclass(frozen=True)
class BatchNormConfig:
    """The checked options of a batch-norm layer (see :func:`jaxbn.batch_norm`).

    Construction checks every option and resolves the defaults that depend on
    others: ``warmup=None`` becomes a bool, renorm's ``rmax``, ``dmax`` and
    ``renorm_momentum`` get their values, ``axis`` and ``axis_index_groups``
    become tuples, dtypes become ``numpy.dtype``. The object is frozen and
    hashable, so it can be a static argument or a static field; build a variant
    with ``dataclasses.replace``, which checks again.

    Raises:
      TypeError, ValueError: for an invalid option (see :func:`jaxbn.batch_norm`).

    Examples:
      >>> import jaxbn
      >>> config = jaxbn.batch_norm(momentum=None).config
      >>> config.momentum, config.warmup, config.renorm_options
      (None, False, None)
      >>> jaxbn.BatchNormConfig(renorm=True).renorm_options
      RenormOptions(rmax=3.0, dmax=5.0, momentum=0.99)
    """

    axis: int | tuple[int, ...] = -1
    momentum: float | None = 0.99
    epsilon: float = 1e-5
    center: bool = True
    scale: bool = True
    warmup: bool | None = None
    allow_one_value: bool = False
    axis_name: AxisName = None
    axis_index_groups: tuple[tuple[int, ...], ...] | None = None
    dtype: DTypeLike | None = None
    param_dtype: DTypeLike = jnp.float32
    scale_init: Initializer = _ones
    bias_init: Initializer = _zeros
    running_var: RunningVar = dataclasses.field(default="biased", metadata=_VARIANT)
    renorm: bool = dataclasses.field(default=False, metadata=_VARIANT)
    rmax: Clip | None = dataclasses.field(default=None, metadata=_VARIANT)
    dmax: Clip | None = dataclasses.field(default=None, metadata=_VARIANT)
    renorm_momentum: float | None = dataclasses.field(default=None, metadata=_VARIANT)
    virtual_batch_size: int | None = dataclasses.field(default=None, metadata=_VARIANT)
    eval_mode: EvalMode = dataclasses.field(default="running", metadata=_VARIANT)
    zero_masked: bool = dataclasses.field(default=False, metadata=_VARIANT)
    debias: Debias | None = dataclasses.field(default=None, metadata=_VARIANT)
    renorm_options: hp.RenormOptions | None = dataclasses.field(init=False, repr=False)

    def __post_init__(self) -> None:
        momentum = hp.check_momentum(self.momentum)
        renorm = hp.check_renorm(
            self.renorm, self.rmax, self.dmax, self.renorm_momentum
        )
        why_var = "'unbiased' stores n/(n-1) times the batch variance, as PyTorch does."
        why_eval = "'batch' normalizes with the batch's statistics in evaluation too."
        warmup = hp.check_warmup(self.warmup, momentum)
        resolved = {
            "axis": hp.check_axis_spec(self.axis),
            "momentum": momentum,
            "warmup": warmup,
            "running_var": hp.check_choice(
                "running_var", self.running_var, get_args(RunningVar), why_var
            ),
            "renorm": renorm is not None,
            "renorm_options": renorm,
            "virtual_batch_size": hp.check_virtual_batch_size(self.virtual_batch_size),
            "eval_mode": hp.check_choice(
                "eval_mode", self.eval_mode, get_args(EvalMode), why_eval
            ),
            "zero_masked": bool(self.zero_masked),
            "debias": hp.check_debias(self.debias, get_args(Debias), momentum, warmup),
            "epsilon": hp.check_epsilon(self.epsilon),
            "dtype": hp.check_float_dtype("dtype", self.dtype, allow_none=True),
            "param_dtype": hp.check_float_dtype(
                "param_dtype", self.param_dtype, allow_none=False
            ),
            "axis_index_groups": hp.check_groups(
                self.axis_name, self.axis_index_groups
            ),
            "center": bool(self.center),
            "scale": bool(self.scale),
            "allow_one_value": bool(self.allow_one_value),
        }
        if renorm is not None:
            resolved.update(rmax=renorm.rmax, dmax=renorm.dmax)
            resolved["renorm_momentum"] = renorm.momentum
        for name, value in resolved.items():
            object.__setattr__(self, name, value)

    @property
    def unbiased(self) -> bool:
        """Whether the running variance averages ``n / (n - 1)`` times the batch's."""
        return self.running_var == "unbiased"

    @property
    def eval_uses_batch(self) -> bool:
        """Whether evaluation normalizes with the batch's statistics."""
        return self.eval_mode == "batch"

    @property
    def freezes_running_stats(self) -> bool:
        """Whether training leaves the running statistics as they are (momentum 1)."""
        return self.momentum == 1.0

    @property
    def keeps_count(self) -> bool:
        """Whether the count matters (warm-up, cumulative average, renorm, debias).

        The Flax adapters store ``count`` only then.
        """
        reads_count = self.momentum is None or self.renorm or self.debias is not None
        return bool(self.warmup) or reads_count

    def geometry(self, x: Any) -> Geometry:
        """The feature axes of ``x`` (checked to be a floating or complex array)."""
        check_x(x)
        batch_elsewhere = self.axis_name is not None or self.allow_one_value
        axes = normalize_axes(self.axis, len(x.shape), batch_elsewhere)
        feature_shape = tuple(x.shape[a] for a in axes)
        kept = tuple(d if i in axes else 1 for i, d in enumerate(x.shape))
        reduction_axes = tuple(i for i in range(len(x.shape)) if i not in axes)
        return Geometry(axes, feature_shape, kept, reduction_axes)

    def params_spec(self, feature_shape: tuple[int, ...]) -> Spec:
        """The ``params`` keys with their shape and dtype."""
        spec: Spec = {}
        if self.scale:
            spec["scale"] = (feature_shape, (self.param_dtype,))
        if self.center:
            spec["bias"] = (feature_shape, (self.param_dtype,))
        return spec

    def stats_spec(self, feature_shape: tuple[int, ...], x_dtype: Any) -> Spec:
        """The ``batch_stats`` keys with their shape and accepted dtypes.

        The statistics are kept in float32 or float64 (``init`` picks float64
        for float64 x); the mean is complex for complex x, the variance always
        real.
        """
        if jnp.issubdtype(x_dtype, jnp.complexfloating):
            means = (jnp.dtype(jnp.complex64), jnp.dtype(jnp.complex128))
        else:
            means = (jnp.dtype(jnp.float32), jnp.dtype(jnp.float64))
        reals = (jnp.dtype(jnp.float32), jnp.dtype(jnp.float64))
        spec: Spec = {
            "mean": (feature_shape, means),
            "var": (feature_shape, reals),
            "count": ((), (jnp.dtype(jnp.int32),)),
        }
        if self.renorm:
            spec["renorm_mean"] = spec["mean"]
            spec["renorm_std"] = spec["var"]
        return spec

    def stats_dtypes(self, x_dtype: Any) -> tuple[Any, Any]:
        """The dtypes ``init`` gives the mean and the variance for ``x_dtype``."""
        return mean_dtype(x_dtype), real_dtype(x_dtype)


# The training-time variants (fields marked ``_VARIANT``): every adapter takes
# them under these names and passes them on as they are.
VARIANTS: tuple[str, ...] = tuple(
    f.name for f in dataclasses.fields(BatchNormConfig) if f.metadata.get("variant")
)
