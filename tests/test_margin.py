"""The passes' margin decides the running-average update (issue: lighter program).

The statistics' passes are one do-while loop whose one cross-feature reduction,
the largest margin by which a feature's mean is far from its shift
(``ShiftedMoments.margin``), is infinite exactly when some statistic is not finite;
the update reads it instead of reducing across the features itself. These
tests pin that the margin decides exactly what a reduction of the statistics'
own finiteness would, case by case and under ``jax.vmap``, and that the pass
over x is compiled once.
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxbn
from jaxbn._running import all_finite, update_running_stats
from jaxbn._statistics import shifted_moments
from jaxbn._sums import Moments


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
def test_margin_decides_the_update_as_a_reduction_would(name, unbiased):
    x, mask = CASES[name]
    layer = jaxbn.batch_norm(
        momentum=0.5, running_var="unbiased" if unbiased else "biased"
    )
    _, stats = layer.init(jnp.asarray(x))
    stats = jaxbn.BatchStats(
        mean=stats["mean"] + 0.25, var=stats["var"], count=jnp.int32(3)
    )
    m = shifted_moments(
        jnp.asarray(x), (0,), None if mask is None else jnp.asarray(mask)
    )
    moments = Moments(m.count[0], (m.shift + m.offset)[0], m.var[0])
    has_values = mask is None
    by_margin = update_running_stats(
        stats, moments, layer.config, jnp.isfinite(m.margin), has_values, True
    )
    reduced = update_running_stats(
        stats, moments, layer.config, all_finite(moments.mean, moments.var), has_values
    )
    for k in stats:
        np.testing.assert_array_equal(by_margin[k], reduced[k], err_msg=k)
    # The margin itself, against NumPy: inf exactly when a statistic is not
    # finite; the mean is finite in every case (a non-finite feature's offset
    # is 0), so the update needs no guard for it.
    finite = np.isfinite(np.asarray(m.var[0]))
    assert bool(np.isinf(np.asarray(m.margin))) == (not finite.all())
    assert np.isfinite(np.asarray(moments.mean)).all()
    valid = (
        np.ones_like(x, bool) if mask is None else np.broadcast_to(mask > 0, x.shape)
    )
    if finite.all() and valid.any(0).all():
        assert int(by_margin["count"]) == 4


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


def test_a_non_finite_feature_does_not_stop_the_others_being_re_centred():
    # One feature NaN, the other 1e6 from the running mean: the NaN makes the
    # batch rejected, but the finite feature's variance is still exact.
    rng = np.random.default_rng(0)
    x = (1e6 + rng.standard_normal((256, 2))).astype(np.float32)
    x[5, 1] = np.nan
    m = shifted_moments(jnp.asarray(x), (0,))
    np.testing.assert_allclose(
        float(m.var[0, 0]), x[:, 0].astype(np.float64).var(), rtol=1e-5
    )
    assert bool(jnp.isinf(m.margin))
