"""The statistics are exact and crash-free everywhere (issue: core statistics).

Each test names the failure it pins: the order of the batch, a far first row,
large means, constants, a zero-size batch under a traced flag, an overflowing
variance, a fully masked feature, momentum 0, float64 end to end, complex
input, forward-mode autodiff and higher derivatives. References: NumPy in
float64, and a plain float32 two-pass computation for the accuracy budget.
"""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

import jaxbn

EPS = 1e-5
# float32 unit roundoff: the best a float32 result can be is within this
# relative distance of the exact value.
U32 = 2.0**-24


def _two_pass_float32(x):
    """The plain float32 two-pass variance (mean first, then squared deviations)."""
    x = jnp.asarray(x, jnp.float32)
    mean = jnp.mean(x, axis=0, keepdims=True)
    return jax.jit(lambda x, m: jnp.mean((x - m) ** 2, axis=0))(x, mean)


def _train(x, layer=None, stats=None, **kw):
    layer = layer or jaxbn.batch_norm(**kw)
    params, init_stats = layer.init(x)
    stats = init_stats if stats is None else stats
    y, new = jax.jit(lambda p, s, x: layer.apply(p, s, x, train=True))(params, stats, x)
    return y, new


def _batch_var(x):
    """The batch variance as the layer sees it: momentum 0 stores it exactly."""
    return _train(x, momentum=0.0, warmup=False)[1]["var"]


def _inputs():
    rng = np.random.default_rng(0)
    n, c = 4096, 4
    cases = {}
    for offset in (0.0, 1e2, 1e4, 1e6):
        cases[f"offset-{offset:g}"] = offset + rng.standard_normal((n, c))
    cases["tiny-var-at-1e4"] = 1e4 + 1e-2 * rng.standard_normal((n, c))
    cases["constant"] = np.full((n, c), 3.7) + np.arange(c)
    far = rng.standard_normal((n, c))
    far[0] = 8.0  # the first row 8 standard deviations out
    cases["first-row-8-std-out"] = far
    far6 = rng.standard_normal((n, c))
    far6[0] = -6.0
    cases["first-row-6-std-out"] = far6
    return {k: v.astype(np.float32) for k, v in cases.items()}


CASES = _inputs()


@pytest.mark.parametrize("name", sorted(CASES))
def test_variance_within_twice_a_float32_two_pass_error(name):
    x = CASES[name]
    x64 = x.astype(np.float64)
    var64 = x64.var(0)
    got = np.asarray(_batch_var(jnp.asarray(x)), np.float64)
    two_pass = np.asarray(_two_pass_float32(x), np.float64)
    # Floor: one rounding of the variance, and the squared float32 resolution
    # of the mean (below which a float32 input cannot tell a spread from a
    # constant).
    floor = np.maximum(U32 * var64, (2 * U32 * np.abs(x64.mean(0))) ** 2)
    budget = 2.0 * np.maximum(np.abs(two_pass - var64), floor)
    assert np.all(np.abs(got - var64) <= budget), (got, var64, two_pass)


@pytest.mark.parametrize("name", sorted(CASES))
def test_permuting_the_batch_changes_nothing_beyond_1e_6(name):
    x = jnp.asarray(CASES[name])
    perm = np.random.default_rng(1).permutation(x.shape[0])
    layer = jaxbn.batch_norm(momentum=0.5)
    y, stats = _train(x, layer)
    y_p, stats_p = _train(x[perm], layer)
    scale = float(jnp.max(jnp.abs(y))) or 1.0
    assert float(jnp.max(jnp.abs(y_p - y[perm]))) <= 1e-6 * scale
    # The variance to 1e-6 relative; the mean to 1e-6 of the spread (a mean
    # near 0 has no relative precision to speak of).
    var, var_p = np.asarray(stats["var"], np.float64), np.asarray(stats_p["var"])
    np.testing.assert_allclose(var_p, var, rtol=1e-6, atol=1e-30)
    mean, mean_p = np.asarray(stats["mean"], np.float64), np.asarray(stats_p["mean"])
    spread = np.sqrt(var)
    assert np.all(np.abs(mean_p - mean) <= 1e-6 * np.maximum(spread, np.abs(mean)))


@pytest.mark.parametrize("name", sorted(CASES))
def test_output_matches_float64(name):
    x = CASES[name]
    y, _ = _train(jnp.asarray(x))
    x64 = x.astype(np.float64)
    y64 = (x64 - x64.mean(0)) / np.sqrt(x64.var(0) + EPS)
    # |y| <= sqrt(n); float32 normalization of an exactly centred value is
    # within a few roundings of |y|.
    np.testing.assert_allclose(np.asarray(y, np.float64), y64, rtol=0, atol=4e-6 * 64)


def test_zero_size_batch_under_a_traced_flag():
    layer = jaxbn.batch_norm()
    params, stats = layer.init(jnp.ones((4, 3)))
    step = jax.jit(lambda t, x: layer.apply(params, stats, x, train=t))
    for flag in (True, False):
        y, new = step(jnp.asarray(flag), jnp.zeros((0, 3)))
        assert y.shape == (0, 3)
        chex.assert_trees_all_equal(new, stats)


def test_overflowing_variance_gives_inf_and_the_bias_never_nan():
    x = jnp.array([[1e20], [-1e20], [3e19]], jnp.float32)
    layer = jaxbn.batch_norm()
    params, stats = layer.init(x)
    params = {"scale": jnp.full((1,), 2.0), "bias": jnp.full((1,), 0.5)}
    y, new = layer.apply(params, stats, x, train=True)
    chex.assert_trees_all_equal(y, jnp.full((3, 1), 0.5))
    m = jaxbn.batch_moments(x, (0,))
    assert bool(jnp.isinf(m.var[0, 0]))
    chex.assert_trees_all_equal(new, stats)  # a non-finite batch is not recorded
    # Jitted: eagerly, every operation of the backward pass compiles on its own.
    grads = jax.jit(
        jax.grad(lambda x: jnp.sum(layer.apply(params, stats, x, train=True)[0]))
    )(x)
    assert bool(jnp.all(jnp.isfinite(grads)))


def test_fully_masked_feature_is_normalized_with_the_running_statistics():
    layer = jaxbn.batch_norm()
    x = jnp.asarray(np.random.default_rng(2).standard_normal((6, 2)), jnp.float32)
    params, _ = layer.init(x)
    stats = {
        "mean": jnp.array([5.0, 1.0]),
        "var": jnp.array([4.0, 9.0]),
        "count": jnp.asarray(7, jnp.int32),
    }
    mask = jnp.array([[False, True]] * 6)  # feature 0 has no valid value
    y, new = layer.apply(params, stats, x, train=True, mask=mask)
    y_eval, _ = layer.apply(params, stats, x, train=False)
    chex.assert_trees_all_close(y[:, 0], y_eval[:, 0], rtol=1e-6)
    assert float(new["mean"][0]) == 5.0 and float(new["var"][0]) == 4.0
    assert float(new["mean"][1]) != 1.0  # the valid feature moved


def test_momentum_zero_stores_the_batch_statistics_exactly():
    x = jnp.asarray(CASES["offset-100"])
    m = jaxbn.batch_moments(x, (0,))
    for warmup in (False, True):
        _, new = _train(x, momentum=0.0, warmup=warmup)
        np.testing.assert_array_equal(new["var"], m.var[0])
        np.testing.assert_array_equal(new["mean"], m.mean[0])


def test_lower_rank_mask_broadcasts_like_numpy():
    layer = jaxbn.batch_norm()
    x = jnp.asarray(np.random.default_rng(3).standard_normal((10, 5)), jnp.float32)
    params, stats = layer.init(x)
    mask = jnp.array([True, False, True, True, False])
    y1, s1 = layer.apply(params, stats, x, train=True, mask=mask)
    y2, s2 = layer.apply(params, stats, x, train=True, mask=mask[None, :])
    chex.assert_trees_all_equal((y1, s1), (y2, s2))


def test_allow_one_value_normalizes_to_the_bias():
    layer = jaxbn.batch_norm(allow_one_value=True)
    for x in (jnp.array([[3.0, -1.0]]), jnp.array([3.0, -1.0])):
        params, stats = layer.init(x)
        params = {"scale": jnp.ones(2), "bias": jnp.array([0.25, -0.5])}
        y, new = layer.apply(params, stats, x, train=True)
        chex.assert_trees_all_equal(y, jnp.broadcast_to(params["bias"], x.shape))
        assert int(new["count"]) == 1
    with pytest.raises(ValueError, match="allow_one_value=True"):
        jaxbn.batch_norm().apply(params, stats, jnp.ones((1, 2)), train=True)


# --- float64, complex, every autodiff mode -----------------------------------


def _reference_y(x, scale, bias, eps=EPS):
    """Plain two-pass batch norm, differentiated by JAX's own autodiff."""
    mean = jnp.mean(x, axis=0, keepdims=True)
    var = jnp.mean(jnp.abs(x - mean) ** 2, axis=0, keepdims=True)
    return (x - mean) / jnp.sqrt(var + eps) * scale[None] + bias[None]


def test_float64_end_to_end_and_check_grads_order_two():
    with jax.enable_x64(True):
        rng = np.random.default_rng(4)
        x = jnp.asarray(1e3 + rng.standard_normal((16, 3)), jnp.float64)
        layer = jaxbn.batch_norm()
        _, stats = layer.init(x)
        assert stats["mean"].dtype == jnp.float64
        scale = jnp.asarray(1.0 + 0.2 * rng.standard_normal(3))
        bias = jnp.asarray(0.1 * rng.standard_normal(3))

        def f(x, scale, bias, train=True):
            p = {"scale": scale, "bias": bias}
            return layer.apply(p, stats, x, train=train)[0]

        y = f(x, scale, bias)
        assert y.dtype == jnp.float64
        x64 = np.asarray(x)
        y64 = (x64 - x64.mean(0)) / np.sqrt(x64.var(0) + EPS) * np.asarray(scale)
        np.testing.assert_allclose(np.asarray(y), y64 + np.asarray(bias), atol=1e-12)
        for train in (True, False):
            # Jitted: check_grads then compiles each derivative once, where
            # eagerly it compiles every operation of it.
            check_grads(
                jax.jit(lambda x, s, b, t=train: f(x, s, b, t)),
                (x, scale, bias),
                order=2,
                modes=("fwd", "rev"),
                atol=1e-6,
                rtol=1e-6,
            )


def test_forward_mode_and_hessian_match_autodiff_of_the_reference():
    with jax.enable_x64(True):
        rng = np.random.default_rng(5)
        x = jnp.asarray(rng.standard_normal((6, 2)))
        w = jnp.asarray(rng.standard_normal((6, 2)))
        scale, bias = jnp.array([1.5, 0.7]), jnp.array([0.1, -0.2])
        layer = jaxbn.batch_norm()
        params = {"scale": scale, "bias": bias}
        stats = layer.init(x)[1]

        def ours(x):
            return jnp.sum(w * layer.apply(params, stats, x, train=True)[0] ** 2)

        def ref(x):
            return jnp.sum(w * _reference_y(x, scale, bias) ** 2)

        @jax.jit
        def derivatives(x, tangent):
            """jvp, jacfwd, hessian and linearize of ours and ref, compiled once.

            Eagerly, every operation of each derivative compiles on its own.
            """
            of = {
                f: (jax.jvp(f, (x,), (tangent,)), jax.jacfwd(f)(x), jax.hessian(f)(x))
                for f in (ours, ref)
            }
            return of[ours], of[ref], jax.linearize(ours, x)[1](tangent)

        tangent = jnp.asarray(rng.standard_normal(x.shape))
        (jvp, jac, hess), (jvp_ref, jac_ref, hess_ref), lin = derivatives(x, tangent)
        chex.assert_trees_all_close(jvp, jvp_ref, rtol=1e-9)
        chex.assert_trees_all_close(jac, jac_ref, rtol=1e-9)
        chex.assert_trees_all_close(hess, hess_ref, atol=1e-8)
        chex.assert_trees_all_close(lin, jvp_ref[1])


def test_complex_input_matches_numpy_and_autodiff():
    rng = np.random.default_rng(6)
    z = (rng.standard_normal((32, 3)) + 1j * rng.standard_normal((32, 3))) * 2 + 1j
    x = jnp.asarray(z, jnp.complex64)
    layer = jaxbn.batch_norm(momentum=0.0, warmup=False)
    params, stats = layer.init(x)
    assert stats["mean"].dtype == jnp.complex64 and stats["var"].dtype == jnp.float32
    y, new = layer.apply(params, stats, x, train=True)
    mean, var = z.mean(0), (np.abs(z - z.mean(0)) ** 2).mean(0)
    np.testing.assert_allclose(np.asarray(new["mean"]), mean, atol=1e-5)
    np.testing.assert_allclose(np.asarray(new["var"]), var, rtol=1e-5)
    np.testing.assert_allclose(
        np.asarray(y), (z - mean) / np.sqrt(var + EPS), atol=1e-5
    )
    w = jnp.asarray(rng.standard_normal((32, 3)), jnp.float32)

    def ours(x, scale):
        p = {"scale": scale, "bias": params["bias"]}
        return jnp.sum(w * jnp.abs(layer.apply(p, stats, x, train=True)[0]) ** 2)

    def ref(x, scale):
        return jnp.sum(w * jnp.abs(_reference_y(x, scale, params["bias"])) ** 2)

    got = jax.jit(jax.grad(ours, (0, 1)))(x, params["scale"])
    want = jax.jit(jax.grad(ref, (0, 1)))(x, params["scale"])
    chex.assert_trees_all_close(got, want, atol=2e-4, rtol=1e-4)
    masked = layer.apply(
        params, stats, x, train=True, mask=(jnp.arange(32) < 20)[:, None]
    )
    np.testing.assert_allclose(np.asarray(masked[1]["mean"]), z[:20].mean(0), atol=1e-5)


@pytest.mark.parametrize(
    ("dtype", "masked", "bound"),
    [
        (jnp.float32, False, 0.25),
        (jnp.float32, True, 3.25),
        (jnp.bfloat16, False, 6.25),
        (jnp.bfloat16, True, 11.25),
    ],
)
def test_training_step_scratch_memory(dtype, masked, bound):
    # The backward pass is JAX's transpose of the linear tangent rule: two
    # reductions and one elementwise pass. In float32 nothing full-size is
    # written between them; the bounds (in units of x's bytes, as measured with
    # jax 0.10.2's XLA:CPU) guard the other cases against regressions. The
    # previous custom-VJP implementation measured 0, 2, 6 and 7: the masked path
    # (not yet optimized, see README "Known limitations") costs one more here.
    layer = jaxbn.batch_norm()
    x = jax.random.normal(jax.random.key(5), (32, 8, 8, 64)).astype(dtype)
    mask = (jnp.arange(32) < 27)[:, None, None, None] if masked else None
    params, stats = layer.init(x)

    def loss(x, params, stats, g):
        y, new_stats = layer.apply(params, stats, x, train=True, mask=mask)
        return jnp.sum(y.astype(jnp.float32) * g), new_stats

    step = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))
    g = jnp.ones(x.shape, jnp.float32)
    memory = step.lower(x, params, stats, g).compile().memory_analysis()
    assert memory is not None and memory.temp_size_in_bytes < bound * x.nbytes
