"""``benchmarks/knockouts.py``: each knock-out removes what it is named for.

The benchmark reports what each guarantee costs in ops and compile time; its
figures mean something only if each copy loses exactly the named guarantee,
and keeps computing the same for ordinary input. Each check below holds for
this checkout and fails for the knock-out. The op counts are of lowered
StableHLO text: exact, not timings.
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxbn
from benchmarks import knockouts


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("knockouts")
    return {k: knockouts.load(k, root / k) for k in knockouts.KNOCKOUTS}


def _train(module, x, **kwargs):
    layer = module.batch_norm(**kwargs)
    params, stats = layer.init(x)
    return layer.apply(params, stats, x, train=True)


def test_ordinary_input_gives_the_same_output(built):
    x = jnp.asarray(np.random.default_rng(0).normal(0.5, 2, (64, 8)), jnp.float32)
    y, stats = _train(jaxbn, x)
    for module in built.values():
        y_k, stats_k = _train(module, x)
        np.testing.assert_allclose(y_k, y, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(stats_k["var"], stats["var"], rtol=1e-5)


def _far_from_the_running_mean_error(module):
    # The running mean starts at 0; the batch mean is 1e4 standard deviations
    # away, where one pass around 0 cancels catastrophically in float32.
    x = jnp.asarray(1e4 + np.random.default_rng(1).normal(0, 1, (256, 4)), jnp.float32)
    values = np.asarray(x, np.float64)  # the reference sees x as the layer does
    y, _ = _train(module, x, epsilon=1e-5)
    want = (values - values.mean(0)) / np.sqrt(values.var(0) + 1e-5)
    return float(np.max(np.abs(np.asarray(y, np.float64) - want)))


def _nan_batch_stats(module):
    x = jnp.asarray([[1.0, 2.0], [np.nan, 3.0], [2.0, 4.0]], jnp.float32)
    _, stats = _train(module, x)
    return stats


def _overflow_gradients(module):
    x = jnp.asarray([[1e20], [-1e20], [3e19]], jnp.float32)
    layer = module.batch_norm()
    params, stats = layer.init(x)
    # sum(dy * (x - mean)) overflows float32 (|dy * x| ~ 1e39).
    w = 1e19 * jnp.asarray([[1.0], [2.0], [-0.5]])

    def loss(params, x):
        return jnp.sum(w * layer.apply(params, stats, x, train=True)[0])

    return jax.jit(jax.grad(loss, argnums=(0, 1)))(params, x)


def _all_finite(tree) -> bool:
    return all(bool(jnp.all(jnp.isfinite(a))) for a in jax.tree.leaves(tree))


def test_loop_knockout_loses_exactness_far_from_the_running_mean(built):
    # This checkout: float32 rounding of y (~1e-6); the knock-out's variance
    # is off by orders of magnitude (1e3 in y was seen).
    assert _far_from_the_running_mean_error(jaxbn) < 1e-4
    assert _far_from_the_running_mean_error(built["loop"]) > 1e-1
    assert _far_from_the_running_mean_error(built["all"]) > 1e-1


def test_non_finite_knockout_lets_a_nan_batch_into_the_statistics(built):
    stats = _nan_batch_stats(jaxbn)
    assert _all_finite(stats) and int(stats["count"]) == 0
    for name in ("non-finite", "all"):
        stats = _nan_batch_stats(built[name])
        assert not _all_finite(stats) and int(stats["count"]) == 1


def test_overflow_guard_knockout_gives_nan_gradients(built):
    assert _all_finite(_overflow_gradients(jaxbn))
    for name in ("overflow-guard", "all"):
        assert not _all_finite(_overflow_gradients(built[name]))


def test_each_knockout_shrinks_the_program(built):
    layers = knockouts.sides(built)
    counts = knockouts.op_counts(layers)
    this = counts["this"]
    for name in knockouts.KNOCKOUTS:
        assert counts[name]["step"] < this["step"], name
        assert counts[name + ", warmup=False"]["step"] < counts[name]["step"], name
    assert counts["all"]["forward"] < counts["loop"]["forward"]
    assert counts["all"]["forward"] < counts["non-finite"]["forward"]
    table = knockouts.render(counts, {k: 2.0 for k in counts} | {"flax.linen": 1.0})
    row = r"\| all \| \d+ \(\d\.\d\dx\) \| \d+ .* \| 2\.00 s \(2\.000x\) \|"
    assert re.search(row, table), table


def test_an_edit_that_no_longer_matches_is_refused(tmp_path, monkeypatch):
    stale = knockouts.KnockOut("nothing", (("_passes.py", "no such text", ""),))
    monkeypatch.setitem(knockouts.KNOCKOUTS, "stale", stale)
    with pytest.raises(ValueError, match="occurs 0 times in jaxbn/_passes.py"):
        knockouts.build("stale", tmp_path)
