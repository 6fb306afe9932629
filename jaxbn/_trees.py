"""Walking a model's batch norms: variable trees of nested dicts and nnx models.

Shared by the after-training tools (``describe``, ``reset_stats``,
``recalibrate``, ``fold``): a batch norm in a tree is a mapping holding
``mean`` and ``var``; in an nnx model, a module with ``mean`` and ``var``
``nnx.BatchStat`` variables.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator, Mapping
from typing import Any

Path = tuple[Any, ...]


def path_name(path: Path) -> str:
    """``("Block_0", "BatchNorm_0")`` -> ``"Block_0/BatchNorm_0"``; ``()``: ``"."``."""
    return "/".join(str(p) for p in path) or "."


def is_nnx_module(obj: Any) -> bool:
    """Whether obj is a ``flax.nnx.Module`` (without importing flax.nnx)."""
    nnx = sys.modules.get("flax.nnx")
    return nnx is not None and isinstance(obj, nnx.Module)


def stats_root(tree: Mapping[str, Any]) -> Mapping[str, Any]:
    """The ``batch_stats`` collection of a variable dict, or the tree itself."""
    inner = tree.get("batch_stats")
    return inner if isinstance(inner, Mapping) else tree


def iter_layers(tree: Any, path: Path = ()) -> Iterator[tuple[Path, Mapping]]:
    """(path, layer) for every mapping holding ``mean`` and ``var`` in ``tree``."""
    if not isinstance(tree, Mapping):
        return
    if "mean" in tree and "var" in tree:
        yield path, tree
        return
    for name, value in tree.items():
        yield from iter_layers(value, (*path, name))


def replace_layers(tree: Any, new: Mapping[Path, Any], path: Path = ()) -> Any:
    """A copy of ``tree`` (nested dicts) with the layers at ``new``'s paths replaced."""
    if path in new:
        return new[path]
    if not isinstance(tree, Mapping):
        return tree
    return {k: replace_layers(v, new, (*path, k)) for k, v in tree.items()}


def nnx_norm_layers(model: Any) -> list[tuple[Path, Any]]:
    """(path, module) of the batch norms (``mean``/``var`` BatchStats) of a model."""
    from flax import nnx

    found = []
    for path, module in nnx.iter_modules(model):
        mean, var = getattr(module, "mean", None), getattr(module, "var", None)
        if isinstance(mean, nnx.BatchStat) and isinstance(var, nnx.BatchStat):
            found.append((tuple(path), module))
    return found
