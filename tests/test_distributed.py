"""Distributed batch norm: sharded jit, shard_map and pmap against one device.

Every way of splitting the batch over the 8 simulated CPU devices must give the
statistics of the whole batch (or of each ``axis_index_groups`` group), merged
by counts and stably (never a mean of per-device means, never E[x^2]-E[x]^2).
"""

import re

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import reference as ref
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import jaxbn

DEVICES = 8
FEATURES = 8
TOL = {"rtol": 1e-5, "atol": 1e-5}


def data(shape, seed=0, offset=0.0):
    return (offset + np.random.default_rng(seed).standard_normal(shape)).astype(
        np.float32
    )


def params_for(layer, x, seed=1):
    params, stats = layer.init(x)
    rng = np.random.default_rng(seed)
    params = {
        k: jnp.asarray(rng.normal(1.0, 0.5, v.shape), v.dtype)
        for k, v in params.items()
    }
    return params, stats


def single_device(x, params, stats, mask=None, **kwargs):
    return jaxbn.batch_norm(**kwargs).apply(params, stats, x, train=True, mask=mask)


DATA, REPLICATED = P("data"), P()


def shard_mapped(layer, mesh, x_spec=DATA, stats_spec=REPLICATED, mask=False):
    """Jitted shard_map of a training step; stats_spec=P("data") stacks them."""

    def f(params, stats, x, *mask_arg):
        y, stats = layer.apply(
            params, stats, x, train=True, mask=mask_arg[0] if mask else None
        )
        if stats_spec != P():
            stats = jax.tree.map(lambda a: a[None], stats)
        return y, stats

    in_specs = (P(), P(), x_spec) + ((x_spec,) if mask else ())
    return jax.jit(
        jax.shard_map(f, mesh=mesh, in_specs=in_specs, out_specs=(x_spec, stats_spec))
    )


def put(mesh, spec, *arrays):
    return tuple(jax.device_put(a, NamedSharding(mesh, spec)) for a in arrays)


# --- sharded jax.jit: no axis_name, statistics are global -------------------------


@pytest.mark.parametrize(
    ("mesh_shape", "names", "x_spec", "param_spec"),
    [
        ((8,), ("data",), P("data"), P()),
        ((2, 4), ("data", "model"), P("data", "model"), P("model")),
    ],
    ids=["data-parallel", "data2-x-model4"],
)
def test_sharded_jit_equals_single_device(mesh_shape, names, x_spec, param_spec):
    x = data((32, FEATURES), offset=3.0)
    layer = jaxbn.batch_norm(momentum=0.9)
    params, stats = params_for(layer, x)
    y0, s0 = layer.apply(params, stats, x, train=True)
    mesh = jax.make_mesh(mesh_shape, names)
    (xs,) = put(mesh, x_spec, x)
    sharded_params = {k: put(mesh, param_spec, v)[0] for k, v in params.items()}
    stats_specs = {"mean": param_spec, "var": param_spec, "count": P()}
    sharded_stats = {k: put(mesh, stats_specs[k], v)[0] for k, v in stats.items()}
    with jax.set_mesh(mesh):
        y, s = jax.jit(lambda p, s, x: layer.apply(p, s, x, train=True))(
            sharded_params, sharded_stats, xs
        )
    assert y.sharding.is_equivalent_to(NamedSharding(mesh, x_spec), y.ndim)
    chex.assert_trees_all_close((y, s), (y0, s0), **TOL)
    _, want = ref.train_step(
        x,
        -1,
        jax.tree.map(np.asarray, stats),
        0.9,
        True,
        np.asarray(params["scale"]),
        np.asarray(params["bias"]),
    )
    chex.assert_trees_all_close(s, want, **TOL)


# --- shard_map and pmap with axis_name --------------------------------------------


def test_shard_map_with_axis_name_gives_global_statistics():
    x = data((64, FEATURES), offset=-2.0)
    layer = jaxbn.batch_norm(axis_name="data")
    params, stats = params_for(layer, x)
    mesh = jax.make_mesh((DEVICES,), ("data",))
    (xs,) = put(mesh, P("data"), x)
    with jax.set_mesh(mesh):
        # out_specs P() for the statistics: they are the same on every device.
        y, s = shard_mapped(layer, mesh)(params, stats, xs)
    chex.assert_trees_all_close((y, s), single_device(x, params, stats), **TOL)


def test_shard_map_over_a_tuple_of_mesh_axes():
    x = data((64, FEATURES), seed=3)
    layer = jaxbn.batch_norm(axis_name=("a", "b"))
    params, stats = params_for(layer, x)
    mesh = jax.make_mesh((2, 4), ("a", "b"))
    (xs,) = put(mesh, P(("a", "b")), x)
    with jax.set_mesh(mesh):
        out = shard_mapped(layer, mesh, x_spec=P(("a", "b")))(params, stats, xs)
    chex.assert_trees_all_close(out, single_device(x, params, stats), **TOL)


def test_pmap_with_axis_name_gives_global_statistics():
    x = data((DEVICES, 8, FEATURES), seed=4)
    layer = jaxbn.batch_norm(axis_name="batch")
    params, stats = params_for(layer, x)
    y, s = jax.pmap(
        lambda p, s, x: layer.apply(p, s, x, train=True),
        axis_name="batch",
        in_axes=(None, None, 0),
    )(params, stats, x)
    y0, s0 = single_device(x.reshape(-1, FEATURES), params, stats)
    chex.assert_trees_all_close(y.reshape(-1, FEATURES), y0, **TOL)
    for d in range(DEVICES):
        chex.assert_trees_all_close(jax.tree.map(lambda a, d=d: a[d], s), s0, **TOL)


GROUPS = {
    "pairs": [[0, 1], [2, 3], [4, 5], [6, 7]],
    "halves": [[0, 1, 2, 3], [4, 5, 6, 7]],
    "interleaved": [[0, 2, 4, 6], [1, 3, 5, 7]],
}


def _per_group_reference(x, params, stats, groups):
    """Per device: the single-device step on the concatenation of its group."""
    ys: list = [None] * DEVICES
    ss: list = [None] * DEVICES
    for g in groups:
        y, s = single_device(np.concatenate([x[d] for d in g]), params, stats)
        for k, d in enumerate(g):
            ys[d] = y[k * x.shape[1] : (k + 1) * x.shape[1]]
            ss[d] = s
    return jnp.stack(ys), jax.tree.map(lambda *a: jnp.stack(a), *ss)


@pytest.mark.parametrize("groups", list(GROUPS.values()), ids=list(GROUPS))
@pytest.mark.parametrize("transform", ["shard_map", "pmap"])
def test_axis_index_groups_give_each_groups_statistics(groups, transform):
    x = (
        data((DEVICES, 6, FEATURES), seed=5)
        + np.arange(DEVICES, dtype=np.float32)[:, None, None]
    )
    layer = jaxbn.batch_norm(axis_name="data", axis_index_groups=groups)
    params, stats = params_for(layer, x)
    want = _per_group_reference(x, params, stats, groups)
    if transform == "pmap":
        got = jax.pmap(
            lambda p, s, x: layer.apply(p, s, x, train=True),
            axis_name="data",
            in_axes=(None, None, 0),
        )(params, stats, x)
    else:
        mesh = jax.make_mesh((DEVICES,), ("data",))
        (xs,) = put(mesh, P("data"), x)
        with jax.set_mesh(mesh):
            # Statistics differ between groups: one row per device.
            y, s = shard_mapped(layer, mesh, stats_spec=P("data"))(params, stats, xs)
        got = (y.reshape(x.shape), s)
    chex.assert_trees_all_close(got, want, **TOL)


# --- counts and stability ---------------------------------------------------------


def test_unequal_valid_counts_give_exact_global_statistics():
    # Device i holds 10**(i+1) valid values (flax#2417: averaging per-device
    # means would weight the 10 values of device 0 like the 10**4 of device 3).
    devices, per_device = 4, 10**4
    rng = np.random.default_rng(6)
    x = rng.normal(
        np.arange(devices)[:, None, None] * 5.0,
        1.0 + np.arange(devices)[:, None, None],
        (devices, per_device, FEATURES),
    ).astype(np.float32)
    mask = np.arange(per_device)[None, :, None] < 10 ** (
        np.arange(devices)[:, None, None] + 1
    )
    mask = np.broadcast_to(mask, x.shape)
    x = np.where(mask, x, np.nan).astype(np.float32)  # padding may be NaN
    layer = jaxbn.batch_norm(axis_name="data", momentum=0.0, warmup=False)
    params, stats = layer.init(x[0])
    mesh = jax.make_mesh((devices,), ("data",), devices=jax.devices()[:devices])
    xs, ms = put(mesh, P("data"), x.reshape(-1, FEATURES), mask.reshape(-1, FEATURES))
    with jax.set_mesh(mesh):
        y, s = shard_mapped(layer, mesh, mask=True)(params, stats, xs, ms)
    n, mean, var = ref.moments(x.reshape(-1, FEATURES), -1, mask.reshape(-1, FEATURES))
    assert n[0] == 11110
    np.testing.assert_allclose(s["mean"], mean, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(s["var"], var, rtol=1e-5)
    mean_of_means = np.mean(
        [np.mean(x[d][mask[d]].reshape(-1, FEATURES), 0) for d in range(devices)], 0
    )
    assert np.all(np.abs(mean_of_means - mean) > 1.0)  # the test can tell them apart
    valid = mask.reshape(-1, FEATURES)
    want_y = ref.normalize(
        x.reshape(-1, FEATURES),
        -1,
        mean,
        var,
        np.asarray(params["scale"]),
        np.asarray(params["bias"]),
    )
    np.testing.assert_allclose(
        np.asarray(y)[valid], want_y[valid], rtol=1e-4, atol=1e-4
    )


def test_large_offset_global_variance_is_accurate():
    # 8 devices holding 1e4 + d + N(0, 1): the global variance within 1e-5
    # (relative) of float64, which E[x^2] - E[x]^2 in float32 misses entirely.
    rng = np.random.default_rng(7)
    x = (
        1e4
        + np.arange(DEVICES)[:, None, None]
        + rng.standard_normal((DEVICES, 4096, FEATURES))
    ).astype(np.float32)
    flat = x.reshape(-1, FEATURES)
    layer = jaxbn.batch_norm(axis_name="data", momentum=0.0, warmup=False)
    params, stats = layer.init(flat)
    mesh = jax.make_mesh((DEVICES,), ("data",))
    (xs,) = put(mesh, P("data"), flat)
    with jax.set_mesh(mesh):
        y, s = shard_mapped(layer, mesh)(params, stats, xs)
    _, mean, var = ref.moments(flat, -1)
    np.testing.assert_allclose(s["var"], var, rtol=1e-5)
    np.testing.assert_allclose(s["mean"], mean, rtol=1e-7)
    np.testing.assert_allclose(y, ref.normalize(flat, -1, mean, var), atol=2e-4)
    naive = (
        np.float32(np.mean(flat * flat, 0, dtype=np.float32))
        - np.float32(np.mean(flat, 0, dtype=np.float32)) ** 2
    )
    assert np.max(np.abs(naive - var) / var) > 1e-3  # the check is meaningful


# --- gradients --------------------------------------------------------------------


def _loss(layer, weights):
    def loss(params, x):
        y, _ = layer.apply(params, layer.init(x)[1], x, train=True)
        return jnp.sum(jnp.sin(y) * weights.reshape(1, -1)) / 64

    return loss


@pytest.mark.parametrize("transform", ["shard_map", "pmap"])
def test_grad_through_synchronized_batch_norm_equals_global(transform):
    x = data((64, FEATURES), seed=8, offset=1.0)
    weights = jnp.arange(FEATURES, dtype=jnp.float32)
    params, _ = params_for(jaxbn.batch_norm(), x)
    want = jax.grad(_loss(jaxbn.batch_norm(), weights), argnums=(0, 1))(params, x)
    layer = jaxbn.batch_norm(axis_name="data")
    loss = _loss(layer, weights)
    if transform == "pmap":
        dp, dx = jax.pmap(
            lambda p, x: jax.grad(loss, argnums=(0, 1))(p, x),
            axis_name="data",
            in_axes=(None, 0),
        )(params, x.reshape(DEVICES, -1, FEATURES))
        # pmap returns per-device parameter gradients: their sum is the total.
        dp = jax.tree.map(lambda a: a.sum(0), dp)
        dx = dx.reshape(x.shape)
    else:
        mesh = jax.make_mesh((DEVICES,), ("data",))
        (xs,) = put(mesh, P("data"), x)

        def global_loss(p, x):
            per_device = jax.shard_map(
                lambda p, x: jax.lax.psum(loss(p, x), "data"),
                mesh=mesh,
                in_specs=(P(), P("data")),
                out_specs=P(),
            )
            return per_device(p, x)

        with jax.set_mesh(mesh):
            dp, dx = jax.jit(jax.grad(global_loss, argnums=(0, 1)))(params, xs)
    chex.assert_trees_all_close((dp, dx), want, rtol=1e-4, atol=1e-5)


def test_grad_inside_shard_map_is_already_global():
    # In jax 0.10 shard_map (check_vma), the gradient of replicated (P()) params
    # taken inside shard_map is already summed over devices: no psum needed
    # (an explicit psum would multiply it by the number of devices).
    x = data((64, FEATURES), seed=9)
    weights = jnp.arange(FEATURES, dtype=jnp.float32)
    params, _ = params_for(jaxbn.batch_norm(), x)
    want = jax.grad(_loss(jaxbn.batch_norm(), weights))(params, x)
    loss = _loss(jaxbn.batch_norm(axis_name="data"), weights)
    mesh = jax.make_mesh((DEVICES,), ("data",))
    (xs,) = put(mesh, P("data"), x)
    step = jax.shard_map(
        lambda p, x: jax.grad(loss)(p, x),
        mesh=mesh,
        in_specs=(P(), P("data")),
        out_specs=P(),
    )
    with jax.set_mesh(mesh):
        got = jax.jit(step)(params, xs)
    chex.assert_trees_all_close(got, want, rtol=1e-4, atol=1e-5)


# --- collectives ------------------------------------------------------------------


def _all_reduces(compiled_text: str | None) -> int:
    assert compiled_text is not None
    return len(re.findall(r"all-reduce(?:-start)?\(", compiled_text))


def _conditional_all_reduces(compiled_text: str | None) -> int:
    """All-reduces in conditional code: a conditional's branches or a while body.

    The statistics' passes are a while loop whose body runs once, and again
    only while the shift is far from the batch mean.
    """
    assert compiled_text is not None
    branches = set()
    for names in re.findall(r"branch_computations=\{([^}]*)\}", compiled_text):
        branches |= {n.strip().lstrip("%") for n in names.split(",")}
    branches |= set(re.findall(r"body=%?([\w.\-]+)", compiled_text))
    count, current = 0, None
    for line in compiled_text.splitlines():
        header = re.match(r"^(?:ENTRY )?%?([\w.\-]+) ", line)
        if header and not line.startswith(" "):
            current = header.group(1)
        elif current in branches and re.search(r"all-reduce(?:-start)?\(", line):
            count += 1
    return count


def test_collective_counts_in_compiled_hlo():
    x = data((64, FEATURES), seed=10)
    t = data((64, FEATURES), seed=11)
    layer = jaxbn.batch_norm(axis_name="data")
    params, stats = layer.init(x)
    mesh = jax.make_mesh((DEVICES,), ("data",))
    xs, ts = put(mesh, P("data"), x, t)
    opt = optax.sgd(0.1)

    def forward(p, s, x):
        return layer.apply(p, s, x, train=True)

    def step(p, s, o, x, t):
        def loss(p):
            y, s2 = layer.apply(p, s, x, train=True)
            return jnp.sum((y - t) ** 2) / 64, s2

        # Already summed over devices (replicated params, check_vma).
        grads, s = jax.grad(loss, has_aux=True)(p)
        updates, o = opt.update(grads, o, p)
        return optax.apply_updates(p, updates), s, o

    with jax.set_mesh(mesh):
        fwd = jax.jit(
            jax.shard_map(
                forward,
                mesh=mesh,
                in_specs=(P(), P(), P("data")),
                out_specs=(P("data"), P()),
            )
        )
        n_forward = _all_reduces(fwd.lower(params, stats, xs).compile().as_text())
        o = opt.init(params)
        train = jax.jit(
            jax.shard_map(
                step,
                mesh=mesh,
                in_specs=(P(), P(), P(), P("data"), P("data")),
                out_specs=(P(), P(), P()),
            )
        )
        n_step = _all_reduces(train.lower(params, stats, o, xs, ts).compile().as_text())
    c_forward = _conditional_all_reduces(
        fwd.lower(params, stats, xs).compile().as_text()
    )
    c_step = _conditional_all_reduces(
        train.lower(params, stats, o, xs, ts).compile().as_text()
    )
    print(
        f"all-reduces: forward {n_forward} ({c_forward} conditional), "
        f"training step {n_step} ({c_step} conditional)"
    )
    # Forward: one all-reduce of (count, s1, s2) per pass, in the body of the
    # passes' while loop: run once around the replicated running mean, and
    # again only while that shift is far from the data (the first steps of a
    # layer whose inputs have a large mean).
    assert (n_forward, c_forward) == (1, 1)
    # A training step runs at most two: the forward's and the backward's
    # (sum(dy), sum(dy * xhat)), with which XLA combines the parameter gradients'.
    assert n_step - c_step <= 2
