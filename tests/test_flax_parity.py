"""Drop-in parity: the scenarios of Flax's own BatchNorm tests, side by side.

Each test runs one scenario that Flax's test suite exercises (the test it comes
from is named in the docstring) with ``flax.linen.BatchNorm`` /
``flax.nnx.BatchNorm`` and with jaxbn's adapters (``warmup=False``, reached
through subclasses as a user swapping the class would), and compares outputs,
running statistics and variable trees. A regression in "change one import"
shows here.

Tolerances: the same float32 data normalized by two implementations differs by
a few float32 roundings (rsqrt, and Flax's one-pass ``E[x^2] - E[x]^2`` on
unit-scale data loses about a bit), so 1e-5 absolute on unit-scale outputs and
statistics; tests that compare structure compare exactly.
"""

import warnings
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jaxbn.linen
import jaxbn.nnx

# Any random values do here: see the fixture (conftest.py).
pytestmark = pytest.mark.usefixtures("non_partitionable_threefry")

TOL = 1e-5


class Swapped:
    """What a user swapping Flax's class gets: jaxbn with Flax's update rule.

    Subclasses named ``BatchNorm``, so that automatic names (``BatchNorm_0``)
    and summary tables are Flax's.
    """

    class BatchNorm(jaxbn.linen.BatchNorm):
        warmup: bool = False

    class NNXBatchNorm(jaxbn.nnx.BatchNorm):
        def __init__(self, *args: Any, warmup: bool = False, **kwargs: Any):
            super().__init__(*args, warmup=warmup, **kwargs)

    NNXBatchNorm.__name__ = NNXBatchNorm.__qualname__ = "BatchNorm"


LinenBN, NNXBN = Swapped.BatchNorm, Swapped.NNXBatchNorm
LINEN = [nn.BatchNorm, LinenBN]
NNX = [nnx.BatchNorm, NNXBN]


def close(actual: Any, expected: Any, tol: float = TOL) -> None:
    """Same tree structure, shapes and dtypes; values within ``tol``."""
    assert jax.tree.structure(actual) == jax.tree.structure(expected)
    for a, e in zip(jax.tree.leaves(actual), jax.tree.leaves(expected), strict=True):
        assert (a.shape, a.dtype) == (e.shape, e.dtype), (a, e)
        np.testing.assert_allclose(np.asarray(a), np.asarray(e), rtol=0, atol=tol)


def both(run, classes) -> tuple[Any, Any]:
    """``run(cls)`` for Flax's class and jaxbn's: (expected, actual)."""
    return run(classes[0]), run(classes[1])


def normal(shape: tuple, seed: int = 0, dtype: Any = jnp.float32) -> jax.Array:
    """Standard normal values (complex: unit variance, as jax.random.normal).

    Drawn by NumPy: jax.random compiles a program for each new shape, which
    takes XLA:CPU seconds for shapes with a short last axis such as (4, 3, 2).
    """
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(shape)
    if jnp.issubdtype(dtype, jnp.complexfloating):
        x = (x + 1j * rng.standard_normal(shape)) / np.sqrt(2.0)
    return jnp.asarray(x, dtype)


# --- 1. a batch of one ------------------------------------------------------


def test_linen_batch_of_one_normalizes_to_bias():
    """``nnx.tabulate``'s docstring and Flax's vmap tests train on (1, d)."""
    x = normal((1, 3))

    def run(cls):
        model = cls(use_running_average=False, bias_init=nn.initializers.ones)
        variables = model.init(jax.random.key(0), x)
        return jax.jit(lambda v, x: model.apply(v, x, mutable=["batch_stats"]))(
            variables, x
        )

    expected, actual = both(run, LINEN)
    close(actual, expected)
    np.testing.assert_array_equal(actual[0], jnp.ones((1, 3)))


def test_nnx_batch_of_one_and_ensemble_vmap():
    """``transforms_test.py::TestVmap::test_state_axes_simple``: an ensemble of
    five blocks made by ``nnx.vmap`` with ``StateAxes`` and ``split_rngs``, each
    trained on its own batch of one."""

    def run(cls):
        class Block(nnx.Module):
            def __init__(self, rngs: nnx.Rngs):
                self.linear = nnx.Linear(2, 3, rngs=rngs)
                self.bn = cls(3, use_running_average=False, rngs=rngs)
                self.dropout = nnx.Dropout(0.1, deterministic=False, rngs=rngs)

            def __call__(self, x: jax.Array) -> jax.Array:
                return nnx.relu(self.dropout(self.bn(self.linear(x))))

        axes = nnx.StateAxes({(nnx.BatchStat, "dropout"): 0, ...: None})

        @nnx.split_rngs(splits=5, only="dropout")
        @nnx.vmap(in_axes=(axes,), out_axes=axes)
        def create(rngs: nnx.Rngs) -> Block:
            return Block(rngs)

        module = create(nnx.Rngs(params=0, dropout=1))

        @nnx.vmap(in_axes=(axes, 0), out_axes=0)
        def forward(module: Block, x: jax.Array) -> jax.Array:
            return module(x)

        y = forward(module, normal((5, 1, 2)))
        return y, nnx.to_pure_dict(nnx.state(module, nnx.BatchStat))

    expected, actual = both(run, NNX)
    close(actual, expected)


def test_nnx_scan_over_layers_batch_of_one():
    """``transforms_test.py::TestScan::test_complex``: layers stacked by
    ``nnx.vmap`` and run by ``nnx.scan``, carrying a batch of one."""

    def run(cls):
        class Block(nnx.Module):
            def __init__(self, rngs: nnx.Rngs):
                self.linear = nnx.Linear(3, 3, rngs=rngs)
                self.bn = cls(3, use_running_average=False, rngs=rngs)

            def __call__(self, x: jax.Array) -> tuple[jax.Array, None]:
                return nnx.gelu(self.bn(self.linear(x))), None

        @nnx.vmap(in_axes=0, out_axes=0)
        def create(key: jax.Array) -> Block:
            return Block(nnx.Rngs(key))

        module = create(jax.random.split(jax.random.key(0), 4))

        @nnx.scan(in_axes=(0, nnx.Carry), out_axes=(nnx.Carry, 0))
        def forward(module: Block, x: jax.Array) -> tuple[jax.Array, None]:
            return module(x)

        y, _ = forward(module, normal((1, 3)))
        return y, nnx.to_pure_dict(nnx.state(module, nnx.BatchStat))

    expected, actual = both(run, NNX)
    close(actual, expected)


# --- 2. variables exactly Flax's with warmup=False ---------------------------


def test_linen_variables_and_tabulate_are_flax_s():
    """``linen/summary_test.py``: ``nn.tabulate`` tables (every module and
    method call, parameter totals) for a BatchNorm built in ``setup``."""

    def run(cls):
        class Block(nn.Module):
            def setup(self):
                self.conv = nn.Conv(4, (3, 3))
                self.bn = cls()

            def __call__(self, x: jax.Array, training: bool) -> jax.Array:
                return self.bn(self.conv(x), use_running_average=not training)

        x = normal((2, 5, 5, 3))
        variables = Block().init(jax.random.key(0), x, training=False)
        table = Block().tabulate(
            jax.random.key(0), x, training=True, show_repeated=True
        )
        return jax.tree.map(lambda a: (a.shape, a.dtype), variables), table

    expected, actual = both(run, LINEN)
    assert actual == expected


def test_nnx_state_and_tabulate_are_flax_s():
    """``nnx/summary_test.py`` and ``TestVmap::test_state_axes_from_state``,
    which names every state leaf."""

    def run(cls):
        class Model(nnx.Module):
            def __init__(self, rngs: nnx.Rngs):
                self.linear = nnx.Linear(2, 3, rngs=rngs)
                self.bn = cls(3, rngs=rngs)

            def __call__(self, x: jax.Array) -> jax.Array:
                return self.bn(self.linear(x))

        model = Model(nnx.Rngs(0))
        state = nnx.state(model)
        axes = jax.tree.map(lambda _: 0, state)
        axes["bn"]["mean"] = 1

        @nnx.vmap(out_axes=nnx.StateAxes(axes), axis_size=5)
        def create() -> Model:
            return Model(nnx.Rngs(0))

        mean_shape = create().bn.mean.shape
        table = nnx.tabulate(model, jnp.ones((1, 2)))
        leaves = jax.tree.map(lambda a: (a.shape, a.dtype, type(a).__name__), state)
        return nnx.to_pure_dict(leaves), mean_shape, table

    expected, actual = both(run, NNX)
    assert actual == expected


@pytest.mark.parametrize("warmup", [False, True])
def test_nnx_whole_module_grad_in_tree_mode(warmup):
    """``integration_test.py::test_tree_mode_multi_module``: ``nnx.grad`` with
    ``graph=False`` differentiates every leaf, so none may be an integer."""

    class Model(nnx.Module):
        def __init__(self, rngs: nnx.Rngs):
            self.linear = nnx.Linear(2, 2, rngs=rngs)
            self.bn = jaxbn.nnx.BatchNorm(2, warmup=warmup, rngs=rngs)

        def __call__(self, x: jax.Array) -> jax.Array:
            return nnx.relu(self.bn(self.linear(x)))

    @nnx.jit(graph=False)
    def step(model: Model, x: jax.Array) -> Model:
        grads = nnx.grad(lambda m: jnp.mean(m(x) ** 2), graph=False)(model)
        return jax.tree.map(lambda w, g: w - 0.1 * g, model, grads)

    model = Model(nnx.Rngs(0))
    for _ in range(3):
        model = step(model, normal((4, 2)))
    assert hasattr(model.bn, "count") is warmup
    if warmup:
        assert model.bn.count[...] == 3.0


def test_linen_whole_variables_grad_with_warmup():
    """With warm-up on, ``count`` is float32: ``jax.grad`` over all variables."""
    model = jaxbn.linen.BatchNorm(use_running_average=False)
    x = normal((4, 3))
    variables = model.init(jax.random.key(0), x)

    def loss(variables):
        y, _ = model.apply(variables, x, mutable=["batch_stats"])
        return jnp.sum(y**2)

    grads = jax.grad(loss)(variables)
    assert grads["batch_stats"]["count"] == 0.0


# --- 3. init_with_output in training mode ------------------------------------


@pytest.mark.parametrize("masked", [False, True])
def test_linen_init_with_output_normalizes_with_the_batch(masked):
    """``linen_test.py::NormalizationTest::test_batch_norm``: init in training
    mode normalizes with the batch's statistics and records nothing; NaN
    padding under the mask."""
    x = normal((4, 3, 2))
    mask = None
    if masked:
        mask = jax.random.bernoulli(jax.random.key(1), 0.5, (4, 3, 1))
        x = jnp.where(mask, x, jnp.nan)

    def run(cls):
        model = cls(momentum=0.9, use_running_average=False)
        y, variables = model.init_with_output(jax.random.key(2), x, mask=mask)
        _, updates = model.apply(variables, x, mutable=["batch_stats"], mask=mask)
        if mask is not None:  # compare only entries behind the statistics
            y = jnp.where(mask, y, 0.0)
        return y, variables, updates

    expected, actual = both(run, LINEN)
    close(actual, expected)


def test_linen_init_ignores_axis_name_and_batch_size():
    """``test_batch_norm_multi_init`` and ``test_bind_stateful``: init outside
    any mapped axis with ``axis_name``, and on a single example."""

    def run(cls):
        model = cls(use_running_average=False, axis_name="batch")
        return model.init_with_output(jax.random.key(0), normal((1, 4)))

    expected, actual = both(run, LINEN)
    close(actual, expected)


# --- 4. complex inputs -------------------------------------------------------


@pytest.mark.parametrize("masked", [False, True])
def test_linen_complex(masked):
    """``linen_test.py::NormalizationTest::test_batch_norm_complex``."""
    x = normal((4, 3, 2), dtype=jnp.complex64)
    mask = None
    if masked:
        mask = jax.random.bernoulli(jax.random.key(1), 0.5, (4, 3, 1))
        x = jnp.where(mask, x, jnp.nan)

    def run(cls):
        model = cls(momentum=0.9, use_running_average=False, dtype=jnp.complex64)
        y, variables = model.init_with_output(jax.random.key(2), x, mask=mask)
        y2, updates = model.apply(variables, x, mutable=["batch_stats"], mask=mask)
        evaluate = cls(momentum=0.9, use_running_average=True, dtype=jnp.complex64)
        evaluated = evaluate.apply({**variables, **updates}, x)
        if mask is not None:
            y, y2, evaluated = (jnp.where(mask, a, 0) for a in (y, y2, evaluated))
        return y, y2, updates, evaluated

    expected, actual = both(run, LINEN)
    close(actual, expected)


def test_nnx_complex_with_mask():
    """Flax NNX writes the complex mean into its float32 variable (dropping the
    imaginary part, with warnings); jaxbn keeps it complex, as Flax
    Linen does. So the training output is compared with Flax NNX's, and the
    statistics and evaluation with Flax Linen's."""
    x = normal((8, 3), dtype=jnp.complex64)
    mask = jnp.arange(8)[:, None] < 6
    bn = NNXBN(3, momentum=0.9, rngs=nnx.Rngs(0))
    y = bn(x, mask=mask)
    with warnings.catch_warnings():  # Flax's FutureWarning and ComplexWarning
        warnings.simplefilter("ignore")
        y_ref = nnx.BatchNorm(3, momentum=0.9, rngs=nnx.Rngs(0))(x, mask=mask)
    close(y, y_ref)
    bn.eval()
    linen = nn.BatchNorm(use_running_average=False, momentum=0.9)
    variables = linen.init(jax.random.key(0), x)
    _, updates = linen.apply(variables, x, mask=mask, mutable=["batch_stats"])
    close({"mean": bn.mean[...], "var": bn.var[...]}, updates["batch_stats"])
    evaluated = linen.clone(use_running_average=True).apply({**variables, **updates}, x)
    close(bn(x), evaluated)


# --- 5. masks of lower rank --------------------------------------------------


@pytest.mark.parametrize(
    "mask",
    [
        np.array([True, False, True, False, True]),  # Flax's own case
        np.array([[True, True, False, True, True]]),
        np.arange(10)[:, None] < 7,
    ],
    ids=["features", "features_2d", "examples"],
)
def test_masks_broadcast_like_numpy(mask):
    """``nnx/nn/normalization_test.py::test_nnx_linen_batchnorm_equivalence``
    uses a mask of shape (5,) for x of shape (10, 5).

    A feature with no True entry is a documented difference: Flax's output and
    statistics become NaN there, jaxbn normalizes it with the running
    statistics and keeps them.
    """
    x = normal((10, 5))
    seen = np.broadcast_to(mask, x.shape).any(axis=0)  # features with a value

    def run_linen(cls):
        model = cls(use_running_average=False)
        variables = model.init(jax.random.key(0), x)
        y, updates = model.apply(variables, x, mask=mask, mutable=["batch_stats"])
        return y, updates["batch_stats"]

    def run_nnx(cls):
        bn = cls(5, rngs=nnx.Rngs(0))
        return bn(x, mask=mask), {"mean": bn.mean[...], "var": bn.var[...]}

    for run, classes in [(run_linen, LINEN), (run_nnx, NNX)]:
        (y_ref, s_ref), (y, stats) = both(run, classes)
        close(y[:, seen], y_ref[:, seen])
        close(
            jax.tree.map(lambda a: a[seen], stats),
            {k: v[seen] for k, v in s_ref.items()},
        )
        assert np.isnan(y_ref[:, ~seen]).all()  # Flax
        close(y[:, ~seen], x[:, ~seen] * jax.lax.rsqrt(1.0 + 1e-5))  # mean 0, var 1
        close(stats["mean"][~seen], jnp.zeros(int((~seen).sum())), 0.0)


# --- 6. no batch axis ---------------------------------------------------------


def test_linen_bind_stateful_single_example():
    """``linen_module_test.py::ModuleTest::test_bind_stateful``: x of shape
    (4,), a BatchNorm between two Dense layers, bound with mutable stats."""

    def run(cls):
        class Foo(nn.Module):
            def setup(self):
                self.a = nn.Dense(3)
                self.bn = cls()
                self.b = nn.Dense(1)

        def f(foo, x):
            return foo.b(foo.bn(foo.a(x), use_running_average=False))

        x = jnp.ones((4,))
        y1, variables = nn.init_with_output(f, Foo())(jax.random.key(0), x)
        y2, state = nn.apply(f, Foo(), mutable="batch_stats")(variables, x)
        bound = Foo().bind(variables, mutable="batch_stats")
        y3 = f(bound, x)
        evaluated = Foo().apply(
            {**variables, **state},
            x,
            method=lambda foo, x: foo.bn(foo.a(x), use_running_average=True),
        )
        return y1, y2, y3, state, bound.variables["batch_stats"], evaluated

    expected, actual = both(run, LINEN)
    close(actual, expected)


def test_linen_vmap_single_examples_with_axis_name():
    """``linen_transforms_test.py::TransformTest::test_vmap_batchnorm``, one
    example per call: ``nn.vmap(cls)`` with ``axis_name``, the statistics taken
    over the mapped axis."""
    x = normal((5, 4))

    def run(cls):
        single = nn.vmap(
            cls,
            in_axes=0,
            variable_axes={"params": None, "batch_stats": None},
            split_rngs={"params": False},
            axis_name="batch",
        )(use_running_average=False, axis_name="batch")
        variables = single.init(jax.random.key(0), x)
        return variables, single.apply(variables, x, mutable=["batch_stats"])

    expected, actual = both(run, LINEN)
    close(actual, expected)


def test_nnx_vmap_single_examples_with_axis_name():
    x = normal((6, 3))

    def run(cls):
        bn = cls(3, axis_name="batch", rngs=nnx.Rngs(0))
        axes = nnx.StateAxes({...: None})
        y = nnx.vmap(lambda bn, x: bn(x), in_axes=(axes, 0), axis_name="batch")(bn, x)
        return y, nnx.to_pure_dict(nnx.state(bn))

    expected, actual = both(run, NNX)
    close(actual, expected)


def test_nnx_single_example_without_axis_name():
    def run(cls):
        bn = cls(3, rngs=nnx.Rngs(0))
        y = bn(jnp.arange(3.0))
        return y, bn(jnp.arange(3.0), use_running_average=True)

    expected, actual = both(run, NNX)
    close(actual, expected)


# --- integer inputs -----------------------------------------------------------


def test_integer_inputs_are_promoted_like_flax():
    x = jnp.arange(12).reshape(4, 3) ** 2

    def run_linen(cls):
        model = cls(use_running_average=False, use_bias=False, use_scale=False)
        variables = model.init(jax.random.key(0), x)
        return model.apply(variables, x, mutable=["batch_stats"])

    def run_nnx(cls):
        bn = cls(3, rngs=nnx.Rngs(0))
        return bn(x), nnx.to_pure_dict(nnx.state(bn))

    expected, actual = both(run_linen, LINEN)
    close(actual, expected, 1e-4)  # statistics of values up to 121
    expected, actual = both(run_nnx, NNX)
    close(actual, expected, 1e-4)
