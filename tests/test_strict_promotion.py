"""Under ``jax.numpy_dtype_promotion("strict")`` every layer trains, evaluates
and differentiates, for float32, bfloat16 and float16 x with float32 parameters.

Equinox's own test configuration, and many JAX projects', is strict dtype
promotion with ``jax.numpy_rank_promotion("raise")``. ``flax.linen.BatchNorm``
and ``flax.nnx.BatchNorm`` raise ``TypePromotionError`` there for bfloat16 x
with float32 parameters; jaxbn's adapters keep their framework's output dtype
(the standard promotion, float32) and cast explicitly. Each result is compared
with the same call under the default promotion: the configuration changes no
value.
"""

from __future__ import annotations

import equinox as eqx
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jaxbn
import jaxbn.equinox
import jaxbn.linen
import jaxbn.nnx

# Any random values do here: see the fixture (conftest.py).
pytestmark = pytest.mark.usefixtures("non_partitionable_threefry")

DTYPES = [jnp.float32, jnp.bfloat16, jnp.float16]
OPTIONS = [{}, {"renorm": True}, {"running_var": "unbiased", "virtual_batch_size": 4}]


def strict():
    class Both:
        def __enter__(self):
            self.a = jax.numpy_dtype_promotion("strict")
            self.b = jax.numpy_rank_promotion("raise")
            self.a.__enter__()
            self.b.__enter__()

        def __exit__(self, *exc):
            self.b.__exit__(*exc)
            self.a.__exit__(*exc)

    return Both()


def x_of(dtype):
    x = jax.random.normal(jax.random.key(0), (8, 3)) * 2.0 + 1.0
    return x.astype(dtype)


def run_both(fn):
    """fn() under the default and the strict configuration; both results."""
    loose = fn()
    with strict():
        tight = fn()
    return loose, tight


def same(a, b):
    for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        assert u.dtype == v.dtype
        np.testing.assert_array_equal(
            np.asarray(u, np.float32), np.asarray(v, np.float32)
        )


MASK = jnp.arange(8)[:, None] < 6
WEIGHTS = jnp.linspace(0.5, 1.5, 8)[:, None]


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: d.__name__)
@pytest.mark.parametrize("options", OPTIONS, ids=lambda o: "-".join(o) or "default")
def test_core(dtype, options):
    x = x_of(dtype)
    layer = jaxbn.batch_norm(**options)
    params, stats = layer.init(x)

    def fn():
        y, new = layer.apply(params, stats, x, train=True, mask=MASK, weights=WEIGHTS)
        y_eval, _ = layer.apply(params, new, x, train=False)
        grads = jax.grad(
            lambda p, x: jnp.sum(
                layer.apply(p, stats, x, train=True)[0].astype(jnp.float32) ** 2
            ),
            argnums=(0, 1),
        )(params, x)
        return y, new, y_eval, grads

    loose, tight = run_both(fn)
    same(loose, tight)
    assert tight[0].dtype == dtype


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: d.__name__)
@pytest.mark.parametrize("options", OPTIONS, ids=lambda o: "-".join(o) or "default")
def test_linen(dtype, options):
    x = x_of(dtype)
    model = jaxbn.linen.BatchNorm(**options)
    variables = model.init(jax.random.key(0), x, False)

    def fn():
        y, updates = model.apply(
            variables, x, False, mask=MASK, weights=WEIGHTS, mutable=["batch_stats"]
        )
        y_eval = model.apply({**variables, **updates}, x, True)

        def loss(params, x):
            out, _ = model.apply(
                {**variables, "params": params}, x, False, mutable=["batch_stats"]
            )
            return jnp.sum(out.astype(jnp.float32) ** 2)

        grads = jax.grad(loss, argnums=(0, 1))(variables["params"], x)
        return y, updates, y_eval, grads

    loose, tight = run_both(fn)
    same(loose, tight)
    assert tight[0].dtype == jnp.float32  # Flax's promotion of x and float32 params


def test_flax_linen_raises_where_jaxbn_does_not():
    x = x_of(jnp.bfloat16)
    model = nn.BatchNorm(use_running_average=False)
    variables = model.init(jax.random.key(0), x)
    with strict(), pytest.raises(jax.dtypes.TypePromotionError):
        model.apply(variables, x, mutable=["batch_stats"])


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: d.__name__)
@pytest.mark.parametrize("options", OPTIONS, ids=lambda o: "-".join(o) or "default")
def test_nnx(dtype, options):
    x = x_of(dtype)

    def fn():
        bn = jaxbn.nnx.BatchNorm(3, rngs=nnx.Rngs(0), **options)
        y = bn(x, mask=MASK, weights=WEIGHTS)
        stats = (bn.mean[...], bn.var[...])
        bn.eval()
        y_eval = bn(x)
        bn.train()
        grads = nnx.grad(lambda m: jnp.sum(m(x).astype(jnp.float32) ** 2))(bn)
        return y, stats, y_eval, nnx.state(grads, nnx.Param)

    loose, tight = run_both(fn)
    same(loose, tight)
    assert tight[0].dtype == jnp.float32


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: d.__name__)
@pytest.mark.parametrize("options", OPTIONS, ids=lambda o: "-".join(o) or "default")
def test_equinox(dtype, options):
    x = x_of(dtype)

    def fn():
        bn, state = eqx.nn.make_with_state(jaxbn.equinox.BatchNorm)(3, **options)
        fresh = jax.tree_util.tree_unflatten(
            *reversed(jax.tree_util.tree_flatten(state))
        )
        y, state = bn(x, state, mask=MASK, weights=WEIGHTS)
        y_eval, state = bn(x, state, inference=True)
        grads = eqx.filter_grad(
            lambda m, s: jnp.sum(m(x, s)[0].astype(jnp.float32) ** 2)
        )(bn, fresh)
        return y, state.get(bn.state_index), y_eval, grads.weight

    loose, tight = run_both(fn)
    same(loose, tight)
    assert tight[0].dtype == jnp.float32
