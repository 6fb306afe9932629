"""One test per user pain that jaxbn removes by design (see README, "Pitfalls")."""

from __future__ import annotations

import chex
import flax.serialization
import jax
import jax.extend.core
import jax.numpy as jnp
import numpy as np
import pytest
import reference as ref

import jaxbn

REDUCTIONS = {
    "reduce_sum",
    "reduce_max",
    "reduce_min",
    "reduce_prod",
    "argmax",
    "argmin",
}


def _primitives(jaxpr) -> set[str]:
    names = set()
    for eqn in jaxpr.eqns:
        names.add(eqn.primitive.name)
        for sub in jax.extend.core.jaxprs_in_params(eqn.params):
            names |= _primitives(sub)
    return names


def test_pain_stats_update_cannot_be_forgotten():
    """apply returns the new statistics in both modes: the update is a return value."""
    layer = jaxbn.batch_norm()
    x = jnp.asarray(np.random.default_rng(0).normal(3.0, 2.0, (32, 4)), jnp.float32)
    params, stats = layer.init(x)
    out_train = layer.apply(params, stats, x, train=True)
    out_eval = layer.apply(params, stats, x, train=False)
    assert jax.tree.structure(out_train) == jax.tree.structure(out_eval)
    _, new = out_train
    assert int(new["count"]) == 1
    assert not np.allclose(new["mean"], stats["mean"])
    # A jitted train step that drops the statistics cannot compile it away by
    # mistake: the only way to get the output is together with the statistics.
    assert isinstance(out_train, tuple) and len(out_train) == 2


def test_pain_cold_start_decay_0999():
    """momentum=0.999: after 300 steps the running statistics track the data."""
    rng = np.random.default_rng(1)
    results = {}
    for warmup in (False, True):
        layer = jaxbn.batch_norm(momentum=0.999, warmup=warmup)
        params, stats = layer.init(jax.ShapeDtypeStruct((128, 8), jnp.float32))
        step = jax.jit(lambda p, s, x, layer=layer: layer.apply(p, s, x, train=True))
        for _ in range(300):
            x = jnp.asarray(rng.normal(5.0, 2.0, (128, 8)), jnp.float32)
            _, stats = step(params, stats, x)
        results[warmup] = stats
    # Plain EMA: still 74% of the initial mean 0 after 300 steps (0.999**300).
    assert np.all(np.asarray(results[False]["mean"]) < 2.0)
    # Warm-up: within 2% of the true mean and variance.
    np.testing.assert_allclose(results[True]["mean"], 5.0, rtol=0.02)
    np.testing.assert_allclose(results[True]["var"], 4.0, rtol=0.05)
    assert float(jaxbn.decay(jnp.int32(300), 0.999, True)) < 0.98


def test_pain_traced_train_flag():
    """A traced boolean serves both modes with one compilation."""
    layer = jaxbn.batch_norm()
    x = jnp.asarray(np.random.default_rng(2).normal(1.0, 1.0, (16, 3)), jnp.float32)
    params, stats = layer.init(x)

    @jax.jit
    @chex.assert_max_traces(n=1)
    def step(p, s, x, train):
        return layer.apply(p, s, x, train=train)

    _, s_train = step(params, stats, x, jnp.asarray(True))
    y_eval, s_eval = step(params, s_train, x, jnp.asarray(False))
    _, s_again = step(params, s_train, x, jnp.asarray(True))
    assert int(s_train["count"]) == 1 and int(s_again["count"]) == 2
    for k in stats:
        np.testing.assert_array_equal(s_eval[k], s_train[k])
    y_ref, _ = layer.apply(params, s_train, x, train=False)
    np.testing.assert_allclose(y_eval, y_ref, rtol=1e-6)


def test_pain_python_bool_compiles_at_most_twice():
    layer = jaxbn.batch_norm()
    x = jnp.ones((8, 3))
    params, stats = layer.init(x)

    @chex.assert_max_traces(n=2)
    def step(p, s, x, train):
        return layer.apply(p, s, x, train=train)

    jitted = jax.jit(step, static_argnames="train")
    for train in (True, False, True, False, True):
        jitted(params, stats, x, train=train)


def test_pain_no_moments_in_eval():
    """Evaluation computes no batch statistics: no reduction in the jaxpr or HLO."""
    layer = jaxbn.batch_norm(axis=(1, 3))
    x = jnp.ones((4, 3, 5, 2))
    params, stats = layer.init(x)

    def evaluate(p, s, x):
        return layer.apply(p, s, x, train=False)

    jaxpr = jax.make_jaxpr(evaluate)(params, stats, x)
    assert not _primitives(jaxpr.jaxpr) & REDUCTIONS
    hlo = jax.jit(evaluate).lower(params, stats, x).compile().as_text()
    assert hlo is not None and "reduce(" not in hlo
    # The check can fail: the training jaxpr does reduce.
    train_jaxpr = jax.make_jaxpr(lambda p, s, x: layer.apply(p, s, x, train=True))
    assert _primitives(train_jaxpr(params, stats, x).jaxpr) & REDUCTIONS


@pytest.mark.parametrize(
    ("offset", "var_rtol", "y_atol"), [(1e4, 1e-4, 1e-3), (1e6, 3e-4, 0.03)]
)
def test_pain_negative_variance(offset, var_rtol, y_atol):
    """Large mean offsets: the variance stays positive and accurate."""
    rng = np.random.default_rng(3)
    x = jnp.asarray(offset + rng.standard_normal((4096, 8)), jnp.float32)
    xr = np.asarray(x, np.float64)
    _, mean, var = ref.moments(xr, -1)
    layer = jaxbn.batch_norm(momentum=0.0)  # running stats = batch stats
    params, stats = layer.init(x)
    y, new = jax.jit(lambda p, s, x: layer.apply(p, s, x, train=True))(params, stats, x)
    assert np.all(np.asarray(new["var"]) > 0)
    np.testing.assert_allclose(new["var"], var, rtol=var_rtol)
    np.testing.assert_allclose(y, ref.normalize(xr, -1, mean, var), atol=y_atol)
    # The unshifted single pass E[x^2] - E[x]^2 in float32 fails this test.
    naive = jnp.mean(x * x, axis=0) - jnp.mean(x, axis=0) ** 2
    assert not np.allclose(naive, var, rtol=var_rtol)


def test_pain_float16_variance_overflow():
    """float16 x whose variance exceeds float16's range: finite float32 stats."""
    rng = np.random.default_rng(4)
    x = jnp.asarray(300.0 * rng.standard_normal((10**6, 2)), jnp.float16)
    assert not np.all(np.isfinite(np.asarray(x * x)))  # x**2 overflows float16
    layer = jaxbn.batch_norm(momentum=0.0)
    params, stats = layer.init(x)
    y, new = jax.jit(lambda p, s, x: layer.apply(p, s, x, train=True))(params, stats, x)
    assert np.all(np.isfinite(np.asarray(new["var"])))
    np.testing.assert_allclose(new["var"], 9e4, rtol=0.01)
    np.testing.assert_allclose(
        np.std(np.asarray(y, np.float32), axis=0), 1.0, rtol=1e-2
    )


def test_pain_batch_size_one_eval():
    layer = jaxbn.batch_norm()
    rng = np.random.default_rng(5)
    x = jnp.asarray(rng.normal(2.0, 3.0, (64, 4)), jnp.float32)
    params, stats = layer.init(x)
    _, stats = layer.apply(params, stats, x, train=True)
    y_all, _ = layer.apply(params, stats, x, train=False)
    ones = [layer.apply(params, stats, x[i : i + 1], train=False)[0] for i in range(4)]
    np.testing.assert_array_equal(np.concatenate(ones), y_all[:4])


def test_pain_nan_batch_poisons_statistics():
    layer = jaxbn.batch_norm()
    x = np.ones((8, 3), np.float32)
    x[0, 0] = np.nan
    params, stats = layer.init(x)
    _, after = layer.apply(params, stats, jnp.asarray(x), train=True)
    assert np.all(np.isfinite(np.asarray(after["mean"])))
    assert int(after["count"]) == 0


def test_pain_stats_missing_from_checkpoint(tmp_path):
    """The statistics are a plain pytree: serializing it keeps every leaf."""
    layer = jaxbn.batch_norm()
    x = jnp.asarray(np.random.default_rng(6).normal(size=(16, 3)), jnp.float32)
    params, stats = layer.init(x)
    _, stats = layer.apply(params, stats, x, train=True)
    state = {"params": params, "batch_stats": stats}
    path = tmp_path / "state.msgpack"
    path.write_bytes(flax.serialization.to_bytes(state))
    fresh = {"params": params, "batch_stats": layer.init(x)[1]}
    restored = flax.serialization.from_bytes(fresh, path.read_bytes())
    chex.assert_trees_all_equal(restored, state)
    y1, _ = layer.apply(params, stats, x, train=False)
    y2, _ = layer.apply(restored["params"], restored["batch_stats"], x, train=False)
    np.testing.assert_array_equal(y1, y2)


def test_pain_train_and_eval_use_different_variables():
    """One params/batch_stats pair serves both modes; nothing is created per mode."""
    layer = jaxbn.batch_norm()
    x = jnp.ones((4, 3))
    params, stats = layer.init(x)
    _, new = layer.apply(params, stats, x * 2, train=True)
    assert jax.tree.structure(new) == jax.tree.structure(stats)
    _y, same = layer.apply(params, new, x, train=False)
    assert same is new
