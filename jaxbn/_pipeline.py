"""The adapter pipeline: the steps ``jaxbn.linen``, ``nnx`` and ``equinox`` share.

An adapter owns its framework's variables; everything else is here. Each call
goes: the mode as the core's ``train`` (:func:`train_flag`), x promoted like
Flax does (:func:`as_inexact`, Flax adapters only), x's geometry
(``config.geometry(x)``, once), then :func:`call_core`: the core's ``params``
and ``batch_stats`` from the adapter's values (:class:`AdapterStats`), the
core's :func:`_apply.run` with the adapter's output dtype, the cast, and the
new statistics in the adapter's dtypes for it to write back. The configuration
is built once per adapter (:func:`adapter_config`), with every option of
:func:`jaxbn.batch_norm`.

Where Flax and the core differ, the adapters behave like Flax: training with
one value per feature (a batch of one, or x without a batch axis) normalizes
to the bias, where the core raises; integer and boolean x are promoted to
float. The Flax adapters store ``count`` as float32 (see ``_converged``) and
only when the configuration needs it (``BatchNormConfig.keeps_count``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import DTypeLike

from ._apply import run
from ._config import VARIANTS, AxisName, BatchNormConfig, Geometry
from ._converged import CONVERGED_COUNT
from ._inputs import check_train, check_x
from ._types import BatchStats, Params


def adapter_config(
    *,
    axis: int | Sequence[int],
    momentum: float | None,
    epsilon: float,
    center: bool,
    scale: bool,
    warmup: bool | None,
    axis_name: AxisName,
    variants: Mapping[str, Any],
    axis_index_groups: Sequence[Sequence[int]] | None = None,
    param_dtype: DTypeLike = BatchNormConfig.param_dtype,
    allow_one_value: bool = True,
) -> BatchNormConfig:
    """The configuration of an adapter: its options under the core's names.

    ``variants`` maps each name of :data:`jaxbn._config.VARIANTS` to the
    adapter's value (all of them: a missing or unknown name is a bug of the
    adapter, and raises). The output dtype is left to the adapter's rule
    (:func:`call_core`).
    """
    if set(variants) != set(VARIANTS):
        raise TypeError(
            f"the adapter passed the variants {sorted(variants)}, not "
            f"{sorted(VARIANTS)}"
        )
    return BatchNormConfig(
        axis=axis,  # pyright: ignore[reportArgumentType]
        momentum=momentum,
        epsilon=epsilon,
        center=center,
        scale=scale,
        warmup=warmup,
        allow_one_value=allow_one_value,
        axis_name=axis_name,
        axis_index_groups=axis_index_groups,  # pyright: ignore[reportArgumentType]
        param_dtype=param_dtype,
        **variants,
    )


def local(config: BatchNormConfig) -> BatchNormConfig:
    """The configuration without ``axis_name``: Flax's ``init`` runs unmapped."""
    if config.axis_name is None:
        return config
    return dataclasses.replace(config, axis_name=None, axis_index_groups=None)


class AdapterStats(NamedTuple):
    """An adapter's running statistics, as its variables hold them.

    Attributes:
      mean: the running mean (float32; complex once complex x updated it).
      var: the running variance.
      count: the adapter's count array (float32 for Flax, int32 for Equinox),
        or a Python int where the adapter keeps none.
      renorm_mean: renorm's moving mean, or None without renorm.
      renorm_std: renorm's moving standard deviation, or None.
    """

    mean: jax.Array
    var: jax.Array
    count: Any
    renorm_mean: jax.Array | None = None
    renorm_std: jax.Array | None = None


class CallArgs(NamedTuple):
    """The optional call-time inputs of :func:`jaxbn.batch_norm`'s ``apply``."""

    mask: Any = None
    weights: Any = None
    scale: Any = None
    offset: Any = None


def train_flag(evaluating: Any) -> bool | jax.Array:
    """``use_running_average`` (Flax) or ``inference`` (Equinox) as ``train``."""
    if isinstance(evaluating, bool | np.bool_):
        return not bool(evaluating)
    return jnp.logical_not(check_train(evaluating))  # a scalar boolean array


def as_inexact(x: Any) -> Any:
    """x, with integer and boolean dtypes promoted to float as Flax does."""
    if not hasattr(x, "shape") or not hasattr(x, "dtype"):
        check_x(x)  # raises the core's TypeError
    if not jnp.issubdtype(x.dtype, jnp.inexact):
        return jnp.asarray(x, jnp.promote_types(x.dtype, jnp.float32))
    return x


def promoted_dtype(*values: Any) -> Any:
    """The standard JAX promotion of ``values``' dtypes: the adapters' output rule.

    Computed under ``jax.numpy_dtype_promotion("standard")``, so the adapters
    keep their framework's output dtype under ``"strict"`` too (bfloat16 x
    with float32 parameters gives float32, as in Flax and Equinox), where
    Flax's own layers raise. The computation itself casts explicitly.
    """
    with jax.numpy_dtype_promotion("standard"):
        return jnp.result_type(*values)


def _core_count(count: Any) -> jax.Array:
    """The count the core updates, in the adapter's own dtype.

    An adapter's array as it is (float32 for the Flax adapters, int32 for
    Equinox), or a Python int (no count variable) as int32.
    """
    if isinstance(count, int):
        return jnp.asarray(min(count, CONVERGED_COUNT), jnp.int32)
    return jnp.asarray(count)  # e.g. a NumPy array restored from a checkpoint


def core_stats(
    stats: AdapterStats, features: tuple[int, ...], x_dtype: Any
) -> BatchStats:
    """The core's ``batch_stats`` from an adapter's values, feature-shaped.

    The running mean starts as float32, as in Flax; for complex x the core
    wants a complex mean, and it becomes complex after the first update (as
    Flax's does).
    """
    mean = stats.mean.reshape(features)
    if jnp.issubdtype(x_dtype, jnp.complexfloating) and not jnp.iscomplexobj(mean):
        mean = mean.astype(jnp.promote_types(mean.dtype, jnp.complex64))
    core: BatchStats = {
        "mean": mean,
        "var": stats.var.reshape(features),
        "count": _core_count(stats.count),
    }
    if stats.renorm_mean is not None and stats.renorm_std is not None:
        core["renorm_mean"] = stats.renorm_mean.reshape(features)
        core["renorm_std"] = stats.renorm_std.reshape(features)
    return core


def call_core(
    config: BatchNormConfig,
    geo: Geometry,
    x: jax.Array,
    train: bool | jax.Array,
    params: Params,
    stats: AdapterStats,
    call: CallArgs,
    dtype: Any,
) -> tuple[jax.Array, AdapterStats]:
    """The core's ``apply`` on an adapter's values; returns ``(y, new stats)``.

    Args:
      config: the adapter's configuration.
      geo: ``config.geometry(x)``, which the adapter computed (once per call).
      x: the input (already checked or promoted by the adapter).
      train: the core's ``train``.
      params: ``{"scale", "bias"}`` as the adapter holds them (any shape with
        the features' size).
      stats: the adapter's running statistics.
      call: the call-time inputs.
      dtype: the output dtype, by the adapter's rule (complex allowed).

    Returns:
      ``y`` in ``dtype``, and the statistics to write back in the dtypes of
      ``stats`` (a count array keeps its dtype; a Python int stays as it is).
    """
    features = geo.feature_shape
    core_params: Params = {}
    if "scale" in params:
        core_params["scale"] = params["scale"].reshape(features)
    if "bias" in params:
        core_params["bias"] = params["bias"].reshape(features)
    core_dtype = None if jnp.issubdtype(dtype, jnp.complexfloating) else dtype
    core = core_stats(stats, features, x.dtype)
    y, new = run(
        config,
        geo,
        core_params,
        core,
        x,
        train=train,
        dtype=core_dtype,
        count_dtype=core["count"].dtype,
        **call._asdict(),
    )
    y = y if y.dtype == dtype else y.astype(dtype)
    count = stats.count
    if isinstance(count, jax.Array):
        count = new["count"].astype(count.dtype)
    updated = AdapterStats(
        new["mean"], new["var"], count, new.get("renorm_mean"), new.get("renorm_std")
    )
    return y, updated
