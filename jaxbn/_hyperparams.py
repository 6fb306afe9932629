"""Checks of the layer's hyperparameters, raised when the layer is built.

Every check of an option of :func:`jaxbn.batch_norm` (and of the adapters,
which build the same configuration) lives here, and so does every rule that
derives one option from another: the warm-up default, the renorm defaults and
the canonical form of ``axis_index_groups``. Each message names the argument,
the value given, the value expected and how to fix it. Nothing here is traced.
Call-time inputs (x, masks, weights, the state) are checked in ``_inputs``.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax.numpy as jnp
import numpy as np

AxisSpec = int | tuple[int, ...]
Groups = tuple[tuple[int, ...], ...]


class RenormOptions(NamedTuple):
    """Batch renormalization's resolved options (see :func:`jaxbn.batch_norm`).

    Attributes:
      rmax: the clip of r, a float ``>= 1`` or a function of ``count``.
      dmax: the clip of d, a float ``>= 0`` or a function of ``count``.
      momentum: the constant decay of the renorm moving averages.
    """

    rmax: float | Callable[[Any], Any]
    dmax: float | Callable[[Any], Any]
    momentum: float


def check_axis_spec(axis: Any) -> AxisSpec:
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


def default_warmup(momentum: float | None) -> bool:
    """The warm-up default (``warmup=None``): on, except for momentum None or 1.0.

    The one place of this rule: the layer, the adapters and ``describe`` call it.
    """
    return momentum is not None and momentum != 1.0


def check_warmup(warmup: Any, momentum: float | None) -> bool:
    """Resolves ``warmup`` (None: :func:`default_warmup`) and checks it."""
    if warmup is None:
        return default_warmup(momentum)
    if not isinstance(warmup, bool | np.bool_):
        raise TypeError(f"warmup must be a bool or None, got {warmup!r}.")
    if warmup and not default_warmup(momentum):
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


def check_epsilon(epsilon: Any) -> float:
    """Checks ``epsilon > 0`` and finite: the one epsilon rule (layer and fold)."""
    if isinstance(epsilon, bool) or not isinstance(epsilon, numbers.Real):
        raise TypeError(f"epsilon must be a positive Python float, got {epsilon!r}.")
    if not float(epsilon) > 0.0 or not math.isfinite(float(epsilon)):
        raise ValueError(
            f"epsilon must be a positive finite float, got {epsilon!r}; it keeps "
            "rsqrt(var + epsilon) finite for a constant feature. Use the batch "
            "norm's own epsilon, e.g. 1e-5."
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


def check_choice(name: str, value: Any, choices: tuple[str, ...], why: str) -> Any:
    """Checks that ``value`` is one of the strings ``choices``."""
    if not isinstance(value, str) or value not in choices:
        listed = ", ".join(repr(c) for c in choices)
        raise ValueError(f"{name}={value!r} is not known; use one of {listed}: {why}")
    return value


def check_groups(axis_name: Any, axis_index_groups: Any) -> Groups | None:
    """``axis_index_groups`` as a tuple of tuples of ints (hashable), or None."""
    if axis_index_groups is None:
        return None
    if axis_name is None:
        raise ValueError(
            "axis_index_groups was given without axis_name; pass the axis_name "
            "whose devices the groups split."
        )
    return canonical_groups(axis_index_groups)


def canonical_groups(groups: Sequence[Sequence[int]] | None) -> Groups | None:
    """Groups of device indices as a tuple of tuples of ints (or None)."""
    if groups is None:
        return None
    return tuple(tuple(int(i) for i in g) for g in groups)


def _check_clip(name: str, value: Any, low: float) -> None:
    if callable(value):
        return
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(
            f"{name} must be a Python float or a function of count, got {value!r}."
        )
    if not float(value) >= low:
        raise ValueError(
            f"{name}={value!r} is below {low}: r is clipped to [1/rmax, rmax] and "
            f"d to [-dmax, dmax], so rmax must be >= 1 and dmax >= 0 (rmax=1, "
            "dmax=0 is plain batch norm; the paper ramps them up to 3 and 5)."
        )


def check_renorm(
    renorm: Any, rmax: Any, dmax: Any, renorm_momentum: Any
) -> RenormOptions | None:
    """Checks batch renormalization's options and fills in their defaults.

    ``rmax`` and ``dmax`` are numbers or functions of ``count`` (the int32
    number of updates so far) returning scalars; numbers are range-checked.
    """
    given = [
        name
        for name, value in (
            ("rmax", rmax),
            ("dmax", dmax),
            ("renorm_momentum", renorm_momentum),
        )
        if value is not None
    ]
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
    _check_clip("rmax", rmax, 1.0)
    _check_clip("dmax", dmax, 0.0)
    momentum = 0.99 if renorm_momentum is None else renorm_momentum
    if isinstance(momentum, bool) or not isinstance(momentum, numbers.Real):
        raise TypeError(f"renorm_momentum must be a Python float, got {momentum!r}.")
    if not 0.0 <= float(momentum) <= 1.0:
        raise ValueError(
            f"renorm_momentum={momentum!r} must be in [0, 1]: it is the decay of "
            "the renorm moving averages (Keras's default 0.99)."
        )
    return RenormOptions(rmax, dmax, float(momentum))


def check_debias(
    debias: Any, choices: tuple[str, ...], momentum: float | None, warmup: bool
) -> Any:
    """Checks ``debias``: None, ``"mean"`` or ``"mean_and_var"``.

    Debiasing undoes ``momentum**count`` of the initial value in a plain
    moving average: it needs a constant momentum and no warm-up.
    """
    if debias is None:
        return None
    why = (
        "'mean' divides the running mean by 1 - momentum**count in evaluation "
        "(TensorFlow's zero_debias_moving_mean); 'mean_and_var' debiases the "
        "variance too (like Equinox's mode='batch')."
    )
    check_choice("debias", debias, choices, why)
    if momentum is None or momentum == 1.0 or warmup:
        raise ValueError(
            f"debias={debias!r} with momentum={momentum!r} and warmup={warmup}: "
            "debiasing corrects a plain moving average started at zero, so it "
            "needs a momentum in [0, 1) and warmup=False. Pass warmup=False, or "
            "drop debias (warm-up already keeps early averages unbiased)."
        )
    return debias


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
