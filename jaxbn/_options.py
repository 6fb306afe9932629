"""Checks of the training-time variants' options, raised at trace time with a fix.

Like ``_validation`` (whose conventions it follows), nothing here is traced
except ``clip_bound``, which evaluates a renorm schedule at ``count``.
"""

from __future__ import annotations

import numbers
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np


def check_warmup(warmup: Any, momentum: float | None) -> bool:
    """Resolves ``warmup`` (None: on unless momentum is None or 1.0)."""
    fixed = momentum is None or momentum == 1.0
    if warmup is None:
        return not fixed
    if not isinstance(warmup, bool | np.bool_):
        raise TypeError(f"warmup must be a bool or None, got {warmup!r}.")
    if warmup and fixed:
        what = (
            "None keeps the exact average of all batches"
            if momentum is None
            else "1.0 freezes the running statistics"
        )
        raise ValueError(
            f"warmup=True with momentum={momentum!r}: momentum={what}, which a "
            "warm-up of the decay would break. Pass warmup=False (or leave it "
            "unset: warmup=None is off for this momentum)."
        )
    return bool(warmup)


def check_choice(name: str, value: Any, choices: tuple[str, ...], why: str) -> str:
    """Checks that ``value`` is one of the strings ``choices``."""
    if not isinstance(value, str) or value not in choices:
        listed = ", ".join(repr(c) for c in choices)
        raise ValueError(f"{name}={value!r} is not known; use one of {listed}: {why}")
    return value


def check_renorm(
    renorm: Any, rmax: Any, dmax: Any, renorm_momentum: Any
) -> tuple[Any, Any, float] | None:
    """Checks batch renormalization's options; returns ``(rmax, dmax, momentum)``.

    ``rmax`` and ``dmax`` are numbers or functions of ``count`` (the int32
    number of updates so far) returning scalars; numbers are range-checked.
    """
    given = {
        k: val
        for k, val in (
            ("rmax", rmax),
            ("dmax", dmax),
            ("renorm_momentum", renorm_momentum),
        )
        if val is not None
    }
    if not isinstance(renorm, bool | np.bool_):
        raise TypeError(f"renorm must be a bool, got {renorm!r}.")
    if not renorm:
        if given:
            raise ValueError(
                f"{', '.join(given)} given but renorm=False; pass renorm=True to use "
                "batch renormalization, or drop these options."
            )
        return None
    rmax = 3.0 if rmax is None else rmax
    dmax = 5.0 if dmax is None else dmax
    for name, val, low in (("rmax", rmax, 1.0), ("dmax", dmax, 0.0)):
        if callable(val):
            continue
        if isinstance(val, bool) or not isinstance(val, numbers.Real):
            raise TypeError(
                f"{name} must be a Python float or a function of count, got {val!r}."
            )
        if not float(val) >= low:
            raise ValueError(
                f"{name}={val!r} is below {low}: r is clipped to [1/rmax, rmax] and "
                f"d to [-dmax, dmax], so rmax must be >= 1 and dmax >= 0 (rmax=1, "
                "dmax=0 is plain batch norm; the paper ramps them up to 3 and 5)."
            )
    momentum = 0.99 if renorm_momentum is None else renorm_momentum
    if isinstance(momentum, bool) or not isinstance(momentum, numbers.Real):
        raise TypeError(f"renorm_momentum must be a Python float, got {momentum!r}.")
    if not 0.0 <= float(momentum) <= 1.0:
        raise ValueError(
            f"renorm_momentum={momentum!r} must be in [0, 1]: it is the decay of "
            "the renorm moving averages (Keras's default 0.99)."
        )
    return rmax, dmax, float(momentum)


def clip_bound(name: str, value: Any, count: jax.Array) -> jax.Array:
    """``value``, or ``value(count)`` for a schedule, as a float32 scalar."""
    out = jnp.asarray(value(count) if callable(value) else value, jnp.float32)
    if out.shape != ():
        raise ValueError(f"{name}(count) must return a scalar, got shape {out.shape}.")
    return out


def check_weights(weights: Any, x_shape: tuple[int, ...], dtype: Any) -> jax.Array:
    """Checks per-example weights: real, broadcastable to x, not negative.

    Returns:
      The weights in ``dtype`` with x's rank (leading size-1 axes added), not
      broadcast to x.
    """
    w_dtype = getattr(weights, "dtype", None)
    if w_dtype is None or not jnp.issubdtype(w_dtype, jnp.floating):
        raise TypeError(
            f"weights must be a real floating array broadcastable to x, got "
            f"{w_dtype if w_dtype is not None else type(weights).__name__}; for a "
            "boolean mask use mask=, and cast counts with .astype(jnp.float32)."
        )
    w_shape = tuple(np.shape(weights))
    try:
        fits = np.broadcast_shapes(w_shape, x_shape) == tuple(x_shape)
    except ValueError:
        fits = False
    if not fits or len(w_shape) > len(x_shape):
        raise ValueError(
            f"weights has shape {w_shape}, which does not broadcast to x's shape "
            f"{x_shape}; give one weight per example with size-1 axes elsewhere, "
            "e.g. weights[:, None, None, None] for NHWC x."
        )
    try:
        concrete = np.asarray(weights)
    except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):
        concrete = None  # traced: checked when concrete only
    if concrete is not None and np.any(concrete < 0):
        raise ValueError(
            "weights has negative entries; weights must be >= 0 (0 drops an "
            "entry from the statistics, like mask=False)."
        )
    w = jnp.asarray(weights, dtype)
    return w.reshape((1,) * (len(x_shape) - w.ndim) + w_shape)


def check_virtual_batch_size(k: Any) -> int | None:
    """Checks ``virtual_batch_size``: None or a positive int."""
    if k is None:
        return None
    if isinstance(k, bool) or not isinstance(k, numbers.Integral) or k < 1:
        raise ValueError(
            f"virtual_batch_size must be a positive int or None, got {k!r}; it is "
            "the number of examples per ghost batch, e.g. 32."
        )
    return int(k)


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
    dtype = getattr(value, "dtype", None)
    if dtype is None or not jnp.issubdtype(dtype, jnp.floating):
        raise TypeError(
            f"{name} must be a real floating array broadcastable to x, got "
            f"{dtype if dtype is not None else type(value).__name__}."
        )
    shape = tuple(np.shape(value))
    try:
        fits = np.broadcast_shapes(shape, x_shape) == tuple(x_shape)
    except ValueError:
        fits = False
    if not fits or len(shape) > len(x_shape):
        raise ValueError(
            f"{name} has shape {shape}, which does not broadcast to x's shape "
            f"{tuple(x_shape)}; give x's rank with size-1 axes where it is "
            f"shared, e.g. {name}[:, None, None, :] per example for NHWC x."
        )
    value = jnp.asarray(value)
    return value.reshape((1,) * (len(x_shape) - value.ndim) + shape)


def renorm_operands(
    stats: Any, shape: tuple[int, ...], options: Any, x_dtype: Any
) -> tuple[jax.Array, ...] | None:
    """Renorm's ``(renorm_mean, renorm_std, rmax, dmax)`` shaped for x, or None."""
    if options is None:
        return None
    if jnp.issubdtype(x_dtype, jnp.complexfloating):
        raise TypeError(
            f"renorm=True with complex x ({x_dtype}): batch renormalization is "
            "defined for real input only; use renorm=False."
        )
    return (
        stats["renorm_mean"].reshape(shape),
        stats["renorm_std"].reshape(shape),
        clip_bound("rmax", options[0], stats["count"]),
        clip_bound("dmax", options[1], stats["count"]),
    )
