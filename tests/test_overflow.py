"""Finite input never gives NaN: an overflowing variance normalizes to the bias.

``x = [[1e20], [-1e20], [3e19]]`` in float32 has a variance of about 7e39,
past float32's 3.4e38: the documented outcome is ``var = inf`` and ``y =
bias``, in training (eager and jitted: XLA:CPU's vectorized rsqrt gives NaN
for inf, so the infinite case is chosen explicitly), in evaluation after such
a step (the batch is rejected, the running statistics stay as they were), and
in the gradient (zero for x and the scale, the upstream sum for the bias).
float16 near its maximum (6e4) does not overflow at all (the statistics are
float32) and matches a float64 reference; bfloat16 near 3e38 overflows like
float32.
"""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jaxbn
import jaxbn.equinox
import jaxbn.linen
import jaxbn.nnx

OVERFLOWING = [
    ("float32", jnp.float32, [[1e20], [-1e20], [3e19]]),
    ("bfloat16", jnp.bfloat16, [[3e38], [-3e38], [1e38]]),
    ("bfloat16-same-sign", jnp.bfloat16, [[3e38], [3e38], [1e38]]),
]
BIAS = 0.25


def layer_and_state(x):
    layer = jaxbn.batch_norm(bias_init=lambda k, s, d: jnp.full(s, BIAS, d))
    return (layer, *layer.init(x))


@pytest.mark.parametrize(("name", "dtype", "values"), OVERFLOWING, ids=lambda v: str(v))
@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
def test_overflowing_variance_gives_the_bias(name, dtype, values, jit):
    del name
    x = jnp.asarray(values, dtype)
    layer, params, stats = layer_and_state(x)
    apply = jax.jit(layer.apply, static_argnames="train") if jit else layer.apply
    y, new = apply(params, stats, x, train=True)
    np.testing.assert_array_equal(np.asarray(y, np.float32), np.full((3, 1), BIAS))
    # The batch's statistics are not finite: rejected, as documented.
    assert int(new["count"]) == 0
    np.testing.assert_array_equal(new["mean"], stats["mean"])
    y_eval, _ = apply(params, new, x, train=False)
    assert bool(jnp.all(jnp.isfinite(y_eval.astype(jnp.float32))))


@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
@pytest.mark.parametrize(
    "w_scale",
    # 1e19: sum(dy * (x - mean)) overflows float32 too (|dy * x| ~ 1e39), and
    # the backward's 0 * inf would be NaN without its guard.
    [1.0, 1e19],
    ids=["cotangent-1", "cotangent-1e19"],
)
def test_gradient_of_an_overflowing_batch_is_finite_and_exact(jit, w_scale):
    x = jnp.asarray([[1e20], [-1e20], [3e19]], jnp.float32)
    layer, params, stats = layer_and_state(x)
    w = w_scale * jnp.asarray([[1.0], [2.0], [-0.5]])

    def loss(params, x):
        return jnp.sum(w * layer.apply(params, stats, x, train=True)[0])

    grad = jax.grad(loss, argnums=(0, 1))
    grad = jax.jit(grad) if jit else grad
    g_params, g_x = grad(params, x)
    # y = bias whatever x and the scale: only the bias has a gradient.
    np.testing.assert_array_equal(g_x, jnp.zeros_like(x))
    np.testing.assert_array_equal(g_params["scale"], jnp.zeros(1))
    np.testing.assert_array_equal(g_params["bias"], jnp.sum(w, keepdims=True)[0])


def test_float16_near_its_maximum_matches_float64():
    values = np.array([[6.0e4], [-6.0e4], [3.0e4], [6.5e4]])
    x = jnp.asarray(values, jnp.float16)
    layer, params, stats = layer_and_state(x)
    y, new = jax.jit(lambda p, s, x: layer.apply(p, s, x, train=True))(params, stats, x)
    x64 = np.asarray(x, np.float64)
    want = (x64 - x64.mean()) / np.sqrt(x64.var() + 1e-5) + BIAS
    # float16 output: half a unit in the last place of values near 1.
    np.testing.assert_allclose(np.asarray(y, np.float64), want, atol=2e-3)
    assert int(new["count"]) == 1 and bool(jnp.all(jnp.isfinite(new["var"])))


def test_adapters_normalize_an_overflowing_batch_to_the_bias():
    x = jnp.asarray([[1e20], [-1e20], [3e19]], jnp.float32)
    model = jaxbn.linen.BatchNorm(use_running_average=False)
    variables = model.init(jax.random.key(0), x)
    y, _ = jax.jit(lambda v, x: model.apply(v, x, mutable=["batch_stats"]))(
        variables, x
    )
    np.testing.assert_array_equal(y, jnp.zeros((3, 1)))
    bn = jaxbn.nnx.BatchNorm(1, rngs=nnx.Rngs(0))
    np.testing.assert_array_equal(nnx.jit(lambda m, x: m(x))(bn, x), jnp.zeros((3, 1)))
    layer, state = eqx.nn.make_with_state(jaxbn.equinox.BatchNorm)(1)
    y, _ = eqx.filter_jit(lambda m, s, x: m(x, s))(layer, state, x)
    np.testing.assert_array_equal(y, jnp.zeros((3, 1)))
