"""``jaxbn.equinox.BatchNorm`` against ``equinox.nn.BatchNorm``, side by side.

Each scenario runs Equinox's layer and jaxbn's with the same arguments, in the
way Equinox's own tests use it, and compares outputs, running statistics and
gradients. Equinox's ``mode="batch"`` (zero-debiased running averages) and
``mode="ema"`` (training normalizes with the updated running average) are both
matched, but for ``mode="batch"``'s inference variance, which jaxbn debiases
from its start at 1 where Equinox divides it (see ``test_variants_debias.py``). Equinox computes in float32 with ``jnp.mean`` over a vmapped axis and
``lax.pmean``, jaxbn with its own shifted sums: the same values up to float32
rounding of sums of a few dozen terms, hence ``rtol=atol=1e-5``.

Equinox's tests (``tests/test_nn.py``, ``test_stateful.py``,
``test_serialisation.py`` of patrick-kidger/equinox) pass with this layer
substituted, except where they read Equinox's private ``batch_state_index`` /
``ema_state_index`` (jaxbn keeps ``{"mean", "var", "count"}`` at
``state_index``); see ``docs/migration.md``.
"""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

import jaxbn.equinox

# Any random values do here: see the fixture (conftest.py).
pytestmark = pytest.mark.usefixtures("non_partitionable_threefry")

MODES = ["batch", "ema"]


def close(a, b, tol=1e-5):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=tol, atol=tol)


def running(layer, state):
    """(mean, var) as each layer evaluates with them."""
    if isinstance(layer, jaxbn.equinox.BatchNorm):
        stats = state.get(layer.state_index)
        return stats["mean"], stats["var"]
    if layer.mode == "ema":
        return state.get(layer.ema_state_index)
    return state.get(layer.batch_state_index)


def pair(*args, **kwargs):
    """The Equinox layer and jaxbn's, each with its state."""
    theirs = eqx.nn.make_with_state(eqx.nn.BatchNorm)(*args, **kwargs)
    ours = eqx.nn.make_with_state(jaxbn.equinox.BatchNorm)(*args, **kwargs)
    return theirs, ours


def mapped(layer, axis_name="batch"):
    return jax.vmap(layer, axis_name=axis_name, in_axes=(0, None), out_axes=(0, None))


def data(shape, seed=0, loc=0.0, scale=1.0):
    # NumPy: jax.random compiles a program for each new shape, which takes
    # XLA:CPU seconds for shapes with a short last axis such as (16, 4, 3).
    x = loc + scale * np.random.default_rng(seed).standard_normal(shape)
    return jnp.asarray(x, jnp.float32)


@pytest.mark.parametrize("mode", MODES)
def test_training_steps_running_statistics_and_inference(mode):
    (theirs, t_state), (ours, o_state) = pair(4, "batch", momentum=0.9, mode=mode)
    for step in range(4):
        x = data((16, 4, 3), seed=step, loc=step, scale=1.0 + step)
        y_t, t_state = mapped(theirs)(x, t_state)
        y_o, o_state = mapped(ours)(x, o_state)
        close(y_o, y_t)
    if mode == "ema":  # Equinox evaluates with what it stores
        for a, b in zip(running(ours, o_state), running(theirs, t_state), strict=True):
            close(a, b)
    x = data((5, 4, 3), seed=9, loc=2.0)
    y_t, _ = mapped(eqx.nn.inference_mode(theirs))(x, t_state)
    y_o, _ = mapped(eqx.nn.inference_mode(ours))(x, o_state)
    if mode == "ema":
        close(y_o, y_t)
        return
    # mode="batch": the same mean as Equinox's zero-debiasing; the variance
    # undoes its start at 1, (var - p) / (1 - p), where Equinox divides it.
    assert theirs.batch_counter is not None
    p = 0.9 ** int(t_state.get(theirs.batch_counter))
    mean, var = (np.asarray(a, np.float64) for a in running(theirs, t_state))
    mean, var = mean / (1 - p), (var - p) / (1 - p)
    channel = (-1, 1)  # Equinox's channels lead each example: (4, 3)
    want = (np.asarray(x) - mean.reshape(channel)) / np.sqrt(
        var.reshape(channel) + 1e-5
    )
    weight, bias = (
        np.asarray(a).reshape(channel) for a in (theirs.weight, theirs.bias)
    )
    close(y_o, want * weight + bias)
    assert not np.allclose(np.asarray(y_o), np.asarray(y_t), rtol=1e-3)


@pytest.mark.parametrize("mode", MODES)
def test_batch_of_one_under_vmap_normalizes_to_the_bias(mode):
    (theirs, t_state), (ours, o_state) = pair(3, "batch", mode=mode)
    x = data((1, 3))
    y_t, t_state = mapped(theirs)(x, t_state)
    y_o, o_state = mapped(ours)(x, o_state)
    close(y_o, y_t)
    close(y_o, jnp.zeros((1, 3)))
    for a, b in zip(running(ours, o_state), running(theirs, t_state), strict=True):
        if mode == "ema":
            close(a, b)


@pytest.mark.parametrize("mode", MODES)
def test_nested_sequential_with_make_with_state(mode):
    def build(cls):
        return eqx.nn.make_with_state(eqx.nn.Sequential)(
            [
                eqx.nn.Linear(3, 4, key=jax.random.key(1)),
                eqx.nn.Sequential([cls(4, axis_name="batch", mode=mode)]),
                eqx.nn.Lambda(jax.nn.relu),
                cls(4, axis_name="batch", mode=mode),
            ]
        )

    theirs, t_state = build(eqx.nn.BatchNorm)
    ours, o_state = build(jaxbn.equinox.BatchNorm)
    for step in range(3):
        x = data((8, 3), seed=step, loc=step)
        y_t, t_state = mapped(theirs)(x, t_state)
        y_o, o_state = mapped(ours)(x, o_state)
        close(y_o, y_t)
    x = data((8, 3), seed=7)
    y_t, _ = mapped(eqx.nn.inference_mode(theirs))(x, t_state)
    y_o, _ = mapped(eqx.nn.inference_mode(ours))(x, o_state)
    if mode == "ema":  # mode="batch" debiases the variance differently (above)
        close(y_o, y_t)
    assert y_o.shape == y_t.shape and bool(jnp.all(jnp.isfinite(y_o)))


def test_zero_training_steps_in_inference():
    (theirs, t_state), (ours, o_state) = pair(3, "foo", mode="batch", inference=True)
    x = data((5, 3))
    y_t, _ = jax.vmap(theirs, in_axes=(0, None), axis_name="foo")(x, t_state)
    y_o, _ = jax.vmap(ours, in_axes=(0, None), axis_name="foo")(x, o_state)
    close(y_o, y_t)
    close(y_o, x / jnp.sqrt(1.0 + 1e-5))


@pytest.mark.parametrize("mode", MODES)
def test_vmap_of_vmap_with_two_axis_names(mode):
    (theirs, t_state), (ours, o_state) = pair(6, ("b1", "b2"), mode=mode)

    def both(layer):
        inner = jax.vmap(layer, axis_name="b1", in_axes=(0, None), out_axes=(0, None))
        return jax.vmap(inner, axis_name="b2", in_axes=(0, None), out_axes=(0, None))

    for step in range(2):
        x = data((3, 5, 6), seed=step, loc=step)
        y_t, t_state = both(theirs)(x, t_state)
        y_o, o_state = both(ours)(x, o_state)
        close(y_o, y_t)


@pytest.mark.parametrize("mode", MODES)
def test_grad_through_the_layer(mode):
    (theirs, t_state), (ours, o_state) = pair(4, "batch", mode=mode)
    x = data((8, 4))
    # A second step, so that "ema" mixes in the running average.
    _, t_state = mapped(theirs)(x, t_state)
    _, o_state = mapped(ours)(x, o_state)
    w = data((8, 4), seed=3)

    def loss(layer, x, state):
        y, _ = mapped(layer)(x, state)
        return jnp.sum(w * y**2)

    clone = jax.tree_util.tree_unflatten
    t_leaves, t_def = jax.tree_util.tree_flatten(t_state)
    o_leaves, o_def = jax.tree_util.tree_flatten(o_state)
    g_t = eqx.filter_grad(loss)(theirs, x * 2 + 1, clone(t_def, t_leaves))
    g_o = eqx.filter_grad(loss)(ours, x * 2 + 1, clone(o_def, o_leaves))
    close(g_o.weight, g_t.weight, 1e-4)
    close(g_o.bias, g_t.bias, 1e-4)
    dx_t = jax.grad(lambda x: loss(theirs, x, clone(t_def, t_leaves)))(x)
    dx_o = jax.grad(lambda x: loss(ours, x, clone(o_def, o_leaves)))(x)
    close(dx_o, dx_t, 1e-4)


@pytest.mark.parametrize("mode", MODES)
def test_shard_map_and_pmap_over_devices(mode):
    (theirs, t_state), (ours, o_state) = pair(3, "d", mode=mode)
    x = data((8, 2, 3))  # 8 devices, 2 examples each
    mesh = jax.make_mesh((8,), ("d",))

    # Statistics over the devices only: each device holds one example. The
    # reference is Equinox's layer under vmap with that axis name (its "ema"
    # cannot update its first-time flag under pmap or shard_map).
    ones = x[:, 0]
    y_t, t_new = mapped(theirs, "d")(ones, t_state)

    def pmapped(layer, state):
        f = jax.pmap(
            lambda x, s: layer(x, s),
            axis_name="d",
            in_axes=(0, None),
            out_axes=(0, None),
        )
        return f(ones, state)

    y_o, o_new = pmapped(ours, o_state)
    close(y_o, y_t)
    for a, b in zip(running(ours, o_new), running(theirs, t_new), strict=True):
        if mode == "ema":
            close(a, b)
    if mode == "batch":
        close(pmapped(theirs, t_state)[0], y_t)

    # The same under jax.shard_map, the state passed in replicated.
    def sharded(layer, state):
        def body(x, state):
            y, state = layer(x.reshape(x.shape[1:]), state)
            return y[None], state

        placed = jax.device_put(ones, jax.sharding.NamedSharding(mesh, P("d")))
        specs = (P("d"), P())
        return jax.shard_map(body, mesh=mesh, in_specs=specs, out_specs=specs)(
            placed, state
        )

    y_so, o_sharded = sharded(ours, o_state)
    close(y_so, y_t)
    for a, b in zip(running(ours, o_sharded), running(ours, o_new), strict=True):
        close(a, b)
    if mode == "batch":  # Equinox's "ema" cannot set its first-time flag there
        y_st, _ = sharded(theirs, t_state)
        close(y_so, y_st)


def test_modes_and_defaults_are_explicit():
    # Equinox's own default (no mode) is its legacy "ema"; jaxbn's is its
    # warm-up of plain batch statistics, and says so in the docstring.
    bn = jaxbn.equinox.BatchNorm(3, "batch")
    assert bn.mode is None and bn.config.warmup and bn.config.debias is None
    batch = jaxbn.equinox.BatchNorm(3, "batch", mode="batch")
    assert not batch.config.warmup and batch.config.debias == "mean_and_var"
    assert jaxbn.equinox.BatchNorm(3, "batch", mode="legacy").mode == "ema"
    with pytest.raises(ValueError, match="mode='ema' is Equinox's legacy"):
        jaxbn.equinox.BatchNorm(3, "batch", mode="ema", renorm=True)
    ema, state = eqx.nn.make_with_state(jaxbn.equinox.BatchNorm)(3, mode="ema")
    with pytest.raises(ValueError, match="mode='ema' takes no mask"):
        ema(jnp.ones((4, 3)), state, mask=jnp.ones((4, 1), bool))
