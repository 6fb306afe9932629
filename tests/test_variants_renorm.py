"""Batch renormalization (``renorm=True``) against NumPy float64, autodiff of a
plain formula, and Keras 3's ``BatchNormalization(renorm=True)``.

Tolerances: y is a float32 normalization of O(1) values (a few ulps, 1e-5);
gradients are sums over 32 values of O(1) terms (float32 rounding ~1e-6 each,
so 1e-4 absolute).
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax
from jax.test_util import check_grads

import jaxbn

EPS = 1e-3


def data(n=32, c=4, seed=0, loc=0.0, spread=1.0):
    rng = np.random.default_rng(seed)
    return (loc + spread * rng.standard_normal((n, c))).astype(np.float32)


def renorm_stats(c, seed=5):
    rng = np.random.default_rng(seed)
    return {
        "mean": jnp.asarray(rng.standard_normal(c), jnp.float32),
        "var": jnp.asarray(rng.uniform(0.5, 2.0, c), jnp.float32),
        "count": jnp.int32(3),
        "renorm_mean": jnp.asarray(rng.standard_normal(c), jnp.float32),
        "renorm_std": jnp.asarray(rng.uniform(0.2, 3.0, c), jnp.float32),
    }


def numpy_renorm(x, stats, scale, bias, rmax, dmax, eps=EPS):
    x = np.asarray(x, np.float64)
    mean, var = x.mean(0), x.var(0)
    s = np.sqrt(var + eps)
    ref = np.maximum(np.asarray(stats["renorm_std"], np.float64), np.sqrt(eps))
    r = np.clip(s / ref, 1 / rmax, rmax)
    d = np.clip(
        (mean - np.asarray(stats["renorm_mean"], np.float64)) / ref, -dmax, dmax
    )
    y = ((x - mean) / s * r + d) * np.asarray(scale, np.float64) + np.asarray(bias)
    return y, mean, var, s


def plain_renorm(x, scale, bias, stats, rmax, dmax):
    """Autodiff reference: the formula written plainly, r and d stop_gradient."""
    mean = jnp.mean(x, 0, keepdims=True)
    var = jnp.mean((x - mean) ** 2, 0, keepdims=True)
    s = jnp.sqrt(var + EPS)
    ref = jnp.maximum(stats["renorm_std"][None], jnp.sqrt(EPS))
    r = lax.stop_gradient(jnp.clip(s / ref, 1 / rmax, rmax))
    d = lax.stop_gradient(
        jnp.clip((mean - stats["renorm_mean"][None]) / ref, -dmax, dmax)
    )
    return ((x - mean) / s * r + d) * scale[None] + bias[None]


@pytest.mark.parametrize(
    ("rmax", "dmax", "use_jit"),
    [(1.5, 0.5, True), (100.0, 100.0, False), (1.0, 0.0, True)],
)
def test_renorm_step_matches_numpy(rmax, dmax, use_jit):
    x = data(loc=0.7, spread=1.8)
    layer = jaxbn.batch_norm(
        momentum=0.9,
        epsilon=EPS,
        renorm=True,
        rmax=rmax,
        dmax=dmax,
        renorm_momentum=0.8,
    )
    params, _ = layer.init(x)
    params = {"scale": jnp.linspace(0.5, 2.0, 4), "bias": jnp.linspace(-1.0, 1.0, 4)}
    stats = renorm_stats(4)
    step = lambda s, x: layer.apply(params, s, x, train=True)  # noqa: E731
    y, new = (jax.jit(step) if use_jit else step)(stats, jnp.asarray(x))
    y_ref, mean, var, s = numpy_renorm(
        x, stats, params["scale"], params["bias"], rmax, dmax
    )
    np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-5)
    assert "renorm_mean" in new and "renorm_std" in new  # present with renorm
    np.testing.assert_allclose(
        new["renorm_mean"],
        0.8 * stats["renorm_mean"] + 0.2 * mean,
        rtol=1e-5,
        atol=1e-6,
    )
    np.testing.assert_allclose(
        new["renorm_std"], 0.8 * stats["renorm_std"] + 0.2 * s, rtol=1e-5
    )
    d = min(0.9, 4 / 13)  # warm-up decay at count = 3
    np.testing.assert_allclose(
        new["mean"], d * stats["mean"] + (1 - d) * mean, rtol=1e-5, atol=1e-6
    )
    np.testing.assert_allclose(new["var"], d * stats["var"] + (1 - d) * var, rtol=1e-5)
    assert int(new["count"]) == 4
    # Evaluation is unchanged: the running mean and variance.
    y_eval, same = layer.apply(params, new, jnp.asarray(x), train=False)
    plain = jaxbn.batch_norm(epsilon=EPS)
    want, _ = plain.apply(
        params,
        {k: new[k] for k in ("mean", "var", "count")},
        jnp.asarray(x),
        train=False,
    )
    np.testing.assert_array_equal(y_eval, want)
    assert same is new


def test_rmax_one_dmax_zero_is_plain_batch_norm():
    x = jnp.asarray(data(loc=2.0))
    layer = jaxbn.batch_norm(renorm=True, rmax=1.0, dmax=0.0, epsilon=EPS)
    plain = jaxbn.batch_norm(epsilon=EPS)
    params, _ = layer.init(x)
    y, _ = layer.apply(params, renorm_stats(4), x, train=True)
    want, _ = plain.apply(params, plain.init(x)[1], x, train=True)
    np.testing.assert_allclose(y, want, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize(("rmax", "dmax"), [(1.5, 0.5), (100.0, 100.0)])
def test_renorm_gradients_match_autodiff_with_stopped_r_and_d(rmax, dmax):
    x = jnp.asarray(data(loc=0.7, spread=1.8))
    layer = jaxbn.batch_norm(epsilon=EPS, renorm=True, rmax=rmax, dmax=dmax)
    stats = renorm_stats(4)
    scale, bias = jnp.linspace(0.5, 2.0, 4), jnp.linspace(-1.0, 1.0, 4)
    w = jnp.asarray(data(seed=9))

    def loss(x, scale, bias):
        p = {"scale": scale, "bias": bias}
        return jnp.sum(w * layer.apply(p, stats, x, train=True)[0])

    def ref_loss(x, scale, bias):
        return jnp.sum(w * plain_renorm(x, scale, bias, stats, rmax, dmax))

    got = jax.grad(loss, argnums=(0, 1, 2))(x, scale, bias)
    want = jax.grad(ref_loss, argnums=(0, 1, 2))(x, scale, bias)
    for g, r in zip(got, want, strict=True):
        np.testing.assert_allclose(g, r, rtol=1e-4, atol=1e-4)
    # Forward mode agrees with the reference too.
    t = (jnp.asarray(data(seed=11)), jnp.ones(4), jnp.ones(4))
    _, jvp = jax.jvp(loss, (x, scale, bias), t)
    _, jvp_ref = jax.jvp(ref_loss, (x, scale, bias), t)
    np.testing.assert_allclose(jvp, jvp_ref, rtol=1e-4, atol=1e-3)


def test_renorm_check_grads_float64():
    with jax.enable_x64(True):
        x = jnp.asarray(data(n=8, c=3, loc=0.5), jnp.float64)
        layer = jaxbn.batch_norm(epsilon=EPS, renorm=True, rmax=1.2, dmax=0.3)
        params, stats = layer.init(x)
        stats = {
            k: v.astype(jnp.float64) if k != "count" else v
            for k, v in renorm_stats(3).items()
        }

        def f(x, scale, bias):
            return layer.apply({"scale": scale, "bias": bias}, stats, x, train=True)[0]

        check_grads(
            f,
            (
                x,
                params["scale"].astype(jnp.float64) + 0.5,
                params["bias"].astype(jnp.float64),
            ),
            order=1,
            modes=("fwd", "rev"),
        )


def test_rmax_and_dmax_schedules_are_functions_of_count():
    x = jnp.asarray(data(loc=3.0, spread=3.0))
    rmax = lambda c: 1.0 + jnp.minimum(c, 20) / 10.0  # noqa: E731
    dmax = lambda c: jnp.minimum(c, 20) / 4.0  # noqa: E731
    layer = jaxbn.batch_norm(epsilon=EPS, renorm=True, rmax=rmax, dmax=dmax)
    params, _ = layer.init(x)
    for count in (0, 4, 50):
        stats = dict(renorm_stats(4), count=jnp.int32(count))
        y, _ = jax.jit(lambda s: layer.apply(params, s, x, train=True))(stats)
        c = min(count, 20)
        y_ref, *_ = numpy_renorm(x, stats, 1.0, 0.0, 1.0 + c / 10.0, c / 4.0)
        np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"renorm": True, "rmax": 0.5}, ValueError, "rmax=0.5 is below 1.0"),
        ({"renorm": True, "dmax": -1.0}, ValueError, "dmax=-1.0 is below 0.0"),
        ({"renorm": True, "rmax": "3"}, TypeError, "rmax must be a Python float"),
        (
            {"renorm": True, "renorm_momentum": 1.5},
            ValueError,
            "renorm_momentum=1.5 must be in",
        ),
        ({"rmax": 3.0}, ValueError, "rmax given but renorm=False"),
        ({"renorm": 1}, TypeError, "renorm must be a bool"),
    ],
)
def test_renorm_errors(kwargs, error, match):
    with pytest.raises(error, match=match):
        jaxbn.batch_norm(**kwargs)


def test_renorm_state_errors():
    x = jnp.ones((4, 2))
    layer = jaxbn.batch_norm(renorm=True)
    params, stats = layer.init(x)
    assert set(stats) == {"mean", "var", "count", "renorm_mean", "renorm_std"}
    plain_stats = jaxbn.batch_norm().init(x)[1]
    with pytest.raises(ValueError, match="missing"):
        layer.apply(params, plain_stats, x, train=True)
    with pytest.raises(ValueError, match=r"rmax\(count\) must return a scalar"):
        bad = jaxbn.batch_norm(renorm=True, rmax=lambda c: jnp.ones(2) * 3)
        bad.apply(params, stats, x, train=True)
    with pytest.raises(TypeError, match="real input only"):
        xc = jnp.ones((4, 2), jnp.complex64)
        p, s = layer.init(xc)
        layer.apply(p, s, xc, train=True)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_keras_renorm_parity_over_several_steps():
    os.environ.setdefault("KERAS_BACKEND", "jax")
    keras = pytest.importorskip(
        "keras", reason="Keras 3 (interop extra) is not installed"
    )
    if keras.backend.backend() != "jax":
        pytest.skip(f"Keras runs on {keras.backend.backend()}, not on JAX")
    rmax, dmax = 2.0, 1.0
    bn = keras.layers.BatchNormalization(
        momentum=0.9,
        epsilon=EPS,
        renorm=True,
        renorm_clipping={"rmax": rmax, "rmin": 1.0 / rmax, "dmax": dmax},
        renorm_momentum=0.7,
    )
    bn.build((32, 4))
    bn.gamma.assign(np.linspace(0.5, 2.0, 4).astype(np.float32))
    bn.beta.assign(np.linspace(-1.0, 1.0, 4).astype(np.float32))
    layer = jaxbn.batch_norm(
        momentum=0.9,
        epsilon=EPS,
        warmup=False,
        renorm=True,
        rmax=rmax,
        dmax=dmax,
        renorm_momentum=0.7,
    )
    params = {
        "scale": jnp.asarray(bn.gamma.numpy()),
        "bias": jnp.asarray(bn.beta.numpy()),
    }
    _, stats = layer.init(jnp.ones((32, 4)))
    step = jax.jit(lambda s, x: layer.apply(params, s, x, train=True))
    # Shifting data so that r and d are clipped in the early steps.
    for k in range(6):
        x = data(seed=k, loc=3.0 - k, spread=0.3 + k)
        y_keras = np.asarray(bn(x, training=True))
        y, stats = step(stats, jnp.asarray(x))
        # float32 both sides; O(1) outputs: a few ulps of |y| <= 10.
        np.testing.assert_allclose(y, y_keras, rtol=1e-5, atol=2e-5)
        np.testing.assert_allclose(
            stats["renorm_mean"], np.asarray(bn.renorm_mean), rtol=1e-5, atol=1e-6
        )
        np.testing.assert_allclose(
            stats["renorm_std"], np.asarray(bn.renorm_stddev), rtol=1e-5
        )
        np.testing.assert_allclose(
            stats["mean"], np.asarray(bn.moving_mean), rtol=1e-5, atol=1e-6
        )
