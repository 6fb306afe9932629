"""The Flax adapters forward the training-time variants to the core: the same
outputs and statistics as ``jaxbn.batch_norm`` with the same options.

Both run the same float32 computation as the core: compared within 1e-6.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from reference import close

import jaxbn
import jaxbn.linen
import jaxbn.nnx

# Any random values do here: see the fixture (conftest.py).
pytestmark = pytest.mark.usefixtures("non_partitionable_threefry")

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


def keeps_count(options):
    return (
        options.get("warmup", True)
        or ("momentum" in options and options["momentum"] is None)
        or options.get("renorm", False)
        or options.get("debias") is not None
    )


def core_run(options, xs, mask, w):
    layer = jaxbn.batch_norm(**options)
    params, stats = layer.init(xs[0])
    ys = []
    for x in xs:
        y, stats = layer.apply(params, stats, x, train=True, mask=mask, weights=w)
        ys.append(y)
    y_eval, _ = layer.apply(params, stats, xs[0], train=False, mask=mask)
    return ys, stats, y_eval


def inputs():
    mask = jnp.asarray(np.arange(8) % 3 != 0)[:, None]
    w = jnp.linspace(0.5, 2.0, 8)[:, None]
    return batches(), mask, w


@pytest.mark.parametrize("options", OPTIONS, ids=lambda o: "-".join(o))
def test_linen_forwards_the_variants(options):
    xs, mask, w = inputs()
    want_ys, want_stats, want_eval = core_run(options, xs, mask, w)
    model = jaxbn.linen.BatchNorm(**options)
    variables = model.init(jax.random.key(0), xs[0], use_running_average=True)
    for x, want in zip(xs, want_ys, strict=True):
        y, updates = model.apply(
            variables, x, False, mask=mask, weights=w, mutable=["batch_stats"]
        )
        variables = {**variables, **updates}
        close(y, want, rtol=1e-6, atol=1e-6)
    # The adapters keep a (float32) count only where it is needed.
    assert ("count" in variables["batch_stats"]) == keeps_count(options)
    for name, value in variables["batch_stats"].items():
        close(value, want_stats[name], rtol=1e-6, atol=1e-6)
    y_eval = model.apply(variables, xs[0], True, mask=mask)
    close(y_eval, want_eval, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("options", OPTIONS, ids=lambda o: "-".join(o))
def test_nnx_forwards_the_variants(options):
    xs, mask, w = inputs()
    want_ys, want_stats, want_eval = core_run(options, xs, mask, w)
    bn = jaxbn.nnx.BatchNorm(3, rngs=nnx.Rngs(0), **options)
    for x, want in zip(xs, want_ys, strict=True):
        close(bn(x, False, mask=mask, weights=w), want, rtol=1e-6, atol=1e-6)
    assert bn.keeps_count == keeps_count(options)
    for name, value in want_stats.items():
        if name != "count" or bn.keeps_count:
            close(getattr(bn, name)[...], value, rtol=1e-6, atol=1e-6)
    close(bn(xs[0], True, mask=mask), want_eval, rtol=1e-6, atol=1e-6)


def test_adapters_take_a_call_time_scale_and_offset():
    x = batches(1)[0]
    s = jnp.linspace(0.5, 2.0, 8)[:, None]
    b = jnp.linspace(-1.0, 1.0, 3)
    layer = jaxbn.batch_norm(scale=False, center=False)
    params, stats = layer.init(x)
    want, _ = layer.apply(params, stats, x, train=True, scale=s, offset=b)
    model = jaxbn.linen.BatchNorm(use_scale=False, use_bias=False)
    variables = model.init(jax.random.key(0), x, True)
    y, _ = model.apply(variables, x, False, scale=s, offset=b, mutable=["batch_stats"])
    close(y, want, rtol=1e-6, atol=1e-6)
    bn = jaxbn.nnx.BatchNorm(3, use_scale=False, use_bias=False, rngs=nnx.Rngs(0))
    close(bn(x, False, scale=s, offset=b), want, rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="build it with scale=False"):
        jaxbn.nnx.BatchNorm(3, rngs=nnx.Rngs(0))(x, False, scale=s)
