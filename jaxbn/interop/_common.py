"""What the converters in :mod:`jaxbn.interop` share: layouts, reading, checks.

Every converter reads plain arrays (NumPy, JAX, or another library's tensors
through duck typing) and builds jaxbn's ``params = {"scale", "bias"}`` and
``batch_stats = {"mean", "var", "count"}``; no other library is imported here.
Where a framework's layout is only a renaming of jaxbn's four arrays, it is a
row of :data:`LAYOUTS`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from .._converged import CONVERGED_COUNT, check_count

__all__ = [
    "CONVERGED_COUNT",
    "LAYOUTS",
    "Layout",
    "as_numpy",
    "jaxbn_variables",
    "split_jaxbn",
]


class Layout(NamedTuple):
    """A framework's names of jaxbn's scale, bias, running mean and variance."""

    scale: str
    bias: str
    mean: str
    var: str

    def prefixed(self, prefix: str) -> Layout:
        """The names with ``prefix`` in front (a layer's key in a whole model)."""
        return Layout(*(prefix + name for name in self))


LAYOUTS = {
    "jaxbn": Layout("scale", "bias", "mean", "var"),
    "flax": Layout("scale", "bias", "mean", "var"),
    "torch": Layout("weight", "bias", "running_mean", "running_var"),
    "keras": Layout("gamma", "beta", "moving_mean", "moving_variance"),
    "tensorflow": Layout("gamma", "beta", "moving_mean", "moving_variance"),
    "equinox": Layout("weight", "bias", "mean", "var"),
}


def as_numpy(value: Any, name: str) -> np.ndarray:
    """``value`` as a NumPy array, from NumPy, JAX, PyTorch, Keras or Flax NNX.

    A PyTorch tensor goes through ``.detach().cpu()`` (bfloat16 through
    float32, which NumPy lacks); a Flax NNX variable through ``get_value()``; a
    Keras variable through ``.value`` (a ``tf.Variable`` through ``.value()``);
    anything else through ``np.array``. The
    result is always a copy: JAX on CPU may alias a NumPy buffer, and PyTorch
    updates its running statistics in place, so a view would change under the
    converted variables.

    Raises:
      TypeError: if ``value`` is None or not array-like.
    """
    if value is None:
        raise TypeError(f"{name} is None; expected an array.")
    if hasattr(value, "detach") and hasattr(value, "cpu"):  # torch.Tensor
        value = value.detach().cpu()
        if str(value.dtype) == "torch.bfloat16":
            return np.array(jnp.asarray(value.float().numpy(), jnp.bfloat16))
        return value.numpy().copy()
    if hasattr(value, "get_value") and hasattr(value, "set_value"):  # nnx.Variable
        value = value.get_value()
    elif hasattr(value, "assign") and hasattr(value, "value"):  # keras.Variable
        value = value.value  # the backend's array (Keras's .numpy() warns on NumPy 2)
        if callable(value):  # tf.Variable, whose value() is a method
            value = value()
    try:
        return np.array(value)
    except Exception as e:
        raise TypeError(
            f"{name} of type {type(value).__name__} is not an array; expected a "
            "NumPy or JAX array or a torch tensor."
        ) from e


def _floating(value: Any, name: str) -> np.ndarray:
    arr = as_numpy(value, name)
    if not jnp.issubdtype(arr.dtype, jnp.floating):
        raise TypeError(
            f"{name} has dtype {arr.dtype}, expected a floating dtype (float32, "
            "bfloat16, ...)."
        )
    return arr


def jaxbn_variables(
    scale: Any,
    bias: Any,
    mean: Any,
    var: Any,
    count: int,
    names: Layout,
    feature_shape: tuple[int, ...] | None = None,
) -> tuple[dict[str, jax.Array], dict[str, jax.Array]]:
    """Checks four source arrays and builds jaxbn's ``(params, batch_stats)``.

    Args:
      scale: the scale, or None when the source has none.
      bias: the bias, or None.
      mean: the running mean.
      var: the running variance.
      count: the ``count`` to record (checked like ``CONVERGED_COUNT``).
      names: the source's names of (scale, bias, mean, var), for messages.
      feature_shape: the shape every array is reshaped to; default the mean's
        shape, which then must be 1-D.

    Returns:
      ``params`` (each array in its own floating dtype) and ``batch_stats``
      (float32 statistics and an int32 ``count``).

    Raises:
      TypeError: for a non-floating array or a bad count.
      ValueError: for a shape that does not match the mean's, or a count out of
        range.
    """
    count = check_count(count)
    mean_np = _floating(mean, names[2])
    exact = feature_shape is None
    if feature_shape is None:
        if mean_np.ndim != 1:
            raise ValueError(
                f"{names[2]} has shape {mean_np.shape}, expected one value per "
                "feature (a 1-D array)."
            )
        feature_shape = mean_np.shape
    size = math.prod(feature_shape)
    arrays = {}
    for name, value in zip(names, (scale, bias, mean_np, var), strict=True):
        if value is None:
            continue
        arr = _floating(value, name)
        mismatch = arr.shape != tuple(feature_shape) if exact else arr.size != size
        if mismatch:
            raise ValueError(
                f"{name} has shape {arr.shape} but {names[2]} has shape "
                f"{mean_np.shape}; all arrays must come from the same batch-norm "
                "layer."
            )
        arrays[name] = arr.reshape(feature_shape)
    params: dict[str, jax.Array] = {}
    if scale is not None:
        params["scale"] = jnp.asarray(arrays[names[0]])
    if bias is not None:
        params["bias"] = jnp.asarray(arrays[names[1]])
    batch_stats = {
        "mean": jnp.asarray(arrays[names[2]], jnp.float32),
        "var": jnp.asarray(arrays[names[3]], jnp.float32),
        "count": jnp.asarray(count, jnp.int32),
    }
    return params, batch_stats


def split_jaxbn(
    params: Mapping[str, Any], batch_stats: Mapping[str, Any]
) -> tuple[np.ndarray | None, np.ndarray | None, np.ndarray, np.ndarray, int]:
    """Splits jaxbn's variables into NumPy ``(scale, bias, mean, var, count)``.

    Raises:
      TypeError: if params or batch_stats is not a dict.
      ValueError: for a missing statistic, an unknown key, mismatched shapes, or
        a count that is not a whole-number scalar.
    """
    if not isinstance(params, Mapping) or not isinstance(batch_stats, Mapping):
        raise TypeError(
            "params and batch_stats must be the dicts returned by jaxbn's init "
            f"or apply, got {type(params).__name__} and "
            f"{type(batch_stats).__name__}."
        )
    extra = set(params) - {"scale", "bias"}
    if extra:
        raise ValueError(
            f"params has unexpected keys {sorted(extra)}; expected a subset of "
            "['bias', 'scale'] (pass the params of one batch-norm layer)."
        )
    missing = {"mean", "var"} - set(batch_stats)
    if missing:
        raise ValueError(
            f"batch_stats lacks {sorted(missing)}; expected the keys ['count', "
            "'mean', 'var'] of one jaxbn batch-norm layer ('count' may be absent "
            "for a Flax adapter built with warmup=False)."
        )
    # Writable copies (a jax array's NumPy view is read-only, which PyTorch
    # warns about when it wraps one).
    mean = np.array(batch_stats["mean"], np.float32)
    var = np.array(batch_stats["var"], np.float32)
    scale = None if "scale" not in params else np.array(params["scale"])
    bias = None if "bias" not in params else np.array(params["bias"])
    for name, arr in (("var", var), ("scale", scale), ("bias", bias)):
        if arr is not None and arr.shape != mean.shape:
            raise ValueError(
                f"{name} has shape {arr.shape} but mean has shape {mean.shape}; "
                "params and batch_stats must belong to the same layer."
            )
    # The core keeps an int32 count; the Flax adapters a float32 one (whole
    # numbers), or none with warmup=False (statistics are then "converged").
    count = np.asarray(batch_stats.get("count", CONVERGED_COUNT))
    whole = jnp.issubdtype(count.dtype, jnp.integer) or (
        jnp.issubdtype(count.dtype, jnp.floating)
        and count.shape == ()
        and float(count) == int(float(count))
    )
    if count.shape != () or not whole:
        raise ValueError(
            f"batch_stats['count'] must be a whole-number scalar, got shape "
            f"{count.shape} and dtype {count.dtype}."
        )
    return scale, bias, mean, var, int(count)
