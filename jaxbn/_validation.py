"""Checks of hyperparameters and inputs, raised at trace time with a fix.

Every message names the argument, the value given, the value expected and how to
fix the mistake. Nothing here is traced: it reads only Python values, shapes and
dtypes.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

Axes = tuple[int, ...]


def check_axis_spec(axis: Any) -> int | tuple[int, ...]:
    """Checks that ``axis`` is an int or a non-empty tuple of ints (not yet ranged)."""
    if isinstance(axis, bool) or not isinstance(axis, int | Sequence):
        raise TypeError(
            f"axis must be an int or a tuple of ints, got {axis!r} "
            f"({type(axis).__name__}); pass e.g. axis=-1 for channels-last data."
        )
    if isinstance(axis, int):
        return axis
    items = tuple(axis)
    if not items or any(isinstance(a, bool) or not isinstance(a, int) for a in items):
        raise TypeError(
            f"axis must be an int or a non-empty tuple of ints, got {axis!r}; "
            "pass e.g. axis=-1 or axis=(1, 2)."
        )
    return items


def normalize_axes(
    axis: int | tuple[int, ...], ndim: int, batch_elsewhere: bool = False
) -> Axes:
    """Turns ``axis`` into sorted non-negative feature axes for an ``ndim``-D input.

    ``batch_elsewhere`` (an ``axis_name`` is given) allows every dimension of x to
    be a feature axis: the batch is then the mapped axis, as in a per-example
    function under ``jax.vmap(..., axis_name=...)``.

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


def check_momentum(momentum: Any) -> float | None:
    """Checks ``0 <= momentum <= 1``, or None (the cumulative average)."""
    if momentum is None:
        return None
    if isinstance(momentum, bool) or not isinstance(momentum, numbers.Real):
        raise TypeError(
            f"momentum must be a Python float in [0, 1] or None, got {momentum!r} "
            f"({type(momentum).__name__}); it is a hyperparameter, not a traced value."
        )
    if not 0.0 <= float(momentum) <= 1.0:
        raise ValueError(
            f"momentum must be in [0, 1] or None, got {momentum!r}. It is the decay "
            "of the running average: 0.9 or 0.99 are usual (PyTorch's momentum=0.1 "
            "means jaxbn momentum=0.9); 1.0 freezes the running statistics and None "
            "keeps the exact average of all batches."
        )
    return float(momentum)


def check_epsilon(epsilon: Any) -> float:
    """Checks ``epsilon > 0``."""
    if isinstance(epsilon, bool) or not isinstance(epsilon, numbers.Real):
        raise TypeError(f"epsilon must be a positive Python float, got {epsilon!r}.")
    if not float(epsilon) > 0.0 or not math.isfinite(float(epsilon)):
        raise ValueError(
            f"epsilon must be a positive finite float, got {epsilon!r}; it keeps "
            "rsqrt(var + epsilon) finite for a constant feature. Use e.g. 1e-5."
        )
    return float(epsilon)


def check_float_dtype(name: str, dtype: Any, allow_none: bool) -> Any:
    """Checks that ``dtype`` is a floating dtype (or None when allowed)."""
    if dtype is None and allow_none:
        return None
    try:
        canonical = jnp.dtype(dtype)
    except TypeError:
        canonical = None
    if canonical is None or not jnp.issubdtype(canonical, jnp.floating):
        raise TypeError(
            f"{name} must be a floating dtype such as jnp.float32 or jnp.bfloat16, "
            f"got {dtype!r}."
        )
    return canonical


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


def stats_spec(
    feature_shape: tuple[int, ...], x_dtype: Any
) -> dict[str, tuple[tuple[int, ...], tuple[Any, ...]]]:
    """Shapes and accepted dtypes of ``batch_stats`` for x of ``x_dtype``.

    The statistics are kept in float32 or float64 (``init`` picks float64 for
    float64 x); the mean is complex for complex x, the variance always real.
    """
    if jnp.issubdtype(x_dtype, jnp.complexfloating):
        means = (jnp.dtype(jnp.complex64), jnp.dtype(jnp.complex128))
    else:
        means = (jnp.dtype(jnp.float32), jnp.dtype(jnp.float64))
    return {
        "mean": (feature_shape, means),
        "var": (feature_shape, (jnp.dtype(jnp.float32), jnp.dtype(jnp.float64))),
        "count": ((), (jnp.dtype(jnp.int32),)),
    }


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


def check_mapping(
    name: str,
    tree: Any,
    expected: Mapping[str, tuple[tuple[int, ...], Any]],  # dtype or tuple
    feature_shape: tuple[int, ...],
    axes: Axes,
    axis: Any,
    exact_dtype: bool,
) -> None:
    """Checks keys, shapes and dtypes of ``params`` or ``batch_stats``.

    Args:
      name: "params" or "batch_stats", for the message.
      tree: the mapping given by the user.
      expected: key -> (shape, dtype or tuple of accepted dtypes) expected.
      feature_shape: shape of the features of x.
      axes: normalized feature axes.
      axis: the axis as given, for the message.
      exact_dtype: whether dtypes must match exactly (else: any floating dtype).
    """
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
    for key, (shape, dtype) in expected.items():
        leaf = tree[key]
        leaf_shape = tuple(getattr(leaf, "shape", np.shape(leaf)))
        if leaf_shape != shape:
            what = (
                "a scalar"
                if shape == ()
                else f"x has {_feature_phrase(feature_shape, axes, axis)}"
            )
            raise ValueError(
                f"{name}[{key!r}] has shape {leaf_shape} but {what}; did you call "
                "init on a different input?"
            )
        leaf_dtype = jnp.result_type(leaf)
        accepted = dtype if isinstance(dtype, tuple) else (jnp.dtype(dtype),)
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


def check_mask(mask: Any, x_shape: tuple[int, ...]) -> jax.Array:
    """Checks that ``mask`` is boolean and broadcasts to ``x_shape``.

    Returns:
      The mask as an array of x's rank (leading size-1 axes added, NumPy's
      broadcasting rule), not broadcast to x.
    """
    if not hasattr(mask, "dtype") or mask.dtype != jnp.bool_:
        raise TypeError(
            f"mask must be a boolean array broadcastable to x, got "
            f"{getattr(mask, 'dtype', type(mask).__name__)}; build it with a "
            "comparison, e.g. mask = lengths[:, None] > jnp.arange(T)."
        )
    if np.ndim(mask) > len(x_shape):
        raise ValueError(
            f"mask has shape {mask.shape}, more dimensions than x of shape "
            f"{x_shape}; the mask must broadcast to x (use size-1 dimensions, "
            "e.g. mask[:, None, None, None] for a per-example mask of NHWC x)."
        )
    try:
        np.broadcast_shapes(mask.shape, x_shape)
    except ValueError:
        raise ValueError(
            f"mask has shape {mask.shape}, which does not broadcast to x's shape "
            f"{x_shape}; use size-1 dimensions where the mask is shared."
        ) from None
    if np.broadcast_shapes(mask.shape, x_shape) != tuple(x_shape):
        raise ValueError(
            f"mask of shape {mask.shape} would enlarge x of shape {x_shape}; "
            "the mask must broadcast to x, not the other way round."
        )
    mask = jnp.asarray(mask)
    return mask.reshape((1,) * (len(x_shape) - mask.ndim) + tuple(mask.shape))
