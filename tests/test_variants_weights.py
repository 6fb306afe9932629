"""Per-example weights (``apply(..., weights=)``) against NumPy float64.

Tolerances: outputs are float32 normalizations of O(1) values (a few ulps):
1e-5; gradients sum 48 float32 terms of O(1): 1e-4.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

import jaxbn


def data(shape, seed=0):
    rng = np.random.default_rng(seed)
    return (1.5 + 2.0 * rng.standard_normal(shape)).astype(np.float32)


def weighted_reference(x, w, axis=-1, eps=1e-5):
    x = np.asarray(x, np.float64)
    w = np.broadcast_to(np.asarray(w, np.float64), x.shape)
    red = tuple(i for i in range(x.ndim) if i != axis % x.ndim)
    n = w.sum(red, keepdims=True)
    mean = (w * x).sum(red, keepdims=True) / n
    var = (w * (x - mean) ** 2).sum(red, keepdims=True) / n
    return (x - mean) / np.sqrt(var + eps), n.squeeze(), mean.squeeze(), var.squeeze()


@pytest.mark.parametrize(
    ("shape", "w_shape", "use_jit"),
    [
        ((12, 3), (12, 1), True),
        ((6, 2, 2, 3), (6, 1, 1, 1), False),
        ((8, 4), (8, 4), True),
    ],
)
def test_weighted_statistics_match_numpy(shape, w_shape, use_jit):
    x = data(shape)
    w = np.random.default_rng(1).uniform(0.0, 3.0, w_shape).astype(np.float32)
    layer = jaxbn.batch_norm(momentum=0.0, warmup=False)
    params, stats = layer.init(x)
    step = lambda s, x, w: layer.apply(params, s, x, train=True, weights=w)  # noqa: E731
    y, new = (jax.jit(step) if use_jit else step)(stats, jnp.asarray(x), jnp.asarray(w))
    y_ref, _, mean, var = weighted_reference(x, w)
    np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(new["mean"], mean, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(new["var"], var, rtol=1e-5)


def test_integer_weights_repeat_examples_and_set_the_unbiased_count():
    x = data((5, 3))
    w = np.array([1.0, 2.0, 0.0, 3.0, 1.0], np.float32)[:, None]
    repeated = np.repeat(x, w[:, 0].astype(int), axis=0)
    kw = {"momentum": 0.0, "warmup": False, "running_var": "unbiased"}
    layer = jaxbn.batch_norm(**kw)
    params, stats = layer.init(x)
    _, new = layer.apply(params, stats, jnp.asarray(x), train=True, weights=w)
    _, want = layer.apply(params, stats, jnp.asarray(repeated), train=True)
    np.testing.assert_allclose(new["mean"], want["mean"], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(new["var"], want["var"], rtol=1e-5)
    np.testing.assert_allclose(want["var"], np.var(repeated, 0, ddof=1), rtol=1e-5)


def test_zero_one_weights_are_a_mask_and_the_two_combine():
    x = jnp.asarray(data((10, 3)))
    keep = np.array([1, 1, 0, 1, 0, 1, 1, 1, 0, 1], bool)[:, None]
    layer = jaxbn.batch_norm(momentum=0.5, warmup=False)
    params, stats = layer.init(x)
    y_mask, s_mask = layer.apply(params, stats, x, train=True, mask=jnp.asarray(keep))
    y_w, s_w = layer.apply(
        params, stats, x, train=True, weights=keep.astype(np.float32)
    )
    # x * 1 and x * 0 are exact: the same sums as the select of the mask.
    np.testing.assert_allclose(y_w, y_mask, rtol=1e-6, atol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6), s_w, s_mask)
    w = np.random.default_rng(2).uniform(0.5, 2.0, (10, 1)).astype(np.float32)
    y_both, s_both = layer.apply(
        params, stats, x, train=True, mask=jnp.asarray(keep), weights=w
    )
    y_prod, s_prod = layer.apply(params, stats, x, train=True, weights=w * keep)
    np.testing.assert_allclose(y_both, y_prod, rtol=1e-6, atol=1e-6)
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6), s_both, s_prod
    )
    # Evaluation checks and ignores the weights.
    y_eval, _ = layer.apply(params, stats, x, train=False, weights=w)
    np.testing.assert_array_equal(y_eval, layer.apply(params, stats, x, train=False)[0])


def _plain_weighted(x, w, scale, bias, eps=1e-5):
    n = jnp.sum(jnp.broadcast_to(w, x.shape), 0, keepdims=True)
    mean = jnp.sum(w * x, 0, keepdims=True) / n
    var = jnp.sum(w * (x - mean) ** 2, 0, keepdims=True) / n
    return (x - mean) / jnp.sqrt(var + eps) * scale[None] + bias[None]


def test_weighted_gradients_match_autodiff_and_check_grads():
    x = jnp.asarray(data((16, 3)))
    w = jnp.asarray(np.random.default_rng(3).uniform(0.0, 2.0, (16, 1)), jnp.float32)
    layer = jaxbn.batch_norm()
    params, stats = layer.init(x)
    params = {"scale": jnp.array([0.5, 1.0, 2.0]), "bias": jnp.array([0.1, 0.0, -0.2])}
    c = jnp.asarray(data((16, 3), seed=7))

    def loss(x, p):
        return jnp.sum(c * layer.apply(p, stats, x, train=True, weights=w)[0])

    def ref(x, p):
        return jnp.sum(c * _plain_weighted(x, w, p["scale"], p["bias"]))

    got, want = jax.grad(loss, (0, 1))(x, params), jax.grad(ref, (0, 1))(x, params)
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4), got, want
    )
    with jax.enable_x64(True):
        x64, w64 = x.astype(jnp.float64), w.astype(jnp.float64)
        layer64 = jaxbn.batch_norm(param_dtype=jnp.float64)
        p64, s64 = layer64.init(x64)

        def f(x):
            return layer64.apply(p64, s64, x, train=True, weights=w64)[0]

        check_grads(f, (x64,), order=1, modes=("fwd", "rev"))


def test_nan_under_zero_weight_reaches_nothing():
    x = data((8, 2))
    x[3] = np.nan
    w = np.ones((8, 1), np.float32)
    w[3] = 0.0
    layer = jaxbn.batch_norm()
    params, stats = layer.init(x)

    def loss(p, x):
        y, s = layer.apply(p, stats, x, train=True, weights=w)
        return jnp.sum(jnp.where(w > 0, y, 0.0)), s

    (val, new), grads = jax.value_and_grad(loss, has_aux=True, argnums=(0, 1))(
        params, jnp.asarray(x)
    )
    assert np.isfinite(val) and np.all(np.isfinite(new["var"]))
    assert all(np.all(np.isfinite(g)) for g in jax.tree.leaves(grads))


def test_weights_errors():
    x = jnp.ones((4, 3))
    layer = jaxbn.batch_norm()
    params, stats = layer.init(x)
    cases = [
        (
            jnp.ones((4, 1), jnp.int32),
            TypeError,
            "weights must be a real floating array",
        ),
        (jnp.ones((4, 1), bool), TypeError, "for a boolean mask use mask="),
        (jnp.ones((5, 1)), ValueError, r"weights has shape \(5, 1\)"),
        (jnp.ones((2, 4, 3)), ValueError, "does not broadcast"),
        (-jnp.ones((4, 1)), ValueError, "weights has negative entries"),
    ]
    for w, error, match in cases:
        with pytest.raises(error, match=match):
            layer.apply(params, stats, x, train=True, weights=w)
