"""Tests of jaxbn.equinox.BatchNorm: parity with equinox.nn.BatchNorm, plain batches.

Equinox's ``mode="batch"`` agrees with jaxbn in training (batch mean and biased
variance) and, with ``warmup=False``, in its stored running averages; it
differs in inference, where Equinox divides them by ``1 - momentum**counter``
(jaxbn uses them as they are; ``jaxbn.interop.from_equinox`` converts). The
tolerance 1e-5 is float32 rounding of order-1 values computed by two formulas
(``(x - m) / sqrt(v + eps) * w`` against ``(x - m) * (w * rsqrt(v + eps))``)
and reduction orders, a few ulps, with a margin.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

eqx = pytest.importorskip("equinox", reason="equinox is not installed")

from reference import close  # noqa: E402

import jaxbn.equinox  # noqa: E402


def _x(seed: int, *shape: int) -> jax.Array:
    rng = np.random.default_rng(seed)
    return jnp.asarray(rng.normal(1.0, 2.0, shape).astype(np.float32))


def _vmapped(model, state, x):
    """Equinox's calling convention: vmap over examples with the axis name."""
    run = jax.vmap(model, axis_name="batch", in_axes=(0, None), out_axes=(0, None))
    return run(x, state)


_per_example = eqx.filter_jit(_vmapped)


def _pair(c, **kwargs):
    ours = eqx.nn.make_with_state(jaxbn.equinox.BatchNorm)(
        c, "batch", warmup=False, **kwargs
    )
    theirs = eqx.nn.make_with_state(eqx.nn.BatchNorm)(
        c, "batch", mode="batch", **kwargs
    )
    w, b = _x(1, c), _x(2, c)
    set_affine = functools.partial(eqx.tree_at, lambda m: (m.weight, m.bias))
    return (set_affine(ours[0], (w, b)), ours[1]), (
        set_affine(theirs[0], (w, b)),
        theirs[1],
    )


def test_parity_with_equinox_training_and_running_averages():
    (ours, s_ours), (theirs, s_theirs) = _pair(3, momentum=0.8)
    for step in range(4):
        x = _x(10 + step, 6, 3, 4, 5)  # 6 examples of shape (C, H, W)
        y_ours, s_ours = _per_example(ours, s_ours, x)
        y_theirs, s_theirs = _per_example(theirs, s_theirs, x)
        close(y_ours, y_theirs)
    stats = s_ours.get(ours.state_index)
    mean, var = s_theirs.get(theirs.batch_state_index)
    close(stats["mean"], mean)
    close(stats["var"], var)
    assert int(stats["count"]) == int(s_theirs.get(theirs.batch_counter)) == 4


def test_parity_with_equinox_gradients():
    (ours, s_ours), (theirs, s_theirs) = _pair(4)
    x = _x(3, 8, 4)
    target = _x(4, 8, 4)

    def loss(model, state, x):
        y, _ = _vmapped(model, state, x)
        return jnp.sum((y - target) ** 2)

    @eqx.filter_jit
    def grads(model, state, x):
        return eqx.filter_grad(loss)(model, state, x), jax.grad(loss, argnums=2)(
            model, state, x
        )

    (g_ours, gx_ours), (g_theirs, gx_theirs) = (
        grads(ours, s_ours, x),
        grads(theirs, s_theirs, x),
    )
    # Gradients of a sum of 32 squared errors of order 10: 1e-5 of relative
    # float32 rounding, plus an absolute term for entries that nearly cancel.
    close(g_ours.weight, g_theirs.weight, atol=1e-4)
    close(g_ours.bias, g_theirs.bias, atol=1e-4)
    close(gx_ours, gx_theirs, atol=1e-4)


def test_plain_batch_needs_no_vmap_and_matches_per_example():
    c = 3
    per_example, state = eqx.nn.make_with_state(jaxbn.equinox.BatchNorm)(c, "batch")
    batched, state_b = eqx.nn.make_with_state(jaxbn.equinox.BatchNorm)(c)
    x = _x(5, 6, c, 4, 4)
    y, state = _per_example(per_example, state, x)
    y_b, state_b = batched(x, state_b)
    close(y_b, y)
    a, b = state.get(per_example.state_index), state_b.get(batched.state_index)
    close(a["mean"], b["mean"])
    close(a["var"], b["var"])


def test_statistics_and_warmup_against_numpy():
    bn, state = eqx.nn.make_with_state(jaxbn.equinox.BatchNorm)(2, momentum=0.99)
    x = _x(6, 10, 2, 3)
    y, state = bn(x, state)
    x64 = np.asarray(x, np.float64)
    mean, var = x64.mean(axis=(0, 2)), x64.var(axis=(0, 2))
    want = (x64 - mean[:, None]) / np.sqrt(var[:, None] + 1e-5)
    close(y, want)
    stats = state.get(bn.state_index)
    # Warm-up: the first update has decay 1/10, not 0.99.
    close(stats["mean"], 0.9 * mean)
    close(stats["var"], 0.1 + 0.9 * var)
    assert int(stats["count"]) == 1


def test_inference_mode_call_override_and_sequential():
    model, state = eqx.nn.make_with_state(eqx.nn.Sequential)(
        [eqx.nn.Lambda(jnp.tanh), jaxbn.equinox.BatchNorm(3)]
    )
    x = _x(7, 5, 3)
    _, state = model(x, state)
    bn = model[1]
    before = state.get(bn.state_index)
    frozen = eqx.nn.inference_mode(model)
    y, same = frozen(x, state)
    assert same is state
    mean, var = (np.asarray(state.get(bn.state_index)[k]) for k in ("mean", "var"))
    want = (np.tanh(np.asarray(x)) - mean) / np.sqrt(var + 1e-5)
    close(y, want)
    y2, _ = bn(jnp.tanh(x), state, inference=True)
    close(y2, y)
    _, trained = frozen[1](jnp.tanh(x), state, inference=False)
    assert int(trained.get(bn.state_index)["count"]) == int(before["count"]) + 1


def test_one_compiled_function_for_both_modes():
    bn, state = eqx.nn.make_with_state(jaxbn.equinox.BatchNorm)(2)
    traces = 0

    @jax.jit
    def step(bn, state, x, inference):
        nonlocal traces
        traces += 1
        return bn(x, state, inference=inference)

    x = _x(8, 4, 2)
    _, trained = step(bn, state, x, jnp.asarray(False))
    _, kept = step(bn, trained, x, jnp.asarray(True))
    assert traces == 1
    assert int(trained.get(bn.state_index)["count"]) == 1
    assert int(kept.get(bn.state_index)["count"]) == 1


def test_no_affine_and_dtypes():
    bn, state = eqx.nn.make_with_state(jaxbn.equinox.BatchNorm)(
        2, channelwise_affine=False
    )
    assert bn.weight is None and bn.bias is None
    y, _ = bn(_x(9, 4, 2).astype(jnp.bfloat16), state)
    assert y.dtype == jnp.float32  # promoted with the float32 statistics, as Equinox
    bn16, state16 = eqx.nn.make_with_state(jaxbn.equinox.BatchNorm)(
        2, dtype=jnp.bfloat16
    )
    assert bn16.weight.dtype == jnp.bfloat16
    y, state16 = bn16(_x(9, 4, 2).astype(jnp.bfloat16), state16)
    assert y.dtype == jnp.bfloat16
    assert state16.get(bn16.state_index)["mean"].dtype == jnp.float32


def test_errors():
    with pytest.raises(ValueError, match="mode='ema' is Equinox's legacy"):
        jaxbn.equinox.BatchNorm(3, "batch", mode="ema", momentum=None)
    with pytest.raises(ValueError, match="mode='x' is not valid"):
        jaxbn.equinox.BatchNorm(3, mode="x")  # pyright: ignore[reportArgumentType]
    with pytest.raises(TypeError, match="input_size must be an int"):
        jaxbn.equinox.BatchNorm(3.0)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="at least 1"):
        jaxbn.equinox.BatchNorm(0)
    with pytest.raises(ValueError, match="momentum"):
        jaxbn.equinox.BatchNorm(3, momentum=1.0, warmup=True)
    with pytest.raises(ValueError, match="mode='batch' is Equinox's"):
        jaxbn.equinox.BatchNorm(3, mode="batch", warmup=True)
    with pytest.raises(TypeError, match="dtype"):
        jaxbn.equinox.BatchNorm(3, dtype=jnp.int32)
    bn, state = eqx.nn.make_with_state(jaxbn.equinox.BatchNorm)(3)
    with pytest.raises(ValueError, match="has no batch axis"):
        bn(jnp.ones(3), state)
    with pytest.raises(
        ValueError, match=r"\(batch, input_size, \.\.\.\) with input_size=3"
    ):
        bn(jnp.ones((4, 5)), state)
    # A batch of one normalizes to the bias, as in Equinox (and Flax).
    y, state = bn(jnp.full((1, 3), 7.0), state)
    assert jnp.array_equal(y, jnp.zeros((1, 3)))
    per_example, state = eqx.nn.make_with_state(jaxbn.equinox.BatchNorm)(3, "batch")
    with pytest.raises(ValueError, match=r"\(input_size, \.\.\.\) with input_size=3"):
        _per_example(per_example, state, jnp.ones((4, 5)))
