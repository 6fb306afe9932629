"""``jaxbn.recalibrate`` on data-parallel models: batch norms with an ``axis_name``.

The model is a ResNet in the style of Flax's ImageNet example
(``examples/imagenet/models.py``: ``partial(nn.BatchNorm, momentum=0.9,
epsilon=1e-5, axis_name="batch")`` after every convolution), with
``flax.linen.BatchNorm`` as there or ``jaxbn.linen.BatchNorm``. Recalibrating
must give the same pooled statistics on one device (the axis bound by a
size-1 vmap), with the batches sharded over 8 devices under ``jax.jit``, and
under ``jax.shard_map`` with the axis bound to the mesh. The reference is the
first layer's input (the stem convolution's output) pooled over every batch
in NumPy float64; float32 sums over ~10^4 values and a count-weighted merge
stay within 1e-5 of the statistics' magnitude (as in test_recalibrate.py).
"""

from __future__ import annotations

from functools import partial
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import jaxbn
import jaxbn.linen
import jaxbn.nnx

# Any random values do here: see the fixture (conftest.py).
pytestmark = pytest.mark.usefixtures("non_partitionable_threefry")

TOL = 1e-5


class Block(nn.Module):
    filters: int
    norm: Any

    @nn.compact
    def __call__(self, x):
        y = nn.Conv(self.filters, (3, 3), use_bias=False)(x)
        y = nn.relu(self.norm()(y))
        y = nn.Conv(self.filters, (3, 3), use_bias=False)(y)
        y = self.norm(scale_init=nn.initializers.zeros_init())(y)
        return nn.relu(x + y)


class ResNet(nn.Module):
    """Flax's ImageNet ResNet, two blocks deep and 8 wide."""

    norm_cls: Any
    train: bool = True

    @nn.compact
    def __call__(self, x, train: bool = True):
        norm = partial(
            self.norm_cls,
            use_running_average=not train,
            momentum=0.9,
            epsilon=1e-5,
            axis_name="batch",
        )
        x = nn.Conv(8, (3, 3), use_bias=False, name="conv_init")(x)
        x = nn.relu(norm(name="bn_init")(x))
        x = Block(8, norm)(x)
        x = Block(8, norm)(x)
        return nn.Dense(10)(jnp.mean(x, axis=(1, 2)))


def batches(n=4, size=16, seed=0):
    rng = np.random.default_rng(seed)
    return [
        jnp.asarray(
            (1.0 + 2.0 * rng.standard_normal((size, 8, 8, 3))).astype(np.float32)
        )
        for _ in range(n)
    ]


def init(model, x):
    # Flax's example initializes under the same axis name: bind it once.
    f = jax.vmap(
        lambda x: model.init(jax.random.key(0), x, train=False),
        axis_name="batch",
        out_axes=None,
    )
    return f(x[None])


def conv3x3_same(x: np.ndarray, kernel: np.ndarray) -> np.ndarray:
    """A 3x3 'SAME' convolution (NHWC, HWIO) in NumPy float64."""
    padded = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    h, w = x.shape[1:3]
    out = np.zeros((*x.shape[:3], kernel.shape[-1]))
    for i in range(3):
        for j in range(3):
            out += padded[:, i : i + h, j : j + w, :] @ kernel[i, j]
    return out


def first_layer_reference(variables, xs):
    """The stem convolution's output over all batches: mean and var in float64."""
    kernel = np.asarray(variables["params"]["conv_init"]["kernel"], np.float64)
    outs = [conv3x3_same(np.asarray(x, np.float64), kernel) for x in xs]
    pooled = np.concatenate(outs).reshape(-1, kernel.shape[-1])
    return pooled.mean(0), pooled.var(0)


def assert_close_to(stats, mean, var):
    scale = max(1.0, float(np.max(np.abs(mean))), float(np.max(var)))
    err = max(
        float(np.max(np.abs(np.asarray(stats["mean"], np.float64) - mean))),
        float(np.max(np.abs(np.asarray(stats["var"], np.float64) - var))),
    )
    assert err <= TOL * scale, err
    return err


@pytest.fixture(scope="module", params=["flax.linen", "jaxbn.linen"])
def resnet(request):
    cls = nn.BatchNorm if request.param == "flax.linen" else jaxbn.linen.BatchNorm
    model = ResNet(cls)
    xs = batches()
    variables = init(model, xs[0])
    mean, var = first_layer_reference(variables, xs)
    return model, variables, xs, mean, var


def test_one_device(resnet):
    model, variables, xs, mean, var = resnet
    with jax.default_matmul_precision("highest"):
        new = jaxbn.recalibrate(model, xs, variables, train=True)
    assert_close_to(new["batch_stats"]["bn_init"], mean, var)
    # Every other layer got statistics too, and the parameters are unchanged.
    for name, layer in jaxbn.describe(new).as_dict().items():
        assert layer["min_var"] > 0, name
    assert new["params"] is variables["params"] or jax.tree.all(
        jax.tree.map(jnp.array_equal, new["params"], variables["params"])
    )


def test_eight_devices_sharded_jit_and_shard_map(resnet):
    model, variables, xs, mean, var = resnet
    mesh = jax.make_mesh((8,), ("batch",))
    placed = [jax.device_put(x, NamedSharding(mesh, P("batch"))) for x in xs]
    with jax.default_matmul_precision("highest"):
        one = jaxbn.recalibrate(model, xs, variables, train=True)
        sharded = jaxbn.recalibrate(model, placed, variables, train=True)
        mapped = jaxbn.recalibrate(model, xs, variables, train=True, mesh=mesh)
    for new in (sharded, mapped):
        assert_close_to(new["batch_stats"]["bn_init"], mean, var)
        # The same pooled statistics either way, layer by layer.
        for a, b in zip(
            jax.tree.leaves(new["batch_stats"]),
            jax.tree.leaves(one["batch_stats"]),
            strict=True,
        ):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def test_axis_index_groups_pool_within_each_group_of_the_mesh():
    model = ResNet(
        partial(jaxbn.linen.BatchNorm, axis_index_groups=[[0, 1, 2, 3], [4, 5, 6, 7]])
    )
    xs = batches(2)
    variables = init(ResNet(jaxbn.linen.BatchNorm), xs[0])
    # On one device (a size-1 axis) every group is the whole batch.
    new = jaxbn.recalibrate(model, xs, variables, train=True)
    mean, var = first_layer_reference(variables, xs)
    assert_close_to(new["batch_stats"]["bn_init"], mean, var)


def test_nnx_model_with_axis_name_on_one_and_eight_devices():
    class Net(nnx.Module):
        def __init__(self, rngs):
            self.linear = nnx.Linear(3, 4, rngs=rngs)
            self.bn = jaxbn.nnx.BatchNorm(4, axis_name="batch", rngs=rngs)

        def __call__(self, x):
            return self.bn(self.linear(x))

    xs = [x.reshape(-1, 3) for x in batches(3)]
    net = Net(nnx.Rngs(0))
    w = np.asarray(net.linear.kernel[...], np.float64)
    assert net.linear.bias is not None
    b = np.asarray(net.linear.bias[...], np.float64)
    h = np.concatenate([np.asarray(x, np.float64) @ w + b for x in xs])
    jaxbn.recalibrate(net, xs)
    assert_close_to(
        {"mean": net.bn.mean[...], "var": net.bn.var[...]}, h.mean(0), h.var(0)
    )
    mesh = jax.make_mesh((8,), ("batch",))
    net2 = Net(nnx.Rngs(0))
    jaxbn.recalibrate(net2, xs, mesh=mesh)
    np.testing.assert_allclose(net2.bn.var[...], net.bn.var[...], rtol=1e-5)


def test_core_forward_names_its_axes_with_bind_axes():
    def forward(x):
        return {"bn": jaxbn.batch_moments(x, (0,), axis_name="batch")}

    _, stats = jaxbn.batch_norm().init(jnp.zeros((2, 3)))
    xs = [x.reshape(-1, 3) for x in batches(2)]
    new = jaxbn.recalibrate(forward, xs, {"bn": stats}, bind_axes=["batch"])
    pooled = np.concatenate([np.asarray(x, np.float64) for x in xs])
    assert_close_to(new["bn"], pooled.mean(0), pooled.var(0))


def test_a_mesh_without_the_axis_name_is_refused():
    model = ResNet(jaxbn.linen.BatchNorm)
    xs = batches(1)
    variables = init(model, xs[0])
    mesh = jax.make_mesh((8,), ("data",))
    with pytest.raises(ValueError, match=r"synchronize over \['batch'\]"):
        jaxbn.recalibrate(model, xs, variables, train=True, mesh=mesh)
