"""Converters between jaxbn's variables and a PyTorch ``BatchNorm`` ``state_dict``.

PyTorch is not imported: tensors are read through ``.detach().cpu().numpy()``
and written as NumPy arrays (``torch.as_tensor`` turns them back).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, overload

import jax
import numpy as np

from ._common import CONVERGED_COUNT, LAYOUTS, jaxbn_variables, split_jaxbn

_TORCH = LAYOUTS["torch"]


def from_torch(
    state_dict: Any, *, prefix: str = "", count: int = CONVERGED_COUNT
) -> tuple[dict[str, jax.Array], dict[str, jax.Array]]:
    """Jaxbn ``(params, batch_stats)`` from a PyTorch ``BatchNorm{1,2,3}d`` state dict.

    ``weight``/``bias`` become ``scale``/``bias`` (both absent with
    ``affine=False``), ``running_mean``/``running_var`` become ``mean``/``var``.
    ``num_batches_tracked`` is not used: ``count`` is set to ``count``, by
    default :data:`jaxbn.interop.CONVERGED_COUNT` (``2**30``), so the running
    statistics are taken as converged and jaxbn's decay is plain ``momentum``
    from the first step, as PyTorch would continue (pass ``count=0`` to warm up
    again). Build the jaxbn layer with ``axis=1`` (PyTorch is channels-first),
    ``momentum=momentum_from_torch(m)`` and PyTorch's ``eps``.

    PyTorch's ``running_var`` is a running average of the *unbiased* batch
    variance (divided by ``n - 1``), jaxbn's of the biased one (divided by
    ``n``): the converted ``var`` is taken as it is, so evaluation gives
    PyTorch's outputs, and training on from there mixes biased batch variances
    into it (a relative difference of ``1 / (n - 1)`` per update, for ``n``
    values per feature in a batch).

    Args:
      state_dict: a ``torch.nn.BatchNorm{1,2,3}d`` module (or a whole model,
        with ``prefix``), or its ``state_dict()``; values are torch tensors or
        arrays.
      prefix: the layer's key prefix in ``state_dict``, e.g. ``"layer1.0.bn1."``.
      count: the ``count`` to record, an int in ``[0, 2**31 - 2]``.

    Returns:
      ``(params, batch_stats)`` as jax arrays: params in the tensors' floating
      dtype, statistics float32, ``count`` int32.

    Raises:
      ValueError: if ``running_mean``/``running_var`` are missing (a layer with
        ``track_running_stats=False`` has none), if only one of ``weight`` and
        ``bias`` is present, or if shapes differ.
      TypeError: for non-floating arrays or a bad count.

    Examples:
      >>> import numpy as np
      >>> from jaxbn import interop
      >>> sd = {"weight": np.ones(2), "bias": np.zeros(2),
      ...       "running_mean": np.array([0.5, 1.0]),
      ...       "running_var": np.array([2.0, 4.0]),
      ...       "num_batches_tracked": np.array(7)}
      >>> params, stats = interop.from_torch(sd)
      >>> stats["var"], stats["count"]
      (Array([2., 4.], dtype=float32), Array(1073741824, dtype=int32))
      >>> round(interop.momentum_from_torch(0.1), 6)  # torch's default
      0.9
    """
    if hasattr(state_dict, "state_dict") and callable(state_dict.state_dict):
        state_dict = state_dict.state_dict()  # a torch.nn.Module
    if not isinstance(state_dict, Mapping):
        raise TypeError(
            f"state_dict must be a mapping such as module.state_dict(), got "
            f"{type(state_dict).__name__}."
        )
    values = {k: state_dict.get(prefix + k) for k in _TORCH}
    for k in ("running_mean", "running_var"):
        if values[k] is None:
            raise ValueError(
                f"state_dict has no key {prefix + k!r} (keys: "
                f"{_some_keys(state_dict)}). A layer built with "
                "track_running_stats=False has no running statistics to convert; "
                "check the prefix otherwise."
            )
    if (values["weight"] is None) != (values["bias"] is None):
        missing = "weight" if values["weight"] is None else "bias"
        raise ValueError(
            f"state_dict has no key {prefix + missing!r} although it has the "
            "other affine parameter; a PyTorch batch norm has both (affine=True) "
            "or neither."
        )
    return jaxbn_variables(
        *(values[k] for k in _TORCH), count=count, names=_TORCH.prefixed(prefix)
    )


def to_torch(
    params: Mapping[str, Any], batch_stats: Mapping[str, Any], *, prefix: str = ""
) -> dict[str, np.ndarray]:
    """A PyTorch ``BatchNorm{1,2,3}d`` state dict (NumPy values) from jaxbn's variables.

    Load it with ``module.load_state_dict({k: torch.as_tensor(v) for k, v in
    sd.items()})``. ``scale``/``bias`` become ``weight``/``bias``: PyTorch has
    both or neither (``affine``), so a jaxbn layer with only one of them gets
    the other as ones or zeros, which computes the same function.
    ``num_batches_tracked`` is ``count`` (PyTorch reads it only with
    ``momentum=None``). jaxbn's ``var`` is a running average of biased batch
    variances and PyTorch reads ``running_var`` as an unbiased one; for ``n``
    values per feature in a batch they differ by a factor ``n / (n - 1)``, and
    evaluation in PyTorch uses the value as it is, as jaxbn does.

    Args:
      params: jaxbn's ``params`` of one layer.
      batch_stats: its ``batch_stats``.
      prefix: prepended to every key, e.g. ``"bn1."``.

    Returns:
      ``{"weight", "bias", "running_mean", "running_var",
      "num_batches_tracked"}`` (prefixed; the first two absent when jaxbn has
      neither scale nor bias), float32 arrays in params' dtype and an int64
      scalar.

    Raises:
      ValueError: for missing statistics, unknown keys or mismatched shapes.

    Examples:
      >>> import jax.numpy as jnp
      >>> import jaxbn
      >>> from jaxbn import interop
      >>> params, stats = jaxbn.batch_norm(axis=1).init(jnp.zeros((4, 3)))
      >>> sd = interop.to_torch(params, stats, prefix="bn.")
      >>> sorted(sd)
      ['bn.bias', 'bn.num_batches_tracked', 'bn.running_mean', 'bn.running_var',
       'bn.weight']
      >>> sd["bn.running_var"], sd["bn.num_batches_tracked"].dtype
      (array([1., 1., 1.], dtype=float32), dtype('int64'))
    """
    scale, bias, mean, var, count = split_jaxbn(params, batch_stats)
    names = _TORCH.prefixed(prefix)
    out: dict[str, np.ndarray] = {}
    if scale is not None or bias is not None:
        like = scale if scale is not None else bias
        assert like is not None
        out[names.scale] = scale if scale is not None else np.ones_like(like)
        out[names.bias] = bias if bias is not None else np.zeros_like(like)
    out[names.mean] = mean
    out[names.var] = var
    out[prefix + "num_batches_tracked"] = np.asarray(count, np.int64)
    return out


def torch_momentum(momentum: float) -> float:
    """PyTorch's ``momentum`` for a jaxbn (or Flax, Keras, Haiku) ``momentum``.

    PyTorch's momentum is the weight of the *new* batch, ``1 - decay``; jaxbn's
    is the decay.

    Args:
      momentum: jaxbn's decay, in ``[0, 1)``.

    Returns:
      ``1 - momentum``.

    Raises:
      ValueError: if momentum is outside ``[0, 1)``.

    Examples:
      >>> from jaxbn import interop
      >>> round(interop.torch_momentum(0.99), 6)
      0.01
    """
    if not 0.0 <= momentum < 1.0:
        raise ValueError(f"momentum={momentum!r} must be in [0, 1) (jaxbn's decay).")
    return 1.0 - float(momentum)


@overload
def momentum_from_torch(momentum: float) -> float: ...
@overload
def momentum_from_torch(momentum: None) -> None: ...
def momentum_from_torch(momentum: float | None) -> float | None:
    """Jaxbn's ``momentum`` (the decay) for a PyTorch ``momentum``.

    Args:
      momentum: PyTorch's momentum, in ``(0, 1]``, or None: PyTorch's
        cumulative moving average, which is jaxbn's ``momentum=None`` too.

    Returns:
      ``1 - momentum``, or None for None.

    Raises:
      ValueError: for a value outside ``(0, 1]``.

    Examples:
      >>> from jaxbn import interop
      >>> round(interop.momentum_from_torch(0.01), 6)
      0.99
      >>> print(interop.momentum_from_torch(None))  # the cumulative average
      None
    """
    if momentum is None:
        return None
    if not 0.0 < momentum <= 1.0:
        raise ValueError(
            f"momentum={momentum!r} must be in (0, 1] (PyTorch's weight of the "
            "new batch)."
        )
    return 1.0 - float(momentum)


def _some_keys(state_dict: Mapping[str, Any], limit: int = 8) -> str:
    keys = list(state_dict)
    shown = ", ".join(repr(k) for k in keys[:limit])
    return shown + (", ..." if len(keys) > limit else "")


__all__ = ["from_torch", "momentum_from_torch", "to_torch", "torch_momentum"]
