"""Tests of ``jaxbn.StatsReport.as_metrics``: describe's figures as flat scalars."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jaxbn
import jaxbn.linen
import jaxbn.nnx


def reference(mean, var):
    """NumPy float64: the figures of one layer over its finite features."""
    mean, var = np.asarray(mean, np.float64), np.asarray(var, np.float64)
    finite = np.isfinite(mean) & np.isfinite(var)
    return {
        "mean_abs": np.abs(mean[finite]).mean(),
        "var_mean": var[finite].mean(),
        "max_abs_mean": np.abs(mean[finite]).max(),
        "min_var": var[finite].min(),
        "max_var": var[finite].max(),
    }


class Net(nn.Module):
    @nn.compact
    def __call__(self, x, train):
        x = nn.Dense(5)(x)
        x = jaxbn.linen.BatchNorm(use_running_average=not train)(x)
        x = nn.Dense(3)(nn.relu(x))
        return jaxbn.linen.BatchNorm(use_running_average=not train, name="head")(x)


def test_linen_tree_against_numpy():
    x = jax.random.normal(jax.random.key(0), (16, 4)) * 3.0 + 2.0
    variables = Net().init(jax.random.key(1), x, train=False)
    _, updates = Net().apply(variables, x, train=True, mutable=["batch_stats"])
    stats = updates["batch_stats"]
    metrics = jaxbn.describe(stats).as_metrics(prefix="bn/")
    for layer in ("BatchNorm_0", "head"):
        s = stats[layer]
        for key, want in reference(s["mean"], s["var"]).items():
            # float32 statistics summed in float64 on both sides.
            assert metrics[f"bn/{layer}/{key}"] == pytest.approx(want, rel=1e-12)
        assert metrics[f"bn/{layer}/count"] == 1.0
        assert metrics[f"bn/{layer}/decay"] == pytest.approx(2 / 11)
        assert metrics[f"bn/{layer}/warmed_up"] == 0.0
        assert metrics[f"bn/{layer}/zero_var"] == 0.0
    assert metrics["bn/BatchNorm_0/features"] == 5.0
    assert metrics["bn/head/features"] == 3.0
    assert all(type(v) is float for v in metrics.values())
    assert all(k.startswith("bn/") for k in metrics)
    assert not any(k.endswith("/problems") for k in metrics)


def test_keys_are_the_numeric_figures_of_as_dict():
    stats = {"a": {"b": {"mean": jnp.array([1.0, -4.0]), "var": jnp.ones(2)}}}
    report = jaxbn.describe(stats)
    metrics = report.as_metrics()
    row = report.as_dict()["a/b"]
    numeric = {k for k, v in row.items() if isinstance(v, int | float)}
    assert set(metrics) == {f"a/b/{k}" for k in numeric}
    assert "count" not in numeric  # saved without one (Flax): no count metric
    assert metrics["a/b/mean_abs"] == 2.5 and metrics["a/b/max_abs_mean"] == 4.0


def test_non_finite_features_are_left_out_of_the_means():
    mean = [2.0, np.nan, -6.0, 1.0]
    var = [1.0, 5.0, 3.0, np.inf]
    stats = {"bn": {"mean": jnp.array(mean), "var": jnp.array(var)}}
    metrics = jaxbn.describe(stats).as_metrics()
    want = reference(mean, var)
    assert metrics["bn/mean_abs"] == pytest.approx(want["mean_abs"]) == 4.0
    assert metrics["bn/var_mean"] == pytest.approx(want["var_mean"]) == 2.0
    assert metrics["bn/nonfinite"] == 2.0
    nothing = {"bn": {"mean": jnp.array([np.nan]), "var": jnp.array([1.0])}}
    assert np.isnan(jaxbn.describe(nothing).as_metrics()["bn/mean_abs"])


def test_nnx_model():
    bn = jaxbn.nnx.BatchNorm(3, momentum=0.9, rngs=nnx.Rngs(0))
    x = jnp.array([[1.0, 2.0, -8.0], [3.0, 6.0, -2.0]])
    bn(x)
    metrics = jaxbn.describe(bn).as_metrics()
    want = reference(bn.mean[...], bn.var[...])
    assert metrics["./mean_abs"] == pytest.approx(want["mean_abs"], rel=1e-12)
    assert metrics["./var_mean"] == pytest.approx(want["var_mean"], rel=1e-12)
    assert metrics["./count"] == 1.0
