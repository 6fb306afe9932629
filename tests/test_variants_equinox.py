"""``jaxbn.equinox.BatchNorm`` takes every option and call-time input of the core.

Through the adapter pipeline it gets the training-time variants (renorm, ghost
batches, ``running_var``, ``eval_mode``, ``momentum=None``, ``zero_masked``)
and ``mask``/``weights``/``scale``/``offset`` at call time, like the Flax
adapters. Each case is compared with ``jaxbn.batch_norm`` built with the same
options: the same float32 computation, so within 1e-6.
"""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from reference import close

import jaxbn
import jaxbn.equinox

OPTIONS = [
    {"momentum": None, "warmup": False, "running_var": "unbiased"},
    {"renorm": True, "rmax": 1.5, "dmax": 0.5, "renorm_momentum": 0.8},
    {"virtual_batch_size": 4, "zero_masked": True},
    {"momentum": 1.0, "warmup": False, "eval_mode": "batch"},
    {"momentum": 0.9, "warmup": False, "debias": "mean_and_var"},
]


def batches(n=3, seed=0):
    rng = np.random.default_rng(seed)
    return [
        jnp.asarray((k + (1 + k) * rng.standard_normal((8, 3))).astype(np.float32))
        for k in range(n)
    ]


def inputs():
    mask = jnp.asarray(np.arange(8) % 3 != 0)[:, None]
    w = jnp.linspace(0.5, 2.0, 8)[:, None]
    return batches(), mask, w


def clone(state):
    """A copy of an eqx.nn.State, which Equinox lets be used once."""
    leaves, treedef = jax.tree_util.tree_flatten(state)
    return jax.tree_util.tree_unflatten(treedef, leaves)


def core_run(options, xs, mask, w, **layout):
    layer = jaxbn.batch_norm(**options, **layout)
    params, stats = layer.init(xs[0])
    ys = []
    for x in xs:
        y, stats = layer.apply(params, stats, x, train=True, mask=mask, weights=w)
        ys.append(y)
    y_eval, _ = layer.apply(params, stats, xs[0], train=False, mask=mask)
    return ys, stats, y_eval


@pytest.mark.parametrize("options", OPTIONS, ids=lambda o: "-".join(o))
def test_batched_layout_forwards_the_variants(options):
    xs, mask, w = inputs()
    want_ys, want_stats, want_eval = core_run(options, xs, mask, w, axis=1)
    make = eqx.nn.make_with_state(jaxbn.equinox.BatchNorm)
    bn, state = make(3, **options)
    assert bn.config.virtual_batch_size == options.get("virtual_batch_size")
    step = eqx.filter_jit(lambda bn, s, x: bn(x, s, mask=mask, weights=w))
    for x, want in zip(xs, want_ys, strict=True):
        y, state = step(bn, state, x)
        close(y, want, rtol=1e-6, atol=1e-6)
    got = state.get(bn.state_index)
    assert sorted(got) == sorted(want_stats)
    for name, value in want_stats.items():
        close(got[name], value, rtol=1e-6, atol=1e-6)
    assert got["count"].dtype == jnp.int32
    y_eval, same = bn(xs[0], state, inference=True, mask=mask)
    close(y_eval, want_eval, rtol=1e-6, atol=1e-6)
    close(same.get(bn.state_index)["mean"], got["mean"], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize(
    "options",
    [o for o in OPTIONS if "virtual_batch_size" not in o],
    ids=lambda o: "-".join(o),
)
def test_per_example_layout_under_vmap_forwards_the_variants(options):
    xs, mask, w = inputs()
    want_ys, want_stats, _ = core_run(options, xs, mask, w, axis=1)
    bn, state = eqx.nn.make_with_state(jaxbn.equinox.BatchNorm)(3, "batch", **options)
    mapped = jax.vmap(
        lambda x, m, wi, s: bn(x, s, mask=m, weights=wi),
        axis_name="batch",
        in_axes=(0, 0, 0, None),
        out_axes=(0, None),
    )
    for x, want in zip(xs, want_ys, strict=True):
        y, state = mapped(x, mask, w, state)
        close(y, want, rtol=1e-6, atol=1e-6)
    got = state.get(bn.state_index)
    for name, value in want_stats.items():
        close(got[name], value, rtol=1e-6, atol=1e-6)


def test_call_time_scale_and_offset():
    x = batches(1)[0]
    s = jnp.linspace(0.5, 2.0, 8)[:, None]
    b = jnp.linspace(-1.0, 1.0, 3)
    layer = jaxbn.batch_norm(axis=1, scale=False, center=False)
    params, stats = layer.init(x)
    want, _ = layer.apply(params, stats, x, train=True, scale=s, offset=b)
    bn, state = eqx.nn.make_with_state(jaxbn.equinox.BatchNorm)(
        3, channelwise_affine=False
    )
    y, _ = bn(x, clone(state), scale=s, offset=b)
    close(y, want, rtol=1e-6, atol=1e-6)
    grads = jax.grad(lambda s: jnp.sum(bn(x, clone(state), scale=s, offset=b)[0] ** 3))(
        s
    )
    want_grads = jax.grad(
        lambda s: jnp.sum(
            layer.apply(params, stats, x, train=True, scale=s, offset=b)[0] ** 3
        )
    )(s)
    close(grads, want_grads, rtol=1e-6, atol=1e-6)
    affine, state = eqx.nn.make_with_state(jaxbn.equinox.BatchNorm)(3)
    with pytest.raises(ValueError, match="build it with scale=False"):
        affine(x, state, scale=s)


def test_variant_errors_name_the_option():
    make = eqx.nn.make_with_state(jaxbn.equinox.BatchNorm)
    with pytest.raises(ValueError, match="rmax given but renorm=False"):
        make(3, rmax=2.0)
    with pytest.raises(ValueError, match="eval_mode='test' is not known"):
        make(3, eval_mode="test")  # pyright: ignore[reportArgumentType]
    bn, state = make(3, virtual_batch_size=3)
    with pytest.raises(ValueError, match="virtual_batch_size=3 does not divide"):
        bn(jnp.ones((8, 3)), state)
    bn, state = make(3)
    with pytest.raises(TypeError, match="mask must be a boolean array"):
        bn(jnp.ones((8, 3)), state, mask=jnp.ones((8, 1)))
