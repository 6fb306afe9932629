"""Tests of ``jaxbn.describe`` and ``jaxbn.reset_stats``."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jaxbn
import jaxbn.linen
import jaxbn.nnx

# Any random values do here: see the fixture (conftest.py).
pytestmark = pytest.mark.usefixtures("non_partitionable_threefry")


def layer(mean, var, count=None):
    out = {"mean": jnp.asarray(mean, jnp.float32), "var": jnp.asarray(var, jnp.float32)}
    if count is not None:
        out["count"] = jnp.asarray(count, jnp.int32)
    return out


def test_warm_up_and_decay_follow_the_core_rule():
    stats = {
        "early": layer([0.0], [1.0], 0),
        "almost": layer([0.0], [1.0], 79),  # 80 / 89 < 0.9
        "done": layer([0.0], [1.0], 80),  # 81 / 90 = 0.9
    }
    rows = jaxbn.describe(stats, momentum=0.9).as_dict()
    assert rows["early"]["decay"] == pytest.approx(0.1)
    assert not rows["almost"]["warmed_up"]
    assert rows["almost"]["decay"] == pytest.approx(80 / 89)
    assert rows["done"]["warmed_up"] and rows["done"]["decay"] == pytest.approx(0.9)
    for name, row in rows.items():  # the same decay as the core's update
        core = jaxbn.decay(stats[name]["count"], 0.9, True)
        assert row["decay"] == pytest.approx(float(core), rel=1e-6)
    no_warmup = jaxbn.describe(stats, momentum=0.9, warmup=False).as_dict()
    assert no_warmup["early"]["warmed_up"] and no_warmup["early"]["decay"] == 0.9


def test_problems_are_counted():
    stats = {
        "a": {
            "b": layer(
                [0.0, 50.0, np.nan, 1.0, 3.0],
                [1.0, 4.0, 1.0, 0.0, -2.0],
                5,
            )
        },
        "fine": layer([1.0, -2.0], [4.0, 9.0], 3),
    }
    report = jaxbn.describe(stats)
    row = report.as_dict()["a/b"]
    assert (row["zero_var"], row["negative_var"], row["nonfinite"]) == (1, 1, 1)
    # 50 > 10 * 2 and 1 > 10 * 0 are far; 0 and the NaN are not.
    assert row["far_means"] == 2
    assert row["max_abs_mean"] == 50.0
    assert (row["min_var"], row["max_var"]) == (-2.0, 4.0)
    assert row["problems"] == [
        "1 zero var",
        "1 negative var",
        "1 non-finite",
        "2 mean > 10 std",
    ]
    assert report.as_dict()["fine"]["problems"] == []
    assert not report.ok
    assert jaxbn.describe({"fine": stats["fine"]}).ok
    assert jaxbn.describe(stats, far=30).as_dict()["a/b"]["far_means"] == 2 - 1


def test_table_lists_every_layer():
    stats = {"a": {"b": layer([0.0, 0.0], [0.0, 1.0], 3)}, "c": layer([1.0], [1.0], 0)}
    text = str(jaxbn.describe(stats))
    lines = text.splitlines()
    assert lines[0].split()[:3] == ["layer", "features", "count"]
    assert lines[1].split()[:3] == ["a/b", "2", "3"] and "1 zero var" in lines[1]
    assert lines[2].split()[:3] == ["c", "1", "0"] and lines[2].endswith("-")
    assert repr(jaxbn.describe(stats)) == text


def test_linen_variables_and_flax_statistics():
    x = jnp.ones((4, 3))
    ours = jaxbn.linen.BatchNorm(use_running_average=True).init(jax.random.key(0), x)
    rows = jaxbn.describe(ours).as_dict()  # whole variable dict: batch_stats read
    assert list(rows) == ["."] and rows["."]["count"] == 0
    theirs = nn.BatchNorm(use_running_average=True).init(jax.random.key(0), x)
    row = jaxbn.describe(theirs["batch_stats"]).as_dict()["."]
    assert row["count"] is None and row["warmed_up"] and row["decay"] == 0.99
    assert "-" in str(jaxbn.describe(theirs)).splitlines()[1].split()[2]


def test_nnx_layers_give_their_own_momentum():
    class Net(nnx.Module):
        def __init__(self):
            self.a = jaxbn.nnx.BatchNorm(2, momentum=0.5, rngs=nnx.Rngs(0))
            self.b = jaxbn.nnx.BatchNorm(3, warmup=False, rngs=nnx.Rngs(0))
            self.flax = nnx.BatchNorm(4, momentum=0.7, rngs=nnx.Rngs(0))

    net = Net()
    net.a.count[...] = jnp.int32(8)  # 9 / 18 = 0.5: warmed up
    rows = jaxbn.describe(net).as_dict()
    assert rows["a"]["warmed_up"] and rows["a"]["decay"] == 0.5
    assert rows["b"]["warmed_up"] and rows["b"]["decay"] == 0.99
    assert rows["flax"]["count"] is None and rows["flax"]["decay"] == 0.7


def test_describe_errors():
    with pytest.raises(TypeError, match="batch_stats tree"):
        jaxbn.describe([1, 2])
    with pytest.raises(ValueError, match="no batch-norm statistics"):
        jaxbn.describe({"params": {"w": jnp.ones(2)}})
    with pytest.raises(ValueError, match="momentum must be in"):
        jaxbn.describe({"a": layer([0.0], [1.0])}, momentum=1.5)
    with pytest.raises(ValueError, match="far must be a positive"):
        jaxbn.describe({"a": layer([0.0], [1.0])}, far=0)


def test_reset_stats_tree_keeps_structure_and_dtypes():
    variables = {
        "params": {"bn": {"scale": jnp.full(2, 3.0)}},
        "batch_stats": {
            "bn": layer([1.0, 2.0], [3.0, 4.0], 9),
            "old": {
                "mean": jnp.ones(2, jnp.bfloat16),
                "var": jnp.full(2, 5.0, jnp.bfloat16),
            },
        },
    }
    fresh = jaxbn.reset_stats(variables)
    assert fresh["params"] is variables["params"]
    bn = fresh["batch_stats"]["bn"]
    np.testing.assert_array_equal(bn["mean"], [0.0, 0.0])
    np.testing.assert_array_equal(bn["var"], [1.0, 1.0])
    assert int(bn["count"]) == 0 and bn["count"].dtype == jnp.int32
    old = fresh["batch_stats"]["old"]
    assert set(old) == {"mean", "var"} and old["var"].dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(old["var"], np.float32), [1.0, 1.0])
    assert jax.tree.structure(fresh) == jax.tree.structure(variables)
    # The core's single-layer dict.
    single = jaxbn.reset_stats(layer([4.0], [2.0], 3))
    assert float(single["mean"][0]) == 0 and int(single["count"]) == 0


def test_reset_stats_nnx_in_place():
    bn = jaxbn.nnx.BatchNorm(2, rngs=nnx.Rngs(0))
    bn(jnp.array([[1.0, 2.0], [3.0, 7.0]]))
    assert int(bn.count[...]) == 1
    assert jaxbn.reset_stats(bn) is None
    np.testing.assert_array_equal(bn.mean[...], [0.0, 0.0])
    np.testing.assert_array_equal(bn.var[...], [1.0, 1.0])
    assert int(bn.count[...]) == 0


def test_reset_stats_errors():
    with pytest.raises(TypeError, match="batch_stats tree"):
        jaxbn.reset_stats(3)
    with pytest.raises(ValueError, match="no batch-norm statistics"):
        jaxbn.reset_stats({"params": {}})
    with pytest.raises(ValueError, match="no batch-norm statistics"):
        jaxbn.reset_stats(nnx.Linear(2, 2, rngs=nnx.Rngs(0)))


def test_nnx_cumulative_and_frozen_layers_report_their_decay():
    from flax import nnx

    import jaxbn.nnx

    class Two(nnx.Module):
        def __init__(self):
            self.cumulative = jaxbn.nnx.BatchNorm(2, momentum=None, rngs=nnx.Rngs(0))
            self.frozen = jaxbn.nnx.BatchNorm(2, momentum=1.0, rngs=nnx.Rngs(0))

    model = Two()
    x = jnp.arange(8.0).reshape(4, 2)
    for _ in range(3):
        model.cumulative(x)
    rows = jaxbn.describe(model).as_dict()
    # Cumulative: the next update weighs the 3 batches so far 3/4.
    assert rows["cumulative"]["decay"] == pytest.approx(0.75)
    assert rows["cumulative"]["warmed_up"] is True
    assert rows["frozen"]["decay"] == 1.0


def test_mark_converged_is_the_one_way_for_trees_and_nnx():
    assert jaxbn.nnx.mark_converged is jaxbn.mark_converged
    x = jnp.asarray(np.random.default_rng(0).normal(2.0, 3.0, (16, 3)), jnp.float32)
    # Flax linen variables: no count; one is added in the Flax adapters' dtype,
    # and jaxbn then continues with decay momentum, exactly like Flax.
    flax_model = nn.BatchNorm(use_running_average=False, momentum=0.9)
    flax_vars = flax_model.init(jax.random.key(0), x)
    _, updates = flax_model.apply(flax_vars, x + 1.0, mutable=["batch_stats"])
    flax_vars = {**flax_vars, **updates}
    marked = jaxbn.mark_converged(flax_vars)
    assert marked["batch_stats"]["count"].dtype == jnp.float32
    assert float(marked["batch_stats"]["count"]) == 2**30
    assert "count" not in flax_vars["batch_stats"]  # the input is not changed
    ours = jaxbn.linen.BatchNorm(use_running_average=False, momentum=0.9)
    _, new = ours.apply(marked, x, mutable=["batch_stats"])
    _, ref = flax_model.apply(flax_vars, x, mutable=["batch_stats"])
    new_mean, ref_mean = (np.asarray(v["batch_stats"]["mean"]) for v in (new, ref))  # pyright: ignore[reportIndexIssue]
    np.testing.assert_allclose(new_mean, ref_mean, rtol=1e-6)
    # A core tree with a count: set, in its own dtype; count=0 restarts warm-up.
    core = {"bn": {"mean": jnp.ones(2), "var": jnp.ones(2), "count": jnp.int32(5)}}
    assert jaxbn.mark_converged(core)["bn"]["count"].dtype == jnp.int32
    assert int(jaxbn.mark_converged(core, count=0)["bn"]["count"]) == 0
    # nnx: in place, every layer that keeps a count.
    bn = jaxbn.nnx.BatchNorm(3, rngs=nnx.Rngs(0))
    assert jaxbn.mark_converged(bn) is None
    assert float(bn.count[...]) == 2**30


def test_mark_converged_errors():
    with pytest.raises(TypeError, match="tree of dicts"):
        jaxbn.mark_converged([1, 2])
    with pytest.raises(ValueError, match="no batch-norm statistics"):
        jaxbn.mark_converged({"params": {}})
    with pytest.raises(ValueError, match="does not fit an int32"):
        jaxbn.mark_converged({"bn": {"mean": jnp.ones(2), "var": jnp.ones(2)}}, 2**31)
    with pytest.raises(TypeError, match="count must be a Python int"):
        stats = {"bn": {"mean": jnp.ones(2), "var": jnp.ones(2)}}
        jaxbn.mark_converged(stats, 1.5)  # pyright: ignore[reportArgumentType]
    with pytest.raises(ValueError, match="no batch norm"):
        jaxbn.mark_converged(nnx.Linear(2, 2, rngs=nnx.Rngs(0)))
