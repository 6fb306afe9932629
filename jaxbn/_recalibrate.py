"""Precise batch norm: ``jaxbn.recalibrate`` recomputes the population statistics.

Each batch runs through the model once, jitted, with every batch norm in
training mode (normalizing with its batch's statistics, as during training).
The moments of each layer's input are merged by count (Chan et al.'s parallel
update of count, mean and sum of squared deviations), so after N batches the
mean and the variance are those of all the N batches' values taken together.
"""

from __future__ import annotations

import itertools
import sys
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ._describe import (
    Path,
    is_nnx_module,
    iter_layers,
    nnx_norm_layers,
    path_name,
    replace_layers,
    stats_root,
)
from ._statistics import Moments, batch_moments

Accumulator = dict[str, tuple[jax.Array, jax.Array, jax.Array]]  # count, mean, M2


def _merge(acc: tuple, m: Moments, shape: tuple[int, ...]) -> tuple:
    """Adds one batch's moments to (count, mean, M2); skips non-finite ones."""
    n, mean, m2 = acc
    nb, mb, vb = (jnp.reshape(a, shape).astype(jnp.float32) for a in m)
    ok = jnp.all(jnp.isfinite(mb)) & jnp.all(jnp.isfinite(vb))
    nb = jnp.where(ok, nb, 0.0)
    mb, vb = jnp.where(ok, mb, 0.0), jnp.where(ok, vb, 0.0)
    total = n + nb
    w = nb / jnp.maximum(total, 1.0)
    delta = mb - mean
    return total, mean + delta * w, m2 + nb * vb + delta * delta * (n * w)


def _feature_axes(axis: Any, ndim: int) -> tuple[int, ...]:
    raw = (axis,) if isinstance(axis, int) else tuple(axis)
    return tuple(sorted(a % ndim for a in raw))


def _moments_of_input(module: Any, x: Any, mask: Any) -> Moments:
    """The batch moments of a batch-norm layer's input x (feature shape)."""
    axes = _feature_axes(module.axis, x.ndim)
    reduce = tuple(i for i in range(x.ndim) if i not in axes)
    if mask is not None:
        mask = jnp.broadcast_to(mask, x.shape)
    m = batch_moments(
        x, reduce, mask, module.axis_name, getattr(module, "axis_index_groups", None)
    )
    features = tuple(x.shape[a] for a in axes)
    return Moments(*(a.reshape(features) for a in m))


def _run(
    moments_fn: Callable[[Any, Any], tuple[dict[str, list[Moments]], Any]],
    carry: Any,
    shapes: dict[str, tuple[int, ...]],
    batches: Iterable[Any],
    num_batches: int | None,
    progress: bool,
) -> tuple[Accumulator, Any, int]:
    """Merges the moments of every batch; returns (accumulator, carry, batches)."""

    @jax.jit
    def step(acc: Accumulator, carry: Any, x: Any) -> tuple[Accumulator, Any]:
        found, carry = moments_fn(carry, x)
        acc = dict(acc)
        for key, moments in found.items():
            if key not in shapes:
                raise ValueError(f"batch norm {key!r} has no statistics to update.")
            for m in moments:
                acc[key] = _merge(acc[key], m, shapes[key])
        return acc, carry

    acc: Accumulator = {}
    for key, shape in shapes.items():
        zeros = jnp.zeros(shape, jnp.float32)
        acc[key] = (zeros, zeros, zeros)
    total = num_batches
    if total is None and hasattr(batches, "__len__"):
        total = len(batches)  # pyright: ignore[reportArgumentType]
    it: Iterable[Any] = itertools.islice(batches, num_batches)
    if progress:
        try:
            from tqdm.auto import tqdm
        except ImportError as err:
            raise ImportError(
                "recalibrate(progress=True) shows a tqdm progress bar, but tqdm is "
                "not installed; pip install tqdm (or jaxbn[examples]), or pass "
                "progress=False."
            ) from err
        it = tqdm(it, total=total, desc="recalibrate", unit="batch")
    seen = 0
    for x in it:
        acc, carry = step(acc, carry, x)
        seen += 1
    if seen == 0:
        raise ValueError(
            "batches gave no batch; pass an iterable of model inputs (e.g. "
            "(x for x, _ in train_batches)) that yields at least one."
        )
    return acc, carry, seen


def _finish(acc: Accumulator, layer: Mapping[str, Any], key: str) -> dict[str, Any]:
    """``layer`` with mean and var from the accumulator (kept where count is 0)."""
    n, mean, m2 = acc[key]
    seen = n > 0
    out = dict(layer)
    for name, value in (("mean", mean), ("var", m2 / jnp.maximum(n, 1.0))):
        old = jnp.asarray(layer[name])
        new = jnp.where(seen, value, old.reshape(value.shape).astype(jnp.float32))
        out[name] = new.reshape(old.shape).astype(old.dtype)
    return out


def _check(num_batches: Any) -> None:
    if num_batches is None:
        return
    if isinstance(num_batches, bool) or not isinstance(num_batches, int):
        raise TypeError(f"num_batches must be an int or None, got {num_batches!r}.")
    if num_batches < 1:
        raise ValueError(f"num_batches must be at least 1, got {num_batches}.")


def recalibrate(
    model: Any,
    batches: Iterable[Any],
    variables: Any = None,
    *,
    num_batches: int | None = None,
    progress: bool = False,
    **apply_kwargs: Any,
) -> Any:
    r"""Recomputes the population statistics of every batch norm (precise BN).

    The running statistics of training are an exponential average over batches
    computed while the weights moved. After training, this replaces them with
    the exact statistics of the final network: each batch runs through the
    model with every batch norm in training mode, and the count, mean and
    variance of each layer's input are merged over the batches, so that the new
    ``mean`` is the count-weighted average of the batch means and the new
    ``var`` the biased variance of all the batches' values pooled together:

    .. math::

       \mu = \frac{\sum_b n_b \mu_b}{\sum_b n_b}, \qquad
       \sigma^2 = \frac{\sum_b n_b \left(\sigma_b^2 + (\mu_b - \mu)^2\right)}
       {\sum_b n_b} .

    (fvcore's ``update_bn_stats`` and PyTorch's ``update_bn`` average the batch
    variances instead, which leaves out the spread of the batch means.)
    Parameters and ``count`` are not changed. A batch whose statistics are not
    finite for a layer is skipped for that layer, and a layer that sees no
    batch keeps its statistics. Each step is jitted and compiled once per
    batch shape (a smaller last batch compiles once more).

    Args:
      model: one of

        * a ``flax.linen`` module: ``variables`` are its variables, and each
          step calls ``model.apply(variables, x, **apply_kwargs)``, where the
          keyword arguments must put the batch norms in training mode (e.g.
          ``train=True``). Its ``jaxbn.linen.BatchNorm`` and
          ``flax.linen.BatchNorm`` layers are measured (an interceptor makes
          them ``sow`` their input's moments in a ``"batch_moments"``
          collection: under ``nn.scan`` or ``nn.vmap``, map it like
          ``"batch_stats"``).
        * a ``flax.nnx`` module: updated in place; each step calls
          ``model(x, **apply_kwargs)`` on a copy whose ``jaxbn.nnx.BatchNorm``
          and ``flax.nnx.BatchNorm`` layers run in training mode (other
          layers keep their mode: call ``model.eval()`` first to turn dropout
          off).
        * for the functional core, a function ``forward(x)`` that runs the
          model in training mode and returns, for each layer, the
          :func:`jaxbn.batch_moments` of its input, in a tree shaped like
          ``variables`` (the ``batch_stats`` tree) with ``Moments`` in place of
          the ``{"mean", "var", "count"}`` dicts.
      batches: an iterable of model inputs ``x`` (each is passed as the first
        argument); e.g. ``(x for x, _ in train_batches)``.
      variables: the linen variables, or the core ``batch_stats``; None for nnx.
      num_batches: use at most this many batches (all by default).
      progress: show a tqdm progress bar (needs tqdm).
      **apply_kwargs: keyword arguments of each call of a linen or nnx model.

    Returns:
      For linen, new variables; for the core, a new ``batch_stats``; for nnx,
      None (the model is updated).

    Raises:
      TypeError: if ``model`` is none of the above or num_batches not an int.
      ValueError: if ``batches`` is empty, ``num_batches < 1``, ``variables``
        is missing or has no statistics, a linen batch norm runs in evaluation
        mode, or no batch norm ran.
      ImportError: if ``progress=True`` and tqdm is not installed.

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> import jaxbn
      >>> layer = jaxbn.batch_norm()
      >>> params, stats = layer.init(jnp.zeros((2, 1)))
      >>> def forward(x):  # the model in training mode, returning the moments
      ...     return {"bn": jaxbn.batch_moments(x, (0,))}
      >>> batches = [jnp.array([[1.0], [3.0]]), jnp.array([[5.0], [7.0]])]
      >>> new = jaxbn.recalibrate(forward, batches, {"bn": stats})
      >>> float(new["bn"]["mean"][0]), float(new["bn"]["var"][0])
      (4.0, 5.0)
    """
    _check(num_batches)
    linen = sys.modules.get("flax.linen")
    if is_nnx_module(model):
        return _recalibrate_nnx(model, batches, num_batches, progress, apply_kwargs)
    if variables is None or not isinstance(variables, Mapping):
        raise ValueError(
            f"variables must be the model's variable dict (linen) or batch_stats "
            f"(core), got {type(variables).__name__}; nnx models need none."
        )
    root = stats_root(variables)
    layers = {path_name(p): (p, layer) for p, layer in iter_layers(root)}
    if not layers:
        raise ValueError(
            "variables hold no batch-norm statistics ('mean' and 'var'); pass the "
            "model's whole variable dict, e.g. from model.init."
        )
    shapes = {k: tuple(jnp.shape(layer["mean"])) for k, (_, layer) in layers.items()}
    if linen is not None and isinstance(model, linen.Module):
        fn = _linen_moments(model, apply_kwargs)
        carry = variables
    elif callable(model) and not apply_kwargs:
        fn = _core_moments(model)
        carry = None
    else:
        raise TypeError(
            f"model must be a flax.linen or flax.nnx Module, or a function "
            f"forward(x) returning the batch moments (without keyword arguments); "
            f"got {type(model).__name__}."
        )
    acc, _, _ = _run(fn, carry, shapes, batches, num_batches, progress)
    new = {p: _finish(acc, layer, k) for k, (p, layer) in layers.items()}
    if root is variables:
        return replace_layers(variables, new)
    return {**variables, "batch_stats": replace_layers(root, new)}


def _flat_moments(tree: Any, path: Path = ()) -> dict[str, list[Moments]]:
    """{layer path: [Moments, ...]} from a tree with Moments (or tuples of them)."""
    if isinstance(tree, Moments):
        return {path_name(path): [tree]}
    if isinstance(tree, list | tuple) and tree and isinstance(tree[0], Moments):
        return {path_name(path): list(tree)}
    out: dict[str, list[Moments]] = {}
    if isinstance(tree, Mapping):
        for k, v in tree.items():
            out.update(_flat_moments(v, (*path, k)))
    return out


def _core_moments(forward: Callable[[Any], Any]) -> Callable:
    def fn(carry: Any, x: Any) -> tuple[dict[str, list[Moments]], Any]:
        return _flat_moments(forward(x)), carry

    return fn


def _linen_moments(model: Any, kwargs: dict[str, Any]) -> Callable:
    import flax.linen as nn

    from . import linen as jaxbn_linen

    if "mutable" in kwargs:
        raise TypeError("recalibrate sets mutable itself; do not pass it.")

    def record(next_fun: Callable, args: tuple, kw: dict, context: Any) -> Any:
        module = context.module
        if context.method_name != "__call__" or not isinstance(
            module, jaxbn_linen.BatchNorm | nn.BatchNorm
        ):
            return next_fun(*args, **kw)
        mode = args[1] if len(args) > 1 else kw.get("use_running_average")
        mode = module.use_running_average if mode is None else mode
        if isinstance(mode, bool | np.bool_) and mode:
            raise ValueError(
                f"recalibrate runs every batch norm in training mode, but "
                f"{path_name(module.path)} was called with use_running_average="
                "True; pass the keyword arguments that select training, e.g. "
                "recalibrate(model, batches, variables, train=True)."
            )
        x = args[0] if args else kw["x"]
        moments = _moments_of_input(module, x, kw.get("mask"))
        module.sow("batch_moments", "moments", moments)
        return next_fun(*args, **kw)

    def fn(variables: Any, x: Any) -> tuple[dict[str, list[Moments]], Any]:
        with nn.intercept_methods(record):
            _, out = model.apply(variables, x, mutable=True, **kwargs)
        sown = out.get("batch_moments", {})
        found = {}
        for p, layer in _sown(sown):
            found[path_name(p)] = list(layer)
        if not found:
            raise ValueError(
                "no BatchNorm (jaxbn's or Flax's) reported its batch moments in the "
                "model's forward pass; inside nn.scan or nn.vmap, map their "
                "'batch_moments' collection like 'batch_stats' (e.g. "
                "variable_axes={..., 'batch_moments': 0})."
            )
        return found, variables

    return fn


def _sown(tree: Any, path: Path = ()) -> list[tuple[Path, tuple]]:
    if isinstance(tree, Mapping):
        if "moments" in tree and isinstance(tree["moments"], tuple):
            return [(path, tree["moments"])]
        return [x for k, v in tree.items() for x in _sown(v, (*path, k))]
    return []


def _recording(cls: type) -> type:
    """A subclass of a batch-norm class that trains and merges its input's moments.

    The moments go to Variables of the layer (not to Python state), so that nnx
    transforms inside the model (``nnx.remat``, ...) carry them out.
    """

    def __call__(
        self: Any, x: Any, use_running_average: Any = None, *, mask: Any = None
    ) -> Any:
        del use_running_average  # always training
        old = (self._jaxbn_n[...], self._jaxbn_mean[...], self._jaxbn_m2[...])
        m = _moments_of_input(self, x, mask)
        new = _merge(old, m, tuple(self.mean.shape))
        self._jaxbn_n[...], self._jaxbn_mean[...], self._jaxbn_m2[...] = new
        return cls.__call__(self, x, False, mask=mask)

    return type(f"Recording{cls.__name__}", (cls,), {"__call__": __call__})


def _recalibrate_nnx(
    model: Any, batches: Any, num_batches: Any, progress: bool, kwargs: dict
) -> None:
    from flax import nnx

    from . import nnx as jaxbn_nnx

    norms = (jaxbn_nnx.BatchNorm, nnx.BatchNorm)
    found = nnx_norm_layers(model)
    layers = [(path_name(p), m) for p, m in found if isinstance(m, norms)]
    if not layers:
        raise ValueError(
            "the nnx model has no jaxbn.nnx.BatchNorm or nnx.BatchNorm to recalibrate."
        )
    shapes = {k: tuple(m.mean.shape) for k, m in layers}
    recording = {type(m): _recording(type(m)) for _, m in layers}
    graphdef, state = nnx.split(model)

    def fn(state: Any, x: Any) -> tuple[dict[str, list[Moments]], Any]:
        copy = nnx.merge(graphdef, state)
        swapped = []
        for p, m in nnx_norm_layers(copy):
            if type(m) in recording:
                zeros = jnp.zeros(m.mean.shape, jnp.float32)
                swapped.append((path_name(p), m, type(m)))
                m.__class__ = recording[type(m)]
                m._jaxbn_n = nnx.Intermediate(zeros)
                m._jaxbn_mean = nnx.Intermediate(zeros)
                m._jaxbn_m2 = nnx.Intermediate(zeros)
        copy(x, **kwargs)
        found = {}
        for key, m, cls in swapped:
            n, mean, m2 = m._jaxbn_n[...], m._jaxbn_mean[...], m._jaxbn_m2[...]
            found[key] = [Moments(n, mean, m2 / jnp.maximum(n, 1.0))]
            del m._jaxbn_n, m._jaxbn_mean, m._jaxbn_m2
            m.__class__ = cls
        return found, nnx.state(copy)

    acc, state, _ = _run(fn, state, shapes, batches, num_batches, progress)
    if not any(bool(jnp.any(acc[key][0] > 0)) for key, _ in layers):
        raise ValueError("no batch norm ran in the nnx model's forward pass.")
    for key, m in layers:
        new = _finish(acc, {"mean": m.mean[...], "var": m.var[...]}, key)
        m.mean[...], m.var[...] = new["mean"], new["var"]
    # Random streams (e.g. dropout's) advance as if the model had been called.
    nnx.update(model, nnx.filter_state(state, nnx.RngState))
