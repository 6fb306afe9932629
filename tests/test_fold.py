"""Tests of ``jaxbn.fold`` and ``jaxbn.fold_kernel``: folded == unfolded in eval mode.

Tolerance: the folded layer scales each kernel entry before the sum instead
of the sum after it, so the two outputs differ by float32 rounding of sums of
at most 36 products of size ~1 (a few 1e-7 each): 1e-5 of the output's
magnitude, as the task demands, bounds it.
"""

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

# Any random values do here: see the fixture (conftest.py).
pytestmark = pytest.mark.usefixtures("non_partitionable_threefry")

TOL = 1e-5

# kind -> (input shape, layer factory for linen, for nnx)
KINDS = {
    "dense": (
        (5, 4),
        lambda bias, name: nn.Dense(6, use_bias=bias, name=name),
        lambda bias, rngs: nnx.Linear(4, 6, use_bias=bias, rngs=rngs),
    ),
    "conv": (
        (2, 7, 7, 4),
        lambda bias, name: nn.Conv(6, (3, 3), use_bias=bias, name=name),
        lambda bias, rngs: nnx.Conv(4, 6, (3, 3), use_bias=bias, rngs=rngs),
    ),
    "grouped": (
        (2, 7, 7, 4),
        lambda bias, name: nn.Conv(
            6, (3, 3), feature_group_count=2, use_bias=bias, name=name
        ),
        lambda bias, rngs: nnx.Conv(
            4, 6, (3, 3), feature_group_count=2, use_bias=bias, rngs=rngs
        ),
    ),
    "depthwise": (
        (2, 7, 7, 4),
        lambda bias, name: nn.Conv(
            8, (3, 3), feature_group_count=4, use_bias=bias, name=name
        ),
        lambda bias, rngs: nnx.Conv(
            4, 8, (3, 3), feature_group_count=4, use_bias=bias, rngs=rngs
        ),
    ),
}
CASES = [(k, b) for k in KINDS for b in (True, False)]


def assert_close(actual: Any, expected: Any) -> None:
    expected = np.asarray(expected)
    scale = max(1.0, float(np.max(np.abs(expected))))
    np.testing.assert_allclose(np.asarray(actual), expected, rtol=0, atol=TOL * scale)


def random_bn(rng: np.random.Generator, n: int) -> dict[str, jax.Array]:
    return {
        "mean": jnp.asarray(rng.normal(size=n) * 2, jnp.float32),
        "var": jnp.asarray(rng.uniform(0.2, 3.0, n), jnp.float32),
        "scale": jnp.asarray(rng.normal(size=n), jnp.float32),
        "bias": jnp.asarray(rng.normal(size=n), jnp.float32),
    }


class Pair(nn.Module):
    kind: str
    layer_bias: bool
    affine: bool = True
    with_bn: bool = True

    @nn.compact
    def __call__(self, x):
        h = KINDS[self.kind][1](self.layer_bias, "layer")(x)
        if not self.with_bn:
            return h
        return jaxbn.linen.BatchNorm(
            use_running_average=True,
            use_scale=self.affine,
            use_bias=self.affine,
            epsilon=1e-3,
            name="bn",
        )(h)


def linen_setup(kind, bias, affine=True, seed=0):
    shape = KINDS[kind][0]
    x = jax.random.normal(jax.random.key(seed), shape)
    model = Pair(kind, bias, affine)
    variables: Any = model.init(jax.random.key(1), x)
    rng = np.random.default_rng(seed)
    n = variables["batch_stats"]["bn"]["mean"].shape[0]
    bn = random_bn(rng, n)
    variables["batch_stats"]["bn"].update(mean=bn["mean"], var=bn["var"])
    if affine:
        variables["params"]["bn"].update(scale=bn["scale"], bias=bn["bias"])
    if bias:
        variables["params"]["layer"]["bias"] = jnp.asarray(
            rng.normal(size=n), jnp.float32
        )
    return model, variables, x


@pytest.mark.parametrize(("kind", "bias"), CASES)
def test_linen_same_definition(kind, bias):
    model, variables, x = linen_setup(kind, bias)
    folded = jaxbn.fold(variables, [("layer", "bn")], epsilon=1e-3)
    assert_close(model.apply(folded, x), model.apply(variables, x))
    assert ("bias" in folded["params"]["layer"]) == bias
    assert set(folded["batch_stats"]["bn"]) == {"mean", "var", "count"}
    assert (
        variables["params"]["layer"]["kernel"]
        is not folded["params"]["layer"]["kernel"]
    )


@pytest.mark.parametrize(("kind", "bias"), CASES)
def test_linen_removed_batch_norm(kind, bias):
    model, variables, x = linen_setup(kind, bias)
    folded = jaxbn.fold(variables, [("layer", "bn")], epsilon=1e-3, remove=True)
    plain = Pair(kind, layer_bias=True, with_bn=False)
    assert_close(plain.apply(folded, x), model.apply(variables, x))
    assert "bn" not in folded["params"] and "bn" not in folded["batch_stats"]


def test_linen_batch_norm_without_scale_and_bias():
    model, variables, x = linen_setup("conv", False, affine=False)
    folded = jaxbn.fold(variables, [("layer", "bn")], epsilon=1e-3)
    assert_close(model.apply(folded, x), model.apply(variables, x))
    assert "bn" not in folded["params"]


def test_identity_var_makes_the_batch_norm_exactly_the_identity():
    for eps in (1e-5, 1e-3, 0.1, 3e-7):
        v = jaxbn._fold.identity_var(eps)
        assert v.dtype == np.float32 and np.float32(v + np.float32(eps)) == 1


class Block(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.Conv(4, (3, 3), use_bias=False)(x)
        x = nn.relu(jaxbn.linen.BatchNorm(use_running_average=True)(x))
        return x


class Deep(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = Block()(x)
        x = x.reshape((x.shape[0], -1))
        x = nn.Dense(5)(x)
        return jaxbn.linen.BatchNorm(use_running_average=True)(x)


def test_linen_nested_paths():
    x = jax.random.normal(jax.random.key(0), (3, 6, 6, 2))
    model = Deep()
    variables: Any = model.init(jax.random.key(1), x)
    rng = np.random.default_rng(3)
    for path in (("Block_0", "BatchNorm_0"), ("BatchNorm_0",)):
        stats = variables["batch_stats"]
        params = variables["params"]
        for key in path:
            stats, params = stats[key], params[key]
        bn = random_bn(rng, stats["mean"].shape[0])
        stats.update(mean=bn["mean"], var=bn["var"])
        params.update(scale=bn["scale"], bias=bn["bias"])
    pairs = [
        ("Block_0/Conv_0", "Block_0/BatchNorm_0"),
        (("Dense_0",), ("BatchNorm_0",)),
    ]
    folded = jaxbn.fold(variables, pairs, module=model, x=x)
    assert_close(model.apply(folded, x), model.apply(variables, x))


def test_core_fold_kernel_channels_first():
    """A core model: an OIHW convolution on NCHW data, batch norm on axis 1."""
    rng = np.random.default_rng(4)
    x = jnp.asarray(rng.normal(size=(2, 3, 6, 6)), jnp.float32)
    kernel = jnp.asarray(rng.normal(size=(5, 3, 3, 3)), jnp.float32)
    layer = jaxbn.batch_norm(axis=1)
    params, stats = layer.init(jax.ShapeDtypeStruct((2, 5, 4, 4), jnp.float32))
    bn = random_bn(rng, 5)
    params = {"scale": bn["scale"], "bias": bn["bias"]}
    stats = {**stats, "mean": bn["mean"], "var": bn["var"]}

    def conv(x, k):
        return jax.lax.conv_general_dilated(x, k, (1, 1), "VALID")

    expected, _ = layer.apply(params, stats, conv(x, kernel), train=False)
    k, b = jaxbn.fold_kernel(kernel, None, params, stats, axis=0)
    assert_close(conv(x, k) + b.reshape(1, 5, 1, 1), expected)


class NnxPair(nnx.Module):
    def __init__(self, kind, bias):
        rngs = nnx.Rngs(0)
        self.layers = nnx.List([KINDS[kind][2](bias, rngs)])
        n = self.layers[0].kernel.shape[-1]
        self.bn = jaxbn.nnx.BatchNorm(
            n, epsilon=1e-4, use_running_average=True, rngs=rngs
        )

    def __call__(self, x):
        return self.bn(self.layers[0](x))


@pytest.mark.parametrize(("kind", "bias"), CASES)
@pytest.mark.parametrize("by_name", [False, True])
def test_nnx_in_place(kind, bias, by_name):
    model = NnxPair(kind, bias)
    rng = np.random.default_rng(5)
    bn = random_bn(rng, model.bn.num_features)
    for name, value in bn.items():
        getattr(model.bn, name)[...] = value
    if bias:
        model.layers[0].bias[...] = jnp.asarray(rng.normal(size=bn["mean"].shape))
    x = jax.random.normal(jax.random.key(2), KINDS[kind][0])
    expected = model(x)
    pair = ("layers/0", "bn") if by_name else (model.layers[0], model.bn)
    assert jaxbn.fold(model, [pair]) is None
    assert_close(model(x), expected)
    assert model.layers[0].bias is not None
    # The batch norm is now the identity: dropping it changes nothing.
    assert_close(model.layers[0](x), expected)


def test_errors():
    _, variables, _ = linen_setup("dense", True)
    with pytest.raises(ValueError, match="'convo' not found.*holds"):
        jaxbn.fold(variables, [("convo", "bn")], epsilon=1e-5)
    with pytest.raises(ValueError, match="has no kernel"):
        jaxbn.fold(variables, [("bn", "bn")], epsilon=1e-5)
    with pytest.raises(ValueError, match="no 'batch_stats'"):
        jaxbn.fold({"params": variables["params"]}, [("layer", "bn")], epsilon=1e-5)
    with pytest.raises(ValueError, match="epsilon must be a positive finite"):
        jaxbn.fold(variables, [("layer", "bn")], epsilon=0.0)
    with pytest.raises(TypeError, match="epsilon must be a positive Python float"):
        jaxbn.fold(variables, [("layer", "bn")], epsilon="1e-5")  # pyright: ignore[reportArgumentType]
    with pytest.raises(TypeError, match="linen variable dict or an nnx model"):
        jaxbn.fold([variables], [("layer", "bn")])
    stats = {"mean": jnp.zeros(3), "var": jnp.ones(3)}
    with pytest.raises(ValueError, match="has 3 features.*output features"):
        jaxbn.fold_kernel(jnp.ones((4, 6)), None, None, stats)
    nnx_model = NnxPair("dense", True)
    with pytest.raises(ValueError, match="not a layer with a kernel"):
        jaxbn.fold(nnx_model, [(nnx_model.bn, nnx_model.bn)])
    with pytest.raises(ValueError, match="not a batch norm"):
        jaxbn.fold(nnx_model, [(nnx_model.layers[0], nnx_model.layers[0])])


def test_flax_batch_norms_fold_too():
    rng = np.random.default_rng(8)
    bn = random_bn(rng, 6)
    x = jax.random.normal(jax.random.key(3), (2, 7, 7, 4))

    class Net(nn.Module):
        @nn.compact
        def __call__(self, x):
            h = nn.Conv(6, (3, 3), use_bias=False, name="conv")(x)
            return nn.BatchNorm(use_running_average=True, name="bn")(h)

    variables: Any = Net().init(jax.random.key(0), x)
    variables["batch_stats"]["bn"].update(mean=bn["mean"], var=bn["var"])
    variables["params"]["bn"].update(scale=bn["scale"], bias=bn["bias"])
    folded = jaxbn.fold(variables, [("conv", "bn")], module=Net(), x=x)
    assert_close(Net().apply(folded, x), Net().apply(variables, x))

    class NnxNet(nnx.Module):
        def __init__(self):
            self.conv = nnx.Conv(4, 6, (3, 3), use_bias=False, rngs=nnx.Rngs(0))
            self.bn = nnx.BatchNorm(6, use_running_average=True, rngs=nnx.Rngs(0))

        def __call__(self, x):
            return self.bn(self.conv(x))

    model = NnxNet()
    for name, value in bn.items():
        getattr(model.bn, name)[...] = value
    expected = model(x)
    jaxbn.fold(model, [(model.conv, model.bn)])
    assert_close(model(x), expected)
    assert_close(model.conv(x), expected)


def test_linen_epsilon_is_read_from_the_module_or_required():
    # The pair's batch norm has epsilon=1e-3: folding with the default 1e-5
    # would give wrong outputs, so fold has no default for linen variables.
    model, variables, x = linen_setup("conv", True)
    folded = jaxbn.fold(variables, [("layer", "bn")], module=model, x=x)
    assert_close(model.apply(folded, x), model.apply(variables, x))
    wrong = jaxbn.fold(variables, [("layer", "bn")], epsilon=1e-5)
    wrong_y, y = model.apply(wrong, x), model.apply(variables, x)
    assert not np.allclose(np.asarray(wrong_y), np.asarray(y), atol=1e-4)  # pyright: ignore
    with pytest.raises(ValueError, match="pass epsilon= .* or module= and x="):
        jaxbn.fold(variables, [("layer", "bn")])
    with pytest.raises(ValueError, match="pass epsilon= .* or module= and x="):
        jaxbn.fold(variables, [("layer", "bn")], epsilon=1e-3, module=model, x=x)
    # A ShapeDtypeStruct is enough: the model is only traced.
    spec = jax.ShapeDtypeStruct(x.shape, x.dtype)
    again = jaxbn.fold(variables, [("layer", "bn")], module=model, x=spec)
    assert_close(model.apply(again, x), model.apply(variables, x))


def test_nnx_layers_carry_their_epsilon():
    model = nnx.Sequential(
        nnx.Linear(3, 4, rngs=nnx.Rngs(0)),
        nnx.BatchNorm(4, use_running_average=True, epsilon=1e-2, rngs=nnx.Rngs(0)),
    )
    with pytest.raises(ValueError, match="drop epsilon="):
        jaxbn.fold(model, [("layers/0", "layers/1")], epsilon=1e-2)
