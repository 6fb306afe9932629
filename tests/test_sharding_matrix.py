"""Sharded ``jax.jit`` in every way users write it, against one device.

The matrix of issue 10: mesh axis type (Explicit, the default of
``jax.make_mesh`` in jax 0.10, and Auto) x with and without ``jax.set_mesh`` x
inputs placed with ``jax.device_put`` or with ``jax.jit(in_shardings=...)`` x a
1-D data mesh of 8 and a 2x4 mesh with the features on the "model" axis x the
core, ``jaxbn.linen`` and ``jaxbn.nnx`` (through ``nnx.jit``, and through
``nnx.split`` + ``jax.jit`` of a function that merges) x a training step
(output, new statistics, and the gradient of a loss with respect to the params
and x) and an evaluation step. Every cell must give the single-device result
and must not gather the batch or the features. ``flax.linen.BatchNorm`` runs in
every cell too, as a control: each cell is a scenario Flax's own layer supports.

The core before issue 10 sliced the batch's first row as the shift of its
variance. With Explicit axes, no ``jax.set_mesh`` and ``jax.device_put`` inputs
that slice of a sharded batch axis raised ``ShardingTypeError: slicing on
sharded dims ...``: the training cells of that kind (1-D and 2x4; every API)
failed, while ``flax.linen.BatchNorm`` passed. (With ``in_shardings``
jax 0.10 types the traced arguments unsharded, so those cells did not fail.)
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

import jaxbn
import jaxbn.linen
import jaxbn.nnx

BATCH, FEATURES = 32, 8
MOMENTUM = 0.9
# The sharded programs sum over the batch in another order (per-device partial
# sums, then an all-reduce) than the single-device one, and XLA may fuse the
# elementwise parts differently. Reordering a float32 sum of n terms changes it
# by about sqrt(n) * 2**-24 of the sum of their magnitudes (n * 2**-24 at
# worst): ~3e-7 relative for n = 32, inherited by the outputs, statistics and
# gradients through a few more roundings. Measured over the matrix: at most
# 1.7e-6 of 1 + |value|; 1e-5 (relative and absolute) leaves a margin of ~6x.
TOL = {"rtol": 1e-5, "atol": 1e-5}

# name: (mesh shape, axis names, spec of x, spec of per-feature arrays)
MESHES = {
    "1d": ((8,), ("data",), P("data"), P()),
    "2x4": ((2, 4), ("data", "model"), P("data", "model"), P("model")),
}
AXIS_TYPES = {"explicit": AxisType.Explicit, "auto": AxisType.Auto}
MODES = ("train", "eval")
FRAMEWORKS = ("core", "linen", "nnx", "nnx-functional", "flax-linen")


@functools.cache
def mesh_of(kind: str, axis_type: str) -> jax.sharding.Mesh:
    shape, names, _, _ = MESHES[kind]
    return jax.make_mesh(shape, names, axis_types=(AXIS_TYPES[axis_type],) * len(shape))


def inputs() -> tuple[np.ndarray, np.ndarray]:
    """x, far from the running mean (so re-centring runs), and loss weights w."""
    rng = np.random.default_rng(0)
    x = 5.0 + 2.0 * rng.standard_normal((BATCH, FEATURES))
    w = rng.standard_normal((BATCH, FEATURES))
    return x.astype(np.float32), w.astype(np.float32)


def core_variables() -> tuple[dict, dict]:
    """Random params and running statistics, so each feature's values differ."""
    rng = np.random.default_rng(1)

    def f32(a: Any) -> np.ndarray:
        return np.asarray(a, np.float32)

    params = {
        "scale": f32(rng.normal(1.0, 0.5, FEATURES)),
        "bias": f32(rng.normal(0.0, 0.5, FEATURES)),
    }
    stats = {
        "mean": f32(rng.normal(1.0, 1.0, FEATURES)),
        "var": f32(rng.uniform(0.5, 2.0, FEATURES)),
        "count": np.asarray(3, np.int32),
    }
    return params, stats


def feature_sharding(mesh: Any, kind: str) -> Callable[[Any], NamedSharding]:
    """Per-feature arrays on the feature spec, scalars (count) replicated."""
    _, _, _, spec = MESHES[kind]
    return lambda a: NamedSharding(mesh, spec if np.ndim(a) == 1 else P())


# --- core and linen: pure functions of (variables, x, w) ---------------------------

CORE = jaxbn.batch_norm(momentum=MOMENTUM)


def core_fn(mode: str) -> Callable:
    if mode == "eval":
        return lambda v, x, w: CORE.apply(v["params"], v["batch_stats"], x, train=False)

    def train_step(v, x, w):
        def loss(params, x):
            y, stats = CORE.apply(params, v["batch_stats"], x, train=True)
            return jnp.sum(y * w), (y, stats)

        grads, aux = jax.grad(loss, argnums=(0, 1), has_aux=True)(v["params"], x)
        return aux, grads

    return train_step


def linen_fn(module: nn.Module) -> Callable[[str], Callable]:
    def fn(mode: str) -> Callable:
        if mode == "eval":
            return lambda v, x, w: module.apply(v, x, use_running_average=True)

        def train_step(v, x, w):
            def loss(params, x):
                y, updates = module.apply(
                    {**v, "params": params},
                    x,
                    use_running_average=False,
                    mutable=["batch_stats"],
                )
                return jnp.sum(y * w), (y, updates)

            grads, aux = jax.grad(loss, argnums=(0, 1), has_aux=True)(v["params"], x)
            return aux, grads

        return train_step

    return fn


def core_vars() -> dict:
    params, stats = core_variables()
    return {"params": params, "batch_stats": stats}


def flax_vars() -> dict:
    params, stats = core_variables()
    del stats["count"]  # flax.linen.BatchNorm keeps no count
    return {"params": params, "batch_stats": stats}


PURE = {
    "core": (core_fn, core_vars),
    "linen": (linen_fn(jaxbn.linen.BatchNorm(momentum=MOMENTUM)), core_vars),
    "flax-linen": (linen_fn(nn.BatchNorm(momentum=MOMENTUM)), flax_vars),
}


@functools.cache
def pure_jitted(framework: str, mode: str) -> Callable:
    """One jitted function per (framework, mode), shared by the cells."""
    return jax.jit(PURE[framework][0](mode))


def prepare_pure(framework: str, mode: str, cell: tuple | None) -> Callable[[], Any]:
    variables = PURE[framework][1]()
    x, w = inputs()
    if cell is None:
        return lambda: pure_jitted(framework, mode)(variables, x, w)
    kind, placement, mesh = cell
    var_sh = jax.tree.map(feature_sharding(mesh, kind), variables)
    x_sh = NamedSharding(mesh, MESHES[kind][2])
    if placement == "device_put":
        args = (jax.device_put(variables, var_sh), *jax.device_put((x, w), x_sh))
        return lambda: pure_jitted(framework, mode)(*args)
    fn = jax.jit(PURE[framework][0](mode), in_shardings=(var_sh, x_sh, x_sh))
    return lambda: fn(variables, x, w)


# --- nnx: a module through nnx.jit -------------------------------------------------


def nnx_model() -> jaxbn.nnx.BatchNorm:
    params, stats = core_variables()
    model = jaxbn.nnx.BatchNorm(FEATURES, momentum=MOMENTUM, rngs=nnx.Rngs(0))
    for name, value in {**params, **stats}.items():
        getattr(model, name)[...] = jnp.asarray(value)
    return model


def nnx_train_step(model, x, w):
    def loss(model, x):
        y = model(x)
        return jnp.sum(y * w), y

    (grads, dx), y = nnx.grad(loss, argnums=(0, 1), has_aux=True)(model, x)
    return y, ({"scale": grads["scale"][...], "bias": grads["bias"][...]}, dx)


def nnx_eval_step(model, x, w):
    return model(x, use_running_average=True)


NNX_STEPS = {"train": nnx_train_step, "eval": nnx_eval_step}
NNX_JITTED = {mode: nnx.jit(fn) for mode, fn in NNX_STEPS.items()}


def prepare_nnx(mode: str, cell: tuple | None) -> Callable[[], Any]:
    model = nnx_model()
    x, w = inputs()
    fn = NNX_JITTED[mode]
    args = (x, w)
    if cell is not None:
        kind, placement, mesh = cell
        to_feature = feature_sharding(mesh, kind)
        x_sh = NamedSharding(mesh, MESHES[kind][2])
        if placement == "device_put":
            state = nnx.state(model)
            nnx.update(model, jax.device_put(state, jax.tree.map(to_feature, state)))
            args = jax.device_put(args, x_sh)
        else:
            model_sh = nnx.StateSharding(
                {
                    nnx.PathContains("count"): NamedSharding(mesh, P()),
                    ...: to_feature(np.zeros(FEATURES)),
                }
            )
            fn = nnx.jit(NNX_STEPS[mode], in_shardings=(model_sh, x_sh, x_sh))

    def call() -> Any:
        out = fn(model, *args)
        return out, {n: getattr(model, n)[...] for n in ("mean", "var", "count")}

    return call


# --- nnx, functional: nnx.split, then jax.jit of a function that merges ----------


def nnx_functional(mode: str) -> Callable:
    def step(graphdef, state, x, w):
        model = nnx.merge(graphdef, state)
        out = NNX_STEPS[mode](model, x, w)
        return out, {n: getattr(model, n)[...] for n in ("mean", "var", "count")}

    return step


NNX_FUNCTIONAL = {mode: jax.jit(nnx_functional(mode)) for mode in MODES}


def prepare_nnx_functional(mode: str, cell: tuple | None) -> Callable[[], Any]:
    graphdef, state = nnx.split(nnx_model())
    x, w = inputs()
    fn = NNX_FUNCTIONAL[mode]
    args = (graphdef, state, x, w)
    if cell is not None:
        kind, placement, mesh = cell
        state_sh = jax.tree.map(feature_sharding(mesh, kind), state)
        x_sh = NamedSharding(mesh, MESHES[kind][2])
        if placement == "device_put":
            placed = jax.device_put((state, x, w), (state_sh, x_sh, x_sh))
            args = (graphdef, *placed)
        else:
            in_shardings = (None, state_sh, x_sh, x_sh)
            fn = jax.jit(nnx_functional(mode), in_shardings=in_shardings)
    return lambda: fn(*args)


# --- the matrix --------------------------------------------------------------------


def prepare(framework: str, mode: str, cell: tuple | None) -> Callable[[], Any]:
    """A thunk running one step; built outside any mesh context, like user data."""
    if framework == "nnx":
        return prepare_nnx(mode, cell)
    if framework == "nnx-functional":
        return prepare_nnx_functional(mode, cell)
    return prepare_pure(framework, mode, cell)


@functools.cache
def single_device(framework: str, mode: str) -> Any:
    return jax.tree.map(np.asarray, prepare(framework, mode, None)())


@functools.cache
def elementwise_shardings(kind, axis_type, set_mesh, placement) -> dict:
    """The shardings that outputs of each rank may have in a cell.

    A layer that never gathers the batch or the features returns its outputs
    sharded like its inputs, or like an elementwise function of them in the
    same cell. The two differ with Explicit axes, ``jax.set_mesh`` and
    ``in_shardings`` (jax 0.10): the traced arguments are typed replicated, so
    every computed output, even ``x + 1``, is too, while outputs that are
    inputs (unchanged statistics, nnx's module state) keep their placement.
    """
    mesh = mesh_of(kind, axis_type)
    x, _ = inputs()
    f = np.zeros(FEATURES, np.float32)
    shardings = (NamedSharding(mesh, MESHES[kind][2]), feature_sharding(mesh, kind)(f))

    def plus_one(x, f):
        return x + 1, f + 1

    if placement == "device_put":
        fn, args = jax.jit(plus_one), jax.device_put((x, f), shardings)
    else:
        fn, args = jax.jit(plus_one, in_shardings=shardings), (x, f)
    if set_mesh:
        with jax.set_mesh(mesh):
            y, g = fn(*args)
    else:
        y, g = fn(*args)
    return {2: (y.sharding, shardings[0]), 1: (g.sharding, shardings[1])}


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("framework", FRAMEWORKS)
@pytest.mark.parametrize("placement", ["device_put", "in_shardings"])
@pytest.mark.parametrize("set_mesh", [False, True], ids=["no-set_mesh", "set_mesh"])
@pytest.mark.parametrize("axis_type", list(AXIS_TYPES))
@pytest.mark.parametrize("kind", list(MESHES))
def test_sharded_equals_single_device(
    kind, axis_type, set_mesh, placement, framework, mode
):
    mesh = mesh_of(kind, axis_type)
    step = prepare(framework, mode, (kind, placement, mesh))
    if set_mesh:
        with jax.set_mesh(mesh):
            out = step()
    else:
        out = step()
    chex.assert_trees_all_close(out, single_device(framework, mode), **TOL)
    want = elementwise_shardings(kind, axis_type, set_mesh, placement)
    for leaf in jax.tree.leaves(out):
        if leaf.ndim:  # full-size (y, dx) or per-feature (statistics, grads)
            allowed = want[leaf.ndim]
            assert any(leaf.sharding.is_equivalent_to(s, leaf.ndim) for s in allowed)


@pytest.mark.parametrize("layer", ["jaxbn", "flax.linen"])
@pytest.mark.parametrize("kind", list(MESHES))
def test_issue_observation_explicit_mesh_without_set_mesh(kind, layer):
    """The issue's report, as written: init's params, only x placed, no set_mesh.

    ``jax.make_mesh`` gives Explicit axes; the jitted training apply on the
    placed x raised ``ShardingTypeError`` with the old core, while
    ``flax.linen.BatchNorm`` worked.
    """
    shape, names, x_spec, _ = MESHES[kind]
    mesh = jax.make_mesh(shape, names)
    assert set(mesh.axis_types) == {AxisType.Explicit}
    x, _ = inputs()
    apply: Callable[[Any], Any]
    if layer == "jaxbn":
        params, stats = CORE.init(x)
        apply = functools.partial(CORE.apply, params, stats, train=True)
    else:
        module = nn.BatchNorm(use_running_average=False, momentum=MOMENTUM)
        variables = module.init(jax.random.key(0), x)
        apply = functools.partial(module.apply, variables, mutable=["batch_stats"])
    want = jax.jit(apply)(x)
    got = jax.jit(apply)(jax.device_put(x, NamedSharding(mesh, x_spec)))
    chex.assert_trees_all_close(got, want, **TOL)


# --- mixed placements: x and the statistics sharded differently ---------------------

# name: (spec of x, spec of per-feature arrays) on the 2x4 mesh. Tensor
# parallelism as most users write it shards x's features over "model" and
# leaves the statistics replicated; the reverse (statistics sharded, x's
# features replicated) is legal too. The do-while passes once failed the first
# with Explicit axes under ``jax.set_mesh`` ("while_loop body function carry
# input and carry output must have equal types ... float32[1,8] ...
# float32[1,8@model]"), which the cells above, sharding both alike, missed.
MIXED = {
    "x-sharded-stats-replicated": (P("data", "model"), P()),
    "x-replicated-stats-sharded": (P("data", None), P("model")),
}


@pytest.mark.parametrize("framework", ["core", "linen", "flax-linen"])
@pytest.mark.parametrize("set_mesh", [False, True], ids=["no-set_mesh", "set_mesh"])
@pytest.mark.parametrize("axis_type", list(AXIS_TYPES))
@pytest.mark.parametrize("placement", list(MIXED))
def test_mixed_placements_equal_single_device(
    placement, axis_type, set_mesh, framework
):
    mesh = mesh_of("2x4", axis_type)
    x_spec, stats_spec = MIXED[placement]
    variables = PURE[framework][1]()
    x, w = inputs()
    var_sh = jax.tree.map(
        lambda a: NamedSharding(mesh, stats_spec if np.ndim(a) == 1 else P()), variables
    )
    args = (
        jax.device_put(variables, var_sh),
        *jax.device_put((x, w), NamedSharding(mesh, x_spec)),
    )
    if set_mesh:
        with jax.set_mesh(mesh):
            out = pure_jitted(framework, "train")(*args)
    else:
        out = pure_jitted(framework, "train")(*args)
    chex.assert_trees_all_close(out, single_device(framework, "train"), **TOL)


def test_issue_observation_tensor_parallel_replicated_statistics():
    """The report as written: a 2-D x sharded (data, model), init's statistics."""
    mesh = jax.make_mesh((2, 4), ("data", "model"))
    x = jnp.asarray(np.random.default_rng(0).normal(3, 2, (32, 8)), jnp.float32)
    params, stats = CORE.init(x)
    f = jax.jit(lambda p, s, x: CORE.apply(p, s, x, train=True))
    want = f(params, stats, x)
    with jax.set_mesh(mesh):
        got = f(
            params, stats, jax.device_put(x, NamedSharding(mesh, P("data", "model")))
        )
    chex.assert_trees_all_close(got, want, **TOL)
    x4 = x.reshape(2, 4, 4, 8)
    with jax.set_mesh(mesh):
        got4 = f(
            params,
            stats,
            jax.device_put(x4, NamedSharding(mesh, P("data", None, None, "model"))),
        )
    chex.assert_trees_all_close(got4, f(params, stats, x4), **TOL)
