"""Diagnostics of running statistics: ``jaxbn.describe`` and ``jaxbn.reset_stats``.

Both read every batch-norm layer of a model: a ``batch_stats`` tree of nested
dicts (linen variables, the core's per-layer ``{"mean", "var", "count"}``) or a
``flax.nnx`` model, through the walkers of ``_trees``. The decay reported is
the core's (``_running.decay_rule``), with the core's warm-up default.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ._converged import CONVERGED_COUNT
from ._hyperparams import check_momentum, default_warmup
from ._running import decay_rule
from ._trees import (
    is_nnx_module,
    iter_layers,
    nnx_norm_layers,
    path_name,
    replace_layers,
    stats_root,
)


def _layers(stats: Any) -> list[tuple[str, dict[str, Any], Any, Any]]:
    """(name, host stats, momentum or None, warmup or None) for every layer."""
    if is_nnx_module(stats):
        out = []
        for path, m in nnx_norm_layers(stats):
            layer = {"mean": m.mean[...], "var": m.var[...]}
            if getattr(m, "count", None) is not None:
                layer["count"] = m.count[...]
            out.append(
                (path_name(path), layer, m.momentum, getattr(m, "warmup", False))
            )
        return out
    if not isinstance(stats, Mapping):
        raise TypeError(
            f"expected a batch_stats tree (nested dicts) or a flax.nnx model, got "
            f"{type(stats).__name__}; pass e.g. variables['batch_stats']."
        )
    found = iter_layers(stats_root(stats))
    return [(path_name(p), dict(layer), _FROM_ARGS, _FROM_ARGS) for p, layer in found]


# A tree carries no momentum or warm-up: describe's arguments give them.
_FROM_ARGS = object()


def _no_layers(stats: Any) -> ValueError:
    return ValueError(
        f"found no batch-norm statistics (mappings with 'mean' and 'var') in the "
        f"given {type(stats).__name__}; pass variables['batch_stats'], the "
        "core's batch_stats dict, or an nnx model with BatchNorm layers."
    )


class StatsReport:
    """What :func:`describe` found: a table as ``str()``, a dict as ``as_dict()``."""

    def __init__(self, rows: dict[str, dict[str, Any]]):
        self._rows = rows

    def as_dict(self) -> dict[str, dict[str, Any]]:
        """Per layer (``"Block_0/BatchNorm_0"``) its figures; see :func:`describe`."""
        return {name: dict(row) for name, row in self._rows.items()}

    def as_metrics(self, prefix: str = "") -> dict[str, float]:
        """The figures as flat scalars, for a metric writer (TensorBoard, CLU, W&B).

        Every number of :meth:`as_dict` under the key
        ``"<prefix><layer>/<figure>"``: ``mean_abs`` (mean of ``|mean|`` over the
        features), ``var_mean`` (mean variance), ``max_abs_mean``, ``min_var``,
        ``max_var``, ``count`` (absent for statistics saved without one),
        ``decay``, ``warmed_up`` (1.0 or 0.0), ``features`` and the counts of
        problem features (``zero_var``, ``negative_var``, ``nonfinite``,
        ``far_means``). The readable ``problems`` notes are left out.

        Args:
          prefix: prepended to every key, e.g. ``"batch_stats/"``.

        Returns:
          A flat ``dict[str, float]``, layers in the order of :meth:`as_dict`.

        Examples:
          >>> import jax.numpy as jnp
          >>> import jaxbn
          >>> stats = {"mean": jnp.array([1.0, -3.0]), "var": jnp.array([2.0, 4.0])}
          >>> metrics = jaxbn.describe({"bn": stats}).as_metrics("stats/")
          >>> metrics["stats/bn/mean_abs"], metrics["stats/bn/var_mean"]
          (2.0, 3.0)
          >>> "stats/bn/count" in metrics  # a layer saved without a count
          False
        """
        return {
            f"{prefix}{name}/{key}": float(value)
            for name, row in self._rows.items()
            for key, value in row.items()
            if isinstance(value, int | float)
        }

    @property
    def ok(self) -> bool:
        """True if no layer has a variance that is zero, negative or not finite."""
        return not any(r["problems"] for r in self._rows.values())

    def __str__(self) -> str:
        head = (
            "layer",
            "features",
            "count",
            "decay",
            "warm",
            "|mean| max",
            "var min",
            "var max",
            "problems",
        )
        lines: list[tuple[str, ...]] = [head]
        for name, r in self._rows.items():
            count = "-" if r["count"] is None else str(r["count"])
            lines.append(
                (
                    name,
                    str(r["features"]),
                    count,
                    f"{r['decay']:.4g}",
                    "yes" if r["warmed_up"] else "no",
                    f"{r['max_abs_mean']:.3g}",
                    f"{r['min_var']:.3g}",
                    f"{r['max_var']:.3g}",
                    "; ".join(r["problems"]) or "-",
                )
            )
        widths = [max(len(line[i]) for line in lines) for i in range(len(head))]
        text = [
            "  ".join(c.ljust(w) for c, w in zip(line, widths, strict=True))
            for line in lines
        ]
        return "\n".join(t.rstrip() for t in text)

    __repr__ = __str__


def describe(
    stats: Any,
    *,
    momentum: float | None = 0.99,
    warmup: bool = True,
    far: float = 10.0,
) -> StatsReport:
    """Describes the running statistics of every batch-norm layer of a model.

    For each layer: ``features`` (number), ``count`` (updates so far; None for
    statistics saved without one, e.g. by Flax), ``decay`` (that of the next
    update), ``warmed_up`` (the warm-up decay ``(1 + count) / (10 + count)`` has
    reached ``momentum``), ``mean_abs`` and ``max_abs_mean`` (mean and largest
    ``|mean|`` over the features), ``var_mean``, ``min_var``, ``max_var``, the
    numbers of features whose variance is ``zero_var``, ``negative_var`` or
    whose mean or variance is ``nonfinite``, ``far_means`` (features whose
    mean is more than ``far`` standard deviations from zero), and ``problems``,
    a list of readable notes on all of these.

    Args:
      stats: ``variables`` or ``variables["batch_stats"]`` of a linen model, a
        core ``batch_stats`` dict (or a dict of them), or a ``flax.nnx`` model,
        whose layers give their own momentum and warm-up.
      momentum: the layers' momentum (trees only; nnx layers carry theirs).
      warmup: whether the layers warm up (trees only).
      far: how many standard deviations from zero make a mean "far".

    Returns:
      A :class:`StatsReport`: ``str(report)`` is a table, ``report.as_dict()``
      the figures, ``report.as_metrics()`` the same as flat scalars for a
      metric writer, ``report.ok`` whether no layer has a problem.

    Raises:
      TypeError: if ``stats`` is neither a tree of dicts nor an nnx model.
      ValueError: if it holds no statistics, or momentum or far is out of range.

    Examples:
      >>> import jax.numpy as jnp
      >>> import jaxbn
      >>> _, stats = jaxbn.batch_norm().init(jnp.zeros((4, 3)))
      >>> stats = {"bn": stats, "bad": {**stats, "var": jnp.array([0.0, 1, 2])}}
      >>> report = jaxbn.describe(stats)
      >>> print(report)
      layer  features  count  decay  warm  |mean| max  var min  var max  problems
      bn     3         0      0.1    no    0           1        1        -
      bad    3         0      0.1    no    0           0        2        1 zero var
      >>> report.as_dict()["bad"]["zero_var"], report.ok
      (1, False)
    """
    momentum = check_momentum(momentum)
    if not far > 0:
        raise ValueError(f"far must be a positive number of deviations, got {far!r}.")
    layers = _layers(stats)
    if not layers:
        raise _no_layers(stats)
    rows = {}
    for name, layer, m, w in layers:
        if m is _FROM_ARGS:  # a tree: the arguments describe every layer
            m, w = momentum, warmup
        w = default_warmup(m) if w is None else bool(w)
        rows[name] = _row(layer, m, w, far)
    return StatsReport(rows)


def _row(
    layer: Mapping[str, Any], momentum: float | None, warmup: bool, far: float
) -> dict:
    mean = np.asarray(jax.device_get(layer["mean"]), np.float64).ravel()
    var = np.asarray(jax.device_get(layer["var"]), np.float64).ravel()
    count = layer.get("count")
    count = None if count is None else int(jax.device_get(count))
    # Statistics saved without a count are taken as converged, as the layers do.
    updates = float(CONVERGED_COUNT if count is None else count)
    decay = decay_rule(updates, momentum, warmup, min)
    warm = decay_rule(updates, 1.0, True, min)
    finite = np.isfinite(mean) & np.isfinite(var)
    std = np.sqrt(np.where(finite & (var > 0), var, 0.0))
    safe_mean = np.where(finite, mean, 0.0)
    far_means = finite & (var >= 0) & (np.abs(safe_mean) > far * std)
    row = {
        "features": int(mean.size),
        "count": count,
        "decay": float(decay),
        "warmed_up": (not warmup) or momentum is None or warm >= momentum,
        "mean_abs": _finite_mean(np.abs(mean), finite),
        "max_abs_mean": float(np.max(np.abs(safe_mean), initial=0.0)),
        "var_mean": _finite_mean(var, finite),
        "min_var": float(np.min(np.where(finite, var, np.inf), initial=np.inf)),
        "max_var": float(np.max(np.where(finite, var, -np.inf), initial=-np.inf)),
        "zero_var": int(np.sum(finite & (var == 0))),
        "negative_var": int(np.sum(finite & (var < 0))),
        "nonfinite": int(np.sum(~finite)),
        "far_means": int(np.sum(far_means)),
    }
    notes = [
        ("zero_var", "zero var"),
        ("negative_var", "negative var"),
        ("nonfinite", "non-finite"),
        ("far_means", f"mean > {far:g} std"),
    ]
    row["problems"] = [f"{row[k]} {text}" for k, text in notes if row[k]]
    return row


def _finite_mean(values: np.ndarray, finite: np.ndarray) -> float:
    """The mean over the features whose mean and variance are finite (NaN if none)."""
    return float(np.mean(values[finite])) if finite.any() else float("nan")


def _filled(like: Any, value: int) -> jax.Array:
    like = jnp.asarray(like)
    return jnp.full(like.shape, value, like.dtype)


def reset_stats(stats: Any) -> Any:
    """Fresh running statistics (mean 0, var 1, count 0) with the same structure.

    Use it to start the statistics over, e.g. before :func:`jaxbn.recalibrate`
    or after changing the data. Each leaf keeps its shape and dtype; a layer
    without ``count`` (saved by Flax) stays without one.

    Args:
      stats: a tree of dicts as for :func:`describe` (a whole variable dict
        keeps its other collections), or a ``flax.nnx`` model, reset in place.

    Returns:
      The new tree, or None for an nnx model.

    Raises:
      TypeError: if ``stats`` is neither a tree of dicts nor an nnx model.
      ValueError: if it holds no statistics.

    Examples:
      >>> import jax.numpy as jnp
      >>> import jaxbn
      >>> stats = {"mean": jnp.ones(2), "var": jnp.full(2, 4.0), "count": jnp.int32(7)}
      >>> new = jaxbn.reset_stats({"bn": stats})
      >>> new["bn"]["mean"], new["bn"]["var"]
      (Array([0., 0.], dtype=float32), Array([1., 1.], dtype=float32))
      >>> new["bn"]["count"]
      Array(0, dtype=int32)
    """
    if is_nnx_module(stats):
        layers = nnx_norm_layers(stats)
        if not layers:
            raise _no_layers(stats)
        for _, m in layers:
            m.mean[...] = jnp.zeros_like(m.mean[...])
            m.var[...] = jnp.ones_like(m.var[...])
            if getattr(m, "count", None) is not None:
                m.count[...] = jnp.zeros_like(m.count[...])
        return None
    _layers(stats)  # type check
    root = stats_root(stats)
    found = dict(iter_layers(root))
    if not found:
        raise _no_layers(stats)
    fresh = {}
    for path, layer in found.items():
        new = dict(layer)
        new["mean"] = _filled(layer["mean"], 0)
        new["var"] = _filled(layer["var"], 1)
        if "count" in layer:
            new["count"] = _filled(layer["count"], 0)
        fresh[path] = dict(sorted(new.items()))
    if root is stats:
        return replace_layers(stats, fresh)
    return {**stats, "batch_stats": replace_layers(root, fresh)}
