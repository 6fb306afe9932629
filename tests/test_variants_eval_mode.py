"""``eval_mode="batch"``: evaluation with the batch's statistics, against NumPy
float64.

Tolerance: float32 normalizations of O(1) values: 1e-5.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import reference as ref

import jaxbn


def data(shape, seed=0):
    rng = np.random.default_rng(seed)
    return (0.5 + 2.0 * rng.standard_normal(shape)).astype(np.float32)


@pytest.mark.parametrize("use_jit", [False, True])
def test_eval_mode_batch_normalizes_with_batch_statistics(use_jit):
    x = jnp.asarray(data((12, 3)))
    mask = jnp.asarray(np.arange(12) % 4 != 0)[:, None]
    layer = jaxbn.batch_norm(eval_mode="batch")
    params, stats = layer.init(x)
    f = lambda s, x, t: layer.apply(params, s, x, train=t, mask=mask)  # noqa: E731
    f = jax.jit(f) if use_jit else f
    y_train, _ = f(stats, x, True)
    for train in (False, jnp.bool_(False)):
        y, same = f(stats, x, train)
        # The same computation; XLA may fuse it differently without the update.
        np.testing.assert_allclose(y, y_train, rtol=1e-6, atol=1e-6)
        jax.tree.map(np.testing.assert_array_equal, same, stats)
    _, mean, var = ref.moments(np.asarray(x), -1, np.asarray(mask))
    np.testing.assert_allclose(
        y_train, ref.normalize(np.asarray(x), -1, mean, var), rtol=1e-5, atol=1e-5
    )
    # The default evaluation still uses the running statistics.
    plain = jaxbn.batch_norm()
    y_run, _ = plain.apply(params, stats, x, train=False)
    np.testing.assert_allclose(y_run, np.asarray(x) / np.sqrt(1 + 1e-5), rtol=1e-6)


def test_eval_mode_batch_needs_two_values_and_mode_is_checked():
    layer = jaxbn.batch_norm(eval_mode="batch")
    params, stats = layer.init(jnp.ones((1, 3)))
    with pytest.raises(ValueError, match="a batch variance needs at least 2"):
        layer.apply(params, stats, jnp.ones((1, 3)), train=False)
    with pytest.raises(ValueError, match="eval_mode='local' is not known"):
        jaxbn.batch_norm(eval_mode="local")  # pyright: ignore[reportArgumentType]
