"""The converter from TensorFlow checkpoints' batch-norm variables to jaxbn's.

Which names make a batch norm, and where each one goes in a model's tree, is
``_tensorflow_names``; this module reads the arrays of one scope (the
zero-debias pair, renorm's state) and builds jaxbn's ``(params, batch_stats)``.
TensorFlow is not imported.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp

from ._common import CONVERGED_COUNT, LAYOUTS, as_numpy, jaxbn_variables
from ._tensorflow_names import (
    Source,
    children,
    choose_scope,
    join,
    model_scopes,
    nest,
)

_NAMES = LAYOUTS["tensorflow"]
_RENORM = ("renorm_mean", "renorm_stddev")
_RENORM_ALL = (*_RENORM, "renorm_mean_weight", "renorm_stddev_weight", "moving_stddev")
Variables = tuple[dict[str, jax.Array], dict[str, jax.Array]]


def _debiased(source: Source, scope: str) -> tuple[Any, int]:
    """The zero-debias pair of ``scope``: the biased mean and the update count."""
    found = {}
    for leaf in ("biased", "local_step"):
        names = [
            join(s, f"moving_mean/{leaf}")
            for s in (join(scope, scope) if scope else None, scope)
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
    source: Source, scope: str, renorm: bool, feature_shape: tuple[int, ...]
) -> dict[str, jax.Array]:
    """``renorm_mean`` and ``renorm_std`` of ``scope``, or {} without renorm."""
    present = [v for v in _RENORM_ALL if join(scope, v) in source.names]
    if not renorm:
        if present:
            raise ValueError(
                f"variables holds {[join(scope, v) for v in present]}, the state "
                "of a layer trained with renorm=True; pass renorm=True to convert "
                "it for jaxbn.batch_norm(renorm=True, ...). Evaluation is the "
                "same either way: it reads moving_mean and moving_variance."
            )
        return {}
    out = {}
    for theirs, ours in zip(_RENORM, ("renorm_mean", "renorm_std"), strict=True):
        name = join(scope, theirs)
        value = source.get(name)
        if value is None:
            raise ValueError(
                f"renorm=True but variables has no {name!r} (variables under "
                f"{scope or 'the top level'}: {children(source, scope)}); pass "
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
                f"{name} has shape {value.shape} but {join(scope, 'moving_mean')} "
                f"has {math.prod(feature_shape)} values; all arrays must come from "
                "the same batch-norm layer."
            )
        out[ours] = jnp.asarray(value.reshape(feature_shape), jnp.float32)
    return out


def _convert(
    source: Source, scope: str, count: int | None, debias: str | None, renorm: bool
) -> Variables:
    """The ``(params, batch_stats)`` of one scope."""
    names = _NAMES.prefixed(f"{scope}/" if scope else "")
    values = [source.get(n) for n in names]
    for name, value in zip(names[2:], values[2:], strict=True):
        if value is None:
            raise ValueError(
                f"variables has no {name!r} (variables under "
                f"{scope or 'the top level'}: {children(source, scope)}); pass "
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
    source = Source.of(variables)
    scope = choose_scope(source, scope)
    return _convert(source, scope, count, debias, renorm)


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
    source = Source.of(variables)
    tree: dict[str, dict[str, Any]] = {"params": {}, "batch_stats": {}}
    for scope in model_scopes(source):
        params, stats = _convert(source, scope, count, debias, renorm)
        nest(tree["params"], scope, params)
        nest(tree["batch_stats"], scope, stats)
    return tree


__all__ = ["from_tensorflow", "from_tensorflow_model"]
