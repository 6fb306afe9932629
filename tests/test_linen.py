"""Tests of ``jaxbn.linen.BatchNorm``: parity with ``flax.linen.BatchNorm`` and pains."""

import functools
from typing import Any

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

import jaxbn.linen

# Any initial parameters do: see the fixture (conftest.py).
pytestmark = pytest.mark.usefixtures("non_partitionable_threefry")


# (axis, x shape) pairs: channels-last, channels-first, two feature axes, NHWC.
GEOMETRIES = [(-1, (8, 5)), (1, (4, 3, 5)), ((1, 2), (4, 3, 5, 2)), (-1, (4, 6, 6, 3))]


def assert_close(actual: Any, expected: Any, tol: float, scaled: bool = True) -> None:
    """Each leaf within ``tol`` (times max(1, its largest magnitude) if scaled)."""
    chex.assert_trees_all_equal_structs(actual, expected)
    for a, e in zip(jax.tree.leaves(actual), jax.tree.leaves(expected), strict=True):
        assert a.dtype == e.dtype and a.shape == e.shape
        a, e = np.asarray(a, np.float32), np.asarray(e, np.float32)
        scale = max(1.0, float(np.max(np.abs(e)))) if scaled else 1.0
        np.testing.assert_allclose(a, e, rtol=0, atol=tol * scale)


def assert_grads_close(actual: Any, expected: Any, tol: float, n: int) -> None:
    """Gradients (params, x); those of params are sums over n values per feature.

    In float32 (tol < 1e-3) the order in which XLA sums n terms of size up to ~3
    moves a parameter's gradient by up to ~2e-6 * n whoever computes it (Flax
    itself is as far from a float64 reference), so that is their tolerance.
    """
    low_precision = tol >= 1e-3
    param_tol = tol if low_precision else 2e-6 * n
    assert_close(actual[0], expected[0], param_tol, scaled=low_precision)
    assert_close(actual[1], expected[1], max(tol, 2e-6))


def data(step: int, shape: tuple, dtype: Any = jnp.float32) -> jax.Array:
    """Well-conditioned data: mean 3, standard deviation 2.

    Drawn by NumPy: jax.random compiles a program for each new shape, which
    takes XLA:CPU seconds for shapes with a short last axis such as (4, 6, 6, 2).
    """
    x = 3.0 + 2.0 * np.random.default_rng(10 + step).standard_normal(shape)
    return jnp.asarray(x.astype(np.float32), dtype)


def stats_only(batch_stats: Any) -> Any:
    """Flax's view of jaxbn's statistics: without count (warm-up on)."""
    if "mean" in batch_stats:
        return {k: v for k, v in batch_stats.items() if k != "count"}
    return {k: stats_only(v) for k, v in batch_stats.items()}


@functools.partial(jax.jit, static_argnums=0)
def train_step(model: nn.Module, variables: dict, x: jax.Array):
    """One training step: output, gradients (params, x) and new variables."""

    def loss(params, x):
        y, updates = model.apply(
            {**variables, "params": params}, x, mutable=["batch_stats"]
        )
        return jnp.sum(jnp.sin(y.astype(jnp.float32))), (y, updates)

    grad = jax.grad(loss, argnums=(0, 1), has_aux=True)
    grads, (y, updates) = grad(variables.get("params", {}), x)
    return y, grads, {**variables, **updates}


@functools.partial(jax.jit, static_argnums=0)
def eval_step(model: nn.Module, variables: dict, x: jax.Array) -> Any:
    return model.clone(use_running_average=True).apply(variables, x)


def train_both(ref, ours, shape, dtype, tol, steps=4):
    x = data(0, shape, dtype)
    n = x.size // ours.init(jax.random.key(0), x)["batch_stats"]["mean"].size
    v_ref = ref.init(jax.random.key(0), x)
    v_ours = ours.init(jax.random.key(0), x)
    assert_close(v_ours, v_ref, 0.0)  # warmup=False: exactly Flax's variables
    for step in range(steps):
        x = data(step, shape, dtype)
        y_ref, g_ref, v_ref = train_step(ref, v_ref, x)
        y_ours, g_ours, v_ours = train_step(ours, v_ours, x)
        assert_close(y_ours, y_ref, tol)
        assert_grads_close(g_ours, g_ref, tol, n)
        assert_close(v_ours["batch_stats"], v_ref["batch_stats"], tol)
    assert_close(eval_step(ours, v_ours, x), eval_step(ref, v_ref, x), tol)
    return v_ref, v_ours


@pytest.mark.parametrize("fast", [False, True], ids=["two_pass", "fast_variance"])
@pytest.mark.parametrize("axis,shape", GEOMETRIES)
def test_parity_with_flax_linen(axis, shape, fast):
    # Flax's default E[x^2] - E[x]^2 loses about two bits on this data (mean 3,
    # std 2), which moves its outputs by up to ~2e-6: hence 5e-6 against 1e-6.
    tol = 5e-6 if fast else 1e-6
    options = {"use_running_average": False, "axis": axis, "momentum": 0.9}
    ref = nn.BatchNorm(use_fast_variance=fast, **options)
    ours = jaxbn.linen.BatchNorm(warmup=False, **options)
    train_both(ref, ours, shape, jnp.float32, tol)


@pytest.mark.parametrize(
    "options",
    [
        {"dtype": jnp.bfloat16},
        {"use_bias": False, "use_scale": False},
        {"param_dtype": jnp.bfloat16, "scale_init": nn.initializers.normal(1.0)},
        {"epsilon": 1e-3, "momentum": 0.5},
    ],
    ids=["dtype_bf16", "no_params", "param_bf16_random_init", "eps_momentum"],
)
def test_parity_options(options):
    ref = nn.BatchNorm(False, use_fast_variance=False, **options)
    ours = jaxbn.linen.BatchNorm(False, warmup=False, **options)
    low = jnp.bfloat16 in options.values()
    train_both(ref, ours, (8, 5), jnp.float32, 1e-2 if low else 1e-6, steps=2)


def test_parity_bfloat16_input():
    # bfloat16 x and float32 params: both promote the output to float32; the
    # gradient with respect to x is bfloat16, within one bfloat16 step.
    ref = nn.BatchNorm(use_running_average=False, momentum=0.9)
    ours = jaxbn.linen.BatchNorm(use_running_average=False, momentum=0.9, warmup=False)
    train_both(ref, ours, (8, 5), jnp.bfloat16, 1e-2)


def test_parity_mask():
    mask = jnp.arange(8)[:, None] < jnp.array([[6, 5, 8]])  # shape=(8, 3)
    x = data(0, (8, 3))
    ref = nn.BatchNorm(use_running_average=False, use_fast_variance=False)
    ours = jaxbn.linen.BatchNorm(use_running_average=False, warmup=False)
    variables = ref.init(jax.random.key(0), x)
    y_ref, s_ref = ref.apply(variables, x, mask=mask, mutable=["batch_stats"])
    variables = ours.init(jax.random.key(0), x)
    y_ours, s_ours = ours.apply(variables, x, mask=mask, mutable=["batch_stats"])
    assert_close(y_ours, y_ref, 1e-6)
    assert_close(s_ours["batch_stats"], s_ref["batch_stats"], 1e-6)


def test_training_without_mutable_batch_stats_says_to_pass_it():
    model = jaxbn.linen.BatchNorm()
    x = data(0, (4, 3))
    variables = model.init(jax.random.key(0), x, use_running_average=False)
    with pytest.raises(ValueError, match=r"mutable=\['batch_stats'\]"):
        model.apply(variables, x, use_running_average=False)
    # Evaluation needs no mutable collection.
    y: Any = model.apply(variables, x, use_running_average=True)
    assert y.shape == (4, 3)


def test_init_records_nothing_and_takes_one_example():
    model = jaxbn.linen.BatchNorm(
        use_running_average=False, axis_name="batch", bias_init=nn.initializers.ones
    )
    # Outside vmap, one example: like Flax, normalized alone (to the bias).
    y, variables = model.init_with_output(jax.random.key(0), data(0, (1, 3)))
    chex.assert_trees_all_equal(y, jnp.ones((1, 3)))
    chex.assert_trees_all_equal(
        variables["batch_stats"],
        {
            "mean": jnp.zeros(3),
            "var": jnp.ones(3),
            "count": jnp.zeros((), jnp.float32),
        },
    )


def test_count_is_float32_exact_then_saturates():
    model = jaxbn.linen.BatchNorm(use_running_average=False)
    x = data(0, (4, 3))
    variables: Any = model.init(jax.random.key(0), x)
    assert variables["batch_stats"]["count"].dtype == jnp.float32
    top = 2**24  # float32 counts exactly up to here; then increments may round away
    converged = jaxbn.linen.CONVERGED_COUNT
    cases = [(0, 1), (top - 2, top - 1), (top - 1, top), (converged, converged)]
    for start, expected in cases:
        stats = {**variables["batch_stats"], "count": jnp.float32(start)}
        _, updates = model.apply(
            {**variables, "batch_stats": stats}, x, mutable=["batch_stats"]
        )
        assert updates["batch_stats"]["count"] == expected


def test_use_running_average_given_once():
    x = data(0, (4, 3))
    model = jaxbn.linen.BatchNorm(use_running_average=True)
    variables = model.init(jax.random.key(0), x)
    with pytest.raises(ValueError, match="passed to the constructor and at call"):
        model.apply(variables, x, use_running_average=False)
    with pytest.raises(ValueError, match="must be passed to the constructor"):
        jaxbn.linen.BatchNorm().init(jax.random.key(0), x)


def test_traced_use_running_average_one_compilation():
    model = jaxbn.linen.BatchNorm(momentum=0.9)
    x = data(0, (8, 3))
    variables = model.init(jax.random.key(0), x, use_running_average=False)

    @jax.jit
    @chex.assert_max_traces(n=1)
    def step(variables, x, evaluate):
        return model.apply(
            variables, x, use_running_average=evaluate, mutable=["batch_stats"]
        )

    _, trained = step(variables, x, jnp.asarray(False))
    assert int(trained["batch_stats"]["count"]) == 1
    y_eval, same = step({**variables, **trained}, x, jnp.asarray(True))
    chex.assert_trees_all_equal(same, trained)
    expected = model.apply({**variables, **trained}, x, use_running_average=True)
    assert_close(y_eval, expected, 1e-6)


def flax_trained(x_shape=(8, 3), steps=3):
    ref = nn.BatchNorm(use_running_average=False, momentum=0.9)
    variables = ref.init(jax.random.key(0), data(0, x_shape))
    for step in range(steps):
        _, _, variables = train_step(ref, variables, data(step, x_shape))
    return ref, variables


def test_from_flax_variables_continues_like_flax():
    ref, old = flax_trained()
    variables = jaxbn.linen.from_flax_variables(old)
    assert "count" not in old["batch_stats"]  # the input is left alone
    assert int(variables["batch_stats"]["count"]) == jaxbn.linen.CONVERGED_COUNT
    # warmup=True, but converged statistics decay with momentum, as in Flax.
    ours = jaxbn.linen.BatchNorm(use_running_average=False, momentum=0.9)
    x = data(7, (8, 3))
    _, _, v_ref = train_step(ref, old, x)
    _, _, v_ours = train_step(ours, variables, x)
    assert_close(stats_only(v_ours["batch_stats"]), v_ref["batch_stats"], 1e-6)
    # 2**30 + 1 rounds to 2**30 in float32: the count stays converged.
    assert int(v_ours["batch_stats"]["count"]) == jaxbn.linen.CONVERGED_COUNT
    assert_close(eval_step(ours, v_ours, x), eval_step(ref, v_ref, x), 1e-6)


def test_flax_variables_without_count_are_converged():
    ref, old = flax_trained()
    ours = jaxbn.linen.BatchNorm(use_running_average=False, momentum=0.9)
    x = data(7, (8, 3))
    assert_close(eval_step(ours, old, x), eval_step(ref, old, x), 1e-6)
    _, _, v_ref = train_step(ref, old, x)
    _, _, v_ours = train_step(ours, old, x)  # count is created, converged
    assert_close(stats_only(v_ours["batch_stats"]), v_ref["batch_stats"], 1e-6)
    assert int(v_ours["batch_stats"]["count"]) == jaxbn.linen.CONVERGED_COUNT
    # With warmup=False, Flax's variables are used as they are.
    flax_like = jaxbn.linen.BatchNorm(False, momentum=0.9, warmup=False)
    _, _, v_same = train_step(flax_like, old, x)
    assert_close(v_same, v_ref, 1e-6)


def test_from_flax_variables_count_and_errors():
    _, old = flax_trained(steps=0)
    restarted = jaxbn.linen.from_flax_variables(old, count=0)
    assert int(restarted["batch_stats"]["count"]) == 0
    with pytest.raises(ValueError, match="no 'batch_stats'"):
        jaxbn.linen.from_flax_variables({"params": old["params"]})
    with pytest.raises(ValueError, match="does not fit an int32"):
        jaxbn.linen.from_flax_variables(old, count=2**31 - 1)
    with pytest.raises(TypeError, match="count must be a Python int"):
        jaxbn.linen.from_flax_variables(old, count=1.0)  # pyright: ignore[reportArgumentType]


class CNN(nn.Module):
    """Three convolutions, each followed by a jaxbn BatchNorm (no names given)."""

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        for features in (4, 8, 8):
            x = nn.Conv(features, (3, 3))(x)
            x = jaxbn.linen.BatchNorm(use_running_average=not train)(x)
            x = nn.relu(x)
        return nn.Dense(2)(jnp.mean(x, axis=(1, 2)))


@jax.jit
def cnn_train_step(variables: dict, x: jax.Array) -> dict:
    def loss(params):
        y, updates = CNN().apply(
            {**variables, "params": params}, x, train=True, mutable=["batch_stats"]
        )
        return jnp.mean(y**2), updates

    grads, updates = jax.grad(loss, has_aux=True)(variables["params"])
    params = jax.tree.map(lambda p, g: p - 0.1 * g, variables["params"], grads)
    return {"params": params, **updates}


@functools.cache  # once per module: two tests read it, neither changes it
def trained_cnn(steps: int = 3) -> tuple[Any, jax.Array]:
    x = data(0, (4, 6, 6, 2))
    variables = CNN().init(jax.random.key(0), x, train=False)
    for step in range(steps):
        variables = cnn_train_step(variables, data(step, (4, 6, 6, 2)))
    return variables, x


def test_pain_scope_reuse():
    x = data(0, (4, 6, 6, 2))
    initial: Any = CNN().init(jax.random.key(0), x, train=False)
    layers = sorted(initial["batch_stats"])
    assert layers == ["BatchNorm_0", "BatchNorm_1", "BatchNorm_2"]
    trained, _ = trained_cnn()
    for name in layers:
        before, after = initial["batch_stats"][name], trained["batch_stats"][name]
        assert int(after["count"]) == 3
        assert not np.allclose(before["mean"], after["mean"])
        assert not np.allclose(before["var"], after["var"])
    means = [trained["batch_stats"][name]["mean"] for name in layers]
    assert not np.allclose(means[1], means[2])  # each layer its own statistics
    # The same model evaluates, and evaluation moves no statistics.
    y, unchanged = CNN().apply(trained, x, train=False, mutable=["batch_stats"])
    assert y.shape == (4, 2)
    chex.assert_trees_all_equal(unchanged["batch_stats"], trained["batch_stats"])


def test_pain_stats_missing_from_checkpoint(tmp_path):
    variables, x = trained_cnn()
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(tmp_path / "checkpoint", variables)
        checkpointer.wait_until_finished()
        restored = checkpointer.restore(tmp_path / "checkpoint")
    assert sorted(restored["batch_stats"]) == sorted(variables["batch_stats"])
    chex.assert_trees_all_equal(restored["batch_stats"], variables["batch_stats"])
    chex.assert_trees_all_equal(restored["params"], variables["params"])
    expected = CNN().apply(variables, x, train=False)
    chex.assert_trees_all_equal(CNN().apply(restored, x, train=False), expected)
