"""Batch norm under JAX transformations: vmap, grad, checkpoint, scan, eval_shape."""

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import reference as ref

import jaxbn

TOL = {"rtol": 1e-5, "atol": 1e-5}


def data(shape, seed=0, offset=0.0):
    rng = np.random.default_rng(seed)
    return (offset + rng.standard_normal(shape)).astype(np.float32)


def test_vmap_ensemble_members_keep_their_own_statistics():
    members, batch, features = 3, 16, 4
    x = (
        data((members, batch, features))
        * np.array([1.0, 5.0, 0.1], np.float32)[:, None, None]
    )
    layer = jaxbn.batch_norm(momentum=0.9)
    keys = jax.random.split(jax.random.key(0), members)
    params, stats = jax.vmap(lambda k, x: layer.init(x, key=k))(keys, x)
    y, new = jax.vmap(lambda p, s, x: layer.apply(p, s, x, train=True))(
        params, stats, x
    )
    assert new["count"].shape == (members,)
    for m in range(members):
        p, s = jax.tree.map(lambda a, m=m: a[m], (params, stats))
        want = layer.apply(p, s, x[m], train=True)
        chex.assert_trees_all_close(
            jax.tree.map(lambda a, m=m: a[m], (y, new)), want, **TOL
        )


@pytest.mark.parametrize("example_shape", [(5,), (1, 5)], ids=["rank1", "rank2"])
def test_vmap_per_example_with_axis_name_equals_batch_computation(example_shape):
    # Equinox style: the function sees one example (shape (5,), all features);
    # the batch is the vmapped axis.
    x = data((32, 5), seed=1, offset=2.0)
    batched = jaxbn.batch_norm(momentum=0.9)
    params, stats = batched.init(x)
    want = batched.apply(params, stats, x, train=True)
    per_example = jaxbn.batch_norm(momentum=0.9, axis_name="batch")

    def one(x):
        y, new = per_example.apply(params, stats, x.reshape(example_shape), train=True)
        return y.reshape(x.shape), new

    y, new = jax.vmap(
        one,
        axis_name="batch",
        out_axes=(0, None),  # the statistics are the same for every example
    )(x)
    chex.assert_trees_all_close((y, new), want, **TOL)
    _, want_stats = ref.train_step(x, -1, jax.tree.map(np.asarray, stats), 0.9, True)
    chex.assert_trees_all_close(new, want_stats, **TOL)


def test_grad_through_vmap_with_axis_name_equals_batch_gradient():
    x = data((16, 3), seed=2)
    weights = jnp.array([[1.0, -2.0, 0.5]])
    layer = jaxbn.batch_norm()
    params, stats = layer.init(x)

    def loss(params, x):
        return jnp.sum(jnp.sin(layer.apply(params, stats, x, train=True)[0]) * weights)

    per_example = jaxbn.batch_norm(axis_name="batch")

    def mapped_loss(params, x):
        y = jax.vmap(
            lambda x: per_example.apply(params, stats, x[None], train=True)[0][0],
            axis_name="batch",
        )(x)
        return jnp.sum(jnp.sin(y) * weights)

    want = jax.grad(loss, argnums=(0, 1))(params, x)
    got = jax.grad(mapped_loss, argnums=(0, 1))(params, x)
    chex.assert_trees_all_close(got, want, rtol=1e-4, atol=1e-5)


def test_checkpoint_gives_the_same_values_and_gradients():
    x = data((16, 4), seed=3)
    layer = jaxbn.batch_norm()
    params, stats = layer.init(x)

    def loss(params, x):
        y, new = layer.apply(params, stats, x, train=True)
        return jnp.sum(jnp.tanh(y) ** 2), new

    want = jax.value_and_grad(loss, has_aux=True)(params, x)
    got = jax.jit(jax.value_and_grad(jax.checkpoint(loss), has_aux=True))(params, x)
    chex.assert_trees_all_close(got, want, **TOL)


def test_lax_scan_over_stacked_layers_equals_a_python_loop():
    depth, features = 4, 6
    x = data((16, features), seed=4, offset=1.0)
    layer = jaxbn.batch_norm(momentum=0.9)
    keys = jax.random.split(jax.random.key(1), depth)
    params, stats = jax.vmap(lambda k: layer.init(x, key=k))(keys)
    params = jax.tree.map(lambda a: a * (1.0 + jnp.arange(depth)[:, None]), params)

    def body(h, layer_vars):
        p, s = layer_vars
        h, s = layer.apply(p, s, h, train=True)
        return jnp.tanh(h) + 0.5, s

    y, new = jax.jit(lambda x: jax.lax.scan(body, x, (params, stats)))(x)
    h, loop = x, []
    for i in range(depth):
        h, s = body(h, jax.tree.map(lambda a, i=i: a[i], (params, stats)))
        loop.append(s)
    chex.assert_trees_all_close(y, h, **TOL)
    chex.assert_trees_all_close(
        new, jax.tree.map(lambda *a: jnp.stack(a), *loop), **TOL
    )


def test_nn_scan_over_linen_batch_norm():
    import jaxbn.linen

    depth = 3

    class Block(nn.Module):
        @nn.compact
        def __call__(self, h, _):
            h = jaxbn.linen.BatchNorm(use_running_average=False, momentum=0.9)(h)
            return jnp.tanh(h) + 0.5, None

    Stack = nn.scan(
        Block,
        variable_axes={"params": 0, "batch_stats": 0},
        split_rngs={"params": True},
        length=depth,
    )
    x = data((16, 5), seed=5, offset=2.0)
    variables = Stack().init(jax.random.key(0), x, None)
    (y, _), updates = Stack().apply(variables, x, None, mutable=["batch_stats"])
    assert jax.tree.leaves(updates)[0].shape[0] == depth
    layer = jaxbn.batch_norm(momentum=0.9)
    h = x
    for _ in range(depth):
        params, stats = layer.init(h)
        h, _ = layer.apply(params, stats, h, train=True)
        h = jnp.tanh(h) + 0.5
    chex.assert_trees_all_close(y, h, **TOL)


def test_eval_shape_of_init_allocates_nothing():
    layer = jaxbn.batch_norm(axis=(1, 3), param_dtype=jnp.bfloat16)
    x = jax.ShapeDtypeStruct((8, 3, 5, 7), jnp.float16)
    params, stats = jax.eval_shape(layer.init, x)
    assert params["scale"].shape == (3, 7)
    assert params["scale"].dtype == jnp.bfloat16
    assert stats["mean"].shape == (3, 7)
    assert stats["mean"].dtype == jnp.float32
    assert stats["count"].shape == ()
    assert stats["count"].dtype == jnp.int32
