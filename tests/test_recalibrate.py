"""Tests of ``jaxbn.recalibrate``: exact pooled statistics, for core, linen and nnx.

The reference is NumPy in float64: the count-weighted mean and the biased
variance of all the batches' values of each layer's input taken together. The
model computes them in float32 from per-batch moments merged by count: each
batch's moments are within a few float32 ulps (~1e-7 relative) and the merge
adds a few more, so 1e-5 of the statistics' magnitude is a safe bound.
"""

import functools
import sys
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jaxbn
import jaxbn.linen
import jaxbn.nnx

TOL = 1e-5


# Any initial parameters do: see the fixture (conftest.py).
pytestmark = pytest.mark.usefixtures("non_partitionable_threefry")


def pooled(values: list[np.ndarray], axis: int = -1) -> tuple[np.ndarray, np.ndarray]:
    """Mean and biased variance in float64 of all values, per feature (last axis)."""
    x = np.concatenate([np.asarray(v, np.float64) for v in values])
    x = np.moveaxis(x, axis, -1).reshape(-1, x.shape[axis])
    return x.mean(0), x.var(0)


def assert_stats(actual: dict, mean: np.ndarray, var: np.ndarray) -> None:
    scale = max(1.0, float(np.max(np.abs(mean))), float(np.max(var)))
    np.testing.assert_allclose(np.asarray(actual["mean"]), mean, atol=TOL * scale)
    np.testing.assert_allclose(np.asarray(actual["var"]), var, atol=TOL * scale)


def batches_of(sizes, features=3, seed=0, offset=5.0):
    rng = np.random.default_rng(seed)
    return [
        (offset + rng.normal(size=(n, features)) * (1 + np.arange(features))).astype(
            np.float32
        )
        for n in sizes
    ]


# ----------------------------------------------------------------- core


def core_forward(x):
    """Two layers: moments of x, then of 2 * x + 1 (a deterministic transform)."""
    h = 2.0 * x + 1.0
    return {
        "a": jaxbn.batch_moments(x, (0,)),
        "b": {"c": jaxbn.batch_moments(h, (0,))},
    }


def core_stats():
    _, s = jaxbn.batch_norm().init(jnp.zeros((2, 3)))
    return {"a": s, "b": {"c": {**s, "count": jnp.int32(7)}}}


def test_core_matches_pooled_numpy_with_unequal_batches():
    batches = batches_of([5, 17, 2, 40])
    new = jaxbn.recalibrate(core_forward, batches, core_stats())
    mean, var = pooled(batches)
    assert_stats(new["a"], mean, var)
    assert_stats(new["b"]["c"], 2 * mean + 1, 4 * var)
    assert int(new["a"]["count"]) == 0 and int(new["b"]["c"]["count"]) == 7
    assert new["a"]["mean"].dtype == jnp.float32


def test_pooled_variance_includes_spread_of_batch_means():
    # Two batches with variance 1 each but means 0 and 10: pooled var = 26.
    batches = [
        np.array([[-1.0], [1.0]], np.float32),
        np.array([[9.0], [11.0]], np.float32),
    ]
    stats = {"a": jaxbn.batch_norm().init(jnp.zeros((2, 1)))[1]}
    new = jaxbn.recalibrate(
        lambda x: {"a": jaxbn.batch_moments(x, (0,))}, batches, stats
    )
    assert float(new["a"]["mean"][0]) == 5.0
    assert float(new["a"]["var"][0]) == 26.0


def test_masked_moments_weight_by_valid_counts():
    batches = batches_of([6, 9], features=2)
    masks = [np.arange(6)[:, None] < np.array([[2, 6]]), np.ones((9, 2), bool)]
    pairs = list(zip(batches, masks, strict=True))
    stats = {"a": jaxbn.batch_norm().init(jnp.zeros((2, 2)))[1]}

    def forward(batch):
        x, mask = batch
        return {"a": jaxbn.batch_moments(x, (0,), mask=mask)}

    new = jaxbn.recalibrate(forward, pairs, stats)
    for f in range(2):
        values = [b[m[:, f], f] for b, m in pairs]
        mean, var = pooled([v[:, None] for v in values])
        np.testing.assert_allclose(new["a"]["mean"][f], mean[0], atol=TOL * 10)
        np.testing.assert_allclose(new["a"]["var"][f], var[0], atol=TOL * 10)


def test_non_finite_batch_is_skipped_and_num_batches_limits():
    batches = batches_of([4, 4, 4, 4])
    bad = batches[1].copy()
    bad[0, 0] = np.nan
    given = [batches[0], bad, batches[2], batches[3]]
    new = jaxbn.recalibrate(core_forward, given, core_stats(), num_batches=3)
    assert_stats(new["a"], *pooled([batches[0], batches[2]]))


def test_layer_that_sees_no_batch_keeps_its_statistics():
    stats = core_stats()
    new = jaxbn.recalibrate(
        lambda x: {"a": jaxbn.batch_moments(x, (0,))}, batches_of([4]), stats
    )
    np.testing.assert_array_equal(new["b"]["c"]["var"], stats["b"]["c"]["var"])


def test_core_under_a_step_compiled_once():
    traces = []

    def forward(x):
        traces.append(1)
        return core_forward(x)

    jaxbn.recalibrate(forward, batches_of([8, 8, 8, 8]), core_stats())
    assert len(traces) == 1


def test_errors():
    stats = core_stats()
    with pytest.raises(ValueError, match="gave no batch"):
        jaxbn.recalibrate(core_forward, [], stats)
    with pytest.raises(ValueError, match="at least 1"):
        jaxbn.recalibrate(core_forward, batches_of([4]), stats, num_batches=0)
    with pytest.raises(TypeError, match="num_batches must be an int"):
        jaxbn.recalibrate(core_forward, batches_of([4]), stats, num_batches=2.0)  # pyright: ignore[reportArgumentType]
    with pytest.raises(ValueError, match="variables must be"):
        jaxbn.recalibrate(core_forward, batches_of([4]))
    with pytest.raises(ValueError, match="no batch-norm statistics"):
        jaxbn.recalibrate(core_forward, batches_of([4]), {"params": {}})
    with pytest.raises(TypeError, match="model must be"):
        jaxbn.recalibrate(3, batches_of([4]), stats)


def test_progress_bar_and_missing_tqdm(monkeypatch, capsys):
    pytest.importorskip("tqdm", reason="progress bars need tqdm (examples extra)")
    jaxbn.recalibrate(core_forward, batches_of([4, 4]), core_stats(), progress=True)
    assert "recalibrate" in capsys.readouterr().err
    monkeypatch.setitem(sys.modules, "tqdm", None)
    monkeypatch.setitem(sys.modules, "tqdm.auto", None)
    with pytest.raises(ImportError, match="pip install tqdm"):
        jaxbn.recalibrate(core_forward, batches_of([4]), core_stats(), progress=True)


# ----------------------------------------------------------------- linen


class Net(nn.Module):
    """Dense -> BN -> relu -> Dense -> BN, the second BN optionally masked."""

    @nn.compact
    def __call__(self, batch, train: bool):
        x, mask = batch["x"], batch.get("mask")
        h = nn.Dense(4, name="dense0")(x)
        h = jaxbn.linen.BatchNorm(use_running_average=not train, name="bn0")(h)
        h = nn.relu(h)
        h = nn.Dense(3, name="dense1")(h)
        return jaxbn.linen.BatchNorm(use_running_average=not train, name="bn1")(
            h, mask=mask
        )


def linen_setup(masked=False):
    batches: list[dict[str, Any]] = [
        {"x": b} for b in batches_of([8, 8, 3], features=5, seed=1)
    ]
    if masked:
        for i, b in enumerate(batches):
            b["mask"] = np.arange(len(b["x"]))[:, None] < len(b["x"]) - i
    model = Net()
    variables = model.init(jax.random.key(0), batches[0], train=False)
    return model, variables, batches


def linen_reference(model, variables, batches):
    """The BN inputs of each batch in training mode, captured by Flax."""
    inputs = {"bn0": [], "bn1": []}
    apply = jax.jit(
        functools.partial(
            model.apply,
            train=True,
            mutable=["batch_stats", "intermediates"],
            capture_intermediates=True,
        )
    )
    for b in batches:
        _, state = apply(variables, b)
        inputs["bn0"].append(
            np.asarray(state["intermediates"]["dense0"]["__call__"][0])
        )
        inputs["bn1"].append(
            np.asarray(state["intermediates"]["dense1"]["__call__"][0])
        )
    return inputs


@pytest.mark.parametrize("masked", [False, True])
def test_linen_matches_numpy_and_keeps_params(masked):
    model, variables, batches = linen_setup(masked)
    new = jaxbn.recalibrate(model, batches, variables, train=True)
    inputs = linen_reference(model, variables, batches)
    assert_stats(new["batch_stats"]["bn0"], *pooled(inputs["bn0"]))
    if masked:
        kept = [x[b["mask"][:, 0]] for x, b in zip(inputs["bn1"], batches, strict=True)]
        assert_stats(new["batch_stats"]["bn1"], *pooled(kept))
    else:
        assert_stats(new["batch_stats"]["bn1"], *pooled(inputs["bn1"]))
    assert new["params"] is variables["params"]
    assert int(new["batch_stats"]["bn0"]["count"]) == 0


def test_linen_under_jit_compiled_once():
    _, variables, batches = linen_setup()
    traces = []

    class Counted(Net):
        def __call__(self, batch, train: bool):
            traces.append(1)
            return super().__call__(batch, train)

    same = [batches[0]] * 4
    jaxbn.recalibrate(Counted(), same, variables, train=True)
    assert len(traces) == 1


def test_linen_eval_mode_and_mutable_are_refused():
    model, variables, batches = linen_setup()
    with pytest.raises(ValueError, match="training mode.*train=True"):
        jaxbn.recalibrate(model, batches, variables, train=False)
    with pytest.raises(TypeError, match="sets mutable itself"):
        jaxbn.recalibrate(model, batches, variables, train=True, mutable=True)


# ----------------------------------------------------------------- nnx


class NnxNet(nnx.Module):
    def __init__(self):
        rngs = nnx.Rngs(0)
        self.dense0 = nnx.Linear(5, 4, rngs=rngs)
        self.bn0 = jaxbn.nnx.BatchNorm(4, rngs=rngs)
        self.dense1 = nnx.Linear(4, 3, rngs=rngs)
        self.bns = nnx.List([jaxbn.nnx.BatchNorm(3, momentum=0.9, rngs=rngs)])

    def __call__(self, x):
        h = nnx.relu(self.bn0(self.dense0(x)))
        return self.bns[0](self.dense1(h))


def test_nnx_matches_numpy_in_place():
    model = NnxNet()
    batches = batches_of([8, 8, 3], features=5, seed=2)
    model.eval()  # recalibrate puts the batch norms in training mode itself
    params_before = jax.tree.map(np.asarray, nnx.state(model, nnx.Param))
    assert jaxbn.recalibrate(model, batches) is None

    # Float64 reference of the forward pass in training mode.
    def p(a):
        return np.asarray(a[...], np.float64)

    h0 = [
        b.astype(np.float64) @ p(model.dense0.kernel) + p(model.dense0.bias)
        for b in batches
    ]
    h1 = []
    for h in h0:
        normed = (h - h.mean(0)) / np.sqrt(h.var(0) + 1e-5) * p(model.bn0.scale) + p(
            model.bn0.bias
        )
        h1.append(np.maximum(normed, 0) @ p(model.dense1.kernel) + p(model.dense1.bias))
    assert_stats({"mean": model.bn0.mean[...], "var": model.bn0.var[...]}, *pooled(h0))
    bn1 = model.bns[0]
    assert_stats({"mean": bn1.mean[...], "var": bn1.var[...]}, *pooled(h1))
    assert int(model.bn0.count[...]) == 0
    assert model.bn0.use_running_average is True  # the model's mode is kept
    params_after = jax.tree.map(np.asarray, nnx.state(model, nnx.Param))
    jax.tree.map(np.testing.assert_array_equal, params_after, params_before)


def test_nnx_without_batch_norm_is_refused():
    with pytest.raises(ValueError, match="no jaxbn.nnx.BatchNorm or nnx.BatchNorm"):
        jaxbn.recalibrate(
            nnx.Linear(2, 2, rngs=nnx.Rngs(0)), batches_of([4], features=2)
        )


# ----------------------------------------------------------------- MNIST


def test_mnist_recalibration_beats_stale_moving_averages():
    """Brief training of the example's CNN on real MNIST, then precise BN.

    With Flax's plain moving average (no warm-up) and 25 steps, the running
    statistics still hold 0.99**25 = 78% of their initial values; the
    recalibrated ones are those of the final network.
    """
    pytest.importorskip("optax", reason="the MNIST example needs the examples extra")
    pytest.importorskip("orbax.checkpoint", reason="the MNIST example needs orbax")
    pytest.importorskip("tqdm", reason="the MNIST example needs tqdm")
    from examples.mnist import input_pipeline, train
    from examples.mnist.configs.default import Config

    config = Config(features=(8, 16), hidden=32, batch_size=64, bn_warmup=False)
    train_x, train_y = input_pipeline.load_split("train", limit=1600)
    test_x, test_y = input_pipeline.load_split("test", limit=1000)
    # One compiled initialization: flax's init, run eagerly, compiles every
    # operation of the model.
    create = jax.jit(train.create_train_state, static_argnums=(0, 2))
    state = create(config, jax.random.key(0), 25)
    rng = np.random.default_rng(0)
    for x, y in input_pipeline.train_batches(train_x, train_y, 64, rng):
        state, _ = train.train_step(state, x, y)

    model = train.create_model(config)
    variables = {"params": state.params, "batch_stats": state.batch_stats}
    images = input_pipeline.normalize(train_x[:320])
    batches = [images[i : i + 64] for i in range(0, 320, 64)]
    new = jaxbn.recalibrate(model, iter(batches), variables, train=True)

    before = train.evaluate(state, test_x, test_y, 500)
    after = train.evaluate(
        state.replace(batch_stats=new["batch_stats"]), test_x, test_y, 500
    )
    # Measured: 677 of 1000 before, 803 after (a recalibration that kept the
    # stale statistics would give the same count).
    assert after["correct"] > before["correct"]

    # The first batch norm's input is the first convolution's output.
    @jax.jit
    def first_conv(b):
        _, state_b = model.apply(
            variables,
            b,
            train=True,
            mutable=["batch_stats", "intermediates"],
            capture_intermediates=lambda m, _: m.name == "Conv_0",
        )
        return state_b["intermediates"]["Conv_0"]["__call__"][0]

    convs = [np.asarray(first_conv(b)) for b in batches]
    assert_stats(new["batch_stats"]["BatchNorm_0"], *pooled(convs))
    assert new["params"] is variables["params"]


class ScanBlock(nn.Module):
    @nn.compact
    def __call__(self, x, _):
        x = nn.relu(nn.Dense(3)(x))
        return jaxbn.linen.BatchNorm(use_running_average=False)(x), None


def scanned(moments_axis: bool):
    axes: dict[Any, Any] = {"params": 0, "batch_stats": 0}
    if moments_axis:
        axes["batch_moments"] = 0
    return nn.scan(ScanBlock, variable_axes=axes, split_rngs={"params": True}, length=2)


class ScanNet(nn.Module):
    moments_axis: bool = True

    @nn.compact
    def __call__(self, x):
        return scanned(self.moments_axis)(name="scan")(x, None)[0]


class Unrolled(nn.Module):
    @nn.compact
    def __call__(self, x):
        for i in range(2):
            x = ScanBlock(name=f"block{i}")(x, None)[0]
        return x


def test_linen_scan_equals_unrolled_layers():
    batches = batches_of([6, 9], features=3, seed=3)
    model = ScanNet()
    variables = model.init(jax.random.key(0), batches[0])
    new = jaxbn.recalibrate(model, batches, variables)
    unrolled_vars = {
        c: {f"block{i}": jax.tree.map(lambda a, i=i: a[i], variables[c]["scan"])
            for i in range(2)}
        for c in ("params", "batch_stats")
    }  # fmt: skip
    expected = jaxbn.recalibrate(Unrolled(), batches, unrolled_vars)
    for i in range(2):
        stacked = new["batch_stats"]["scan"]["BatchNorm_0"]
        got = jax.tree.map(lambda a, i=i: a[i], stacked)
        want = expected["batch_stats"][f"block{i}"]["BatchNorm_0"]
        assert np.all(np.asarray(want["var"]) != 1.0)  # not the initial statistics
        np.testing.assert_allclose(got["mean"], want["mean"], rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(got["var"], want["var"], rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="'batch_moments': 0"):
        jaxbn.recalibrate(ScanNet(moments_axis=False), batches, variables)


class RematNnx(nnx.Module):
    def __init__(self):
        self.dense = nnx.Linear(5, 3, rngs=nnx.Rngs(0))
        self.bn = jaxbn.nnx.BatchNorm(3, rngs=nnx.Rngs(0))

    def __call__(self, x):
        @nnx.remat
        def block(m, x):
            return m.bn(m.dense(x))

        return block(self, x)


def test_nnx_batch_norm_inside_remat():
    model = RematNnx()
    batches = batches_of([6, 4], features=5, seed=4)
    jaxbn.recalibrate(model, batches)
    kernel = np.asarray(model.dense.kernel[...], np.float64)
    assert model.dense.bias is not None
    bias = np.asarray(model.dense.bias[...], np.float64)
    inputs = [b.astype(np.float64) @ kernel + bias for b in batches]
    stats = {"mean": model.bn.mean[...], "var": model.bn.var[...]}
    assert_stats(stats, *pooled(inputs))


class CountedNnx(nnx.Module):
    def __init__(self, use_bn: bool):
        self.bn = jaxbn.nnx.BatchNorm(5, rngs=nnx.Rngs(0))
        self.use_bn = use_bn

    def __call__(self, x):
        type(self).calls.append(1)
        return self.bn(x) if self.use_bn else x

    calls: list = []  # noqa: RUF012


def test_nnx_compiled_once_and_unused_batch_norm_refused():
    CountedNnx.calls.clear()
    batch = batches_of([4], features=5)[0]
    jaxbn.recalibrate(CountedNnx(True), [batch] * 4)
    assert len(CountedNnx.calls) == 1
    with pytest.raises(ValueError, match="no batch norm ran"):
        jaxbn.recalibrate(CountedNnx(False), [batch])


class FlaxNet(nn.Module):
    @nn.compact
    def __call__(self, x, train: bool):
        h = nn.Dense(4, name="dense")(x)
        return nn.BatchNorm(use_running_average=not train, name="bn")(h)


def test_flax_linen_batch_norm_too():
    batches = batches_of([8, 5], features=5, seed=6)
    model = FlaxNet()
    variables = model.init(jax.random.key(0), batches[0], train=False)
    new = jaxbn.recalibrate(model, batches, variables, train=True)
    p = variables["params"]["dense"]
    inputs = [b @ np.asarray(p["kernel"]) + np.asarray(p["bias"]) for b in batches]
    assert_stats(new["batch_stats"]["bn"], *pooled(inputs))
    assert set(new["batch_stats"]["bn"]) == {"mean", "var"}


def test_flax_nnx_batch_norm_too():
    class Net(nnx.Module):
        def __init__(self):
            self.dense = nnx.Linear(5, 4, rngs=nnx.Rngs(0))
            self.bn = nnx.BatchNorm(4, use_running_average=True, rngs=nnx.Rngs(0))

        def __call__(self, x):
            return self.bn(self.dense(x))

    model = Net()
    batches = batches_of([8, 5], features=5, seed=7)
    jaxbn.recalibrate(model, batches)
    assert type(model.bn) is nnx.BatchNorm
    kernel = np.asarray(model.dense.kernel[...], np.float64)
    assert model.dense.bias is not None
    inputs = [b @ kernel + np.asarray(model.dense.bias[...]) for b in batches]
    assert_stats(
        {"mean": model.bn.mean[...], "var": model.bn.var[...]}, *pooled(inputs)
    )
