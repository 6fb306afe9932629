"""Call-time ``scale`` and ``offset`` (conditional batch norm, FiLM), against
NumPy float64 and autodiff of the plain formula.

Tolerances: float32 normalizations of O(1) values: 1e-5; gradients sum 24
O(1) float32 terms: 1e-4.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxbn


def data(shape, seed=0):
    rng = np.random.default_rng(seed)
    return (0.5 + 2.0 * rng.standard_normal(shape)).astype(np.float32)


def film_reference(x, scale, bias, eps=1e-5):
    x = np.asarray(x, np.float64)
    red = tuple(range(x.ndim - 1))
    mean, var = x.mean(red, keepdims=True), x.var(red, keepdims=True)
    return (x - mean) / np.sqrt(var + eps) * scale + bias


@pytest.mark.parametrize("per_example", [False, True])
def test_call_time_scale_and_offset_match_numpy(per_example):
    x = data((6, 2, 2, 3))
    rng = np.random.default_rng(1)
    shape = (6, 1, 1, 3) if per_example else (3,)
    s = rng.uniform(0.5, 2.0, shape).astype(np.float32)
    b = rng.standard_normal(shape).astype(np.float32)
    layer = jaxbn.batch_norm(scale=False, center=False)
    params, stats = layer.init(x)
    assert params == {}
    y, _ = jax.jit(
        lambda s_, b_: layer.apply(
            params, stats, jnp.asarray(x), train=True, scale=s_, offset=b_
        )
    )(s, b)
    np.testing.assert_allclose(y, film_reference(x, s, b), rtol=1e-5, atol=1e-5)
    y_eval, _ = layer.apply(
        params, stats, jnp.asarray(x), train=False, scale=s, offset=b
    )
    np.testing.assert_allclose(
        y_eval, x / np.sqrt(1 + 1e-5) * s + b, rtol=1e-5, atol=1e-5
    )


def test_call_time_scale_gradients_match_autodiff():
    x = jnp.asarray(data((8, 3)))
    s = jnp.asarray(np.random.default_rng(2).uniform(0.5, 2.0, (8, 3)), jnp.float32)
    b = jnp.asarray(np.random.default_rng(3).standard_normal((8, 1)), jnp.float32)
    c = jnp.asarray(data((8, 3), seed=5))
    layer = jaxbn.batch_norm(scale=False, center=False)
    params, stats = layer.init(x)

    def loss(x, s, b):
        return jnp.sum(
            c * layer.apply(params, stats, x, train=True, scale=s, offset=b)[0]
        )

    def plain(x, s, b):
        mean = jnp.mean(x, 0, keepdims=True)
        var = jnp.mean((x - mean) ** 2, 0, keepdims=True)
        return jnp.sum(c * ((x - mean) / jnp.sqrt(var + 1e-5) * s + b))

    got = jax.grad(loss, (0, 1, 2))(x, s, b)
    want = jax.grad(plain, (0, 1, 2))(x, s, b)
    for a, w in zip(got, want, strict=True):
        assert a.shape == w.shape
        np.testing.assert_allclose(a, w, rtol=1e-4, atol=1e-4)


def test_call_time_scale_with_ghost_batches():
    x = data((8, 3))
    s = np.random.default_rng(4).uniform(0.5, 2.0, (8, 1)).astype(np.float32)
    layer = jaxbn.batch_norm(scale=False, virtual_batch_size=4)
    params, stats = layer.init(x)
    y, _ = layer.apply(params, stats, jnp.asarray(x), train=True, scale=s)
    want = np.concatenate(
        [film_reference(x[i : i + 4], s[i : i + 4], 0.0) for i in (0, 4)]
    )
    np.testing.assert_allclose(y, want, rtol=1e-5, atol=1e-5)


def test_call_time_scale_and_offset_errors():
    x = jnp.ones((4, 3))
    learned = jaxbn.batch_norm()
    params, stats = learned.init(x)
    with pytest.raises(ValueError, match="build it with scale=False"):
        learned.apply(params, stats, x, train=True, scale=jnp.ones(3))
    with pytest.raises(ValueError, match="build it with center=False"):
        learned.apply(params, stats, x, train=True, offset=jnp.ones(3))
    free = jaxbn.batch_norm(scale=False, center=False)
    p, s = free.init(x)
    with pytest.raises(ValueError, match=r"scale has shape \(4,\)"):
        free.apply(p, s, x, train=True, scale=jnp.ones(4))
    with pytest.raises(ValueError, match=r"offset has shape \(2, 4, 3\)"):
        free.apply(p, s, x, train=True, offset=jnp.ones((2, 4, 3)))
    with pytest.raises(TypeError, match="scale must be a real floating array"):
        free.apply(p, s, x, train=True, scale=jnp.ones(3, jnp.int32))
