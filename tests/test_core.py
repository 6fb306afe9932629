"""The functional core against a NumPy float64 reference, with and without jit."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import reference as ref

import jaxbn

CASES = [
    ((16, 5), -1),
    ((8, 4, 4, 3), -1),
    ((6, 3, 5, 5), 1),
    ((4, 3, 5, 2), (1, 3)),
    ((7, 2, 3), (-2, -1)),
]


def data(shape, seed=0, offset=0.0, spread=1.0):
    rng = np.random.default_rng(seed)
    return (offset + spread * rng.standard_normal(shape)).astype(np.float32)


def random_params(feature_shape, seed=1):
    rng = np.random.default_rng(seed)
    return {
        "scale": jnp.asarray(rng.uniform(0.5, 2.0, feature_shape), jnp.float32),
        "bias": jnp.asarray(rng.standard_normal(feature_shape), jnp.float32),
    }


def maybe_jit(fn, use_jit):
    return jax.jit(fn) if use_jit else fn


@pytest.mark.parametrize("use_jit", [False, True])
@pytest.mark.parametrize(("shape", "axis"), CASES)
def test_training_step_matches_reference(shape, axis, use_jit):
    x = data(shape, offset=3.0, spread=2.0)
    layer = jaxbn.batch_norm(axis=axis, momentum=0.9)
    _, stats = layer.init(x)
    params = random_params(stats["mean"].shape)
    step = maybe_jit(lambda p, s, x: layer.apply(p, s, x, train=True), use_jit)
    y, new = step(params, stats, jnp.asarray(x))
    np_stats = {k: np.asarray(v, np.float64) for k, v in stats.items()}
    scale, bias = np.asarray(params["scale"]), np.asarray(params["bias"])
    y_ref, new_ref = ref.train_step(x, axis, np_stats, 0.9, True, scale, bias)
    np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(new["mean"], new_ref["mean"], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(new["var"], new_ref["var"], rtol=1e-5, atol=1e-6)
    assert int(new["count"]) == 1
    assert new["mean"].dtype == jnp.float32
    assert new["var"].dtype == jnp.float32
    assert new["count"].dtype == jnp.int32
    assert y.dtype == jnp.float32 and y.shape == x.shape


@pytest.mark.parametrize("warmup", [False, True])
@pytest.mark.parametrize("use_jit", [False, True])
def test_running_statistics_over_several_steps(warmup, use_jit):
    layer = jaxbn.batch_norm(axis=-1, momentum=0.95, warmup=warmup)
    params, stats = layer.init(jax.ShapeDtypeStruct((32, 4), jnp.float32))
    np_stats = {k: np.asarray(v, np.float64) for k, v in stats.items()}
    step = maybe_jit(lambda p, s, x: layer.apply(p, s, x, train=True), use_jit)
    for i in range(25):
        x = data((32, 4), seed=i, offset=float(i) / 5, spread=1.0 + i / 10)
        _, stats = step(params, stats, jnp.asarray(x))
        _, np_stats = ref.train_step(x, -1, np_stats, 0.95, warmup)
    np.testing.assert_allclose(stats["mean"], np_stats["mean"], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(stats["var"], np_stats["var"], rtol=1e-5, atol=1e-6)
    assert int(stats["count"]) == 25


@pytest.mark.parametrize("use_jit", [False, True])
@pytest.mark.parametrize(("shape", "axis"), CASES)
def test_evaluation_uses_running_statistics(shape, axis, use_jit):
    layer = jaxbn.batch_norm(axis=axis)
    x = data(shape, seed=3, offset=-2.0, spread=3.0)
    _, stats = layer.init(x)
    params = random_params(stats["mean"].shape)
    rng = np.random.default_rng(4)
    stats = {
        "mean": jnp.asarray(rng.standard_normal(stats["mean"].shape), jnp.float32),
        "var": jnp.asarray(rng.uniform(0.5, 4, stats["var"].shape), jnp.float32),
        "count": jnp.int32(7),
    }
    evaluate = maybe_jit(lambda p, s, x: layer.apply(p, s, x, train=False), use_jit)
    y, same = evaluate(params, stats, jnp.asarray(x))
    y_ref = ref.normalize(
        x,
        axis,
        np.asarray(stats["mean"]),
        np.asarray(stats["var"]),
        np.asarray(params["scale"]),
        np.asarray(params["bias"]),
    )
    np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-5)
    for k in stats:
        np.testing.assert_array_equal(same[k], stats[k])


@pytest.mark.parametrize(("shape", "axis"), CASES[:4])
def test_gradients_match_float64_finite_differences(shape, axis):
    x = data(shape, seed=5, offset=1.0)
    layer = jaxbn.batch_norm(axis=axis)
    _, stats = layer.init(x)
    params = random_params(stats["mean"].shape, seed=6)
    cot = data(shape, seed=7)

    def loss(x, p):
        y, _ = layer.apply(p, stats, x, train=True)
        return jnp.sum(y * cot)

    gx, gp = jax.jit(jax.grad(loss, argnums=(0, 1)))(jnp.asarray(x), params)
    fx, fs, fb = ref.loss_grad_fd(
        x, axis, cot, np.asarray(params["scale"]), np.asarray(params["bias"])
    )
    np.testing.assert_allclose(gx, fx, rtol=2e-3, atol=2e-3)
    np.testing.assert_allclose(gp["scale"], fs, rtol=2e-3, atol=2e-3)
    np.testing.assert_allclose(gp["bias"], fb, rtol=2e-3, atol=2e-3)


def test_gradient_invariants():
    """Per feature, dL/dx sums to zero and is orthogonal to the normalized x."""
    x = jnp.asarray(data((64, 6), seed=8, offset=5.0, spread=2.0))
    cot = jnp.asarray(data((64, 6), seed=9))
    layer = jaxbn.batch_norm(center=False, scale=False)
    params, stats = layer.init(x)
    gx = jax.grad(
        lambda x: jnp.sum(layer.apply(params, stats, x, train=True)[0] * cot)
    )(x)
    xhat, _ = layer.apply(params, stats, x, train=True)
    np.testing.assert_allclose(jnp.sum(gx, axis=0), 0.0, atol=1e-4)
    np.testing.assert_allclose(jnp.sum(gx * xhat, axis=0), 0.0, atol=1e-4)


def test_running_statistics_carry_no_gradient():
    x = jnp.asarray(data((16, 3)))
    layer = jaxbn.batch_norm()
    params, stats = layer.init(x)

    def stats_loss(x):
        _, new = layer.apply(params, stats, x, train=True)
        return jnp.sum(new["mean"]) + jnp.sum(new["var"])

    np.testing.assert_array_equal(jax.grad(stats_loss)(x), 0.0)


def test_permuting_the_batch_permutes_the_output():
    x = jnp.asarray(data((32, 4), seed=10))
    perm = np.random.default_rng(0).permutation(32)
    layer = jaxbn.batch_norm()
    params, stats = layer.init(x)
    y, s1 = layer.apply(params, stats, x, train=True)
    yp, s2 = layer.apply(params, stats, x[perm], train=True)
    np.testing.assert_allclose(yp, y[perm], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(s1["var"], s2["var"], rtol=1e-6)


def test_evaluation_of_one_example_does_not_depend_on_the_others():
    layer = jaxbn.batch_norm()
    x = jnp.asarray(data((8, 5), seed=11))
    params, stats = layer.init(x)
    _, stats = layer.apply(params, stats, x, train=True)
    y_all, _ = layer.apply(params, stats, x, train=False)
    other = x.at[1:].set(1e3)
    y_other, _ = layer.apply(params, stats, other, train=False)
    np.testing.assert_array_equal(y_all[0], y_other[0])


def test_no_center_no_scale_and_param_keys():
    layer = jaxbn.batch_norm(center=False, scale=False)
    params, stats = layer.init(jnp.zeros((4, 3)))
    assert params == {}
    assert set(stats) == {"mean", "var", "count"}
    only_scale = jaxbn.batch_norm(center=False).init(jnp.zeros((4, 3)))[0]
    assert set(only_scale) == {"scale"}


def test_random_initializers_get_the_key():
    def normal_init(key, shape, dtype):
        return jax.random.normal(key, shape, dtype)

    layer = jaxbn.batch_norm(scale_init=normal_init, bias_init=normal_init)
    x = jax.ShapeDtypeStruct((4, 3), jnp.float32)
    a, _ = layer.init(x, key=jax.random.key(1))
    b, _ = layer.init(x, key=jax.random.key(2))
    assert not np.allclose(a["scale"], b["scale"])
    assert not np.allclose(a["scale"], a["bias"])


def test_init_reads_only_shape_and_dtype():
    layer = jaxbn.batch_norm(axis=(1, 2), param_dtype=jnp.bfloat16)
    spec = jax.ShapeDtypeStruct((2, 3, 4, 5), jnp.float16)
    params, stats = jax.eval_shape(layer.init, spec)
    assert params["scale"].shape == (3, 4) and params["scale"].dtype == jnp.bfloat16
    assert stats["mean"].shape == (3, 4) and stats["mean"].dtype == jnp.float32
    assert stats["count"].shape == () and stats["count"].dtype == jnp.int32


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_low_precision_input_float32_statistics(dtype):
    x32 = data((64, 8), seed=12, offset=2.0, spread=3.0)
    x = jnp.asarray(x32, dtype)
    layer = jaxbn.batch_norm()
    params, stats = layer.init(x)
    y, new = jax.jit(lambda p, s, x: layer.apply(p, s, x, train=True))(params, stats, x)
    assert y.dtype == dtype
    assert new["mean"].dtype == jnp.float32
    xr = np.asarray(x.astype(jnp.float32), np.float64)
    _, mean, var = ref.moments(xr, -1)
    np.testing.assert_allclose(new["mean"], 0.9 * mean, rtol=1e-5, atol=1e-6)
    y_ref = ref.normalize(xr, -1, mean, var)
    np.testing.assert_allclose(np.asarray(y, np.float32), y_ref, atol=0.05)


def test_output_dtype_option():
    layer = jaxbn.batch_norm(dtype=jnp.bfloat16)
    x = jnp.asarray(data((16, 4)))
    params, stats = layer.init(x)
    for train in (True, False):
        y, _ = layer.apply(params, stats, x, train=train)
        assert y.dtype == jnp.bfloat16


def test_eval_in_bfloat16_uses_float32_statistics():
    """Eval with dtype=bfloat16 normalizes with float32 statistics (nnx casts them)."""
    layer = jaxbn.batch_norm(dtype=jnp.bfloat16)
    x = jnp.asarray(data((4, 3), seed=13, offset=300.0), jnp.float32)
    params, _ = layer.init(x)
    stats = {
        "mean": jnp.full((3,), 300.7, jnp.float32),
        "var": jnp.full((3,), 1.0, jnp.float32),
        "count": jnp.int32(100),
    }
    y, _ = layer.apply(params, stats, x, train=False)
    exact = (np.asarray(x, np.float64) - 300.7) / np.sqrt(1.0 + 1e-5)
    # bfloat16 rounding of the output only (~2 decimal digits), no 0.3-std shift.
    np.testing.assert_allclose(np.asarray(y, np.float32), exact, atol=0.02, rtol=0.01)


def test_masked_statistics_ignore_false_entries():
    rng = np.random.default_rng(14)
    x = rng.standard_normal((20, 3)).astype(np.float32)
    mask = rng.uniform(size=(20, 3)) > 0.4
    poisoned = np.where(mask, x, np.nan).astype(np.float32)
    layer = jaxbn.batch_norm(momentum=0.9)
    params, stats = layer.init(x)
    _, new = layer.apply(params, stats, jnp.asarray(poisoned), train=True, mask=mask)
    n, mean, var = ref.moments(x, -1, mask)
    np.testing.assert_allclose(new["mean"], 0.9 * mean, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(new["var"], 0.1 * 1.0 + 0.9 * var, rtol=1e-5)
    assert n.min() > 0


def test_masked_gradients_are_finite_under_nan_padding():
    rng = np.random.default_rng(15)
    x = rng.standard_normal((10, 2)).astype(np.float32)
    mask = np.arange(10)[:, None] < 6
    poisoned = jnp.asarray(np.where(mask, x, np.nan).astype(np.float32))
    layer = jaxbn.batch_norm()
    params, stats = layer.init(x)

    def loss(x):
        y, _ = layer.apply(params, stats, x, train=True, mask=mask)
        return jnp.sum(jnp.where(mask, y, 0.0) ** 2)

    g = jax.grad(loss)(poisoned)
    assert np.all(np.isfinite(np.asarray(g)[:6]))


def test_per_example_mask_broadcasts():
    x = jnp.asarray(data((6, 2, 2, 3), seed=16))
    mask = jnp.asarray(np.array([True, True, False, True, False, True]))[
        :, None, None, None
    ]
    layer = jaxbn.batch_norm()
    params, stats = layer.init(x)
    _, masked = layer.apply(params, stats, x, train=True, mask=mask)
    _, subset = layer.apply(params, stats, x[np.asarray(mask[:, 0, 0, 0])], train=True)
    np.testing.assert_allclose(masked["mean"], subset["mean"], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(masked["var"], subset["var"], rtol=1e-5)


def test_all_masked_batch_leaves_statistics_unchanged():
    x = jnp.asarray(data((8, 3), seed=17))
    layer = jaxbn.batch_norm()
    params, stats = layer.init(x)
    _, stats = layer.apply(params, stats, x, train=True)
    none = jnp.zeros((8, 3), bool)
    y, after = layer.apply(params, stats, x, train=True, mask=none)
    assert np.all(np.isfinite(np.asarray(y)))
    for k in stats:
        np.testing.assert_array_equal(after[k], stats[k])


def test_non_finite_batch_leaves_statistics_unchanged():
    x = np.asarray(data((8, 3), seed=18))
    layer = jaxbn.batch_norm()
    params, stats = layer.init(x)
    _, stats = layer.apply(params, stats, jnp.asarray(x), train=True)
    x[2, 1] = np.inf
    y, after = jax.jit(lambda p, s, x: layer.apply(p, s, x, train=True))(
        params, stats, jnp.asarray(x)
    )
    assert not np.all(np.isfinite(np.asarray(y)))  # the loss shows it
    for k in stats:
        np.testing.assert_array_equal(after[k], stats[k])
