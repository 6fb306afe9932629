"""Tests of jaxbn.interop.from_tensorflow and from_tensorflow_model.

TensorFlow is not needed: the checkpoints are dicts of NumPy arrays under the
names TensorFlow gives them (contrib's ``<scope>/BatchNorm/...`` with the
zero-debias pair under ``<scope>/<scope>/moving_mean/``, ``tf.layers``'s
``batch_normalization_N``, Keras's ``:0`` and object-based
``/.ATTRIBUTES/VARIABLE_VALUE`` names, optimizer slots), and the reference is
TensorFlow's inference formula in NumPy float64. Tolerance: outputs are
normalized values of order 1 computed in float32 by a different expression
order, so they agree to a few float32 ulps (about 1e-6); 1e-5 leaves a margin.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from reference import close

import jaxbn
import jaxbn.linen
from jaxbn import interop

C = 3
EPS = 1e-3  # TensorFlow's default epsilon


def _bn_vars(seed: int, c: int = C, gamma: bool = True, beta: bool = True):
    rng = np.random.default_rng(seed)
    out = {
        "moving_mean": rng.normal(0.0, 1.0, c).astype(np.float32),
        "moving_variance": rng.uniform(0.5, 2.0, c).astype(np.float32),
    }
    if gamma:
        out["gamma"] = rng.normal(1.0, 0.3, c).astype(np.float32)
    if beta:
        out["beta"] = rng.normal(0.0, 0.3, c).astype(np.float32)
    return out


def _named(scope: str, bn: dict, fmt: str = "{}/{}") -> dict:
    return {fmt.format(scope, k): v for k, v in bn.items()}


def _tf_inference(x, bn: dict, axis: int = -1, eps: float = EPS) -> np.ndarray:
    """TensorFlow's gamma * (x - moving_mean) / sqrt(moving_variance + eps) + beta."""
    x = np.asarray(x, np.float64)
    shape = [1] * x.ndim
    shape[axis] = -1
    get = lambda k, default: np.asarray(bn.get(k, default), np.float64).reshape(shape)  # noqa: E731
    y = (x - get("moving_mean", 0.0)) / np.sqrt(get("moving_variance", 1.0) + eps)
    return get("gamma", 1.0) * y + get("beta", 0.0)


def _x(*shape: int, seed: int = 1) -> jax.Array:
    return jnp.asarray(np.random.default_rng(seed).normal(0.5, 2.0, shape), jnp.float32)


def _eval(params, stats, x, axis: int = -1, **options) -> jax.Array:
    layer = jaxbn.batch_norm(
        axis,
        epsilon=EPS,
        scale="scale" in params,
        center="bias" in params,
        renorm="renorm_mean" in stats,
        **options,
    )
    y, same = layer.apply(params, stats, x, train=False)
    assert same is stats
    return y


@pytest.mark.parametrize("gamma", [True, False])
def test_contrib_scope_evaluates_as_tensorflow(gamma):
    # contrib's default scale=False saves no gamma; the checkpoint also holds
    # the conv's kernel, optimizer slots and an EMA shadow, which are not read.
    bn = _bn_vars(0, gamma=gamma)
    ckpt = {
        **_named("conv1/BatchNorm", bn),
        "conv1/weights": np.ones((3, 3, 2, C), np.float32),
        "conv1/BatchNorm/beta/Momentum": np.ones(C, np.float32),
        "conv1/BatchNorm/beta/ExponentialMovingAverage": np.ones(C, np.float32),
        "global_step": np.int64(1000),
    }
    params, stats = interop.from_tensorflow(ckpt, scope="conv1/BatchNorm")
    assert sorted(params) == (["bias", "scale"] if gamma else ["bias"])
    assert int(stats["count"]) == interop.CONVERGED_COUNT
    assert stats["count"].dtype == jnp.int32
    x = _x(4, C)
    close(_eval(params, stats, x), _tf_inference(x, bn))
    # The only batch norm is found without scope=.
    again, _ = interop.from_tensorflow(ckpt)
    np.testing.assert_array_equal(again["bias"], params["bias"])


@pytest.mark.parametrize(
    "fmt, scope",
    [
        ("{}/{}", "block1/batch_normalization_1"),  # tf.layers
        ("{}/{}:0", "model/bn1"),  # Keras 2 layer.weights names
        ("{}/{}/.ATTRIBUTES/VARIABLE_VALUE", "layer_with_weights-1"),  # Keras TF2
        ("{}/{}", ""),  # bare names, e.g. {v.name: v} of one Keras 3 layer
    ],
)
def test_tf_layers_and_keras_names(fmt, scope):
    bn = _bn_vars(1)
    ckpt: dict[str, Any] = {fmt.format(scope, k).lstrip("/"): v for k, v in bn.items()}
    slot = "layer_with_weights-1/gamma/.OPTIMIZER_SLOT/optimizer/m"
    ckpt[slot + "/.ATTRIBUTES/VARIABLE_VALUE"] = np.ones(C, np.float32)
    ckpt["_CHECKPOINTABLE_OBJECT_GRAPH"] = b"not an array"
    params, stats = interop.from_tensorflow(ckpt, scope=scope)
    x = _x(4, C)
    close(_eval(params, stats, x), _tf_inference(x, bn))


def test_checkpoint_reader_reads_only_the_scope():
    class Reader:  # what tf.train.load_checkpoint(path) returns, duck-typed
        def __init__(self, tensors):
            self.tensors, self.read = tensors, []

        def get_variable_to_shape_map(self):
            return {k: np.shape(v) for k, v in self.tensors.items()}

        def get_tensor(self, name):
            self.read.append(name)
            return self.tensors[name]

    bn = _bn_vars(2)
    reader = Reader({**_named("a/BatchNorm", bn), **_named("b/BatchNorm", bn)})
    params, stats = interop.from_tensorflow(reader, scope="b/BatchNorm")
    assert sorted(reader.read) == sorted(f"b/BatchNorm/{k}" for k in bn)
    x = _x(4, C)
    close(_eval(params, stats, x), _tf_inference(x, bn))


def test_tf_variables_are_read_through_value():
    class Variable:  # tf.Variable, duck-typed: value() is a method
        def __init__(self, array):
            self.array = array

        def assign(self, value):
            raise AssertionError("the converter must not write")

        def value(self):
            return self.array

    bn = _bn_vars(13)
    params, stats = interop.from_tensorflow(
        {f"bn/{k}:0": Variable(v) for k, v in bn.items()}
    )
    x = _x(4, C)
    close(_eval(params, stats, x), _tf_inference(x, bn))


def test_nchw_and_keepdims_shapes():
    # data_format="NCHW" / Keras axis=1: the variables are (C,); jaxbn's axis=1.
    bn = _bn_vars(3)
    params, stats = interop.from_tensorflow(_named("BatchNorm", bn))
    x = _x(2, C, 2)
    close(_eval(params, stats, x, axis=1), _tf_inference(x, bn, axis=1))
    # Keras with virtual_batch_size keeps (1, 1, 1, C) variables: squeezed.
    kept = {k: v.reshape(1, 1, 1, C) for k, v in bn.items()}
    params, stats = interop.from_tensorflow(_named("bn", kept))
    assert stats["mean"].shape == params["scale"].shape == (C,)
    x = _x(4, C)
    close(_eval(params, stats, x), _tf_inference(x, bn))


def test_whole_model_nests_by_scope_and_drops_into_linen():
    layers = {
        "block1/batch_normalization": _bn_vars(4),
        "block1/batch_normalization_1": _bn_vars(5, gamma=False),
        "head/BatchNorm": _bn_vars(6),
    }
    ckpt: dict[str, Any] = {"block1/conv2d/kernel": np.ones((3, 3, C, C), np.float32)}
    for scope, bn in layers.items():
        ckpt.update(_named(scope, bn))
    ckpt["block1/batch_normalization/gamma/Adam"] = np.ones(C, np.float32)
    tree = interop.from_tensorflow_model(ckpt)
    assert sorted(tree) == ["batch_stats", "params"]
    assert sorted(tree["batch_stats"]["block1"]) == [
        "batch_normalization",
        "batch_normalization_1",
    ]
    x = _x(4, C)
    for scope, bn in layers.items():
        first, second = scope.split("/")
        params = tree["params"][first][second]
        stats = tree["batch_stats"][first][second]
        close(_eval(params, stats, x), _tf_inference(x, bn))

    class Block(nn.Module):
        @nn.compact
        def __call__(self, x):
            x = jaxbn.linen.BatchNorm(
                use_running_average=True, epsilon=EPS, name="batch_normalization"
            )(x)
            return jaxbn.linen.BatchNorm(
                use_running_average=True,
                epsilon=EPS,
                use_scale=False,
                name="batch_normalization_1",
            )(x)

    class Net(nn.Module):
        @nn.compact
        def __call__(self, x):
            return Block(name="block1")(x)

    variables = {k: {"block1": v["block1"]} for k, v in tree.items()}
    y = Net().apply(variables, x)
    b1, b2 = (
        layers["block1/batch_normalization"],
        layers["block1/batch_normalization_1"],
    )
    close(y, _tf_inference(_tf_inference(x, b1), b2))


def test_zero_debias_moving_mean():
    # contrib with zero_debias_moving_mean=True: moving_mean holds the debiased
    # average biased / (1 - decay**local_step) that TensorFlow evaluates with.
    decay, step = 0.9, 7
    bn = _bn_vars(7)
    biased = (bn["moving_mean"] * (1 - decay**step)).astype(np.float32)
    shadow = "conv1/BatchNorm/conv1/BatchNorm/moving_mean"
    ckpt = {
        **_named("conv1/BatchNorm", bn),
        f"{shadow}/biased": biased,
        f"{shadow}/local_step": np.float32(step),
    }
    x = _x(4, C)
    params, stats = interop.from_tensorflow(ckpt)  # as stored: debiased
    np.testing.assert_array_equal(stats["mean"], bn["moving_mean"])
    close(_eval(params, stats, x), _tf_inference(x, bn))

    params, stats = interop.from_tensorflow(ckpt, debias="mean")
    np.testing.assert_array_equal(stats["mean"], biased)
    assert int(stats["count"]) == step
    options: dict[str, Any] = dict(momentum=decay, warmup=False, debias="mean")
    close(_eval(params, stats, x, **options), _tf_inference(x, bn))
    # One more training step goes on exactly as TensorFlow's would.
    layer = jaxbn.batch_norm(epsilon=EPS, **options)
    apply = jax.jit(layer.apply, static_argnames="train")
    _, stats = apply(params, stats, x, train=True)
    xd = np.asarray(x, np.float64)
    biased_next = decay * biased + (1 - decay) * xd.mean(0)
    var_next = decay * bn["moving_variance"] + (1 - decay) * xd.var(0)
    tf_next = {
        **bn,
        "moving_mean": biased_next / (1 - decay ** (step + 1)),
        "moving_variance": var_next,
    }
    y, _ = apply(params, stats, x, train=False)
    close(y, _tf_inference(x, tf_next))
    # The pair under <scope>/moving_mean/ (as contrib's docstring names it) too.
    short = {
        k.replace(shadow, "conv1/BatchNorm/moving_mean"): v for k, v in ckpt.items()
    }
    _, stats = interop.from_tensorflow(short, debias="mean")
    assert int(stats["count"]) == step


def test_renorm_variables():
    bn = _bn_vars(8)
    rng = np.random.default_rng(9)
    renorm_mean = rng.normal(0.0, 1.0, C).astype(np.float32)
    renorm_stddev = rng.uniform(0.5, 2.0, C).astype(np.float32)
    keras2 = {
        **_named("bn", bn),
        "bn/renorm_mean": renorm_mean,
        "bn/renorm_stddev": renorm_stddev,
        "bn/moving_stddev": np.sqrt(bn["moving_variance"] + EPS),
    }
    with pytest.raises(ValueError, match=r"renorm=True.*pass renorm=True"):
        interop.from_tensorflow(keras2)
    params, stats = interop.from_tensorflow(keras2, renorm=True)
    np.testing.assert_array_equal(stats["renorm_mean"], renorm_mean)
    np.testing.assert_array_equal(stats["renorm_std"], renorm_stddev)
    x = _x(4, C)
    close(_eval(params, stats, x), _tf_inference(x, bn))
    layer = jaxbn.batch_norm(epsilon=EPS, renorm=True)
    _, trained = jax.jit(layer.apply, static_argnames="train")(
        params, stats, x, train=True
    )  # the state is usable
    assert int(trained["count"]) == interop.CONVERGED_COUNT + 1
    # TensorFlow 1 keeps debiasing weights: the averages are divided by them.
    tf1 = {
        **_named("bn", bn),
        "bn/renorm_mean": renorm_mean * 0.5,
        "bn/renorm_mean_weight": np.float32(0.5),
        "bn/renorm_stddev": renorm_stddev * 0.25,
        "bn/renorm_stddev_weight": np.float32(0.25),
    }
    _, stats = interop.from_tensorflow(tf1, renorm=True)
    close(stats["renorm_mean"], renorm_mean)
    close(stats["renorm_std"], renorm_stddev)
    with pytest.raises(ValueError, match="never"):
        interop.from_tensorflow(
            {**tf1, "bn/renorm_mean_weight": np.float32(0.0)}, renorm=True
        )
    with pytest.raises(ValueError, match=r"no 'bn/renorm_mean'.*renorm=False"):
        interop.from_tensorflow(_named("bn", bn), renorm=True)
    bad = {**keras2, "bn/renorm_stddev": np.ones(C + 1, np.float32)}
    with pytest.raises(ValueError, match="bn/renorm_stddev has shape"):
        interop.from_tensorflow(bad, renorm=True)


def test_errors():
    bn = _bn_vars(10)
    one = _named("conv1/BatchNorm", bn)
    two = {**one, **_named("conv2/BatchNorm", bn)}
    with pytest.raises(TypeError, match="mapping from TensorFlow variable names"):
        interop.from_tensorflow([np.ones(C)])
    with pytest.raises(TypeError, match="expected TensorFlow variable names"):
        interop.from_tensorflow({1: np.ones(C)})
    with pytest.raises(TypeError, match="scope must be a str"):
        interop.from_tensorflow(one, scope=1)  # pyright: ignore[reportArgumentType]
    with pytest.raises(ValueError, match=r"holds 2 batch norms.*pass scope="):
        interop.from_tensorflow(two)
    with pytest.raises(ValueError, match=r"holds 0 batch norms \(none\)"):
        interop.from_tensorflow({"dense/kernel": np.ones((2, 2))})
    with pytest.raises(ValueError, match=r"scope='conv3'.*\['conv1/BatchNorm'"):
        interop.from_tensorflow(two, scope="conv3")
    no_var = {k: v for k, v in one.items() if not k.endswith("moving_variance")}
    with pytest.raises(ValueError, match="no 'conv1/BatchNorm/moving_variance'"):
        interop.from_tensorflow(no_var)
    with pytest.raises(ValueError, match="conv1/BatchNorm/gamma has shape"):
        interop.from_tensorflow({**one, "conv1/BatchNorm/gamma": np.ones(C + 1)})
    with pytest.raises(TypeError, match="floating"):
        interop.from_tensorflow({**one, "conv1/BatchNorm/beta": np.zeros(C, int)})
    with pytest.raises(TypeError, match="count must be a Python int"):
        interop.from_tensorflow(one, count=1.5)  # pyright: ignore[reportArgumentType]


def test_debias_errors():
    bn = _bn_vars(11)
    one = _named("BatchNorm", bn)
    with pytest.raises(ValueError, match=r"debias='var'.*expected None"):
        interop.from_tensorflow(one, debias="var")
    with pytest.raises(ValueError, match="drop count"):
        interop.from_tensorflow(one, debias="mean", count=3)
    with pytest.raises(ValueError, match="BatchNorm/BatchNorm/moving_mean/biased"):
        interop.from_tensorflow(one, debias="mean")
    pair = {
        "BatchNorm/BatchNorm/moving_mean/biased": bn["moving_mean"],
        "BatchNorm/BatchNorm/moving_mean/local_step": np.float32(2.5),
    }
    with pytest.raises(ValueError, match="expected a whole number"):
        interop.from_tensorflow({**one, **pair}, debias="mean")
    pair["BatchNorm/BatchNorm/moving_mean/local_step"] = np.float32(-1.0)
    with pytest.raises(ValueError, match="non-negative scalar"):
        interop.from_tensorflow({**one, **pair}, debias="mean")


def test_whole_model_errors():
    bn = _bn_vars(12)
    with pytest.raises(ValueError, match="holds no batch norm"):
        interop.from_tensorflow_model({"dense/kernel": np.ones((2, 2))})
    with pytest.raises(ValueError, match=r"top level.*scope=''"):
        interop.from_tensorflow_model({**bn, **_named("a/BatchNorm", bn)})
    nested = {**_named("a", bn), **_named("a/BatchNorm", bn)}
    with pytest.raises(
        ValueError, match=r"'a' contains the batch norms \['a/BatchNorm'"
    ):
        interop.from_tensorflow_model(nested)
    with pytest.raises(ValueError, match="drop count"):
        interop.from_tensorflow_model(_named("a", bn), debias="mean", count=0)
