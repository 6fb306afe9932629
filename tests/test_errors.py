"""Every documented error: raised at trace time, naming the argument and the fix."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxbn


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        (
            {"momentum": 1.5},
            ValueError,
            r"momentum must be in \[0, 1\] or None, got 1.5",
        ),
        ({"momentum": -0.1}, ValueError, r"momentum must be in \[0, 1\]"),
        ({"momentum": jnp.float32(0.9)}, TypeError, "momentum must be a Python float"),
        (
            {"epsilon": 0.0},
            ValueError,
            "epsilon must be a positive finite float, got 0.0",
        ),
        ({"epsilon": -1e-5}, ValueError, "epsilon must be a positive"),
        ({"axis": 1.5}, TypeError, "axis must be an int or a tuple of ints"),
        ({"axis": ()}, TypeError, "non-empty tuple"),
        ({"axis": True}, TypeError, "axis must be an int"),
        ({"dtype": jnp.int32}, TypeError, "dtype must be a floating dtype"),
        ({"param_dtype": "int8"}, TypeError, "param_dtype must be a floating dtype"),
        ({"axis_index_groups": [[0, 1]]}, ValueError, "without axis_name"),
    ],
)
def test_bad_hyperparameters(kwargs, error, match):
    with pytest.raises(error, match=match):
        jaxbn.batch_norm(**kwargs)


@pytest.fixture
def layer_and_state():
    layer = jaxbn.batch_norm()
    x = jnp.ones((4, 64))
    params, stats = layer.init(x)
    return layer, params, stats, x


@pytest.mark.parametrize(
    ("axis", "match"),
    [
        (
            2,
            r"axis=2 is out of range for x with 2 dimensions; expected values in \[-2, 1\]",
        ),
        (-3, "out of range"),
        ((0, -2), "names the same dimension twice"),
        ((0, 1), "leaving nothing to reduce over"),
    ],
)
def test_axis_out_of_range_or_repeated(axis, match):
    with pytest.raises(ValueError, match=match):
        jaxbn.batch_norm(axis=axis).init(jnp.ones((4, 3)))


@pytest.mark.parametrize("dtype", [jnp.int32, jnp.uint8, jnp.bool_])
def test_integer_or_bool_x(dtype, layer_and_state):
    layer, params, stats, _ = layer_and_state
    x = jnp.ones((4, 64), dtype)
    with pytest.raises(TypeError, match=f"x has dtype {jnp.dtype(dtype)}"):
        layer.apply(params, stats, x, train=True)
    with pytest.raises(TypeError, match="floating or complex input"):
        layer.init(x)


def test_complex_x_with_real_statistics_is_refused(layer_and_state):
    # A real running mean cannot hold a complex batch mean: refuse rather
    # than silently drop the imaginary part.
    layer, params, stats, _ = layer_and_state
    x = jnp.ones((4, 64), jnp.complex64)
    with pytest.raises(TypeError, match=r"batch_stats\['mean'\] has dtype float32"):
        layer.apply(params, stats, x, train=True)


def test_x_not_an_array(layer_and_state):
    layer, params, stats, _ = layer_and_state
    with pytest.raises(TypeError, match="x must be a jax.Array"):
        layer.apply(params, stats, [[1.0, 2.0]], train=True)


def test_stats_of_a_different_input(layer_and_state):
    layer, params, _, _ = layer_and_state
    _, stats32 = layer.init(jnp.ones((4, 32)))
    with pytest.raises(
        ValueError,
        match=r"batch_stats\['mean'\] has shape \(32,\) but x has 64 features along "
        r"axis -1; did you call init on a different input\?",
    ):
        layer.apply(params, stats32, jnp.ones((4, 64)), train=True)


def test_params_of_a_different_input(layer_and_state):
    layer, _, stats, x = layer_and_state
    params, _ = layer.init(jnp.ones((4, 8)))
    with pytest.raises(ValueError, match=r"params\['scale'\] has shape \(8,\)"):
        layer.apply(params, stats, x, train=False)


def test_tuple_axes_message():
    layer = jaxbn.batch_norm(axis=(1, 2))
    params, stats = layer.init(jnp.ones((2, 3, 4)))
    with pytest.raises(ValueError, match=r"feature shape \(3, 5\) along axes \(1, 2\)"):
        layer.apply(params, stats, jnp.ones((2, 3, 5)), train=True)


def test_missing_and_unexpected_keys(layer_and_state):
    layer, params, stats, x = layer_and_state
    no_count = {k: v for k, v in stats.items() if k != "count"}
    with pytest.raises(ValueError, match=r"missing \['count'\]"):
        layer.apply(params, no_count, x, train=True)
    with pytest.raises(ValueError, match=r"unexpected \['offset'\]"):
        layer.apply({**params, "offset": params["bias"]}, stats, x, train=True)
    with pytest.raises(TypeError, match="batch_stats must be the dict returned by"):
        layer.apply(params, (stats["mean"], stats["var"]), x, train=True)


def test_stats_of_the_wrong_dtype(layer_and_state):
    layer, params, stats, x = layer_and_state
    bad = {**stats, "var": stats["var"].astype(jnp.bfloat16)}
    with pytest.raises(TypeError, match=r"batch_stats\['var'\] has dtype bfloat16"):
        layer.apply(params, bad, x, train=False)
    bad = {**stats, "count": jnp.float32(0)}
    with pytest.raises(TypeError, match=r"batch_stats\['count'\] has dtype float32"):
        layer.apply(params, bad, x, train=True)
    bad = {**stats, "count": jnp.zeros((1,), jnp.int32)}
    with pytest.raises(ValueError, match=r"batch_stats\['count'\] has shape \(1,\)"):
        layer.apply(params, bad, x, train=True)


@pytest.mark.parametrize(
    "train", [1, 0, "yes", None, jnp.array([True]), jnp.int32(1), np.float32(1)]
)
def test_train_must_be_a_bool(train, layer_and_state):
    layer, params, stats, x = layer_and_state
    with pytest.raises(
        TypeError, match="train must be a Python bool or a scalar boolean"
    ):
        layer.apply(params, stats, x, train=train)


def test_errors_are_raised_at_trace_time(layer_and_state):
    layer, params, _, x = layer_and_state
    _, stats32 = layer.init(jnp.ones((4, 32)))
    traced = jax.jit(lambda p, s, x: layer.apply(p, s, x, train=True))
    with pytest.raises(ValueError, match="did you call init on a different input"):
        jax.eval_shape(traced, params, stats32, x)


def test_training_needs_two_values_per_feature():
    layer = jaxbn.batch_norm()
    params, stats = layer.init(jnp.ones((1, 3)))
    with pytest.raises(ValueError, match=r"each feature sees 1 value\(s\)"):
        layer.apply(params, stats, jnp.ones((1, 3)), train=True)
    y, _ = layer.apply(params, stats, jnp.ones((1, 3)), train=False)  # eval is fine
    assert y.shape == (1, 3)


def test_two_values_counting_devices_of_axis_name():
    layer = jaxbn.batch_norm(axis_name="batch")
    params, stats = layer.init(jnp.ones((2, 3)))

    def per_example(x):  # x has shape (3,): its batch is the vmapped axis
        return layer.apply(params, stats, x[None], train=True)[0][0]

    y = jax.vmap(per_example, axis_name="batch")(jnp.arange(6.0).reshape(2, 3))
    assert y.shape == (2, 3)
    with pytest.raises(ValueError, match=r"1 per device x 1 device"):
        jax.vmap(per_example, axis_name="batch")(jnp.ones((1, 3)))


def test_unbound_axis_name():
    layer = jaxbn.batch_norm(axis_name="devices")
    params, stats = layer.init(jnp.ones((4, 3)))
    with pytest.raises(ValueError, match="axis_name='devices' is not bound here"):
        layer.apply(params, stats, jnp.ones((4, 3)), train=True)


@pytest.mark.parametrize(
    ("mask", "error", "match"),
    [
        (jnp.ones((4, 64), jnp.float32), TypeError, "mask must be a boolean array"),
        (jnp.ones((4,), bool), ValueError, "does not broadcast"),
        (jnp.ones((3, 1), bool), ValueError, "does not broadcast"),
        (jnp.ones((4, 64, 1), bool), ValueError, "more dimensions than x"),
    ],
)
def test_bad_mask(mask, error, match, layer_and_state):
    layer, params, stats, x = layer_and_state
    with pytest.raises(error, match=match):
        layer.apply(params, stats, x, train=True, mask=mask)


def test_mask_may_not_enlarge_x(layer_and_state):
    layer, params, stats, _ = layer_and_state
    with pytest.raises(ValueError, match="would enlarge x"):
        layer.apply(
            params, stats, jnp.ones((1, 64)), train=True, mask=jnp.ones((4, 64), bool)
        )
