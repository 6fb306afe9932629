"""Ghost (virtual) batch norm (``virtual_batch_size=k``) against NumPy float64.

Tolerances: outputs are float32 normalizations of O(1) values (a few ulps):
1e-5; merged statistics sum a few dozen float32 values: 1e-5 relative;
gradients sum 32 O(1) float32 terms: 1e-4.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import jaxbn


def data(shape, seed=0):
    rng = np.random.default_rng(seed)
    return (
        rng.uniform(-3, 3, (shape[0],) + (1,) * (len(shape) - 1))
        + rng.standard_normal(shape)
    ).astype(np.float32)


def ghost_reference(x, k, eps=1e-5):
    x = np.asarray(x, np.float64)
    g = x.reshape((x.shape[0] // k, k, *x.shape[1:]))
    red = tuple(range(1, g.ndim - 1))
    mean = g.mean(red, keepdims=True)
    var = g.var(red, keepdims=True)
    y = ((g - mean) / np.sqrt(var + eps)).reshape(x.shape)
    flat = x.reshape(-1, x.shape[-1])
    return y, flat.mean(0), flat.var(0)


@pytest.mark.parametrize(
    ("shape", "k", "use_jit"),
    [((32, 3), 8, True), ((12, 2, 2, 3), 4, False), ((6, 5), 6, True)],
)
def test_each_group_is_normalized_alone_and_the_running_stats_merge(shape, k, use_jit):
    x = data(shape)
    layer = jaxbn.batch_norm(momentum=0.0, warmup=False, virtual_batch_size=k)
    params, stats = layer.init(x)
    step = lambda s, x: layer.apply(params, s, x, train=True)  # noqa: E731
    y, new = (jax.jit(step) if use_jit else step)(stats, jnp.asarray(x))
    y_ref, mean, var = ghost_reference(x, k)
    np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(new["mean"], mean, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(new["var"], var, rtol=1e-5)
    # Evaluation is unchanged.
    plain = jaxbn.batch_norm()
    y_eval, _ = layer.apply(params, new, jnp.asarray(x), train=False)
    np.testing.assert_array_equal(
        y_eval, plain.apply(params, new, jnp.asarray(x), train=False)[0]
    )


def test_masked_groups_and_large_mean_merge_exactly():
    x = data((16, 2)) + 1e4
    keep = np.ones((16, 1), bool)
    keep[[1, 5, 6, 7, 12]] = False  # group 1 keeps one example only
    layer = jaxbn.batch_norm(momentum=0.0, warmup=False, virtual_batch_size=4)
    params, stats = layer.init(x)
    stats = dict(stats, mean=jnp.full(2, 1e4, jnp.float32))
    _, new = layer.apply(
        params, stats, jnp.asarray(x), train=True, mask=jnp.asarray(keep)
    )
    kept = np.asarray(x, np.float64)[keep[:, 0]]
    np.testing.assert_allclose(new["mean"], kept.mean(0), rtol=1e-7)
    np.testing.assert_allclose(new["var"], kept.var(0), rtol=1e-4)


def _plain_ghost(x, k, scale, bias, eps=1e-5):
    g = x.reshape((x.shape[0] // k, k, *x.shape[1:]))
    mean = jnp.mean(g, 1, keepdims=True)
    var = jnp.mean((g - mean) ** 2, 1, keepdims=True)
    y = (g - mean) / jnp.sqrt(var + eps) * scale[None, None] + bias[None, None]
    return y.reshape(x.shape)


def test_ghost_gradients_match_autodiff_of_the_per_group_formula():
    x = jnp.asarray(data((32, 3)))
    layer = jaxbn.batch_norm(virtual_batch_size=8)
    params, stats = layer.init(x)
    params = {"scale": jnp.array([0.5, 1.0, 2.0]), "bias": jnp.array([0.1, 0.0, -0.2])}
    c = jnp.asarray(data((32, 3), seed=4))

    def loss(x, p):
        return jnp.sum(c * layer.apply(p, stats, x, train=True)[0])

    def ref(x, p):
        return jnp.sum(c * _plain_ghost(x, 8, p["scale"], p["bias"]))

    got, want = jax.grad(loss, (0, 1))(x, params), jax.grad(ref, (0, 1))(x, params)
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4), got, want
    )


def test_ghost_batches_under_shard_map_and_sharded_jit_match_one_device():
    x = jnp.asarray(data((64, 3)))
    k = 4
    single = jaxbn.batch_norm(momentum=0.5, warmup=False, virtual_batch_size=k)
    params, stats = single.init(x)
    y_ref, s_ref = jax.jit(lambda x: single.apply(params, stats, x, train=True))(x)
    mesh = jax.make_mesh((8,), ("batch",))
    synced = jaxbn.batch_norm(
        momentum=0.5, warmup=False, virtual_batch_size=k, axis_name="batch"
    )

    @jax.jit
    @functools.partial(
        jax.shard_map, mesh=mesh, in_specs=P("batch"), out_specs=(P("batch"), P())
    )
    def step(x):
        return synced.apply(params, stats, x, train=True)

    xs = jax.device_put(x, NamedSharding(mesh, P("batch")))
    with jax.set_mesh(mesh):
        y, s = step(xs)
    np.testing.assert_allclose(y, y_ref, rtol=1e-6, atol=1e-6)
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), s, s_ref
    )
    y2, s2 = jax.jit(lambda x: single.apply(params, stats, x, train=True))(xs)
    np.testing.assert_allclose(y2, y_ref, rtol=1e-6, atol=1e-6)
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), s2, s_ref
    )


def test_ghost_errors():
    layer = jaxbn.batch_norm(virtual_batch_size=4)
    x = jnp.ones((10, 3))
    params, stats = layer.init(x)
    with pytest.raises(
        ValueError, match="virtual_batch_size=4 does not divide the batch of 10"
    ):
        layer.apply(params, stats, x, train=True)
    first = jaxbn.batch_norm(axis=0, virtual_batch_size=2)
    xt = jnp.ones((4, 8))
    p, s = first.init(xt)
    with pytest.raises(ValueError, match="axis 0 is a feature axis"):
        first.apply(p, s, xt, train=True)
    with pytest.raises(ValueError, match="virtual_batch_size must be a positive int"):
        jaxbn.batch_norm(virtual_batch_size=0)
    with pytest.raises(ValueError, match="virtual_batch_size must be a positive int"):
        jaxbn.batch_norm(virtual_batch_size=2.0)  # type: ignore[arg-type]
    one = jaxbn.batch_norm(virtual_batch_size=1)
    with pytest.raises(ValueError, match="a batch variance needs at least 2"):
        one.apply(params, stats, jnp.ones((8, 3)), train=True)
