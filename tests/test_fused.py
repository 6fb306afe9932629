"""The training step (``jaxbn._training``) against independent references.

References: autodiff of the plain two-pass formula in float32, NumPy float64
finite differences, and the global computation for ``axis_name`` under
``jax.vmap`` and ``jax.shard_map``. Speed is not tested here.
"""

from __future__ import annotations

import functools
import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from jax import lax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import jaxbn
from jaxbn._training import Running, StepOptions, training_step

EPS = 1e-5


def kept_shape(shape, axes):
    return tuple(1 if i in axes else d for i, d in enumerate(shape))


def fused(
    x, mask=None, scale=None, bias=None, *, axes, dtype=None, fallback=None, **kw
):
    kept = kept_shape(x.shape, axes)
    fallback = jnp.zeros(kept, jnp.float32) if fallback is None else fallback
    groups = kw.get("axis_index_groups")
    options = StepOptions(
        reduction_axes=tuple(axes),
        epsilon=EPS,
        axis_name=kw.get("axis_name"),
        groups=None if groups is None else tuple(tuple(g) for g in groups),
        dtype=x.dtype if dtype is None else dtype,
    )
    running = Running(fallback, jnp.ones(kept, jnp.float32))
    return training_step(x, mask, scale, bias, running, options)


def reference(x, mask=None, scale=None, bias=None, *, axes, dtype=None):
    """The plain two-pass formula in float32, differentiated by autodiff."""
    xf = x.astype(jnp.float32)
    valid = jnp.ones(x.shape, bool) if mask is None else jnp.broadcast_to(mask, x.shape)
    n = jnp.sum(valid, axes, keepdims=True, dtype=jnp.float32)
    mean = jnp.sum(jnp.where(valid, xf, 0.0), axes, keepdims=True) / n
    var = jnp.sum(jnp.where(valid, (xf - mean) ** 2, 0.0), axes, keepdims=True) / n
    y = (xf - mean) * lax.rsqrt(var + EPS)
    if scale is not None:
        y = y * scale.astype(jnp.float32)
    if bias is not None:
        y = y + bias.astype(jnp.float32)
    return y.astype(x.dtype if dtype is None else dtype), mean, var


def normal(seed, shape):
    """Standard normal float32 values drawn by NumPy.

    ``jax.random`` compiles a program for each new shape (over a second on a
    shared 2-core CPU), more than many of these tests take otherwise.
    """
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def inputs(shape, axes, dtype, mask_shape=None, seed=0, offset=0.0):
    rng = np.random.default_rng(seed)  # not jax.random: see normal
    kept = kept_shape(shape, axes)
    x = (2.0 * rng.standard_normal(shape) + 1.5 + offset).astype(np.float32)
    scale = 1.0 + 0.3 * rng.standard_normal(kept)
    bias = 0.3 * rng.standard_normal(kept)
    w = rng.standard_normal(shape)
    mask = None
    if mask_shape is not None:
        mask = rng.random(mask_shape) < 0.7
        mask[tuple(min(1, d - 1) for d in mask_shape)] = True  # a valid value
    f32 = (jnp.asarray(a, jnp.float32) for a in (scale, bias, w))
    return (
        jnp.asarray(x.astype(dtype)),
        *f32,
        None if mask is None else jnp.asarray(mask),
    )


def loss_of(fn, w, mask, **kw):
    def loss(x, scale, bias):
        y = fn(x, mask, scale, bias, **kw)[0].astype(jnp.float32)
        return jnp.sum(w * y)

    return loss


CASES = [
    # shape, reduction axes, mask shape
    ((32, 4), (0,), None),
    ((32, 4), (0,), (32, 4)),
    ((8, 5, 6, 3), (0, 1, 2), None),
    ((8, 5, 6, 3), (0, 1, 2), (8, 1, 1, 1)),
    ((8, 5, 6, 3), (0, 1, 2), (8, 5, 6, 1)),
    ((6, 3, 7), (0, 2), None),  # channels-first
    ((6, 3, 7), (0,), (6, 1, 7)),  # tuple of feature axes (1, 2)
]
TOL = {jnp.float32: 2e-5, jnp.bfloat16: 2e-2, jnp.float16: 4e-3}


@functools.partial(jax.jit, static_argnames="axes")
def fused_and_reference(x, mask, scale, bias, w, *, axes):
    """Both outputs and both gradients of ``sum(w * y)``, in one compiled program.

    One compile per case, where running them eagerly compiles each operation
    (the layer's path without jit is checked by the tests below).
    """
    grad_args = (x, scale, bias)
    return (
        fused(x, mask, scale, bias, axes=axes),
        reference(x, mask, scale, bias, axes=axes),
        jax.grad(loss_of(fused, w, mask, axes=axes), (0, 1, 2))(*grad_args),
        jax.grad(loss_of(reference, w, mask, axes=axes), (0, 1, 2))(*grad_args),
    )


@functools.partial(jax.jit, static_argnames=("fn", "axes"))
def grads_of(fn, x, mask, scale, bias, w, *, axes):
    """The gradients of ``sum(w * fn(x)[0])``, compiled once per shape."""
    return jax.grad(loss_of(fn, w, mask, axes=axes), (0, 1, 2))(x, scale, bias)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16, jnp.float16])
@pytest.mark.parametrize(("shape", "axes", "mask_shape"), CASES)
def test_matches_autodiff_of_reference(shape, axes, mask_shape, dtype):
    x, scale, bias, w, mask = inputs(shape, axes, dtype, mask_shape)
    (y, m), (y_ref, mean_ref, var_ref), grads, grads_ref = fused_and_reference(
        x, mask, scale, bias, w, axes=axes
    )
    assert y.dtype == dtype
    tol = TOL[dtype]
    chex.assert_trees_all_close(m.shift + m.offset, mean_ref, rtol=1e-5, atol=1e-5)
    chex.assert_trees_all_close(m.var, var_ref, rtol=1e-5, atol=1e-5)
    chex.assert_trees_all_close(
        y.astype(jnp.float32), y_ref.astype(jnp.float32), rtol=tol, atol=tol
    )
    assert grads[0].dtype == dtype
    for g, g_ref in zip(grads, grads_ref, strict=True):
        g, g_ref = g.astype(jnp.float32), g_ref.astype(jnp.float32)
        scale_of = float(jnp.max(jnp.abs(g_ref)))
        chex.assert_trees_all_close(g, g_ref, atol=tol * scale_of, rtol=tol)


@pytest.mark.parametrize(("center", "scale"), [(False, False), (True, False)])
def test_without_scale_or_bias(center, scale):
    axes = (0,)
    x, gamma, beta, w, _ = inputs((16, 3), axes, jnp.float32)
    gamma = gamma if scale else None
    beta = beta if center else None

    def loss(fn):
        return lambda x: jnp.sum(w * fn(x, None, gamma, beta, axes=axes)[0])

    chex.assert_trees_all_close(
        jax.grad(loss(fused))(x), jax.grad(loss(reference))(x), atol=1e-5
    )


def test_output_dtype_differs_from_input():
    axes = (0,)
    x, scale, bias, w, _ = inputs((16, 3), axes, jnp.bfloat16)
    y, _ = fused(x, None, scale, bias, axes=axes, dtype=jnp.float32)
    assert y.dtype == jnp.float32
    dx = jax.grad(lambda x: jnp.sum(w * fused(x, axes=axes, dtype=jnp.float32)[0]))(x)
    assert dx.dtype == jnp.bfloat16


# -- float64 finite differences ---------------------------------------------


def numpy_loss(x, mask, scale, bias, w, axes):
    valid = np.broadcast_to(np.ones((), bool) if mask is None else mask, x.shape)
    n = valid.sum(axis=axes, keepdims=True)
    mean = np.where(valid, x, 0.0).sum(axis=axes, keepdims=True) / n
    var = np.where(valid, (x - mean) ** 2, 0.0).sum(axis=axes, keepdims=True) / n
    return np.sum(w * ((x - mean) / np.sqrt(var + EPS) * scale + bias))


def finite_differences(f, args, step):
    grads = []
    for i, a in enumerate(args):
        g = np.zeros_like(a)
        for idx in np.ndindex(a.shape):
            up = [b.copy() for b in args]
            down = [b.copy() for b in args]
            up[i][idx] += step
            down[i][idx] -= step
            g[idx] = (f(*up) - f(*down)) / (2 * step)
        grads.append(g)
    return grads


@pytest.mark.parametrize("offset", [0.0, 1e4])
@pytest.mark.parametrize("masked", [False, True])
def test_gradients_against_float64_finite_differences(offset, masked):
    axes = (0,)
    x, scale, bias, w, mask = inputs(
        (12, 3), axes, jnp.float32, (12, 1) if masked else None, offset=offset
    )
    grads = jax.grad(loss_of(fused, w, mask, axes=axes), (0, 1, 2))(x, scale, bias)
    mask64 = None if mask is None else np.asarray(mask)
    w64 = np.asarray(w, np.float64)

    def f(x, s, b):
        return numpy_loss(x, mask64, s, b, w64, axes)

    args = [np.asarray(a, np.float64) for a in (x, scale, bias)]
    expected = finite_differences(f, args, step=1e-4)
    for g, e in zip(grads, expected, strict=True):
        np.testing.assert_allclose(
            np.asarray(g), e, rtol=1e-4, atol=1e-4 * abs(e).max()
        )


# -- accuracy under large offsets -------------------------------------------


@pytest.mark.parametrize(("offset", "var_tol"), [(1e4, 1e-4), (1e6, 3e-4)])
def test_variance_and_output_under_large_offset(offset, var_tol):
    x = jnp.asarray(offset + normal(1, (4096, 2)), jnp.float32)
    y, m = fused(x, axes=(0,))
    x64 = np.asarray(x, np.float64)
    mean64, var64 = x64.mean(0), x64.var(0)
    np.testing.assert_allclose(np.asarray(m.var)[0], var64, rtol=var_tol)
    y64 = (x64 - mean64) / np.sqrt(var64 + EPS)
    assert np.max(np.abs(np.asarray(y, np.float64) - y64)) < 0.03


@pytest.mark.parametrize("sigmas", [0.0, 3.0, 7.9, 8.1, 1e3])
def test_mean_and_variance_accurate_from_zero_to_large_means(sigmas):
    # Means from 0 to 1000 std around a shift that is a batch value: the mean
    # within 1e-5 std, the variance within 1e-5, y within 1e-4.
    x = jnp.asarray(sigmas * 2.0 + 2.0 * normal(4, (2**17, 3)), jnp.float32)
    y, m = fused(x, axes=(0,))
    x64 = np.asarray(x, np.float64)
    mean = np.asarray(m.shift, np.float64) + np.asarray(m.offset, np.float64)
    np.testing.assert_allclose(mean[0], x64.mean(0), rtol=0, atol=2e-5)
    np.testing.assert_allclose(np.asarray(m.var)[0], x64.var(0), rtol=1e-5)
    y64 = (x64 - x64.mean(0)) / np.sqrt(x64.var(0) + EPS)
    assert np.max(np.abs(np.asarray(y, np.float64) - y64)) < 1e-4


def test_training_step_writes_no_full_size_temporary():
    # XLA:CPU writes a producer or broadcast that two reduction fusions share to
    # memory; the training step keeps every full-size expression its own.
    layer = jaxbn.batch_norm()
    x = jnp.asarray(normal(5, (32, 8, 8, 64)))
    params, stats = layer.init(x)

    def loss(x, params, stats, g):
        y, new_stats = layer.apply(params, stats, x, train=True)
        return jnp.sum(y * g), new_stats

    step = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))
    memory = step.lower(x, params, stats, x).compile().memory_analysis()
    assert memory is not None and memory.temp_size_in_bytes < x.nbytes // 4


def test_masked_first_value_recentres_around_the_data():
    # The first value is masked and the fallback (0) is far from the data: the
    # single pass cancels, so the second pass must take over.
    x = jnp.asarray(1e4 + normal(2, (4096, 2)), jnp.float32)
    mask = jnp.ones((4096, 1), bool).at[0].set(False)
    _, m = fused(x, mask, axes=(0,))
    x64 = np.asarray(x, np.float64)[1:]
    np.testing.assert_allclose(np.asarray(m.var)[0], x64.var(0), rtol=1e-4)
    np.testing.assert_allclose(np.asarray(m.shift + m.offset)[0], x64.mean(0))


def test_float16_large_batch_gives_finite_stats_and_unit_std():
    x = jnp.asarray(300.0 * normal(3, (10**6, 2)), jnp.float16)
    y, m = fused(x, axes=(0,))
    assert m.var.dtype == jnp.float32
    assert bool(jnp.all(jnp.isfinite(m.var))) and bool(jnp.all(m.var > 0))
    std = jnp.std(y.astype(jnp.float32), axis=0)
    chex.assert_trees_all_close(std, jnp.ones(2), atol=1e-2)


@pytest.mark.parametrize("offset", [0.0, 1e4])
def test_gradients_at_large_offset_against_float64_formula(offset):
    axes = (0,)
    x, scale, bias, w, _ = inputs((4096, 2), axes, jnp.float32, offset=offset)
    dx, dscale = jax.grad(loss_of(fused, w, None, axes=axes), (0, 1))(x, scale, bias)
    x64, s64, w64 = (np.asarray(a, np.float64) for a in (x, scale, w))
    r = 1.0 / np.sqrt(x64.var(0) + EPS)
    xhat = (x64 - x64.mean(0)) * r
    dscale64 = np.sum(w64 * xhat, 0, keepdims=True)
    dxhat = w64 * s64
    dx64 = r * (dxhat - dxhat.mean(0) - xhat * np.mean(dxhat * xhat, 0))
    np.testing.assert_allclose(np.asarray(dscale), dscale64, rtol=1e-4)
    np.testing.assert_allclose(np.asarray(dx), dx64, atol=1e-4 * np.abs(dx64).max())


# -- masks ------------------------------------------------------------------


def test_nan_under_false_reaches_no_gradient():
    axes = (0,)
    x, scale, bias, w, _ = inputs((16, 3), axes, jnp.float32)
    mask = jnp.arange(16)[:, None] < 11
    x = jnp.where(mask, x, jnp.nan)

    def loss(x, scale, bias):
        y = fused(x, mask, scale, bias, axes=axes)[0]
        return jnp.sum(jnp.where(mask, w * y, 0.0))

    grads = jax.grad(loss, (0, 1, 2))(x, scale, bias)
    assert all(bool(jnp.all(jnp.isfinite(g))) for g in grads)
    chex.assert_trees_all_close(grads[0][11:], jnp.zeros((5, 3)))
    # The valid entries' gradients are those of the batch without padding.
    expected = jax.grad(loss_of(fused, w[:11], None, axes=axes), (0, 1, 2))(
        x[:11], scale, bias
    )
    chex.assert_trees_all_close(grads[0][:11], expected[0], atol=1e-5)
    chex.assert_trees_all_close(grads[1:], expected[1:], atol=1e-5)


def test_all_masked_batch_gives_finite_output_and_zero_count():
    x = jnp.asarray(normal(4, (8, 3)))
    y, m = fused(x, jnp.zeros((8, 1), bool), axes=(0,), fallback=jnp.ones((1, 3)))
    assert bool(jnp.all(jnp.isfinite(y)))
    chex.assert_trees_all_close(m.count, jnp.zeros((1, 3)))
    dx = jax.grad(lambda x: jnp.sum(fused(x, jnp.zeros((8, 1), bool), axes=(0,))[0]))(x)
    assert bool(jnp.all(jnp.isfinite(dx)))


def test_statistics_carry_no_gradient():
    x, *_ = inputs((16, 3), (0,), jnp.float32)

    def stats_sum(x):
        m = fused(x, axes=(0,))[1]
        return jnp.sum(m.shift + m.offset) + jnp.sum(m.var)

    chex.assert_trees_all_close(jax.grad(stats_sum)(x), jnp.zeros_like(x))


# -- residuals --------------------------------------------------------------


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16, jnp.float16])
@pytest.mark.parametrize("mask_shape", [None, (64, 1, 1, 1), (64, 8, 8, 32)])
def test_residuals_are_about_one_input(dtype, mask_shape):
    shape, axes = (64, 8, 8, 32), (0, 1, 2)
    x, scale, bias, _, mask = inputs(shape, axes, dtype, mask_shape)
    _, vjp = jax.vjp(lambda x, s, b: fused(x, mask, s, b, axes=axes), x, scale, bias)
    saved = sum(leaf.nbytes for leaf in jax.tree.leaves(vjp))
    mask_bytes = 0 if mask is None else mask.nbytes
    assert saved <= 1.1 * x.nbytes + mask_bytes


# -- transformations --------------------------------------------------------


def test_jit_vmap_and_remat_agree():
    axes = (0,)
    x, scale, bias, w, mask = inputs((4, 16, 3), (0, 1), jnp.float32, (4, 16, 1))
    assert mask is not None

    def loss(x, scale, bias):
        def one(x, mask, w):
            return jnp.sum(w * fused(x, mask, scale[0], bias[0], axes=axes)[0])

        return jnp.sum(jax.vmap(one)(x, mask, w))

    expected = [
        grads_of(fused, x[i], mask[i], scale[0], bias[0], w[i], axes=axes)
        for i in range(4)
    ]
    for fn in (loss, jax.jit(loss), jax.checkpoint(loss)):
        dx, ds, db = jax.grad(fn, (0, 1, 2))(x, scale, bias)
        chex.assert_trees_all_close(dx, jnp.stack([e[0] for e in expected]), atol=1e-5)
        chex.assert_trees_all_close(ds[0], sum(e[1] for e in expected), atol=1e-4)
        chex.assert_trees_all_close(db[0], sum(e[2] for e in expected), atol=1e-4)


@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("groups", [None, [[0, 1], [2, 3]]])
def test_axis_name_under_vmap_matches_global_batch(masked, groups):
    # Four "devices" of 8 rows each; each group's statistics and gradients are
    # those of its concatenated rows.
    shape = (4, 8, 3)
    x, scale, bias, w, mask = inputs(
        shape, (0, 1), jnp.float32, (4, 8, 1) if masked else None
    )
    scale, bias = scale[0], bias[0]
    mask = jnp.ones((4, 8, 1), bool) if mask is None else mask

    def loss(x, scale, bias):
        def device(x, mask, w):
            y = fused(
                x, mask, scale, bias, axes=(0,), axis_name="i", axis_index_groups=groups
            )[0]
            return jnp.sum(w * y)

        return jnp.sum(jax.vmap(device, axis_name="i")(x, mask, w))

    members = [[0, 1, 2, 3]] if groups is None else groups
    expected_dx = jnp.zeros_like(x)
    expected_ds = expected_db = 0.0
    for g in members:
        g = jnp.asarray(g)
        flat = (x[g].reshape(-1, 3), mask[g].reshape(-1, 1), w[g].reshape(-1, 3))
        e = grads_of(reference, flat[0], flat[1], scale, bias, flat[2], axes=(0,))
        expected_dx = expected_dx.at[g].set(e[0].reshape(len(g), 8, 3))
        expected_ds, expected_db = expected_ds + e[1], expected_db + e[2]
    dx, ds, db = jax.jit(jax.grad(loss, (0, 1, 2)))(x, scale, bias)
    chex.assert_trees_all_close(dx, expected_dx, atol=1e-5)
    chex.assert_trees_all_close((ds, db), (expected_ds, expected_db), atol=1e-4)


def test_shard_map_on_eight_devices_matches_global_batch():
    mesh = jax.make_mesh((8,), ("d",))
    x, scale, bias, w, _ = inputs((8 * 4, 5), (0,), jnp.float32, seed=5)

    def device(x, scale, bias, w):
        y, m = fused(x, None, scale, bias, axes=(0,), axis_name="d")
        return lax.psum(jnp.sum(w * y), "d"), m.var

    sharded = jax.shard_map(
        device, mesh=mesh, in_specs=(P("d"), P(), P(), P("d")), out_specs=(P(), P())
    )

    def loss(x, scale, bias, w):
        return sharded(x, scale, bias, w)[0]

    xs, ws = (jax.device_put(a, NamedSharding(mesh, P("d"))) for a in (x, w))
    with jax.set_mesh(mesh):
        var = jax.jit(sharded)(xs, scale, bias, ws)[1]
        grads = jax.jit(jax.grad(loss, (0, 1, 2)))(xs, scale, bias, ws)
    _, _, var_ref = reference(x, axes=(0,))
    chex.assert_trees_all_close(var, var_ref, rtol=1e-5)
    expected = grads_of(reference, x, None, scale, bias, w, axes=(0,))
    chex.assert_trees_all_close(tuple(grads), expected, atol=1e-4)


# -- the layer uses the fused path ------------------------------------------


def test_layer_training_uses_the_custom_jvp():
    layer = jaxbn.batch_norm(axis=(1, 2))
    x, *_ = inputs((6, 3, 7), (0,), jnp.float32)
    params, stats = layer.init(x)
    jaxpr = jax.make_jaxpr(lambda p, x: layer.apply(p, stats, x, train=True))(params, x)
    assert "custom_jvp_call" in str(jaxpr)


@settings(max_examples=8, deadline=None)
@given(
    shape=st.lists(st.integers(2, 5), min_size=2, max_size=4),
    data=st.data(),
)
def test_random_shapes_axes_and_masks(shape, data):
    ndim = len(shape)
    n_feature = data.draw(st.integers(1, ndim - 1))
    features = data.draw(st.permutations(range(ndim)))[:n_feature]
    axes = tuple(i for i in range(ndim) if i not in features)
    mask_shape = data.draw(
        st.one_of(
            st.none(), st.just(tuple(shape)), st.just((shape[0],) + (1,) * (ndim - 1))
        )
    )
    x, scale, bias, w, mask = inputs(tuple(shape), axes, jnp.float32, mask_shape)
    if mask is not None:
        # Every feature needs a valid value for the reference to be finite.
        mask = np.array(mask)
        mask[tuple(0 if i in axes else slice(None) for i in range(ndim))] = True
    _, (_, _, var_ref), grads, grads_ref = fused_and_reference(
        x, mask, scale, bias, w, axes=axes
    )
    # With two values per feature the input gradient is g * r * (t - mean(t))
    # * eps / (var + eps): the float32 rounding of x - mean is magnified
    # (var + eps) / eps times (seen: 2.4e-4 relative at var 4.3e-4, against
    # float64, for this layer and base alike; the float32 autodiff reference
    # rounds differently). More values per feature do not cancel so.
    two = math.prod(shape[a] for a in axes) == 2
    kappa = 1.0 + float(jnp.max(var_ref)) / EPS if two else 1.0
    for g, g_ref in zip(grads, grads_ref, strict=True):
        # Two values per feature make tiny gradients from O(1) terms: absolute
        # error at least ~1e-7 whatever the gradient's size.
        scale_of = max(float(jnp.max(jnp.abs(g_ref))), 1.0)
        chex.assert_trees_all_close(
            g, g_ref, atol=2e-5 * scale_of * kappa, rtol=1e-4 * kappa
        )
