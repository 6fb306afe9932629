"""TensorFlow checkpoints' variable names: which batch norms they hold, and where.

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
shadows) and every other variable are not read. The arrays are read in
``_tensorflow``; this module only reads and places names.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

__all__ = ["Source", "children", "choose_scope", "join", "model_scopes", "nest"]

# Object-based checkpoints (tf.train.Checkpoint, Keras's model.save_weights)
# end each variable's name in /.ATTRIBUTES/VARIABLE_VALUE; the names of
# layer.weights end in ":0".
_SUFFIX = re.compile(r"(/\.ATTRIBUTES/VARIABLE_VALUE|:\d+)$")


class Source(NamedTuple):
    """TensorFlow's variables: clean name -> name as given, and a reader."""

    names: dict[str, str]
    read: Callable[[str], Any]

    @classmethod
    def of(cls, variables: Any) -> Source:
        """Reads a mapping of names to arrays or a checkpoint reader."""
        if hasattr(variables, "get_variable_to_shape_map") and hasattr(
            variables, "get_tensor"
        ):
            keys = list(variables.get_variable_to_shape_map())
            read = variables.get_tensor
        elif isinstance(variables, Mapping):
            keys, read = list(variables), variables.__getitem__
        else:
            raise TypeError(
                "variables must be a mapping from TensorFlow variable names to "
                "arrays, e.g. {name: reader.get_tensor(name) for name in "
                "reader.get_variable_to_shape_map()}, or the reader of "
                "tf.train.load_checkpoint(path) itself; got "
                f"{type(variables).__name__}."
            )
        names = {}
        for key in keys:
            if not isinstance(key, str):
                raise TypeError(
                    f"variables has the key {key!r} of type {type(key).__name__}; "
                    "expected TensorFlow variable names (str)."
                )
            names[_SUFFIX.sub("", key)] = key
        return cls(names, read)

    def get(self, name: str) -> Any:
        """The array of ``name`` (a clean name), or None if absent."""
        key = self.names.get(name)
        return None if key is None else self.read(key)

    def scopes(self) -> list[str]:
        """Every scope holding a ``moving_mean``, sorted."""
        found = {
            name[: -len("moving_mean")].rstrip("/")
            for name in self.names
            if name == "moving_mean" or name.endswith("/moving_mean")
        }
        return sorted(found)


def join(scope: str, leaf: str) -> str:
    """``scope/leaf``, or ``leaf`` at the top level (``scope == ""``)."""
    return f"{scope}/{leaf}" if scope else leaf


def children(source: Source, scope: str) -> list[str]:
    """The names directly under ``scope``, for error messages."""
    prefix = f"{scope}/" if scope else ""
    return sorted(
        n[len(prefix) :]
        for n in source.names
        if n.startswith(prefix) and "/" not in n[len(prefix) :]
    )


def choose_scope(source: Source, scope: str | None) -> str:
    """``scope`` (a str or None) checked against the batch norms of ``source``.

    None chooses the only batch norm; a scope's surrounding ``/`` are dropped.
    """
    found = source.scopes()
    if scope is None:
        if len(found) != 1:
            raise ValueError(
                f"variables holds {len(found)} batch norms ({found or 'none'}); "
                "pass scope= to choose one, or use from_tensorflow_model for all."
            )
        return found[0]
    if scope.strip("/") not in found:
        raise ValueError(
            f"scope={scope!r} holds no moving_mean; the batch norms in variables "
            f"are {found or 'none'}."
        )
    return scope.strip("/")


def model_scopes(source: Source) -> list[str]:
    """Every batch norm of ``source``, checked to nest as a tree of dicts."""
    found = source.scopes()
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
    return found


def nest(tree: dict[str, Any], scope: str, value: Any) -> None:
    """Stores ``value`` in ``tree`` under the parts of ``scope`` (split at ``/``)."""
    *parents, leaf = scope.split("/")
    node = tree
    for part in parents:
        node = node.setdefault(part, {})
    node[leaf] = value
