"""Property tests with hypothesis: shapes, axes and dtypes against the reference."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import reference as ref
from hypothesis import given, settings
from hypothesis import strategies as st

import jaxbn

DTYPES = {"float32": (jnp.float32, 1e-4), "bfloat16": (jnp.bfloat16, 0.05)}
DTYPES["float16"] = (jnp.float16, 0.01)


@st.composite
def shapes_and_axes(draw):
    ndim = draw(st.integers(2, 4))
    shape = tuple(draw(st.lists(st.integers(1, 5), min_size=ndim, max_size=ndim)))
    n_features = draw(st.integers(1, ndim - 1))
    axes = draw(st.permutations(range(ndim)))[:n_features]
    signed = tuple(a - ndim if draw(st.booleans()) else a for a in axes)
    axis = signed[0] if len(signed) == 1 and draw(st.booleans()) else signed
    batch = int(np.prod([shape[i] for i in range(ndim) if i not in axes]))
    if batch < 2:  # training needs two values per feature
        first_batch_axis = next(i for i in range(ndim) if i not in axes)
        shape = tuple(2 if i == first_batch_axis else d for i, d in enumerate(shape))
    return shape, axis


@settings(max_examples=25, deadline=None)
@given(
    case=shapes_and_axes(),
    dtype=st.sampled_from(sorted(DTYPES)),
    seed=st.integers(0, 99),
)
def test_training_matches_reference_for_any_shape_axis_dtype(case, dtype, seed):
    shape, axis = case
    jdtype, tol = DTYPES[dtype]
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.normal(1.0, 2.0, shape), jdtype)
    layer = jaxbn.batch_norm(axis=axis, momentum=0.5, warmup=False)
    params, stats = layer.init(x)
    y, new = jax.jit(lambda p, s, x: layer.apply(p, s, x, train=True))(params, stats, x)
    assert y.dtype == jdtype and y.shape == x.shape
    xr = np.asarray(x.astype(jnp.float32), np.float64)
    _, mean, var = ref.moments(xr, axis)
    np.testing.assert_allclose(new["mean"], 0.5 * mean, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(new["var"], 0.5 + 0.5 * var, rtol=1e-5, atol=1e-5)
    y_ref = ref.normalize(xr, axis, mean, var)
    # Outputs are rounded to x's dtype; a constant feature normalizes to 0.
    np.testing.assert_allclose(np.asarray(y, np.float32), y_ref, atol=tol * 4, rtol=tol)
    # A constant input, far from the running mean: E[x^2] - E[x]^2 would
    # round to either sign; the batch variance (momentum 0 stores it) is never
    # negative and within the float32 resolution of the constant of 0.
    c = np.float32(1e4 / 3)
    batch = jaxbn.batch_norm(axis=axis, momentum=0.0, warmup=False)
    _, const = jax.jit(lambda p, s, x: batch.apply(p, s, x, train=True))(
        params, stats, jnp.full(shape, c, jnp.float32)
    )
    var = np.asarray(const["var"], np.float64)
    assert np.all(var >= 0) and np.all(var <= (2**-23 * c) ** 2), var


@settings(max_examples=15, deadline=None)
@given(case=shapes_and_axes(), seed=st.integers(0, 99))
def test_evaluation_is_elementwise_for_any_shape(case, seed):
    shape, axis = case
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.normal(size=shape), jnp.float32)
    layer = jaxbn.batch_norm(axis=axis)
    params, stats = layer.init(x)
    stats = {
        **stats,
        "mean": jnp.asarray(rng.normal(size=stats["mean"].shape), jnp.float32),
        "var": jnp.asarray(rng.uniform(0.1, 3, stats["var"].shape), jnp.float32),
    }
    y, same = layer.apply(params, stats, x, train=False)
    y_ref = ref.normalize(
        np.asarray(x), axis, np.asarray(stats["mean"]), np.asarray(stats["var"])
    )
    np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-5)
    assert same is stats
