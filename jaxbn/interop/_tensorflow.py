"""Converters from TensorFlow checkpoints' batch-norm variables to jaxbn's.

TensorFlow is not imported: the input is a mapping from TensorFlow's variable
names to arrays (what ``tf.train.load_checkpoint(path).get_tensor(name)`` gives
for the names of ``get_variable_to_shape_map()``), or the checkpoint reader
itself, read through duck typing.

A batch norm is a *scope*, the path in front of its ``moving_mean``:
``conv1/BatchNorm`` (``tf.contrib.layers.batch_norm``),
``block1/batch_normalization_1`` (``tf.layers``), ``bn1`` or
``layer_with_weights-1`` (Keras). Its variables are the scope's direct
children: ``gamma``, ``beta``, ``moving_mean``, ``moving_variance``, the
zero-debias pair ``moving_mean/biased`` and ``moving_mean/local_step`` (which
TensorFlow names ``<scope>/<scope>/moving_mean/...``), and renorm's
``renorm_mean``, ``renorm_stddev`` (with ``renorm_mean_weight`` and
``renorm_stddev_weight`` in TensorFlow 1) and ``moving_stddev``. Deeper names
(optimizer slots such as ``<scope>/gamma/Adam``, ``ExponentialMovingAverage``
shadows) and every other variable are not read.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from ._common import CONVERGED_COUNT, LAYOUTS, as_numpy, jaxbn_variables

_NAMES = LAYOUTS["tensorflow"]
_RENORM = ("renorm_mean", "renorm_stddev")
_RENORM_ALL = (*_RENORM, "renorm_mean_weight", "renorm_stddev_weight", "moving_stddev")
# Object-based checkpoints (tf.train.Checkpoint, Keras's model.save_weights)
# end each variable's name in /.ATTRIBUTES/VARIABLE_VALUE; the names of
# layer.weights end in ":0".
_SUFFIX = re.compile(r"(/\.ATTRIBUTES/VARIABLE_VALUE|:\d+)$")

Variables = tuple[dict[str, jax.Array], dict[str, jax.Array]]


class _Source(NamedTuple):
    """TensorFlow's variables: clean name -> name as given, and a reader."""

    names: dict[str, str]
    read: Callable[[str], Any]

    def get(self, name: str) -> Any:
        """The array of ``name`` (a clean name), or None if absent."""
        key = self.names.get(name)
        return None if key is None else self.read(key)


def _source(variables: Any) -> _Source:
    """Reads a mapping of names to arrays or a checkpoint reader."""
    if hasattr(variables, "get_variable_to_shape_map") and hasattr(
        variables, "get_tensor"
    ):
        keys, read = list(variables.get_variable_to_shape_map()), variables.get_tensor
    elif isinstance(variables, Mapping):
        keys, read = list(variables), variables.__getitem__
    else:
        raise TypeError(
            "variables must be a mapping from TensorFlow variable names to arrays, "
            "e.g. {name: reader.get_tensor(name) for name in "
            "reader.get_variable_to_shape_map()}, or the reader of "
            f"tf.train.load_checkpoint(path) itself; got {type(variables).__name__}."
        )
    names = {}
    for key in keys:
        if not isinstance(key, str):
            raise TypeError(
                f"variables has the key {key!r} of type {type(key).__name__}; "
                "expected TensorFlow variable names (str)."
            )
        names[_SUFFIX.sub("", key)] = key
    return _Source(names, read)


def _join(scope: str, leaf: str) -> str:
    return f"{scope}/{leaf}" if scope else leaf


def _scopes(source: _Source) -> list[str]:
    """Every scope holding a ``moving_mean``, sorted."""
    found = {
        name[: -len("moving_mean")].rstrip("/")
        for name in source.names
        if name == "moving_mean" or name.endswith("/moving_mean")
    }
    return sorted(found)


def _debiased(source: _Source, scope: str) -> tuple[Any, int]:
    """The zero-debias pair of ``scope``: the biased mean and the update count."""
    found = {}
    for leaf in ("biased", "local_step"):
        names = [
            _join(s, f"moving_mean/{leaf}")
            for s in (_join(scope, scope) if scope else None, scope)
            if s is not None
        ]
        value = next((v for v in map(source.get, names) if v is not None), None)
        if value is None:
            raise ValueError(
                f"debias='mean' needs {' or '.join(map(repr, names))}, which "
                "variables lacks: the layer was not trained with "
                "zero_debias_moving_mean=True. Convert it with debias=None."
            )
        found[leaf] = as_numpy(value, names[0])
    step = found["local_step"]
    if step.size != 1 or not float(step.reshape(())) >= 0:
        raise ValueError(
            f"{scope}'s moving_mean/local_step is {step!r}, expected a non-negative "
            "scalar (the number of updates)."
        )
    count = float(step.reshape(()))
    if count != int(count):
        raise ValueError(
            f"{scope}'s moving_mean/local_step is {count}, expected a whole number."
        )
    return found["biased"], int(count)


def _renorm_stats(
    source: _Source, scope: str, renorm: bool, feature_shape: tuple[int, ...]
) -> dict[str, jax.Array]:
    """``renorm_mean`` and ``renorm_std`` of ``scope``, or {} without renorm."""
    present = [v for v in _RENORM_ALL if _join(scope, v) in source.names]
    if not renorm:
        if present:
            raise ValueError(
                f"variables holds {[_join(scope, v) for v in present]}, the state "
                "of a layer trained with renorm=True; pass renorm=True to convert "
                "it for jaxbn.batch_norm(renorm=True, ...). Evaluation is the "
                "same either way: it reads moving_mean and moving_variance."
            )
        return {}
    out = {}
    for theirs, ours in zip(_RENORM, ("renorm_mean", "renorm_std"), strict=True):
        name = _join(scope, theirs)
        value = source.get(name)
        if value is None:
            raise ValueError(
                f"renorm=True but variables has no {name!r} (variables under "
                f"{scope or 'the top level'}: {_children(source, scope)}); pass "
                "renorm=False for a layer trained without renorm."
            )
        value = as_numpy(value, name)
        weight = source.get(name + "_weight")  # TensorFlow 1's debiasing weight
        if weight is not None:
            weight = float(as_numpy(weight, name + "_weight").reshape(()))
            if not weight > 0:
                raise ValueError(
                    f"{name}_weight is {weight}: the renorm averages were never "
                    "updated; convert with renorm=False."
                )
            value = value / weight
        if value.size != math.prod(feature_shape):
            raise ValueError(
                f"{name} has shape {value.shape} but {_join(scope, 'moving_mean')} "
                f"has {math.prod(feature_shape)} values; all arrays must come from "
                "the same batch-norm layer."
            )
        out[ours] = jnp.asarray(value.reshape(feature_shape), jnp.float32)
    return out


def _children(source: _Source, scope: str) -> list[str]:
    prefix = f"{scope}/" if scope else ""
    return sorted(
        n[len(prefix) :]
        for n in source.names
        if n.startswith(prefix) and "/" not in n[len(prefix) :]
    )


def _convert(
    source: _Source, scope: str, count: int | None, debias: str | None, renorm: bool
) -> Variables:
    """The ``(params, batch_stats)`` of one scope."""
    names = _NAMES.prefixed(f"{scope}/" if scope else "")
    values = [source.get(n) for n in names]
    for name, value in zip(names[2:], values[2:], strict=True):
        if value is None:
            raise ValueError(
                f"variables has no {name!r} (variables under "
                f"{scope or 'the top level'}: {_children(source, scope)}); pass "
                "every variable of the layer, e.g. all the names of "
                "reader.get_variable_to_shape_map()."
            )
    if debias is not None:
        values[2], count = _debiased(source, scope)
    mean = as_numpy(values[2], names[2])
    feature_shape = tuple(d for d in mean.shape if d != 1) or (1,)
    params, stats = jaxbn_variables(
        *values,
        count=CONVERGED_COUNT if count is None else count,
        names=names,
        feature_shape=feature_shape,
    )
    return params, {**stats, **_renorm_stats(source, scope, renorm, feature_shape)}


def _check_options(count: int | None, debias: str | None) -> None:
    if debias not in (None, "mean"):
        raise ValueError(
            f"debias={debias!r}; expected None (TensorFlow's moving_mean as "
            "stored) or 'mean' (the biased average and its step count, for "
            "jaxbn.batch_norm(debias='mean', warmup=False))."
        )
    if debias is not None and count is not None:
        raise ValueError(
            f"count={count} and debias='mean' given; with debias='mean' the count "
            "is TensorFlow's moving_mean/local_step, so drop count."
        )


def from_tensorflow(
    variables: Any,
    *,
    scope: str | None = None,
    count: int | None = None,
    debias: str | None = None,
    renorm: bool = False,
) -> Variables:
    """Jaxbn ``(params, batch_stats)`` from one TensorFlow batch norm's variables.

    Reads the variables of ``tf.contrib.layers.batch_norm``,
    ``tf.layers.batch_normalization`` or ``tf.keras.layers.BatchNormalization``
    from a checkpoint, the variables named ``<scope>/<name>``: ``gamma`` and
    ``beta`` become ``scale`` and ``bias`` (each absent when TensorFlow has
    none, with ``scale=False`` or ``center=False``), ``moving_mean`` and
    ``moving_variance`` become ``mean`` and ``var``, so evaluation computes
    TensorFlow's ``gamma * (x - moving_mean) / sqrt(moving_variance + epsilon)
    + beta``. ``count`` is :data:`CONVERGED_COUNT` (``2**30``) unless given:
    the statistics are taken as converged and jaxbn continues with the plain
    decay. Build the layer with ``momentum=decay`` (the same convention),
    TensorFlow's ``epsilon`` (default ``1e-3``, jaxbn's ``1e-5``), ``axis=1``
    for ``NCHW``, and ``scale=False`` for contrib's default. Keepdims
    shapes (``(1, 1, 1, C)``) are squeezed like Haiku's. Other names are not
    read: kernels, optimizer slots (``<scope>/gamma/Adam``), EMA shadows.

    Args:
      variables: a mapping from TensorFlow variable names to arrays (NumPy
        arrays, ``tf.Variable`` objects, anything ``np.asarray`` reads), or a
        checkpoint reader (``tf.train.load_checkpoint(path)``: anything with
        ``get_variable_to_shape_map()`` and ``get_tensor(name)``, read only
        for this scope's variables). Names may end in ``:0`` or
        ``/.ATTRIBUTES/VARIABLE_VALUE``.
      scope: the layer's scope, e.g. ``"conv1/BatchNorm"`` (``""`` for bare
        names such as ``"moving_mean"``); default the only batch norm in
        ``variables``.
      count: the ``count`` to record, an int in ``[0, 2**31 - 2]``; default
        ``CONVERGED_COUNT``.
      debias: None (default) takes ``moving_mean`` as stored, which for a
        layer trained with ``zero_debias_moving_mean=True`` is already the
        debiased mean TensorFlow evaluates with. ``"mean"`` takes the biased
        average ``moving_mean/biased`` as ``mean`` and
        ``moving_mean/local_step`` as ``count``, to continue training exactly
        as TensorFlow with ``jaxbn.batch_norm(momentum=decay, warmup=False,
        debias="mean")``; ``count`` must then be left out.
      renorm: whether to convert renorm's state, ``renorm_mean`` and
        ``renorm_stddev``, into ``batch_stats["renorm_mean"]`` and
        ``["renorm_std"]`` (divided by TensorFlow 1's ``*_weight``), for a
        jaxbn layer built with ``renorm=True``. ``moving_stddev`` is not read:
        ``moving_variance`` holds the same statistics.

    Returns:
      ``(params, batch_stats)`` as jax arrays: params in the variables' dtype,
      statistics float32, ``count`` int32.

    Raises:
      ValueError: if ``scope`` holds no batch norm (or ``scope`` is None and
        ``variables`` holds several or none), if ``moving_mean`` or
        ``moving_variance`` is missing, for renorm variables without
        ``renorm=True`` (or missing ones with it), for ``debias="mean"``
        without the zero-debias variables or with ``count``, an unknown
        ``debias``, or mismatched shapes.
      TypeError: for ``variables`` that is neither a mapping nor a reader,
        non-string names or ``scope``, non-floating arrays or a bad count.

    Examples:
      >>> import numpy as np
      >>> from jaxbn import interop
      >>> ckpt = {"conv1/BatchNorm/beta": np.zeros(2),
      ...         "conv1/BatchNorm/moving_mean": np.array([0.5, 1.0]),
      ...         "conv1/BatchNorm/moving_variance": np.array([2.0, 4.0]),
      ...         "conv1/weights": np.ones((3, 3, 1, 2))}
      >>> params, stats = interop.from_tensorflow(ckpt)  # contrib: no gamma
      >>> sorted(params), stats["var"]
      (['bias'], Array([2., 4.], dtype=float32))
    """
    _check_options(count, debias)
    if scope is not None and not isinstance(scope, str):
        raise TypeError(
            f"scope must be a str such as 'conv1/BatchNorm', got {scope!r}."
        )
    source = _source(variables)
    found = _scopes(source)
    if scope is None:
        if len(found) != 1:
            raise ValueError(
                f"variables holds {len(found)} batch norms ({found or 'none'}); "
                "pass scope= to choose one, or use from_tensorflow_model for all."
            )
        scope = found[0]
    elif scope.strip("/") not in found:
        raise ValueError(
            f"scope={scope!r} holds no moving_mean; the batch norms in variables "
            f"are {found or 'none'}."
        )
    return _convert(source, scope.strip("/"), count, debias, renorm)


def from_tensorflow_model(
    variables: Any,
    *,
    count: int | None = None,
    debias: str | None = None,
    renorm: bool = False,
) -> dict[str, dict[str, Any]]:
    """Every batch norm of a TensorFlow checkpoint, as nested jaxbn variables.

    Each scope found (see :func:`from_tensorflow`) is converted with the same
    options and stored under its path, split at ``/``: the variables of
    ``conv1/BatchNorm`` are ``tree["params"]["conv1"]["BatchNorm"]`` (``scale``,
    ``bias``) and ``tree["batch_stats"]["conv1"]["BatchNorm"]`` (``mean``,
    ``var``, ``count``). This is the layout of a linen model whose modules
    carry the same names; for the core, index it with the scope's parts.

    Args:
      variables: as in :func:`from_tensorflow`; variables that belong to no
        batch norm (kernels, optimizer slots, step counters) are ignored.
      count: as in :func:`from_tensorflow`, for every layer.
      debias: as in :func:`from_tensorflow`, for every layer.
      renorm: as in :func:`from_tensorflow`, for every layer.

    Returns:
      ``{"params": {...}, "batch_stats": {...}}``, nested dicts of jax arrays.

    Raises:
      ValueError: if ``variables`` holds no batch norm, if one scope lies
        inside another (or is the top level), and as :func:`from_tensorflow`.
      TypeError: as :func:`from_tensorflow`.

    Examples:
      >>> import numpy as np
      >>> from jaxbn import interop
      >>> bn = lambda c: {"gamma": np.ones(c), "beta": np.zeros(c),
      ...                 "moving_mean": np.zeros(c), "moving_variance": np.ones(c)}
      >>> layers = [("block1/batch_normalization", 2),
      ...           ("block1/batch_normalization_1", 3)]
      >>> ckpt = {f"{scope}/{k}": v for scope, c in layers for k, v in bn(c).items()}
      >>> tree = interop.from_tensorflow_model(ckpt)
      >>> {k: v["var"].shape for k, v in tree["batch_stats"]["block1"].items()}
      {'batch_normalization': (2,), 'batch_normalization_1': (3,)}
    """
    _check_options(count, debias)
    source = _source(variables)
    found = _scopes(source)
    if not found:
        raise ValueError(
            "variables holds no batch norm (no name ends in 'moving_mean'); "
            f"some of its names: {sorted(source.names)[:8]}."
        )
    if "" in found:
        raise ValueError(
            "variables holds a batch norm at the top level (a bare 'moving_mean'), "
            "which has no scope to nest it under; convert it with "
            "from_tensorflow(variables, scope='')."
        )
    for outer in found:
        inner = [s for s in found if s.startswith(f"{outer}/")]
        if inner:
            raise ValueError(
                f"the batch norm {outer!r} contains the batch norms {inner}, which "
                "cannot be nested under its variables; convert them one at a time "
                "with from_tensorflow(variables, scope=...)."
            )
    tree: dict[str, dict[str, Any]] = {"params": {}, "batch_stats": {}}
    for scope in found:
        params, stats = _convert(source, scope, count, debias, renorm)
        *parents, leaf = scope.split("/")
        for collection, value in (("params", params), ("batch_stats", stats)):
            node = tree[collection]
            for part in parents:
                node = node.setdefault(part, {})
            node[leaf] = value
    return tree


__all__ = ["from_tensorflow", "from_tensorflow_model"]
