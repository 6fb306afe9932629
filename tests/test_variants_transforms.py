"""The variants under shard_map, pmap, vmap (axis_name) and sharded jit give the
one-device result, gradients included.

Two layers combine the variants: one with the cumulative average, the unbiased
running variance, renorm, weights with a mask, zeroed padding, a call-time
per-example scale and batch statistics in evaluation; one with ghost batches,
renorm and weights. Tolerances: the devices sum in another order than one
device (float32, 64 O(1) values): 1e-5 relative, 1e-6 absolute for outputs and
statistics; gradients (sums of 64 O(1) terms) 1e-4.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from reference import close

import jaxbn

DEVICES, PER_DEVICE, FEATURES = 8, 8, 3
CONFIGS = {
    "combined": {
        "momentum": None,
        "running_var": "unbiased",
        "renorm": True,
        "rmax": 1.5,
        "dmax": 0.5,
        "zero_masked": True,
        "scale": False,
        "eval_mode": "batch",
    },
    "ghost": {"virtual_batch_size": 4, "renorm": True, "rmax": 1.5, "dmax": 0.5},
}


def inputs(seed=0):
    rng = np.random.default_rng(seed)
    n = DEVICES * PER_DEVICE
    x = (rng.uniform(-2, 2, (n, 1)) + rng.standard_normal((n, FEATURES))).astype(
        np.float32
    )
    mask = rng.uniform(size=(n, 1)) > 0.2
    w = rng.uniform(0.5, 2.0, (n, 1)).astype(np.float32)
    s = rng.uniform(0.5, 2.0, (n, 1)).astype(np.float32)
    c = rng.standard_normal((n, FEATURES)).astype(np.float32)
    return tuple(jnp.asarray(a) for a in (x, mask, w, s, c))


def make(name, axis_name=None, psum_loss=True):
    layer = jaxbn.batch_norm(axis_name=axis_name, **CONFIGS[name])
    combined = name == "combined"

    def step(params, stats, x, mask, w, s, c, train=True):
        kw = {"mask": mask, "scale": s} if combined else {}
        y, new = layer.apply(params, stats, x, train=train, weights=w, **kw)
        loss = jnp.sum(jnp.sin(y) * c)
        if axis_name is not None and psum_loss:
            loss = jax.lax.psum(loss, axis_name)
        return loss, (y, new)

    def run(params, stats, x, mask, w, s, c):
        (_, (y, new)), grads = jax.value_and_grad(step, (0, 2, 5), has_aux=True)(
            params, stats, x, mask, w, s, c
        )
        y_eval = step(params, new, x, mask, w, s, c, train=False)[1][0]
        return y, new, y_eval, grads

    return layer, run


def reference(name):
    layer, run = make(name)
    x = inputs()[0]
    params, stats = layer.init(x)
    stats = dict(stats, count=jnp.int32(2))  # past the first renorm step
    return params, stats, jax.jit(run)(params, stats, *inputs())


@pytest.mark.parametrize("name", list(CONFIGS))
def test_shard_map_and_sharded_jit_match_one_device(name):
    params, stats, want = reference(name)
    mesh = jax.make_mesh((DEVICES,), ("d",))
    _, run = make(name, "d")
    data = P("d")
    sharded = jax.shard_map(
        run,
        mesh=mesh,
        in_specs=(P(), P(), data, data, data, data, data),
        out_specs=(data, P(), data, (P(), data, data)),
    )
    args = [jax.device_put(a, NamedSharding(mesh, data)) for a in inputs()]
    with jax.set_mesh(mesh):
        y, new, y_eval, (dp, dx, ds) = jax.jit(sharded)(params, stats, *args)
    # Each device returns its share of the parameter gradient (psum'd loss).
    close((y, new, y_eval), want[:3], atol=1e-6)
    close((dp, dx, ds), want[3], rtol=1e-4, atol=1e-4)
    # Sharded jit of the plain layer (no axis_name): global statistics.
    _, run_global = make(name)
    got = jax.jit(run_global)(params, stats, *args)
    close(got[:3], want[:3], atol=1e-6)
    close(got[3], want[3], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(
    ("name", "transform"),
    [("combined", "pmap"), ("ghost", "pmap"), ("combined", "vmap")],
)
def test_pmap_and_vmap_with_axis_name_match_one_device(name, transform):
    params, stats, want = reference(name)
    # Each device differentiates its own share of the loss; the parameter
    # gradient is the sum of the shares, the input gradient is exact per device.
    _, run = make(name, "d", psum_loss=False)
    per_device = [a.reshape(DEVICES, PER_DEVICE, *a.shape[1:]) for a in inputs()]
    mapper = jax.pmap if transform == "pmap" else jax.vmap
    mapped = mapper(run, axis_name="d", in_axes=(None, None, 0, 0, 0, 0, 0))
    y, new, y_eval, (dp, dx, ds) = mapped(params, stats, *per_device)
    flat = lambda a: a.reshape(-1, *a.shape[2:])  # noqa: E731
    close((flat(y), flat(y_eval)), (want[0], want[2]), atol=1e-6)
    for d in (0, DEVICES - 1):
        close(jax.tree.map(lambda a, d=d: a[d], new), want[1], atol=1e-6)
    close(jax.tree.map(lambda a: a.sum(0), dp), want[3][0], rtol=1e-4, atol=1e-4)
    close((flat(dx), flat(ds)), want[3][1:], rtol=1e-4, atol=1e-4)


def test_ghost_groups_stay_on_their_device():
    # With axis_name each device splits its own examples: 8 per device, k=4.
    layer, _ = make("ghost", "d")
    x = inputs()[0].reshape(DEVICES, PER_DEVICE, FEATURES)
    params, stats = layer.init(x[0])
    y, _ = jax.vmap(
        functools.partial(layer.apply, params, stats, train=True), axis_name="d"
    )(x)
    plain = jaxbn.batch_norm(**CONFIGS["ghost"])
    want, _ = plain.apply(params, stats, x.reshape(-1, FEATURES), train=True)
    close(y.reshape(-1, FEATURES), want, atol=1e-6)
