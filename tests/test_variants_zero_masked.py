"""``zero_masked=True``: zeroed padding, in training and evaluation."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxbn


def data(shape, seed=0):
    rng = np.random.default_rng(seed)
    return (0.5 + 2.0 * rng.standard_normal(shape)).astype(np.float32)


@pytest.mark.parametrize("train", [True, False])
def test_zero_masked_sets_padding_to_zero_and_nothing_else(train):
    x = data((4, 5, 3))
    x[1, 3:] = np.nan  # padding may hold NaN
    mask = np.ones((4, 5, 1), bool)
    mask[1, 3:] = False
    mask[2, 4:] = False
    zeroed = jaxbn.batch_norm(zero_masked=True)
    plain = jaxbn.batch_norm()
    params, stats = plain.init(x)
    y, _ = zeroed.apply(params, stats, jnp.asarray(x), train=train, mask=mask)
    y_plain, _ = plain.apply(params, stats, jnp.asarray(x), train=train, mask=mask)
    full = np.broadcast_to(mask, x.shape)
    np.testing.assert_array_equal(np.asarray(y)[~full], 0.0)
    np.testing.assert_array_equal(np.asarray(y)[full], np.asarray(y_plain)[full])
    grad = jax.grad(
        lambda x: jnp.sum(
            zeroed.apply(params, stats, x, train=train, mask=mask)[0] ** 2
        )
    )(jnp.asarray(x))
    assert np.all(np.isfinite(grad))
    np.testing.assert_array_equal(np.asarray(grad)[~full], 0.0)
