"""``debias``: evaluation with zero-debiased running averages.

Against a NumPy float64 reference of a plain moving average started at mean
0, var 1, with ``p = momentum**count``: the mean divided by ``1 - p`` (the
mean only for "mean", TensorFlow's ``zero_debias_moving_mean``), and for
"mean_and_var" the variance ``(var - p) / (1 - p)``, which undoes its start
at 1 (Equinox's ``mode="batch"`` divides it, which overstated it: after one
step at momentum 0.99 an output std of 0.245 instead of 1). Training outputs
and the stored statistics are those of ``debias=None``; float32 against
float64 over 3 steps: 1e-5.
"""

import jax.numpy as jnp
import numpy as np
import pytest

import jaxbn


def batches():
    rng = np.random.default_rng(0)
    return [
        (k + (1 + k) * rng.standard_normal((16, 2))).astype(np.float32)
        for k in range(3)
    ]


@pytest.mark.parametrize("debias", ["mean", "mean_and_var"])
def test_evaluation_divides_by_one_minus_momentum_to_the_count(debias):
    m = 0.9
    layer = jaxbn.batch_norm(momentum=m, warmup=False, debias=debias)
    plain = jaxbn.batch_norm(momentum=m, warmup=False)
    params, stats = layer.init(jnp.zeros((16, 2)))
    _, plain_stats = plain.init(jnp.zeros((16, 2)))
    mean, var = np.zeros(2), np.ones(2)
    for x in batches():
        y, stats = layer.apply(params, stats, jnp.asarray(x), train=True)
        y_plain, plain_stats = plain.apply(
            params, plain_stats, jnp.asarray(x), train=True
        )
        np.testing.assert_array_equal(y, y_plain)
        x64 = x.astype(np.float64)
        mean = m * mean + (1 - m) * x64.mean(0)
        var = m * var + (1 - m) * x64.var(0)
    for key in ("mean", "var", "count"):
        np.testing.assert_array_equal(stats[key], plain_stats[key])
    factor = 1 - m**3
    want_mean = mean / factor
    want_var = (var - m**3) / factor if debias == "mean_and_var" else var
    x = batches()[0]
    y, _ = layer.apply(params, stats, jnp.asarray(x), train=False)
    want = (x - want_mean) / np.sqrt(want_var + 1e-5)
    np.testing.assert_allclose(y, want, rtol=1e-5, atol=1e-5)


def test_no_update_yet_means_no_division():
    layer = jaxbn.batch_norm(momentum=0.9, warmup=False, debias="mean_and_var")
    params, stats = layer.init(jnp.zeros((4, 2)))
    x = jnp.asarray(batches()[1][:4])
    y, _ = layer.apply(params, stats, x, train=False)
    np.testing.assert_allclose(y, x / jnp.sqrt(1 + 1e-5), rtol=1e-6)


def test_debias_errors_say_what_to_pass():
    with pytest.raises(
        ValueError, match="needs a momentum in \\[0, 1\\) and warmup=False"
    ):
        jaxbn.batch_norm(debias="mean")  # warm-up is on by default
    with pytest.raises(ValueError, match="needs a momentum"):
        jaxbn.batch_norm(momentum=None, debias="mean")
    with pytest.raises(ValueError, match="debias='both' is not known"):
        jaxbn.batch_norm(warmup=False, debias="both")  # pyright: ignore[reportArgumentType]


@pytest.mark.parametrize("momentum", [0.9, 0.99, 0.999])
def test_mean_and_var_is_the_average_of_the_batches_from_the_first_step(momentum):
    # The case: x = 1 + 2.5 N(0, 1); evaluating on the batches seen
    # gives outputs of std 1 from the first step on (dividing the variance,
    # which starts at 1, by 1 - momentum gave 0.245 at momentum 0.99).
    rng = np.random.default_rng(1)
    layer = jaxbn.batch_norm(momentum=momentum, warmup=False, debias="mean_and_var")
    x0 = (1 + 2.5 * rng.standard_normal((256, 4))).astype(np.float32)
    params, stats = layer.init(jnp.asarray(x0))
    sums = np.zeros((2, 4))
    weights = 0.0
    for step in range(5):
        x = (
            x0
            if step == 0
            else (1 + 2.5 * rng.standard_normal((256, 4))).astype(np.float32)
        )
        _, stats = layer.apply(params, stats, jnp.asarray(x), train=True)
        # The exponentially weighted average of the batches alone, in float64.
        x64 = x.astype(np.float64)
        sums = momentum * sums + (1 - momentum) * np.stack([x64.mean(0), x64.var(0)])
        weights = momentum * weights + (1 - momentum)
        y, _ = layer.apply(params, stats, jnp.asarray(x0), train=False)
        want = (x0 - sums[0] / weights) / np.sqrt(sums[1] / weights + 1e-5)
        # (var - p) / (1 - p) magnifies the float32 rounding of var by
        # 1 / (1 - p): up to 1000 at momentum 0.999, ~6e-5 of var here.
        np.testing.assert_allclose(np.asarray(y), want, rtol=1e-4, atol=1e-4)
        if step == 0:
            assert abs(float(jnp.std(y)) - 1.0) < 1e-3
