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
from collections.abc import Callable, Hashable, Iterable, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from ._record import (
    axis_names,
    bound,
    core_moments_fn,
    linen_axis_names,
    linen_moments_fn,
    merge,
    nnx_moments_fn,
)
from ._sums import Moments
from ._trees import (
    is_nnx_module,
    iter_layers,
    nnx_norm_layers,
    path_name,
    replace_layers,
    stats_root,
)

Accumulator = dict[str, tuple[jax.Array, jax.Array, jax.Array]]  # count, mean, M2


class _Binding(NamedTuple):
    """How the batch norms' axis names are bound (see ``_record.bound``).

    Attributes:
      names: ``names(carry, x)``, the axis names to bind, read on the first
        batch.
      mesh: None (size-1 vmaps), or the mesh to ``shard_map`` the batch over.
      eager: bind ``names`` at once, without first tracing the model unbound
        (they are known without tracing: nnx, or ``bind_axes``).
    """

    names: Callable[[Any, Any], tuple[Hashable, ...]]
    mesh: Any
    eager: bool = False


def _run(
    moments_fn: Callable[[Any, Any], tuple[dict[str, list[Moments]], Any]],
    carry: Any,
    shapes: dict[str, tuple[int, ...]],
    batches: Iterable[Any],
    *,
    num_batches: int | None,
    progress: bool,
    binding: _Binding,
) -> tuple[Accumulator, Any, int]:
    """Merges the moments of every batch; returns (accumulator, carry, batches)."""

    def make_step(fn: Callable) -> Callable:
        @jax.jit
        def step(acc: Accumulator, carry: Any, x: Any) -> tuple[Accumulator, Any]:
            found, carry = fn(carry, x)
            acc = dict(acc)
            for key, moments in found.items():
                if key not in shapes:
                    raise ValueError(f"batch norm {key!r} has no statistics to update.")
                for m in moments:
                    acc[key] = merge(acc[key], m, shapes[key])
            return acc, carry

        return step

    step: Callable | None = None  # made on the first batch

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
        if step is None:
            step = _first_step(make_step, moments_fn, binding, (acc, carry, x))
        acc, carry = step(acc, carry, x)
        seen += 1
    if seen == 0:
        raise ValueError(
            "batches gave no batch; pass an iterable of model inputs (e.g. "
            "(x for x, _ in train_batches)) that yields at least one."
        )
    return acc, carry, seen


def _first_step(
    make_step: Callable, moments_fn: Callable, binding: _Binding, args: tuple
) -> Callable:
    """The jitted step, with the batch norms' axis names bound if they need it.

    Without a mesh, the model is first traced as it is: a model whose batch
    norms name no axis is traced once. One that does raises NameError
    (unbound axis name); its names are then read (``binding.names``) and bound.
    """
    if binding.mesh is None and not binding.eager:
        step = make_step(moments_fn)
        try:
            jax.eval_shape(step, *args)
            return step
        except NameError as err:
            if "axis name" not in str(err):
                raise
    _, carry, x = args
    names = binding.names(carry, x)
    return make_step(bound(moments_fn, names, binding.mesh))


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
    mesh: Any = None,
    bind_axes: Sequence[Hashable] | None = None,
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
      mesh: None (default): batch norms that synchronize over an
        ``axis_name`` (data-parallel models) have it bound by a size-1
        ``vmap``, so each batch is pooled whole, on one device or sharded by
        ``jax.jit`` (place the batches with ``jax.device_put``). A
        ``jax.sharding.Mesh`` whose axes carry those names: each step runs
        under ``jax.shard_map``, the batch split along axis 0 over them, as in
        data-parallel training. Both give the same pooled statistics.
      bind_axes: the axis names to bind; default those of the model's batch
        norms (linen, nnx). A core ``forward`` whose ``batch_moments`` name an
        axis needs them here.
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
    fixed = tuple(n for a in (bind_axes or ()) for n in axis_names(a))
    if is_nnx_module(model):
        return _recalibrate_nnx(
            model,
            batches,
            num_batches=num_batches,
            progress=progress,
            mesh=mesh,
            bind_axes=fixed,
            apply_kwargs=apply_kwargs,
        )
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
    fn, carry, names = _tree_model(model, variables, apply_kwargs)
    if bind_axes is not None:
        binding = _Binding(lambda c, x: fixed, mesh, eager=True)
    else:
        binding = _Binding(names, mesh)
    acc, _, _ = _run(
        fn,
        carry,
        shapes,
        batches,
        num_batches=num_batches,
        progress=progress,
        binding=binding,
    )
    new = {p: _finish(acc, layer, k) for k, (p, layer) in layers.items()}
    if root is variables:
        return replace_layers(variables, new)
    return {**variables, "batch_stats": replace_layers(root, new)}


def _tree_model(model: Any, variables: Any, apply_kwargs: dict) -> tuple:
    """``(moments_fn, carry, names(carry, x))`` of a linen or core model."""
    linen = sys.modules.get("flax.linen")
    if linen is not None and isinstance(model, linen.Module):
        fn = linen_moments_fn(model, apply_kwargs)
        return fn, variables, linen_axis_names(model, apply_kwargs)
    if callable(model) and not apply_kwargs:
        return core_moments_fn(model), None, lambda carry, x: ()
    raise TypeError(
        f"model must be a flax.linen or flax.nnx Module, or a function "
        f"forward(x) returning the batch moments (without keyword arguments); "
        f"got {type(model).__name__}."
    )


def _recalibrate_nnx(
    model: Any,
    batches: Iterable[Any],
    *,
    num_batches: int | None,
    progress: bool,
    mesh: Any,
    bind_axes: tuple[Hashable, ...],
    apply_kwargs: dict[str, Any],
) -> None:
    """:func:`recalibrate` of an nnx model, in place."""
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
    graphdef, state = nnx.split(model)
    fn = nnx_moments_fn(graphdef, {type(m) for _, m in layers}, apply_kwargs)
    found = tuple(n for _, m in layers for n in axis_names(m.axis_name))
    names = bind_axes or tuple(dict.fromkeys(found))
    binding = _Binding(lambda carry, x: names, mesh, eager=True)
    acc, state, _ = _run(
        fn,
        state,
        shapes,
        batches,
        num_batches=num_batches,
        progress=progress,
        binding=binding,
    )
    if not any(bool(jnp.any(acc[key][0] > 0)) for key, _ in layers):
        raise ValueError("no batch norm ran in the nnx model's forward pass.")
    for key, m in layers:
        new = _finish(acc, {"mean": m.mean[...], "var": m.var[...]}, key)
        m.mean[...], m.var[...] = new["mean"], new["var"]
    # Random streams (e.g. dropout's) advance as if the model had been called.
    nnx.update(model, nnx.filter_state(state, nnx.RngState))
