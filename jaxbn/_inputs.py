"""Checks of call-time inputs, raised at trace time with a fix.

Everything ``apply`` (and the adapters' calls) receives is checked here: x and
its feature axes, ``train``, the ``params`` and ``batch_stats`` mappings, a mask,
weights, a call-time scale or offset, and whether a training batch has enough
values. Each message names the argument, the value given, the value expected
and how to fix the mistake. Nothing here is traced: only Python values, shapes
and dtypes are read (weights are range-checked when concrete). The layer's
hyperparameters are checked in ``_hyperparams``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ._hyperparams import AxisSpec

Axes = tuple[int, ...]
# key -> (shape, accepted dtypes), as ``check_mapping`` reads it.
Spec = dict[str, tuple[tuple[int, ...], tuple[Any, ...]]]


def normalize_axes(axis: AxisSpec, ndim: int, batch_elsewhere: bool = False) -> Axes:
    """Turns ``axis`` into sorted non-negative feature axes for an ``ndim``-D input.

    The one place of axis normalization: the layer, ``fold_kernel`` and
    ``recalibrate`` call it. ``batch_elsewhere`` (an ``axis_name`` is given, or
    one value per feature is allowed) lets every dimension of x be a feature
    axis: the batch is then the mapped axis, as in a per-example function
    under ``jax.vmap(..., axis_name=...)``.

    Raises:
      ValueError: if an axis is out of range or repeated.
    """
    raw = (axis,) if isinstance(axis, int) else tuple(axis)
    for a in raw:
        if not -ndim <= a < ndim:
            raise ValueError(
                f"axis={axis!r} is out of range for x with {ndim} dimensions; "
                f"expected values in [{-ndim}, {ndim - 1}]. Use a negative axis "
                "(axis=-1) to name the feature axis independently of the batch rank."
            )
    axes = tuple(sorted(a % ndim for a in raw))
    if len(set(axes)) != len(axes):
        raise ValueError(
            f"axis={axis!r} names the same dimension twice for x with {ndim} "
            "dimensions; list each feature axis once."
        )
    if len(axes) == ndim and not batch_elsewhere:
        raise ValueError(
            f"axis={axis!r} makes every dimension of x (ndim={ndim}) a feature axis, "
            "leaving nothing to reduce over; batch norm needs at least one batch "
            "axis. Add a batch dimension to x, or give axis_name to normalize over "
            "a mapped axis."
        )
    return axes


def check_x(x: Any) -> None:
    """Checks that ``x`` is a floating or complex array (or ShapeDtypeStruct)."""
    if not hasattr(x, "shape") or not hasattr(x, "dtype"):
        raise TypeError(
            f"x must be a jax.Array or jax.ShapeDtypeStruct, got {type(x).__name__}; "
            "wrap Python data with jnp.asarray."
        )
    if not jnp.issubdtype(x.dtype, jnp.inexact):
        raise TypeError(
            f"x has dtype {x.dtype}, but batch norm needs floating or complex "
            "input (float32, bfloat16, float16, float64, complex64 or "
            "complex128); convert with x.astype(jnp.float32)."
        )


def check_train(train: Any) -> bool | jax.Array:
    """Accepts a Python bool or a scalar boolean array; returns it."""
    if isinstance(train, bool | np.bool_):
        return bool(train)
    if hasattr(train, "shape") and hasattr(train, "dtype"):
        if train.shape == () and train.dtype == jnp.bool_:
            return jnp.asarray(train)
        raise TypeError(
            f"train must be a Python bool or a scalar boolean array, got an array "
            f"of shape {train.shape} and dtype {train.dtype}; pass train=True/False "
            "or a jnp.bool_ scalar (e.g. jnp.asarray(step_is_training))."
        )
    raise TypeError(
        f"train must be a Python bool or a scalar boolean array, got {train!r} "
        f"({type(train).__name__}). Pass train=True for a training step and "
        "train=False for evaluation; 0/1 integers are refused so that a mode is "
        "never picked by accident."
    )


def _feature_phrase(feature_shape: tuple[int, ...], axes: Axes, axis: Any) -> str:
    if len(axes) == 1:
        return f"{feature_shape[0]} features along axis {axis!r}"
    return f"feature shape {feature_shape} along axes {axis!r}"


def _check_keys(name: str, tree: Any, expected: Mapping[str, Any]) -> None:
    if not isinstance(tree, Mapping):
        raise TypeError(
            f"{name} must be the dict returned by layer.init, got "
            f"{type(tree).__name__}."
        )
    missing = [k for k in expected if k not in tree]
    extra = [k for k in tree if k not in expected]
    if missing or extra:
        raise ValueError(
            f"{name} has keys {sorted(tree)} but this layer expects "
            f"{sorted(expected)} (missing {missing}, unexpected {extra}); pass the "
            f"{name} returned by init of a layer with the same center/scale options."
        )


def check_mapping(
    name: str,
    tree: Any,
    expected: Spec,
    axes: Axes,
    axis: Any,
    exact_dtype: bool,
) -> None:
    """Checks keys, shapes and dtypes of ``params`` or ``batch_stats``.

    Args:
      name: "params" or "batch_stats", for the message.
      tree: the mapping given by the user.
      expected: key -> (shape, accepted dtypes); every shape but count's is
        the feature shape.
      axes: normalized feature axes.
      axis: the axis as given, for the message.
      exact_dtype: whether dtypes must match exactly (else: any floating dtype).
    """
    _check_keys(name, tree, expected)
    for key, (shape, accepted) in expected.items():
        leaf = tree[key]
        leaf_shape = tuple(getattr(leaf, "shape", np.shape(leaf)))
        if leaf_shape != shape:
            what = (
                "a scalar"
                if shape == ()
                else f"x has {_feature_phrase(shape, axes, axis)}"
            )
            raise ValueError(
                f"{name}[{key!r}] has shape {leaf_shape} but {what}; did you call "
                "init on a different input?"
            )
        leaf_dtype = jnp.result_type(leaf)
        ok = (
            leaf_dtype in accepted
            if exact_dtype or key == "count"
            else jnp.issubdtype(leaf_dtype, jnp.floating)
        )
        if not ok:
            names = " or ".join(str(d) for d in accepted)
            raise TypeError(
                f"{name}[{key!r}] has dtype {leaf_dtype} but {names} is expected; "
                "running statistics are kept in float32 (float64 for float64 x, "
                "a complex mean for complex x) and count in int32 whatever the "
                "input dtype. Use the state returned by init on such an x."
            )


def check_broadcast(
    name: str, shape: tuple[int, ...], x_shape: tuple[int, ...], hint: str
) -> None:
    """Checks that an array of ``shape`` broadcasts to x without enlarging it.

    The one "broadcasts to x" rule, for a mask, weights, and a call-time scale
    or offset.
    """
    shape, x_shape = tuple(shape), tuple(x_shape)
    if len(shape) > len(x_shape):
        raise ValueError(
            f"{name} has shape {shape}, more dimensions than x of shape {x_shape}, "
            f"so it does not broadcast to x; {hint}"
        )
    try:
        joint = np.broadcast_shapes(shape, x_shape)
    except ValueError:
        raise ValueError(
            f"{name} has shape {shape}, which does not broadcast to x's shape "
            f"{x_shape}; {hint}"
        ) from None
    if joint != x_shape:
        raise ValueError(
            f"{name} of shape {shape} would enlarge x of shape {x_shape}; "
            f"the {name} must broadcast to x, not the other way round."
        )


def with_rank(value: Any, ndim: int, dtype: Any = None) -> jax.Array:
    """``value`` as an array with leading size-1 axes up to rank ``ndim``.

    NumPy's broadcasting rule, without broadcasting; converted to ``dtype``
    if given.
    """
    shape = tuple(np.shape(value))
    value = jnp.asarray(value, dtype)
    return value.reshape((1,) * (ndim - len(shape)) + shape)


def check_mask(mask: Any, x_shape: tuple[int, ...]) -> jax.Array:
    """Checks that ``mask`` is boolean and broadcasts to ``x_shape``."""
    if not hasattr(mask, "dtype") or mask.dtype != jnp.bool_:
        raise TypeError(
            f"mask must be a boolean array broadcastable to x, got "
            f"{getattr(mask, 'dtype', type(mask).__name__)}; build it with a "
            "comparison, e.g. mask = lengths[:, None] > jnp.arange(T)."
        )
    hint = "use size-1 dimensions, e.g. mask[:, None, None, None] for NHWC x."
    check_broadcast("mask", np.shape(mask), x_shape, hint)
    return with_rank(mask, len(x_shape))


def _real_floating(name: str, value: Any, extra: str = "") -> None:
    dtype = getattr(value, "dtype", None)
    if dtype is None or not jnp.issubdtype(dtype, jnp.floating):
        raise TypeError(
            f"{name} must be a real floating array broadcastable to x, got "
            f"{dtype if dtype is not None else type(value).__name__}{extra}."
        )


def check_weights(weights: Any, x_shape: tuple[int, ...], dtype: Any) -> jax.Array:
    """Checks per-example weights: real, broadcastable to x, not negative.

    Returns:
      The weights in ``dtype`` with x's rank (leading size-1 axes added), not
      broadcast to x.
    """
    _real_floating(
        "weights",
        weights,
        "; for a boolean mask use mask=, and cast counts with .astype(jnp.float32)",
    )
    hint = "give one weight per example, e.g. weights[:, None, None, None] for NHWC x."
    check_broadcast("weights", np.shape(weights), x_shape, hint)
    try:
        concrete = np.asarray(weights)
    except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):
        concrete = None  # traced: checked when concrete only
    if concrete is not None and np.any(concrete < 0):
        raise ValueError(
            "weights has negative entries; weights must be >= 0 (0 drops an "
            "entry from the statistics, like mask=False)."
        )
    return with_rank(weights, len(x_shape), dtype)


def check_external(
    name: str, value: Any, x_shape: tuple[int, ...], learned: bool
) -> jax.Array:
    """Checks a call-time ``scale`` or ``offset`` (conditional batch norm).

    Returns:
      The array with x's rank (leading size-1 axes added), not broadcast.
    """
    flag = "scale" if name == "scale" else "center"
    if learned:
        raise ValueError(
            f"apply(..., {name}=...) replaces the learned {name}, but this layer "
            f"learns one too; build it with {flag}=False (as Haiku's "
            f"create_{name}=False) to pass the {name} at call time."
        )
    _real_floating(name, value)
    hint = (
        f"give x's rank with size-1 axes where it is shared, e.g. "
        f"{name}[:, None, None, :] per example for NHWC x."
    )
    check_broadcast(name, np.shape(value), x_shape, hint)
    return with_rank(value, len(x_shape))


def check_enough_values(
    shape: tuple[int, ...],
    reduction_axes: Axes,
    devices: int,
    virtual_batch_size: int | None,
) -> None:
    """Raises unless each feature sees at least two values in a training batch.

    Args:
      shape: x's shape.
      reduction_axes: the batch axes.
      devices: the devices whose values are pooled (1 for ghost batches).
      virtual_batch_size: the ghost batch size, which replaces axis 0's size.
    """
    per_device = 1
    for a in reduction_axes:
        ghost = a == 0 and virtual_batch_size is not None
        per_device *= virtual_batch_size if ghost else shape[a]  # type: ignore[operator]
    if 0 < per_device * devices < 2:
        raise ValueError(
            f"train=True with x of shape {tuple(shape)}: each feature sees "
            f"{per_device * devices} value(s) ({per_device} per device x "
            f"{devices} device(s)), but a batch variance needs at least 2. "
            "Train with a larger batch, use train=False to normalize with "
            "the running statistics, or build the layer with "
            "allow_one_value=True to normalize such a batch to the bias, as "
            "flax.linen.BatchNorm does."
        )


def check_ghost_groups(shape: tuple[int, ...], axes: Axes, k: int) -> int:
    """Checks that axis 0 is a batch axis that k divides; returns the group count.

    Raises:
      ValueError: if axis 0 is a feature axis or its size is not a multiple of k.
    """
    if 0 in axes or not shape:
        raise ValueError(
            f"virtual_batch_size={k} splits axis 0 of x into groups, but axis 0 "
            f"is a feature axis here (x of shape {tuple(shape)}, feature axes "
            f"{axes}); put the batch first, or drop virtual_batch_size."
        )
    if shape[0] % k:
        raise ValueError(
            f"virtual_batch_size={k} does not divide the batch of {shape[0]} "
            f"examples (x of shape {tuple(shape)}); use a batch size that is a "
            f"multiple of {k} (e.g. {shape[0] - shape[0] % k or k}), or a "
            "virtual_batch_size that divides it."
        )
    return shape[0] // k


def check_real_for_renorm(x_dtype: Any) -> None:
    """Batch renormalization is defined for real input only."""
    if jnp.issubdtype(x_dtype, jnp.complexfloating):
        raise TypeError(
            f"renorm=True with complex x ({x_dtype}): batch renormalization is "
            "defined for real input only; use renorm=False."
        )
