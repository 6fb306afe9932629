"""Tests of ``jaxbn.nnx.BatchNorm``: parity with ``flax.nnx.BatchNorm`` and pains."""

import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from flax import nnx
from test_linen import GEOMETRIES, assert_close, assert_grads_close, data

import jaxbn.nnx

# Any random values do here: see the fixture (conftest.py).
pytestmark = pytest.mark.usefixtures("non_partitionable_threefry")


@nnx.jit
def train_step(model: nnx.Module, x: jax.Array):
    """One training step: output and gradients (params, x); updates statistics."""

    def loss(model, x):
        y = model(x)
        return jnp.sum(jnp.sin(y.astype(jnp.float32))), y

    grad = nnx.grad(loss, argnums=(0, 1), has_aux=True)
    grads, y = grad(model, x)
    return y, grads


@nnx.jit
def eval_step(model: nnx.Module, x: jax.Array) -> jax.Array:
    return model(x, use_running_average=True)


def stats(model: nnx.Module, *names: str) -> dict:
    return {n: getattr(model, n)[...] for n in names}


def train_both(ref, ours, shape, dtype, tol, steps=4):
    n = math.prod(shape) // ours.num_features
    for step in range(steps):
        x = data(step, shape, dtype)
        y_ref, (gm_ref, gx_ref) = train_step(ref, x)
        y_ours, (gm_ours, gx_ours) = train_step(ours, x)
        assert_close(y_ours, y_ref, tol)
        grads_ours = (nnx.to_pure_dict(gm_ours), gx_ours)
        assert_grads_close(grads_ours, (nnx.to_pure_dict(gm_ref), gx_ref), tol, n)
        assert_close(stats(ours, "mean", "var"), stats(ref, "mean", "var"), tol)
    # warmup=False: exactly Flax's variables, no count.
    assert nnx.to_pure_dict(nnx.state(ours)).keys() == (
        nnx.to_pure_dict(nnx.state(ref)).keys()
    )
    assert_close(eval_step(ours, x), eval_step(ref, x), tol)


# flax.nnx.BatchNorm keeps flat (num_features,) statistics and cannot update them
# for several feature axes; jaxbn.nnx.BatchNorm can (test_several_feature_axes).
SINGLE_AXIS = [(axis, shape) for axis, shape in GEOMETRIES if isinstance(axis, int)]


@pytest.mark.parametrize("fast", [False, True], ids=["two_pass", "fast_variance"])
@pytest.mark.parametrize("axis,shape", SINGLE_AXIS)
def test_parity_with_flax_nnx(axis, shape, fast):
    tol = 5e-6 if fast else 1e-6  # see test_linen.test_parity_with_flax_linen
    features = shape[axis]
    options = {"axis": axis, "momentum": 0.9, "rngs": nnx.Rngs(0)}
    ref = nnx.BatchNorm(features, use_fast_variance=fast, **options)
    options["rngs"] = nnx.Rngs(0)
    ours = jaxbn.nnx.BatchNorm(features, warmup=False, **options)
    assert_close(stats(ours, "scale", "bias"), stats(ref, "scale", "bias"), 0.0)
    train_both(ref, ours, shape, jnp.float32, tol)


@pytest.mark.parametrize(
    "options,dtype",
    [
        ({}, jnp.bfloat16),
        ({"dtype": jnp.bfloat16}, jnp.float32),
        ({"use_bias": False, "use_scale": False}, jnp.float32),
        ({"scale_init": nnx.initializers.normal(1.0)}, jnp.float32),
    ],
    ids=["x_bf16", "dtype_bf16", "no_params", "random_init"],
)
def test_parity_options(options, dtype, request):
    case = request.node.callspec.id
    ref = nnx.BatchNorm(5, use_fast_variance=False, rngs=nnx.Rngs(0), **options)
    ours = jaxbn.nnx.BatchNorm(5, warmup=False, rngs=nnx.Rngs(0), **options)
    if "scale_init" in options:
        assert_close(stats(ours, "scale"), stats(ref, "scale"), 0.0)
    # With dtype=bfloat16, Flax NNX rounds x and the running statistics to
    # bfloat16 before computing; jaxbn computes from x in float32: they differ
    # by up to ~2 bfloat16 steps.
    tol = {"dtype_bf16": 3e-2, "x_bf16": 1e-2}.get(case, 1e-6)
    train_both(ref, ours, (8, 5), dtype, tol, steps=2)


def test_several_feature_axes():
    x = data(0, (4, 3, 5, 2))
    ours = jaxbn.nnx.BatchNorm(15, axis=(1, 2), momentum=0.9, rngs=nnx.Rngs(0))
    layer = jaxbn.batch_norm(axis=(1, 2), momentum=0.9)
    params, batch_stats = layer.init(x)
    y, batch_stats = layer.apply(params, batch_stats, x, train=True)
    assert_close(ours(x), y, 1e-6)
    assert ours.mean[...].shape == (15,)
    assert_close(ours.mean[...], batch_stats["mean"].reshape(15), 1e-6)


def test_train_eval_switch_and_warmup():
    bn = jaxbn.nnx.BatchNorm(3, momentum=0.9, rngs=nnx.Rngs(0))
    x = data(0, (8, 3))
    bn(x)  # warm-up: the first update has decay 0.1
    expected = 0.1 * 0.0 + 0.9 * np.asarray(jnp.mean(x, axis=0))
    np.testing.assert_allclose(bn.mean[...], expected, rtol=1e-6)
    bn.eval()
    assert bn.use_running_average is True
    before = nnx.clone(nnx.state(bn, nnx.BatchStat))
    bn(x)
    chex.assert_trees_all_equal(nnx.state(bn, nnx.BatchStat), before)
    bn.train()
    bn(x)
    assert int(bn.count[...]) == 2
    assert nnx.view(bn, use_running_average=True).use_running_average is True


def test_errors():
    with pytest.raises(ValueError, match="momentum must be in"):
        jaxbn.nnx.BatchNorm(3, momentum=1.5, rngs=nnx.Rngs(0))
    bn = jaxbn.nnx.BatchNorm(4, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="num_features=4"):
        bn(jnp.ones((8, 3)))
    bn = jaxbn.nnx.BatchNorm(3, use_running_average=None, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"model.train\(\) / model.eval\(\)"):
        bn(jnp.ones((8, 3)))


def test_mark_converged_continues_like_flax():
    ref = nnx.BatchNorm(3, momentum=0.9, rngs=nnx.Rngs(0))
    for step in range(3):
        train_step(ref, data(step, (8, 3)))
    ours = jaxbn.nnx.BatchNorm(3, momentum=0.9, rngs=nnx.Rngs(1))
    nnx.update(ours, nnx.state(ref))  # Flax's state has no count
    jaxbn.nnx.mark_converged(ours)
    x = data(7, (8, 3))
    assert_close(eval_step(ours, x), eval_step(ref, x), 1e-6)
    train_step(ref, x)
    train_step(ours, x)  # warmup=True, but converged: decay 0.9, as in Flax
    assert_close(stats(ours, "mean", "var"), stats(ref, "mean", "var"), 1e-6)
    assert ours.count[...] == jaxbn.nnx.CONVERGED_COUNT  # 2**30 + 1 rounds back
    with pytest.raises(ValueError, match="does not fit an int32"):
        jaxbn.nnx.mark_converged(ours, count=-1)
    flax_like = jaxbn.nnx.BatchNorm(3, warmup=False, rngs=nnx.Rngs(1))
    jaxbn.nnx.mark_converged(flax_like)  # no count: nothing to mark
    assert not hasattr(flax_like, "count")


class CNN(nnx.Module):
    """Three convolutions, each followed by a jaxbn BatchNorm."""

    def __init__(self, rngs: nnx.Rngs):
        sizes = [(2, 4), (4, 8), (8, 8)]
        self.convs = nnx.List([nnx.Conv(i, o, (3, 3), rngs=rngs) for i, o in sizes])
        self.norms = nnx.List([jaxbn.nnx.BatchNorm(o, rngs=rngs) for _, o in sizes])
        self.head = nnx.Linear(8, 2, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        for conv, norm in zip(self.convs, self.norms, strict=True):
            x = nnx.relu(norm(conv(x)))
        return self.head(jnp.mean(x, axis=(1, 2)))


@nnx.jit
def cnn_train_step(model: CNN, optimizer: nnx.Optimizer, x: jax.Array) -> None:
    grads = nnx.grad(lambda m: jnp.mean(m(x) ** 2))(model)
    optimizer.update(model, grads)


def trained_cnn(steps: int = 3) -> tuple[CNN, nnx.State]:
    model = CNN(nnx.Rngs(0))
    initial = nnx.clone(nnx.state(model, nnx.BatchStat))
    optimizer = nnx.Optimizer(model, optax.sgd(0.1), wrt=nnx.Param)
    model.train()
    for step in range(steps):
        cnn_train_step(model, optimizer, data(step, (4, 6, 6, 2)))
    return model, initial


def test_pain_scope_reuse():
    model, initial = trained_cnn()
    trained = nnx.to_pure_dict(nnx.state(model, nnx.BatchStat))["norms"]
    before = nnx.to_pure_dict(initial)["norms"]
    assert sorted(trained) == [0, 1, 2]
    for i in range(3):
        assert int(trained[i]["count"]) == 3
        assert not np.allclose(before[i]["mean"], trained[i]["mean"])
        assert not np.allclose(before[i]["var"], trained[i]["var"])
    assert not np.allclose(trained[1]["mean"], trained[2]["mean"])
    # The same model evaluates, and evaluation moves no statistics.
    model.eval()
    assert nnx.jit(lambda m, x: m(x))(model, data(0, (4, 6, 6, 2))).shape == (4, 2)
    after = nnx.to_pure_dict(nnx.state(model, nnx.BatchStat))["norms"]
    chex.assert_trees_all_equal(after, trained)


def test_pain_stats_missing_from_checkpoint(tmp_path):
    model, _ = trained_cnn()
    model.eval()
    x = data(0, (4, 6, 6, 2))
    state = nnx.to_pure_dict(nnx.state(model))
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(tmp_path / "checkpoint", state)
        checkpointer.wait_until_finished()
        restored = checkpointer.restore(tmp_path / "checkpoint")
    fresh = CNN(nnx.Rngs(1))
    fresh.eval()
    nnx.replace_by_pure_dict(restored_state := nnx.state(fresh), restored)
    nnx.update(fresh, restored_state)
    for i in range(3):
        for name in ("mean", "var", "count"):
            chex.assert_trees_all_equal(
                getattr(fresh.norms[i], name)[...], getattr(model.norms[i], name)[...]
            )
    chex.assert_trees_all_equal(fresh(x), model(x))
