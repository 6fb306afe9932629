"""How each kind of model reports the batch moments of its batch norms' inputs.

For :func:`jaxbn.recalibrate`: a linen model through a method interceptor that
makes each BatchNorm ``sow`` its input's moments, an nnx model through a copy
whose batch norms are swapped for recording subclasses, a core model through
its own forward function. Each gives a ``moments_fn(carry, x) -> ({layer path:
[Moments, ...]}, carry)`` to run under ``jax.jit``.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ._hyperparams import check_axis_spec
from ._inputs import normalize_axes
from ._statistics import batch_moments
from ._sums import Moments
from ._trees import Path, nnx_norm_layers, path_name

MomentsFn = Callable[[Any, Any], tuple[dict[str, list[Moments]], Any]]


def merge(acc: tuple, m: Moments, shape: tuple[int, ...]) -> tuple:
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


def moments_of_input(module: Any, x: Any, mask: Any) -> Moments:
    """The batch moments of a batch-norm layer's input x (feature shape)."""
    axes = normalize_axes(check_axis_spec(module.axis), x.ndim, batch_elsewhere=True)
    reduce = tuple(i for i in range(x.ndim) if i not in axes)
    if mask is not None:
        mask = jnp.broadcast_to(mask, x.shape)
    m = batch_moments(
        x, reduce, mask, module.axis_name, getattr(module, "axis_index_groups", None)
    )
    features = tuple(x.shape[a] for a in axes)
    return Moments(*(a.reshape(features) for a in m))


def flat_moments(tree: Any, path: Path = ()) -> dict[str, list[Moments]]:
    """{layer path: [Moments, ...]} from a tree with Moments (or tuples of them)."""
    if isinstance(tree, Moments):
        return {path_name(path): [tree]}
    if isinstance(tree, list | tuple) and tree and isinstance(tree[0], Moments):
        return {path_name(path): list(tree)}
    out: dict[str, list[Moments]] = {}
    if isinstance(tree, Mapping):
        for k, v in tree.items():
            out.update(flat_moments(v, (*path, k)))
    return out


def core_moments_fn(forward: Callable[[Any], Any]) -> MomentsFn:
    """A core model's forward function, which returns the moments itself."""

    def fn(carry: Any, x: Any) -> tuple[dict[str, list[Moments]], Any]:
        return flat_moments(forward(x)), carry

    return fn


def linen_moments_fn(model: Any, kwargs: dict[str, Any]) -> MomentsFn:
    """``model.apply`` with every BatchNorm sowing its input's moments."""
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
        moments = moments_of_input(module, x, kw.get("mask"))
        module.sow("batch_moments", "moments", moments)
        return next_fun(*args, **kw)

    def fn(variables: Any, x: Any) -> tuple[dict[str, list[Moments]], Any]:
        with nn.intercept_methods(record):
            _, out = model.apply(variables, x, mutable=True, **kwargs)
        sown = out.get("batch_moments", {})
        found = {}
        for p, layer in sown_moments(sown):
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


def sown_moments(tree: Any, path: Path = ()) -> list[tuple[Path, tuple]]:
    """(layer path, sown Moments) from the ``batch_moments`` collection."""
    if isinstance(tree, Mapping):
        if "moments" in tree and isinstance(tree["moments"], tuple):
            return [(path, tree["moments"])]
        return [x for k, v in tree.items() for x in sown_moments(v, (*path, k))]
    return []


def recording_class(cls: type) -> type:
    """A subclass of a batch-norm class that trains and merges its input's moments.

    The moments go to Variables of the layer (not to Python state), so that nnx
    transforms inside the model (``nnx.remat``, ...) carry them out.
    """

    def __call__(
        self: Any, x: Any, use_running_average: Any = None, *, mask: Any = None
    ) -> Any:
        del use_running_average  # always training
        old = (self._jaxbn_n[...], self._jaxbn_mean[...], self._jaxbn_m2[...])
        m = moments_of_input(self, x, mask)
        new = merge(old, m, tuple(self.mean.shape))
        self._jaxbn_n[...], self._jaxbn_mean[...], self._jaxbn_m2[...] = new
        return cls.__call__(self, x, False, mask=mask)

    return type(f"Recording{cls.__name__}", (cls,), {"__call__": __call__})


def nnx_moments_fn(graphdef: Any, classes: set[type], kwargs: dict) -> MomentsFn:
    """Runs a copy of the nnx model whose batch norms record their moments.

    Args:
      graphdef: the model's graph definition (``nnx.split``).
      classes: the batch-norm classes to record.
      kwargs: keyword arguments of the model's call.
    """
    from flax import nnx

    recording = {cls: recording_class(cls) for cls in classes}

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

    return fn


def axis_names(axis_name: Any) -> tuple[Hashable, ...]:
    """The names in an ``axis_name`` (one name or a tuple of them; None: none)."""
    if axis_name is None:
        return ()
    return tuple(axis_name) if isinstance(axis_name, tuple | list) else (axis_name,)


def linen_norms(
    model: Any, variables: Any, x: Any, kwargs: dict[str, Any]
) -> dict[str, Any]:
    """{layer path: module} of the batch norms a linen model calls on ``x``.

    Found by tracing the model once (``jax.eval_shape``) with each batch norm
    replaced by the identity, so that no collective runs unbound. The modules
    are read for their static fields (``axis_name``, ``epsilon``).
    """
    import flax.linen as nn

    from . import linen as jaxbn_linen

    found: dict[str, Any] = {}

    def collect(next_fun: Callable, args: tuple, kw: dict, context: Any) -> Any:
        module = context.module
        norms = jaxbn_linen.BatchNorm | nn.BatchNorm
        if context.method_name == "__call__" and isinstance(module, norms):
            found[path_name(module.path)] = module
            return args[0] if args else kw["x"]
        return next_fun(*args, **kw)

    def run(variables: Any, x: Any) -> None:
        with nn.intercept_methods(collect):
            model.apply(variables, x, mutable=True, **kwargs)

    jax.eval_shape(run, variables, x)
    return found


def linen_axis_names(model: Any, kwargs: dict[str, Any]) -> Callable:
    """``names(variables, x)``: the axis names the model's batch norms use."""

    def names(variables: Any, x: Any) -> tuple[Hashable, ...]:
        norms = linen_norms(model, variables, x, kwargs).values()
        return tuple(dict.fromkeys(n for m in norms for n in axis_names(m.axis_name)))

    return names


def bound(fn: MomentsFn, names: tuple[Hashable, ...], mesh: Any) -> MomentsFn:
    """``fn`` with the batch norms' axis names bound, so that they pool across them.

    Without ``mesh`` each name is bound by a ``jax.vmap`` of size 1: the step
    sees the whole batch, on one device or sharded by ``jax.jit`` (whose
    reductions are global). With ``mesh``, the step runs under
    ``jax.shard_map`` with the batch split along axis 0 over the mesh axes of
    those names, as in data-parallel training.
    """
    if not names:
        return fn
    if mesh is not None:
        return _sharded(fn, names, mesh)

    def mapped(carry: Any, x: Any) -> tuple[dict[str, list[Moments]], Any]:
        g = fn
        for name in names:
            g = jax.vmap(g, in_axes=(None, 0), axis_name=name)
        for _ in names:
            x = jax.tree.map(lambda a: jnp.expand_dims(a, 0), x)
        out = g(carry, x)
        return jax.tree.map(lambda a: jnp.squeeze(a, range(len(names))), out)

    return mapped


def _sharded(fn: MomentsFn, names: tuple[Hashable, ...], mesh: Any) -> MomentsFn:
    from jax.sharding import PartitionSpec as P

    missing = [n for n in names if n not in mesh.axis_names]
    if missing:
        raise ValueError(
            f"the batch norms synchronize over {list(names)} but the mesh has "
            f"axes {list(mesh.axis_names)} (missing {missing}); pass a mesh "
            "whose axes carry those names."
        )
    spec = P(tuple(names))

    def sharded(carry: Any, x: Any) -> tuple[dict[str, list[Moments]], Any]:
        x = jax.tree.map(lambda a: _placed(a, mesh, spec), x)
        x_specs = jax.tree.map(lambda _: spec, x)
        return jax.shard_map(
            fn, mesh=mesh, in_specs=(P(), x_specs), out_specs=P(), check_vma=False
        )(carry, x)

    return sharded


def _placed(a: jax.Array, mesh: Any, spec: Any) -> jax.Array:
    """``a`` split along axis 0 over the mesh (Explicit or Auto axes)."""
    from jax.sharding import AxisType, NamedSharding

    sharding = NamedSharding(mesh, spec)
    if all(t == AxisType.Explicit for t in mesh.axis_types):
        return jax.sharding.reshard(a, sharding)
    return jax.lax.with_sharding_constraint(a, sharding)
