"""Tests of jaxbn.interop: round trips, and parity with the real frameworks.

Each framework's tests skip with a reason where it is not installed. Parity
tolerances are float32 ones: outputs are normalized values of order 1 computed
by different reduction orders and formulas (e.g. ``(x - m) / sqrt(v + eps) * w``
against jaxbn's ``(x - m) * (w * rsqrt(v + eps))``), so they agree to a few
float32 ulps of their inputs' magnitude, about 1e-6; 1e-5 leaves a margin for
the batch statistics' own rounding (a sum over at most a few hundred values).
Running statistics are weighted sums of such statistics and get the same bound.
"""

from __future__ import annotations

import functools
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from reference import close

import jaxbn
from jaxbn import interop

# Any random values do here: see the fixture (conftest.py).
pytestmark = pytest.mark.usefixtures("non_partitionable_threefry")


CONVERGED = interop.CONVERGED_COUNT
ROOT = Path(__file__).resolve().parents[1]


def _rand(seed: int, *shape: int, loc: float = 0.5, scale: float = 2.0) -> np.ndarray:
    return np.random.default_rng(seed).normal(loc, scale, shape).astype(np.float32)


def _random_variables(c: int, seed: int = 0, count: int = 17):
    rng = np.random.default_rng(seed)
    params = {
        "scale": jnp.asarray(rng.normal(1.0, 0.3, c), jnp.float32),
        "bias": jnp.asarray(rng.normal(0.0, 0.3, c), jnp.float32),
    }
    stats = {
        "mean": jnp.asarray(rng.normal(0.0, 1.0, c), jnp.float32),
        "var": jnp.asarray(rng.uniform(0.5, 2.0, c), jnp.float32),
        "count": jnp.asarray(count, jnp.int32),
    }
    return params, stats


def _assert_same(a, b) -> None:
    """Bitwise equal trees of arrays (same dtypes too)."""
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        assert np.asarray(x).dtype == np.asarray(y).dtype
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@settings(max_examples=25, deadline=None)
@given(
    c=st.integers(1, 5),
    dtype=st.sampled_from([jnp.float32, jnp.bfloat16, jnp.float16]),
    affine=st.sampled_from(["both", "scale", "bias", "none"]),
    count=st.integers(0, 2**31 - 2),
    seed=st.integers(0, 99),
)
def test_array_round_trips_are_exact(c, dtype, affine, count, seed):
    """to_X then from_X gives jaxbn's variables back, bit for bit, for the
    converters that need no framework object (PyTorch and Keras where their
    layouts can hold the affine parameters given, Flax linen, Haiku)."""
    params, stats = _random_variables(c, seed=seed, count=count)
    params = {k: v.astype(dtype) for k, v in params.items()}
    if affine in ("scale", "none"):
        del params["bias"]
    if affine in ("bias", "none"):
        del params["scale"]
    want = (params, stats)
    _assert_same(interop.from_flax(interop.to_flax(*want), count=count), want)
    # Haiku: keepdims shapes, params in the input's dtype.
    own = {}
    if "scale" in params:
        own["scale"] = np.ones((1, c), dtype)
    if "bias" in params:
        own["offset"] = np.zeros((1, c), dtype)
    ema = {"counter": np.int32(0), "hidden": np.zeros((1, c), np.float32)}
    hk_state = {
        f"m/bn/~/{k}": {**ema, "average": np.zeros((1, c), np.float32)}
        for k in ("mean_ema", "var_ema")
    }
    hk = interop.to_haiku(*want, {"m/bn": own} if own else {}, hk_state)
    _assert_same(interop.from_haiku(*hk, count=count), want)
    if affine in ("both", "none"):
        _assert_same(interop.from_torch(interop.to_torch(*want), count=count), want)
        _assert_same(interop.from_keras(interop.to_keras(*want), count=count), want)


# --------------------------------------------------------------------- PyTorch


def _torch():
    return pytest.importorskip("torch", reason="PyTorch is not installed")


def test_torch_round_trip_is_exact():
    params, stats = _random_variables(5)
    sd = interop.to_torch(params, stats, prefix="block.bn.")
    assert sorted(sd) == [
        "block.bn.bias",
        "block.bn.num_batches_tracked",
        "block.bn.running_mean",
        "block.bn.running_var",
        "block.bn.weight",
    ]
    assert sd["block.bn.num_batches_tracked"].dtype == np.int64
    back = interop.from_torch(sd, prefix="block.bn.", count=17)
    _assert_same(back, (params, stats))


def test_torch_loads_into_real_module_and_back():
    torch = _torch()
    params, stats = _random_variables(4)
    bn = torch.nn.BatchNorm2d(4)
    sd = interop.to_torch(params, stats)
    bn.load_state_dict({k: torch.as_tensor(v) for k, v in sd.items()})
    assert int(bn.num_batches_tracked) == 17
    back = interop.from_torch(bn.state_dict(), count=17)  # tensors, duck-typed
    _assert_same(back, (params, stats))


def test_torch_parity_train_eval_and_running_stats():
    """BatchNorm2d against jaxbn with axis=1 and the converted momentum.

    PyTorch averages the unbiased batch variance, jaxbn the biased one; with n
    values per channel in every batch, ``torch_var - d**k`` equals
    ``n / (n - 1) * (jaxbn_var - d**k)`` after k steps from var 1 (each update
    adds ``(1 - d) d**j`` times a batch variance), which the test checks.
    """
    torch = _torch()
    c, k, torch_m = 3, 6, 0.1
    bn = torch.nn.BatchNorm2d(c, momentum=torch_m, eps=1e-5)
    with torch.no_grad():
        bn.weight.copy_(torch.as_tensor(_rand(1, c)))
        bn.bias.copy_(torch.as_tensor(_rand(2, c)))
    params, stats = interop.from_torch(bn.state_dict())
    d = interop.momentum_from_torch(torch_m)
    layer = jaxbn.batch_norm(axis=1, momentum=d, epsilon=1e-5)
    apply = jax.jit(layer.apply, static_argnames="train")
    bn.train()
    shape = (4, c, 5, 6)
    n = shape[0] * shape[2] * shape[3]
    for step in range(k):
        x = _rand(10 + step, *shape, loc=float(step))
        y_torch = bn(torch.as_tensor(x)).detach().numpy()
        y, stats = apply(params, stats, jnp.asarray(x), train=True)
        close(y, y_torch)
    close(stats["mean"], bn.running_mean.numpy())
    decayed = d**k  # what is left of the initial variance 1
    close(
        (np.asarray(stats["var"]) - decayed) * n / (n - 1),
        bn.running_var.numpy() - decayed,
    )
    assert int(bn.num_batches_tracked) == k
    assert int(stats["count"]) == CONVERGED + k

    # Evaluation: PyTorch's trained statistics, converted, give its outputs.
    bn.eval()
    x = _rand(99, *shape)
    params, stats = interop.from_torch(bn.state_dict())
    y, _ = layer.apply(params, stats, jnp.asarray(x), train=False)
    close(y, bn(torch.as_tensor(x)).detach().numpy())


def test_torch_eval_parity_after_to_torch():
    torch = _torch()
    params, stats = _random_variables(6, seed=3)
    bn = torch.nn.BatchNorm1d(6).eval()
    sd = interop.to_torch(params, stats)
    bn.load_state_dict({k: torch.as_tensor(v) for k, v in sd.items()})
    x = _rand(5, 7, 6)
    y, _ = jaxbn.batch_norm(axis=1).apply(params, stats, jnp.asarray(x), train=False)
    close(y, bn(torch.as_tensor(x)).detach().numpy())


def test_torch_whole_model_prefix_and_no_affine():
    torch = _torch()
    model = torch.nn.Sequential(
        torch.nn.Conv2d(2, 3, 1), torch.nn.BatchNorm2d(3, affine=False)
    )
    params, stats = interop.from_torch(model.state_dict(), prefix="1.", count=0)
    assert params == {}
    assert int(stats["count"]) == 0
    sd = interop.to_torch(params, stats, prefix="1.")
    assert sorted(sd) == ["1.num_batches_tracked", "1.running_mean", "1.running_var"]


def test_torch_bfloat16_weights_keep_their_dtype():
    torch = _torch()
    bn = torch.nn.BatchNorm1d(3).to(torch.bfloat16)
    params, stats = interop.from_torch(bn.state_dict())
    assert params["scale"].dtype == jnp.bfloat16
    assert stats["mean"].dtype == jnp.float32


def test_torch_only_scale_gets_zero_bias():
    params, stats = _random_variables(3)
    del params["bias"]
    sd = interop.to_torch(params, stats)
    np.testing.assert_array_equal(sd["bias"], np.zeros(3, np.float32))


def test_torch_errors():
    torch = _torch()
    untracked = torch.nn.BatchNorm2d(3, track_running_stats=False).state_dict()
    with pytest.raises(ValueError, match="track_running_stats=False"):
        interop.from_torch(untracked)
    sd = interop.to_torch(*_random_variables(3))
    with pytest.raises(ValueError, match="'bn.running_mean'.*check the prefix"):
        interop.from_torch(sd, prefix="bn.")
    with pytest.raises(ValueError, match="no key 'bias'"):
        interop.from_torch({k: v for k, v in sd.items() if k != "bias"})
    with pytest.raises(ValueError, match=r"running_var has shape \(4,\)"):
        interop.from_torch({**sd, "running_var": np.ones(4, np.float32)})
    with pytest.raises(ValueError, match="expected one value per feature"):
        interop.from_torch({**sd, "running_mean": np.ones((3, 1), np.float32)})
    with pytest.raises(TypeError, match="floating dtype"):
        interop.from_torch({**sd, "weight": np.ones(3, np.int32)})
    with pytest.raises(TypeError, match="mapping"):
        interop.from_torch([1, 2])  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="does not fit an int32"):
        interop.from_torch(sd, count=2**31)


def test_momentum_conversions():
    assert interop.torch_momentum(0.99) == pytest.approx(0.01)
    assert interop.momentum_from_torch(0.1) == pytest.approx(0.9)
    assert interop.momentum_from_torch(interop.torch_momentum(0.9)) == pytest.approx(
        0.9
    )
    # PyTorch's momentum=None (cumulative average) is jaxbn's momentum=None:
    # the layer built with it matches torch (test_variants' BatchNorm1d parity).
    assert interop.momentum_from_torch(None) is None
    jaxbn.batch_norm(momentum=interop.momentum_from_torch(None))
    with pytest.raises(ValueError, match=r"must be in \(0, 1\]"):
        interop.momentum_from_torch(0.0)
    with pytest.raises(ValueError, match=r"must be in \[0, 1\)"):
        interop.torch_momentum(1.0)


def test_to_converters_check_jaxbn_variables():
    params, stats = _random_variables(3)
    with pytest.raises(ValueError, match="unexpected keys"):
        interop.to_torch({**params, "gamma": params["scale"]}, stats)
    with pytest.raises(ValueError, match="lacks"):
        interop.to_keras(params, {"mean": stats["mean"], "count": stats["count"]})
    with pytest.raises(ValueError, match="scale has shape"):
        interop.to_flax({**params, "scale": jnp.ones(4)}, stats)
    with pytest.raises(ValueError, match="whole-number scalar"):
        interop.to_torch(params, {**stats, "count": jnp.ones(3)})
    with pytest.raises(ValueError, match="whole-number scalar"):
        interop.to_torch(params, {**stats, "count": jnp.float32(2.5)})


def test_to_converters_take_flax_adapter_statistics():
    # The Flax adapters keep a float32 count (warm-up) or none (warmup=False).
    params, stats = _random_variables(3)
    want = interop.to_torch(params, stats)
    for count in ({"count": jnp.float32(stats["count"])}, {}):
        adapter_stats = {"mean": stats["mean"], "var": stats["var"], **count}
        got = interop.to_torch(params, adapter_stats)
        np.testing.assert_array_equal(got["running_var"], want["running_var"])
    with pytest.raises(TypeError, match="dicts returned by jaxbn"):
        interop.to_torch([params], stats)  # type: ignore[arg-type]


# --------------------------------------------------------------------- Keras


# Keras's own Variable.numpy() (behind get_weights) trips NumPy 2's copy= check.
_KERAS_NUMPY_WARNING = (
    "ignore:__array__ implementation doesn't accept a copy keyword:DeprecationWarning"
)


def _keras():
    os.environ.setdefault("KERAS_BACKEND", "jax")
    keras = pytest.importorskip("keras", reason="Keras 3 is not installed")
    if keras.backend.backend() != "jax":
        pytest.skip(f"Keras runs on {keras.backend.backend()}, not on JAX")
    return keras


@pytest.mark.filterwarnings(_KERAS_NUMPY_WARNING)
def test_keras_parity_train_eval_and_running_stats():
    keras = _keras()
    c, k = 4, 5
    bn = keras.layers.BatchNormalization(momentum=0.9)  # epsilon 1e-3
    bn.build((None, 3, 3, c))
    bn.gamma.assign(_rand(1, c))
    bn.beta.assign(_rand(2, c))
    params, stats = interop.from_keras(bn.get_weights())
    layer = jaxbn.batch_norm(momentum=0.9, epsilon=1e-3)
    for step in range(k):
        x = _rand(20 + step, 5, 3, 3, c, loc=float(step))
        y_keras = np.asarray(bn(x, training=True))
        y, stats = layer.apply(params, stats, jnp.asarray(x), train=True)
        close(y, y_keras)
    # Keras also averages the biased variance: both statistics agree directly.
    close(stats["mean"], np.asarray(bn.moving_mean))
    close(stats["var"], np.asarray(bn.moving_variance))

    x = _rand(7, 2, 3, 3, c)
    params, stats = interop.from_keras({v.path: v for v in bn.weights})
    y, _ = layer.apply(params, stats, jnp.asarray(x), train=False)
    close(y, np.asarray(bn(x, training=False)))


@pytest.mark.filterwarnings(_KERAS_NUMPY_WARNING)
def test_keras_set_weights_round_trip_and_eval_parity():
    keras = _keras()
    params, stats = _random_variables(3, count=CONVERGED)
    del params["bias"]
    bn = keras.layers.BatchNormalization(center=False, epsilon=1e-5)
    bn.build((None, 3))
    bn.set_weights(interop.to_keras(params, stats))
    x = _rand(4, 6, 3)
    y, _ = jaxbn.batch_norm(center=False).apply(
        params, stats, jnp.asarray(x), train=False
    )
    close(y, np.asarray(bn(x, training=False)))
    back = interop.from_keras({v.name: v for v in bn.weights})
    _assert_same(back, (params, stats))


def test_keras_list_round_trip_without_keras():
    params, stats = _random_variables(3, count=CONVERGED)
    _assert_same(interop.from_keras(interop.to_keras(params, stats)), (params, stats))
    no_affine = interop.to_keras({}, stats)
    assert len(no_affine) == 2
    _assert_same(interop.from_keras(no_affine), ({}, stats))


def test_keras_errors():
    params, stats = _random_variables(3)
    weights = interop.to_keras(params, stats)
    with pytest.raises(ValueError, match="pass a dict by name"):
        interop.from_keras(weights[1:])
    with pytest.raises(ValueError, match="list of 5 arrays"):
        interop.from_keras([*weights, weights[0]])
    with pytest.raises(ValueError, match="renorm=True"):
        interop.from_keras({"bn/moving_stddev": weights[0], "moving_mean": weights[2]})
    with pytest.raises(ValueError, match="no 'moving_variance'"):
        interop.from_keras({"moving_mean": weights[2]})
    with pytest.raises(ValueError, match="unexpected names"):
        interop.from_keras({"moving_mean": weights[2], "kernel": weights[0]})
    with pytest.raises(TypeError, match="get_weights"):
        interop.from_keras("gamma")
    with pytest.raises(TypeError, match="keras BatchNormalization layer"):
        interop.from_keras(3.0)


# --------------------------------------------------------------------- Haiku


def _haiku_bn(decay: float = 0.9):
    hk = pytest.importorskip("haiku", reason="dm-haiku is not installed")

    def forward(x, is_training):
        return hk.BatchNorm(True, True, decay, eps=1e-5, name="bn")(x, is_training)

    return hk.without_apply_rng(hk.transform_with_state(forward))


def test_haiku_parity_and_eval_after_from_haiku():
    f = _haiku_bn()
    shape = (6, 3, 3, 4)
    hk_params, hk_state = f.init(None, jnp.zeros(shape), True)
    hk_params = {"bn": {"scale": _rand(1, 1, 1, 1, 4), "offset": _rand(2, 1, 1, 1, 4)}}
    params, stats = interop.from_haiku(hk_params, hk_state)
    assert params["scale"].shape == (4,)
    layer = jaxbn.batch_norm(momentum=0.9)
    for step in range(4):
        x = jnp.asarray(_rand(30 + step, *shape))
        y_hk, hk_state = f.apply(hk_params, hk_state, x, True)
        y, stats = layer.apply(params, stats, x, train=True)
        # Haiku's variance is E[x^2] - E[x]^2: with |mean| ~ 0.5 and var ~ 4
        # it loses about one bit, still within the float32 tolerance.
        close(y, y_hk)
    x = jnp.asarray(_rand(8, *shape))
    y_hk, _ = f.apply(hk_params, hk_state, x, False)
    params, stats = interop.from_haiku(hk_params, hk_state, name="bn")
    y, _ = layer.apply(params, stats, x, train=False)
    close(y, y_hk)


def test_haiku_to_haiku_eval_and_continued_training():
    """Converted into Haiku (count > 0), both continue as one plain average."""
    f = _haiku_bn(decay=0.8)
    shape = (5, 4)
    hk_params, hk_state = f.init(None, jnp.zeros(shape), True)
    params, stats = _random_variables(4, count=CONVERGED)
    hk_params, hk_state = interop.to_haiku(params, stats, hk_params, hk_state)
    assert hk_params["bn"]["scale"].shape == (1, 4)
    x = jnp.asarray(_rand(3, *shape))
    layer = jaxbn.batch_norm(momentum=0.8)
    y, _ = layer.apply(params, stats, x, train=False)
    close(f.apply(hk_params, hk_state, x, False)[0], y)
    for step in range(3):
        x = jnp.asarray(_rand(40 + step, *shape))
        _, hk_state = f.apply(hk_params, hk_state, x, True)
        _, stats = layer.apply(params, stats, x, train=True)
    back_params, back_stats = interop.from_haiku(hk_params, hk_state, count=0)
    close(back_stats["mean"], stats["mean"])
    close(back_stats["var"], stats["var"])
    _assert_same(back_params, params)


def test_haiku_count_zero_gives_a_fresh_average():
    """count == 0: Haiku's first update debiases as from its own init."""
    f = _haiku_bn()
    shape = (5, 4)
    hk_params, fresh = f.init(None, jnp.zeros(shape), True)
    params, stats = jaxbn.batch_norm().init(jnp.zeros(shape))
    _, converted = interop.to_haiku(params, stats, hk_params, fresh)
    x = jnp.asarray(_rand(5, *shape))
    _, want = f.apply(hk_params, fresh, x, True)
    _, got = f.apply(hk_params, converted, x, True)
    _assert_same(got, want)


def test_haiku_round_trip_and_errors():
    hk_params = {"bn": {"scale": np.ones((1, 1, 3), np.float32)}}
    ema = {"counter": np.int32(0), "hidden": np.zeros((1, 1, 3), np.float32)}
    hk_state = {
        "bn/~/mean_ema": {**ema, "average": np.zeros((1, 1, 3), np.float32)},
        "bn/~/var_ema": {**ema, "average": np.ones((1, 1, 3), np.float32)},
    }
    params, stats = _random_variables(3)
    del params["bias"]
    new_params, new_state = interop.to_haiku(params, stats, hk_params, hk_state)
    assert hk_params["bn"]["scale"].max() == 1.0  # inputs are not changed
    _assert_same(interop.from_haiku(new_params, new_state, count=17), (params, stats))
    with pytest.raises(ValueError, match="has 'bias' but"):
        interop.to_haiku(_random_variables(3)[0], stats, hk_params, hk_state)
    with pytest.raises(ValueError, match=r"modules in it are \['bn'\]"):
        interop.from_haiku(hk_params, hk_state, name="net/~/bn")
    two = {**hk_state, **{k.replace("bn", "bn2"): v for k, v in hk_state.items()}}
    with pytest.raises(ValueError, match="holds 2 hk.BatchNorm modules"):
        interop.from_haiku(hk_params, two)
    with pytest.raises(ValueError, match="3 features"):
        interop.to_haiku(*_random_variables(4), hk_params, hk_state)


# --------------------------------------------------------------------- Equinox


def _eqx():
    return pytest.importorskip("equinox", reason="equinox is not installed")


def _eqx_run(bn, state, x, axis_name="batch"):
    """Equinox's way: one example per vmap lane, the state shared (jitted)."""
    return _eqx_run_jit(_eqx().filter_jit)(bn, state, x, axis_name)


@functools.cache
def _eqx_run_jit(filter_jit):
    def run(bn, state, x, axis_name):
        vmapped = jax.vmap(
            bn, axis_name=axis_name, in_axes=(0, None), out_axes=(0, None)
        )
        return vmapped(x, state)

    return filter_jit(run)


def test_equinox_batch_mode_from_and_to():
    eqx = _eqx()
    c, shape = 3, (6, 3, 4)
    bn, state = eqx.nn.make_with_state(eqx.nn.BatchNorm)(
        c, "batch", momentum=0.9, mode="batch"
    )
    bn = eqx.tree_at(lambda m: (m.weight, m.bias), bn, (_rand(1, c), _rand(2, c)))
    for step in range(3):
        _, state = _eqx_run(bn, state, jnp.asarray(_rand(50 + step, *shape)))
    x = jnp.asarray(_rand(9, *shape))
    y_eqx, _ = _eqx_run(eqx.nn.inference_mode(bn), state, x)
    params, stats = interop.from_equinox(bn, state)
    assert int(stats["count"]) == CONVERGED
    layer = jaxbn.batch_norm(axis=1, momentum=0.9)
    y, _ = layer.apply(params, stats, x, train=False)
    close(y, y_eqx)

    # Back into a fresh Equinox layer: same evaluation, then one plain average.
    fresh, fresh_state = eqx.nn.make_with_state(eqx.nn.BatchNorm)(
        c, "batch", momentum=0.9, mode="batch"
    )
    bn2, state2 = interop.to_equinox(params, stats, fresh, fresh_state)
    y_eqx, _ = _eqx_run(eqx.nn.inference_mode(bn2), state2, x)
    close(y_eqx, y)
    for step in range(3):
        xs = jnp.asarray(_rand(60 + step, *shape))
        _, state2 = _eqx_run(bn2, state2, xs)
        _, stats = layer.apply(params, stats, xs, train=True)
    _, back = interop.from_equinox(bn2, state2)
    close(back["mean"], stats["mean"])
    close(back["var"], stats["var"])


def test_equinox_untrained_and_ema_mode():
    eqx = _eqx()
    bn, state = eqx.nn.make_with_state(eqx.nn.BatchNorm)(2, "b", mode="batch")
    _, stats = interop.from_equinox(bn, state)
    assert int(stats["count"]) == 0  # never trained: no converged statistics
    np.testing.assert_array_equal(stats["var"], np.ones(2, np.float32))
    _, state = interop.to_equinox(*_random_variables(2, count=0), bn, state)
    assert int(state.get(bn.batch_counter)) == 0

    ema, ema_state = eqx.nn.make_with_state(eqx.nn.BatchNorm)(2, "b", mode="ema")
    params, stats = interop.from_equinox(ema, ema_state)
    assert int(stats["count"]) == 0
    np.testing.assert_array_equal(stats["var"], np.ones(2, np.float32))
    params, stats = _random_variables(2)
    ema, ema_state = interop.to_equinox(params, stats, ema, ema_state)
    assert not bool(ema_state.get(ema.ema_first_time_index))
    _assert_same(interop.from_equinox(ema, ema_state, count=17), (params, stats))
    x = jnp.asarray(_rand(3, 4, 2))
    y_eqx, _ = _eqx_run(eqx.nn.inference_mode(ema), ema_state, x, "b")
    y, _ = jaxbn.batch_norm(axis=1).apply(params, stats, x, train=False)
    close(y, y_eqx)


def test_equinox_round_trips_are_exact():
    eqx = _eqx()
    import jaxbn.equinox

    params, stats = _random_variables(3)
    for cls, kwargs in (
        (eqx.nn.BatchNorm, {"mode": "batch"}),
        (jaxbn.equinox.BatchNorm, {}),
    ):
        bn, state = eqx.nn.make_with_state(cls)(3, "b", **kwargs)
        bn, state = interop.to_equinox(params, stats, bn, state)
        # Equinox's counter is 2**30, so its debiasing divides by exactly 1;
        # jaxbn's own layer keeps count 17.
        _assert_same(interop.from_equinox(bn, state, count=17), (params, stats))


def test_equinox_errors():
    eqx = _eqx()
    bn, state = eqx.nn.make_with_state(eqx.nn.BatchNorm)(
        3, "b", channelwise_affine=False, mode="batch"
    )
    with pytest.raises(ValueError, match="channelwise_affine=False"):
        interop.to_equinox(*_random_variables(3), bn, state)
    with pytest.raises(ValueError, match="input_size=3"):
        interop.to_equinox({}, _random_variables(4)[1], bn, state)
    with pytest.raises(TypeError, match="neither an equinox.nn.BatchNorm"):
        interop.from_equinox(eqx.nn.Linear(2, 2, key=jax.random.key(0)), state)


# --------------------------------------------------------------------- Flax


def test_flax_linen_parity_from_and_to():
    import flax.linen as nn

    c, shape = 4, (6, 5, 4)
    model = nn.BatchNorm(momentum=0.8)
    variables = model.init(jax.random.key(0), jnp.zeros(shape), True)
    variables = {
        "params": {"scale": jnp.asarray(_rand(1, c)), "bias": jnp.asarray(_rand(2, c))},
        "batch_stats": variables["batch_stats"],
    }
    for step in range(3):
        x = jnp.asarray(_rand(70 + step, *shape))
        _, updates = model.apply(variables, x, False, mutable=["batch_stats"])
        variables = {**variables, **updates}
    x = jnp.asarray(_rand(11, *shape))
    y_flax = model.apply(variables, x, True)
    params, stats = interop.from_flax(variables)
    y, _ = jaxbn.batch_norm(momentum=0.8).apply(params, stats, x, train=False)
    close(y, y_flax)
    back = interop.to_flax(params, stats)
    _assert_same(back, variables)


def test_flax_nnx_from_and_into_module():
    from flax import nnx

    import jaxbn.nnx

    bn = nnx.BatchNorm(3, momentum=0.8, rngs=nnx.Rngs(0))
    assert bn.scale is not None
    bn.scale[...] = jnp.asarray(_rand(1, 3))
    for step in range(2):
        bn(jnp.asarray(_rand(80 + step, 6, 3)))
    bn.eval()
    x = jnp.asarray(_rand(12, 6, 3))
    params, stats = interop.from_flax(bn)
    y, _ = jaxbn.batch_norm(momentum=0.8).apply(params, stats, x, train=False)
    close(y, bn(x))

    ours = jaxbn.nnx.BatchNorm(3, rngs=nnx.Rngs(1))
    assert interop.to_flax(params, stats, ours) is ours
    assert int(ours.count[...]) == CONVERGED
    _assert_same(interop.from_flax(ours), (params, stats))
    fresh = nnx.BatchNorm(3, rngs=nnx.Rngs(2))
    interop.to_flax(params, stats, fresh)
    _assert_same(interop.from_flax(fresh), (params, stats))


def test_flax_errors():
    from flax import nnx

    params, stats = _random_variables(3)
    with pytest.raises(ValueError, match="use_scale/use_bias"):
        interop.to_flax(
            params, stats, nnx.BatchNorm(3, use_bias=False, rngs=nnx.Rngs(0))
        )
    with pytest.raises(ValueError, match="as many features"):
        interop.to_flax(*_random_variables(4), nnx.BatchNorm(3, rngs=nnx.Rngs(0)))
    with pytest.raises(ValueError, match="no batch_stats"):
        interop.from_flax({"params": params})
    with pytest.raises(TypeError, match="neither the variables dict"):
        interop.from_flax(3)


def test_interop_imports_no_other_framework():
    code = (
        "import sys, jaxbn.interop; "
        "print(sorted(m for m in ('torch', 'keras', 'haiku', 'equinox', "
        "'orbax') if m in sys.modules))"
    )
    run = subprocess.run(
        [sys.executable, "-c", code],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.strip() == "[]"


@pytest.mark.filterwarnings(_KERAS_NUMPY_WARNING)
def test_converters_take_the_layer_or_module_itself():
    keras = _keras()
    bn = keras.layers.BatchNormalization(scale=False, momentum=0.9)
    bn.build((None, 3))
    bn.beta.assign(_rand(3, 3))
    bn.moving_mean.assign(_rand(4, 3))
    from_layer = interop.from_keras(bn)  # no get_weights(), no guessing
    _assert_same(from_layer, interop.from_keras({v.name: v for v in bn.weights}))
    assert sorted(from_layer[0]) == ["bias"]
    params, stats = _random_variables(3, count=CONVERGED)
    del params["scale"]
    interop.to_keras(params, stats, layer=bn)
    _assert_same(interop.from_keras(bn), (params, stats))
    with pytest.raises(TypeError, match="keras BatchNormalization layer"):
        interop.to_keras(params, stats, layer=object())
    torch = pytest.importorskip("torch")
    module = torch.nn.BatchNorm1d(3)
    with torch.no_grad():
        module.running_mean.copy_(torch.arange(3.0))
    _assert_same(interop.from_torch(module), interop.from_torch(module.state_dict()))
    model = torch.nn.Sequential(torch.nn.Linear(2, 3), module)
    _assert_same(interop.from_torch(model, prefix="1."), interop.from_torch(module))
