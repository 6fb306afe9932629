"""Smoke test of the paired A/B benchmark (``benchmarks.ab``).

Loads this checkout a second time under another name as the "base", and checks
that both measurements return positive finite medians for every side (no
timing assertion: speed targets live in the benchmarks, not in tests), and the
two documented refusals.
"""

import math
from pathlib import Path

import pytest

pytest.importorskip("optax", reason="the benchmark's loss uses optax")

from benchmarks import ab

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def base():
    return ab.load_checkout(ROOT, "jaxbn_ab_smoke")


def test_the_base_is_a_second_copy_of_the_code(base):
    # A broken loader would time this checkout twice: the base must be other
    # module objects, loaded from the given path, that compute the same.
    import jax.numpy as jnp

    import jaxbn

    assert base.__name__ == "jaxbn_ab_smoke" and base is not jaxbn
    assert base.batch_norm is not jaxbn.batch_norm
    assert Path(base.__file__).resolve() == ROOT / "jaxbn" / "__init__.py"
    x = jnp.arange(12.0).reshape(4, 3)
    outs = []
    for module in (base, jaxbn):
        layer = module.batch_norm(momentum=0.9)
        outs.append(layer.apply(*layer.init(x), x, train=True)[0])
    assert bool(jnp.all(outs[0] == outs[1]))


def test_compile_ab_times_flax_the_base_and_this_checkout(base):
    result = ab.compile_ab(base, "resnet18", "eval", reps=1)
    assert set(result["median_s"]) == {"flax", "base", "this"}
    for wall, cpu in result["median_s"].values():
        assert math.isfinite(wall) and wall > 0 and math.isfinite(cpu) and cpu > 0


def test_compile_ab_traces_the_mnist_cnn_with_the_side_s_own_layer(base):
    # The example's CNN picks its layer by name: the timed side's class must
    # be the one traced, not this checkout's jaxbn.linen.BatchNorm.
    import jaxbn.linen

    calls = []

    class Recording(jaxbn.linen.BatchNorm):
        def __call__(self, x, *args, **kwargs):
            calls.append(x.shape)
            return super().__call__(x, *args, **kwargs)

    ab._compile_once("mnist", Recording, "eval")
    # Three batch norms, each called when initializing and when tracing.
    assert len(calls) == 6, calls
    result = ab.compile_ab(base, "mnist", "eval", reps=1)
    assert set(result["median_s"]) == {"flax", "base", "this"}


def test_run_ab_times_both_ops_of_both_checkouts(base):
    rows = ab.run_ab(base, reps=2, shapes={"small": (64, 8)})
    assert [r["op"] for r in rows] == ["forward", "forward+backward"]
    for row in rows:
        assert set(row["median_ms"]) == {"base", "this"}
        assert all(math.isfinite(t) and t > 0 for t in row["median_ms"].values())


def test_refusals(base, tmp_path):
    with pytest.raises(ValueError, match="has no jaxbn"):
        ab.load_checkout(tmp_path)
    with pytest.raises(ValueError, match="resnet50"):
        ab.compile_ab(base, "vgg", "train", reps=1)
