"""Converters between jaxbn's variables and Haiku ``hk.BatchNorm``'s params and state.

Haiku is not imported: its ``params`` and ``state`` are plain nested dicts,
``params[name] = {"scale", "offset"}`` with the input's rank (keepdims shapes,
e.g. ``(1, 1, 1, C)``) and ``state[name + "/~/mean_ema"]`` (and ``var_ema``)
``= {"counter", "hidden", "average"}``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ._common import CONVERGED_COUNT, Layout, as_numpy, jaxbn_variables, split_jaxbn

_MEAN, _VAR = "/~/mean_ema", "/~/var_ema"


def _module_name(state: Mapping[str, Any], name: str | None) -> str:
    found = sorted(k[: -len(_MEAN)] for k in state if str(k).endswith(_MEAN))
    if name is None:
        if len(found) != 1:
            raise ValueError(
                f"state holds {len(found)} hk.BatchNorm modules "
                f"({found or 'none'}); pass name= to choose one."
            )
        return found[0]
    if name + _MEAN not in state or name + _VAR not in state:
        raise ValueError(
            f"state has no {name + _MEAN!r} and {name + _VAR!r}; the "
            f"hk.BatchNorm modules in it are {found or 'none'}."
        )
    return name


def from_haiku(
    params: Mapping[str, Any],
    state: Mapping[str, Any],
    *,
    name: str | None = None,
    count: int = CONVERGED_COUNT,
) -> tuple[dict[str, jax.Array], dict[str, jax.Array]]:
    """Jaxbn ``(params, batch_stats)`` from an ``hk.BatchNorm``'s params and state.

    ``scale``/``offset`` become ``scale``/``bias``; the ``average`` of
    ``mean_ema`` and ``var_ema`` (the zero-debiased running averages Haiku
    evaluates with) become ``mean`` and ``var``. Haiku's keepdims shapes are
    squeezed: axes of size 1 are dropped, so a channels-last ``(1, 1, 1, C)``
    gives ``(C,)`` (and a single channel gives ``(1,)``). ``count`` is set to
    ``count``, by default ``CONVERGED_COUNT`` (``2**30``): the statistics are
    taken as converged. Build the jaxbn layer with ``momentum=decay_rate`` and
    Haiku's ``eps``.

    Args:
      params: the Haiku params of the model.
      state: the Haiku state.
      name: the module's full name, e.g. ``"net/~/batch_norm"``; default the
        only ``hk.BatchNorm`` in ``state``.
      count: the ``count`` to record, an int in ``[0, 2**31 - 2]``.

    Returns:
      ``(params, batch_stats)`` as jax arrays.

    Raises:
      ValueError: if ``name`` is not found (or is None while ``state`` holds
        several batch norms), or for mismatched shapes.
      TypeError: for non-floating arrays or a bad count.

    Examples:
      >>> import numpy as np
      >>> from jaxbn import interop
      >>> ema = lambda a: {"counter": np.int32(5), "hidden": a, "average": a}
      >>> hk_params = {"bn": {"scale": np.ones((1, 2)), "offset": np.zeros((1, 2))}}
      >>> hk_state = {"bn/~/mean_ema": ema(np.array([[0.5, 1.0]])),
      ...             "bn/~/var_ema": ema(np.array([[2.0, 4.0]]))}
      >>> params, stats = interop.from_haiku(hk_params, hk_state)
      >>> params["scale"].shape, stats["var"]
      ((2,), Array([2., 4.], dtype=float32))
    """
    name = _module_name(state, name)
    mean = as_numpy(state[name + _MEAN].get("average"), f"{name}{_MEAN}/average")
    feature_shape = tuple(d for d in mean.shape if d != 1) or (1,)
    own = params.get(name, {})
    return jaxbn_variables(
        own.get("scale"),
        own.get("offset"),
        mean,
        state[name + _VAR].get("average"),
        count,
        Layout(f"{name}/scale", f"{name}/offset", f"{name}{_MEAN}", f"{name}{_VAR}"),
        feature_shape,
    )


def to_haiku(
    params: Mapping[str, Any],
    batch_stats: Mapping[str, Any],
    hk_params: Mapping[str, Any],
    hk_state: Mapping[str, Any],
    *,
    name: str | None = None,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Haiku params and state with an ``hk.BatchNorm``'s variables set from jaxbn's.

    ``hk_params`` and ``hk_state`` (e.g. from ``transformed.init``) give the
    module and its keepdims shapes; copies are returned with the module's
    ``scale``/``offset`` and both moving averages replaced (the inputs are not
    changed). Haiku evaluates with ``average``, which is set to jaxbn's
    statistics exactly. With ``count > 0`` the ``counter`` is set to
    ``CONVERGED_COUNT`` and ``hidden`` to the statistics, so ``decay **
    counter`` is 0 in float32 and Haiku continues as a plain moving average;
    with ``count == 0`` (no update yet) ``counter`` and ``hidden`` are 0, a
    fresh Haiku average that debiases from its first update.

    Args:
      params: jaxbn's ``params`` of one layer.
      batch_stats: its ``batch_stats``.
      hk_params: the Haiku params holding the module.
      hk_state: the Haiku state holding the module.
      name: the module's full name; default the only ``hk.BatchNorm``.

    Returns:
      ``(hk_params, hk_state)``, new dicts.

    Raises:
      ValueError: if ``name`` is not found, if jaxbn has a scale or bias that
        the Haiku module lacks (or the reverse), or for mismatched sizes.

    Examples:
      >>> import numpy as np, jax.numpy as jnp
      >>> import jaxbn
      >>> from jaxbn import interop
      >>> ema = lambda: {"counter": np.int32(0), "hidden": np.zeros((1, 3)),
      ...                "average": np.zeros((1, 3))}
      >>> hk_params = {"bn": {"scale": np.ones((1, 3)), "offset": np.zeros((1, 3))}}
      >>> hk_state = {"bn/~/mean_ema": ema(), "bn/~/var_ema": ema()}
      >>> params, stats = jaxbn.batch_norm().init(jnp.zeros((4, 3)))
      >>> _, new_state = interop.to_haiku(params, stats, hk_params, hk_state)
      >>> new_state["bn/~/var_ema"]["average"]
      Array([[1., 1., 1.]], dtype=float32)
    """
    name = _module_name(hk_state, name)
    scale, bias, mean, var, count = split_jaxbn(params, batch_stats)
    own = dict(hk_params.get(name, {}))
    for ours, theirs, value in (("scale", "scale", scale), ("bias", "offset", bias)):
        if (value is None) != (theirs not in own):
            has = "has" if value is not None else "has no"
            raise ValueError(
                f"jaxbn's params {has} {ours!r} but hk_params[{name!r}] "
                f"{'has no' if theirs not in own else 'has'} {theirs!r}; build the "
                "hk.BatchNorm with create_scale/create_offset matching jaxbn's "
                "scale/center."
            )
        if value is not None:
            own[theirs] = jnp.asarray(_like(value, own[theirs], f"{name}/{theirs}"))
    new_params = {**hk_params}
    if own:
        new_params[name] = own
    new_state = {**hk_state}
    counter = jnp.asarray(CONVERGED_COUNT if count > 0 else 0, jnp.int32)
    for suffix, value in ((_MEAN, mean), (_VAR, var)):
        old = hk_state[name + suffix]
        average = jnp.asarray(_like(value, old["average"], name + suffix))
        hidden = average if count > 0 else jnp.zeros_like(average)
        new_state[name + suffix] = {
            **old,
            "counter": counter,
            "hidden": hidden,
            "average": average,
        }
    return new_params, new_state


def _like(value: np.ndarray, template: Any, name: str) -> np.ndarray:
    like = as_numpy(template, name)
    if value.size != like.size:
        raise ValueError(
            f"{name} has shape {like.shape} ({like.size} features) but jaxbn's "
            f"array has shape {value.shape}; convert into the matching module."
        )
    return value.reshape(like.shape).astype(like.dtype)


__all__ = ["from_haiku", "to_haiku"]
