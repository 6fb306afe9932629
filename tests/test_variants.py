"""Training-time variants of the running statistics: cumulative average, frozen
statistics, the unbiased running variance, against NumPy float64 and PyTorch.

Tolerances: outputs are float32 normalizations of O(1) values (a few ulps of
float32, ~1e-6 relative, amplified by at most rsqrt(var + eps) ~ 1): 1e-5.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import reference as ref

import jaxbn


def batches(n, shape=(8, 3), seed=0):
    rng = np.random.default_rng(seed)
    return [
        (1.0 + k + (1 + k) * rng.standard_normal(shape)).astype(np.float32)
        for k in range(n)
    ]


@pytest.mark.parametrize("use_jit", [False, True])
def test_momentum_none_keeps_the_exact_average_of_all_batches(use_jit):
    xs = batches(5)
    layer = jaxbn.batch_norm(momentum=None)
    params, stats = layer.init(xs[0])
    step = lambda s, x: layer.apply(params, s, x, train=True)  # noqa: E731
    step = jax.jit(step) if use_jit else step
    for x in xs:
        _, stats = step(stats, jnp.asarray(x))
    moments = [ref.moments(x, -1) for x in xs]
    want_mean = np.mean([m[1] for m in moments], axis=0)
    want_var = np.mean([m[2] for m in moments], axis=0)
    # Five float32 blends of O(10) values: a few ulps each.
    np.testing.assert_allclose(stats["mean"], want_mean, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(stats["var"], want_var, rtol=1e-5)
    assert int(stats["count"]) == 5


def test_momentum_none_first_batch_is_taken_exactly():
    x = batches(1)[0]
    layer = jaxbn.batch_norm(momentum=None)
    params, stats = layer.init(x)
    _, new = layer.apply(params, stats, jnp.asarray(x), train=True)
    m = jaxbn.batch_moments(jnp.asarray(x), (0,))
    np.testing.assert_array_equal(new["mean"], m.mean[0])
    np.testing.assert_array_equal(new["var"], m.var[0])


@pytest.mark.parametrize("use_jit", [False, True])
def test_momentum_one_freezes_running_statistics_bitwise(use_jit):
    x = jnp.asarray(batches(1, (16, 4))[0])
    layer = jaxbn.batch_norm(momentum=1.0)
    params, stats = layer.init(x)
    rng = np.random.default_rng(3)
    stats = {
        "mean": jnp.asarray(rng.standard_normal(4), jnp.float32),
        "var": jnp.asarray(rng.uniform(0.1, 3.0, 4), jnp.float32),
        "count": jnp.int32(7),
    }
    step = lambda s, x, t: layer.apply(params, s, x, train=t)  # noqa: E731
    step = jax.jit(step) if use_jit else step
    for train in (True, jnp.bool_(True), jnp.bool_(False)):
        y, new = step(stats, x, train)
        for k in stats:
            np.testing.assert_array_equal(new[k], stats[k])
            assert new[k].dtype == stats[k].dtype
    # Training still normalizes with the batch's statistics.
    y, _ = layer.apply(params, stats, x, train=True)
    _, mean, var = ref.moments(np.asarray(x), -1)
    np.testing.assert_allclose(
        y, ref.normalize(np.asarray(x), -1, mean, var), rtol=1e-5, atol=1e-5
    )


def test_frozen_statistics_take_gradients_like_plain_training():
    x = jnp.asarray(batches(1, (16, 4))[0])
    frozen, plain = jaxbn.batch_norm(momentum=1.0), jaxbn.batch_norm()
    params, stats = plain.init(x)

    def loss(layer):
        return lambda p, x: jnp.sum(jnp.sin(layer.apply(p, stats, x, train=True)[0]))

    g1 = jax.grad(loss(frozen), argnums=(0, 1))(params, x)
    g2 = jax.grad(loss(plain), argnums=(0, 1))(params, x)
    jax.tree.map(np.testing.assert_array_equal, g1, g2)


@pytest.mark.parametrize("n", [2, 3, 17])
def test_unbiased_running_variance_matches_numpy(n):
    x = batches(1, (n, 3))[0]
    layer = jaxbn.batch_norm(momentum=0.9, warmup=False, running_var="unbiased")
    params, stats = layer.init(x)
    y, new = layer.apply(params, stats, jnp.asarray(x), train=True)
    _, mean, var = ref.moments(x, -1)
    # Normalization still uses the biased variance.
    np.testing.assert_allclose(y, ref.normalize(x, -1, mean, var), rtol=1e-5, atol=1e-5)
    want = 0.9 * 1.0 + 0.1 * var * n / (n - 1)
    np.testing.assert_allclose(new["var"], want, rtol=1e-6)


def test_unbiased_running_variance_counts_masked_values_only():
    x = batches(1, (6, 2))[0]
    mask = jnp.asarray([True, True, True, False, False, False])[:, None]
    layer = jaxbn.batch_norm(momentum=0.0, warmup=False, running_var="unbiased")
    params, stats = layer.init(x)
    _, new = layer.apply(params, stats, jnp.asarray(x), train=True, mask=mask)
    np.testing.assert_allclose(new["var"], np.var(x[:3], axis=0, ddof=1), rtol=1e-6)


def _torch():
    return pytest.importorskip(
        "torch", reason="PyTorch (interop extra) is not installed"
    )


@pytest.mark.parametrize(
    ("n", "torch_momentum"), [(2, 0.1), (3, 0.1), (17, 0.1), (3, None)]
)
def test_unbiased_running_variance_matches_torch_batchnorm1d(n, torch_momentum):
    torch = _torch()
    xs = batches(4, (n, 5), seed=n)
    bn = torch.nn.BatchNorm1d(5, eps=1e-5, momentum=torch_momentum)
    with torch.no_grad():
        bn.weight.copy_(torch.linspace(0.5, 2.0, 5))
        bn.bias.copy_(torch.linspace(-1.0, 1.0, 5))
    momentum = None if torch_momentum is None else 1.0 - torch_momentum
    layer = jaxbn.batch_norm(momentum=momentum, warmup=False, running_var="unbiased")
    _, stats = layer.init(xs[0])
    params = {
        "scale": jnp.asarray(bn.weight.detach().numpy()),
        "bias": jnp.asarray(bn.bias.detach().numpy()),
    }
    step = jax.jit(lambda s, x: layer.apply(params, s, x, train=True))
    bn.train()
    for x in xs:
        y_torch = bn(torch.from_numpy(x)).detach().numpy()
        y, stats = step(stats, jnp.asarray(x))
        # float32 both sides, O(1) outputs, different summation orders.
        np.testing.assert_allclose(y, y_torch, rtol=1e-5, atol=2e-5)
        np.testing.assert_allclose(
            stats["mean"], bn.running_mean.numpy(), rtol=1e-5, atol=1e-5
        )
        np.testing.assert_allclose(stats["var"], bn.running_var.numpy(), rtol=1e-5)
    bn.eval()
    y_torch = bn(torch.from_numpy(xs[0])).detach().numpy()
    y, _ = layer.apply(params, stats, jnp.asarray(xs[0]), train=False)
    np.testing.assert_allclose(y, y_torch, rtol=1e-5, atol=2e-5)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        (
            {"momentum": None, "warmup": True},
            ValueError,
            "warmup=True with momentum=None",
        ),
        (
            {"momentum": 1.0, "warmup": True},
            ValueError,
            "warmup=True with momentum=1.0",
        ),
        ({"momentum": 1.5}, ValueError, r"momentum must be in \[0, 1\] or None"),
        ({"momentum": "0.9"}, TypeError, "momentum must be a Python float"),
        ({"warmup": 1}, TypeError, "warmup must be a bool or None"),
        ({"running_var": "sample"}, ValueError, "running_var='sample' is not known"),
    ],
)
def test_variant_hyperparameter_errors(kwargs, error, match):
    with pytest.raises(error, match=match):
        jaxbn.batch_norm(**kwargs)


def test_readme_fine_tuning_recipe_freezes_batch_norm_parameters_and_statistics():
    optax = pytest.importorskip("optax", reason="optax (test extra) is not installed")
    layer = jaxbn.batch_norm()
    x = jnp.asarray(batches(1, (8, 4))[0])
    bn_params, bn_stats = layer.init(x)
    bn_params = jax.tree.map(lambda a: a + 0.5, bn_params)
    params = {"dense": {"w": jnp.eye(4) + 0.1}, "bn": bn_params}
    labels = {
        "dense": {"w": "train"},
        "bn": jax.tree.map(lambda _: "freeze", bn_params),
    }
    tx = optax.multi_transform(
        {"train": optax.adam(1e-2), "freeze": optax.set_to_zero()}, labels
    )
    opt_state = tx.init(params)

    def loss(params, x):
        h = x @ params["dense"]["w"]
        y, stats = layer.apply(params["bn"], bn_stats, h, train=False)
        return jnp.sum(y**2), stats

    (_, stats), grads = jax.value_and_grad(loss, has_aux=True)(params, x)
    assert np.any(np.asarray(grads["bn"]["scale"]) != 0)  # gradients do reach bn
    updates, opt_state = tx.update(grads, opt_state, params)
    new = optax.apply_updates(params, updates)
    jax.tree.map(np.testing.assert_array_equal, new["bn"], params["bn"])
    jax.tree.map(np.testing.assert_array_equal, stats, bn_stats)
    assert np.any(np.asarray(new["dense"]["w"]) != np.asarray(params["dense"]["w"]))
