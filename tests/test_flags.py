"""The passes' flags decide the running-average update (issue: compile time).

The statistics' passes are one do-while loop whose cross-feature reduction
also records, per batch, whether any statistic is not finite and whether any
feature has a value (``ShiftedMoments.flags``); the update reads them instead
of reducing across the features itself. These tests pin that the flags decide
exactly what the update's own reduction decided, case by case and under
``jax.vmap``, and that the pass over x is compiled once.
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxbn
from jaxbn._running import update_running_stats
from jaxbn._statistics import shifted_moments
from jaxbn._sums import COUNTED, NOT_FINITE, Moments


def _cases() -> dict[str, tuple[np.ndarray, np.ndarray | None]]:
    rng = np.random.default_rng(3)
    x = rng.standard_normal((16, 4)).astype(np.float32)
    nan = x.copy()
    nan[3, 2] = np.nan
    inf = x.copy()
    inf[5, 0] = np.inf
    overflow = x.copy()
    overflow[:3, 1] = [1e20, -1e20, 3e19]
    some_masked = np.ones((16, 4), bool)
    some_masked[:, 1] = False
    return {
        "finite": (x, None),
        "far-from-the-running-mean": (x + 1e6, None),
        "one-nan": (nan, None),
        "one-inf": (inf, None),
        "overflowing-variance": (overflow, None),
        "a-feature-all-masked": (x, some_masked),
        "all-masked": (x, np.zeros((16, 4), bool)),
        "weights": (x, np.abs(x[:, :1]) + 0.1),
        "nan-masked-out": (nan, ~np.isnan(nan)),
    }


CASES = _cases()


@pytest.mark.parametrize("name", sorted(CASES))
@pytest.mark.parametrize("unbiased", [False, True], ids=["biased", "unbiased"])
def test_flags_decide_the_update_as_its_own_reduction_would(name, unbiased):
    x, mask = CASES[name]
    layer = jaxbn.batch_norm(
        momentum=0.5, running_var="unbiased" if unbiased else "biased"
    )
    _, stats = layer.init(jnp.asarray(x))
    stats = {**stats, "mean": stats["mean"] + 0.25, "count": jnp.int32(3)}
    m = shifted_moments(
        jnp.asarray(x), (0,), None if mask is None else jnp.asarray(mask)
    )
    moments = Moments(m.count[0], (m.shift + m.offset)[0], m.var[0])
    counted = mask is None
    with_flags = update_running_stats(stats, moments, layer.config, counted, m.flags)
    reduced = update_running_stats(stats, moments, layer.config, counted)
    for k in stats:
        np.testing.assert_array_equal(with_flags[k], reduced[k], err_msg=k)
    # The flags themselves, against NumPy.
    valid = (
        np.ones_like(x, bool) if mask is None else np.broadcast_to(mask > 0, x.shape)
    )
    counts = valid.sum(0)
    finite = np.isfinite(np.asarray(moments.mean)) & np.isfinite(np.asarray(m.var[0]))
    assert bool(int(m.flags) & NOT_FINITE) == (not finite.all())
    assert bool(int(m.flags) & COUNTED) == bool(counts.any())


def test_vmapped_members_accept_or_reject_their_own_batches():
    # Two ensemble members under jax.vmap: a NaN in the first member's batch
    # leaves only the first member's statistics (and count) unchanged.
    x = np.asarray(CASES["finite"][0])
    batches = np.stack([x, x + 2.0])
    batches[0, 3, 2] = np.nan
    layer = jaxbn.batch_norm(momentum=0.5)
    params, stats = jax.vmap(layer.init)(jnp.asarray(batches))
    step = jax.jit(jax.vmap(lambda p, s, x: layer.apply(p, s, x, train=True)))
    _, new = step(params, stats, jnp.asarray(batches))
    assert np.asarray(new["count"]).tolist() == [0, 1]
    np.testing.assert_array_equal(new["mean"][0], stats["mean"][0])
    np.testing.assert_allclose(new["mean"][1], 0.9 * (x + 2.0).mean(0), rtol=1e-5)


def test_the_pass_over_x_is_compiled_once():
    # One pair of reductions over the batch axis (the sums of x - shift and of
    # its square) in the compiled training forward: the loop's body is the
    # pass, not a copy of a pass made before the loop.
    x = jnp.asarray(np.random.default_rng(0).standard_normal((256, 512)), jnp.float32)
    layer = jaxbn.batch_norm()
    params, stats = layer.init(x)
    fn = jax.jit(lambda p, s, x: layer.apply(p, s, x, train=True))
    text = fn.lower(params, stats, x).compile().as_text()
    assert text is not None
    reductions = re.findall(r"= f32\[512\]\S* reduce\([^\n]*dimensions=\{0\}", text)
    assert len(reductions) == 2, reductions
