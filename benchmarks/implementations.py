"""Registry of the batch-norm implementations that the benchmark compares.

Every entry is a small adapter. A JAX entry's ``build(x)`` returns a
:class:`JaxBatchNorm`: initial ``params`` and ``stats`` pytrees and one pure
function ``step(params, stats, x, train) -> (y, stats)``, from which
``benchmarks.cases`` derives the jitted training forward, forward+backward,
backward and evaluation. ``train`` is a Python bool, or a traced boolean scalar
when the harness counts traces with a traced flag (an adapter that cannot take
one simply fails there, and the harness reports "unsupported").

A PyTorch entry's ``build(x)`` returns a :class:`TorchBatchNorm`.

All entries use the same hyperparameters: features on the last axis, the
statistics over every other axis, momentum 0.99 (PyTorch: 0.01), epsilon 1e-5,
learnable scale and bias, and an output ``y`` of ``x``'s dtype (flax gets
``dtype=x.dtype``; Equinox computes in float32 and its output is cast back to
``x``'s dtype, casts that XLA fuses).

``build`` imports its framework itself: an entry whose import fails (jaxbn.linen
not written yet, torch not installed) is skipped with the error as the reason.
To add an entry, write a ``build`` function and append an
:class:`Implementation` to ``IMPLEMENTATIONS``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

MOMENTUM = 0.99
EPSILON = 1e-5

Step = Callable[[Any, Any, jax.Array, Any], tuple[jax.Array, Any]]


@dataclasses.dataclass(frozen=True)
class JaxBatchNorm:
    """A JAX implementation reduced to pure functions.

    Attributes:
      params: pytree of learnable parameters (differentiated in fwd+bwd).
      stats: pytree of running statistics.
      step: ``step(params, stats, x, train) -> (y, stats)``.
    """

    params: Any
    stats: Any
    step: Step


@dataclasses.dataclass(frozen=True)
class TorchBatchNorm:
    """A PyTorch module in training mode and a copy in evaluation mode.

    Attributes:
      train_module: the module in ``train()`` mode.
      eval_module: a copy in ``eval()`` mode.
      torch: the imported ``torch`` module.
    """

    train_module: Any
    eval_module: Any
    torch: Any


@dataclasses.dataclass(frozen=True)
class Implementation:
    """One entry of the registry.

    Attributes:
      name: short name used on the command line and in the table.
      build: ``build(x) -> JaxBatchNorm | TorchBatchNorm``; may raise
        ImportError or AttributeError, and the entry is then skipped.
      kind: ``"jax"`` or ``"torch"``.
      note: one line on how the entry is configured.
    """

    name: str
    build: Callable[[jax.Array], JaxBatchNorm | TorchBatchNorm]
    kind: str = "jax"
    note: str = ""


def _not(train: Any) -> Any:
    """Logical not of a Python bool or of a traced boolean scalar."""
    return (not train) if isinstance(train, bool) else jnp.logical_not(train)


def _reduction_axes(x: jax.Array) -> tuple[int, ...]:
    return tuple(range(x.ndim - 1))


# --- jaxbn -------------------------------------------------------------------


def _jaxbn_core(x: jax.Array) -> JaxBatchNorm:
    import jaxbn

    layer = jaxbn.batch_norm(axis=-1, momentum=MOMENTUM, epsilon=EPSILON)
    params, stats = layer.init(x)

    def step(params, stats, x, train):
        return layer.apply(params, stats, x, train=train)

    return JaxBatchNorm(params, stats, step)


def _jaxbn_linen(x: jax.Array) -> JaxBatchNorm:
    import jaxbn.linen

    return _linen_from_class(jaxbn.linen.BatchNorm, x)


def _jaxbn_nnx(x: jax.Array) -> JaxBatchNorm:
    import jaxbn.nnx

    return _nnx_from_class(jaxbn.nnx.BatchNorm, x)


# --- flax --------------------------------------------------------------------


def _linen_from_class(cls: Any, x: jax.Array, **kwargs: Any) -> JaxBatchNorm:
    model = cls(axis=-1, momentum=MOMENTUM, epsilon=EPSILON, dtype=x.dtype, **kwargs)
    variables = model.init(jax.random.key(0), x, use_running_average=False)

    def step(params, stats, x, train):
        variables = {"params": params, "batch_stats": stats}
        if train is False:
            return model.apply(variables, x, use_running_average=True), stats
        y, updates = model.apply(
            variables, x, use_running_average=_not(train), mutable=["batch_stats"]
        )
        return y, updates["batch_stats"]

    return JaxBatchNorm(variables["params"], variables["batch_stats"], step)


def _flax_linen(x: jax.Array) -> JaxBatchNorm:
    import flax.linen

    return _linen_from_class(flax.linen.BatchNorm, x)


def _flax_linen_two_pass(x: jax.Array) -> JaxBatchNorm:
    import flax.linen

    return _linen_from_class(flax.linen.BatchNorm, x, use_fast_variance=False)


def _nnx_from_class(cls: Any, x: jax.Array) -> JaxBatchNorm:
    from flax import nnx

    model = cls(
        x.shape[-1],
        axis=-1,
        momentum=MOMENTUM,
        epsilon=EPSILON,
        dtype=x.dtype,
        rngs=nnx.Rngs(0),
    )
    graphdef, params, stats, rest = nnx.split(model, nnx.Param, nnx.BatchStat, ...)

    def step(params, stats, x, train):
        module = nnx.merge(graphdef, params, stats, rest, copy=True)
        y = module(x, use_running_average=_not(train))
        return y, nnx.state(module, nnx.BatchStat)

    return JaxBatchNorm(params, stats, step)


def _flax_nnx(x: jax.Array) -> JaxBatchNorm:
    from flax import nnx

    return _nnx_from_class(nnx.BatchNorm, x)


# --- Haiku and Equinox -------------------------------------------------------


def _haiku(x: jax.Array) -> JaxBatchNorm:
    import haiku as hk  # pyright: ignore[reportMissingImports]

    def forward(x, is_training):
        bn = hk.BatchNorm(
            create_scale=True, create_offset=True, decay_rate=MOMENTUM, eps=EPSILON
        )
        return bn(x, is_training)

    transformed = hk.transform_with_state(forward)
    params, stats = transformed.init(jax.random.key(0), x, True)

    def step(params, stats, x, train):
        return transformed.apply(params, stats, None, x, train)

    return JaxBatchNorm(params, stats, step)


def _equinox(x: jax.Array) -> JaxBatchNorm:
    import equinox as eqx  # pyright: ignore[reportMissingImports]

    # eqx.nn.BatchNorm normalizes one example of shape (features, ...) and
    # averages across vmapped axes named in axis_name; vmapping every
    # non-feature axis keeps x in its NHWC layout (no transpose).
    names = tuple(f"axis{i}" for i in _reduction_axes(x))
    bn, stats = eqx.nn.make_with_state(eqx.nn.BatchNorm)(
        x.shape[-1], axis_name=names, eps=EPSILON, momentum=MOMENTUM, mode="ema"
    )
    params, static = eqx.partition(bn, eqx.is_inexact_array)

    def step(params, stats, x, train):
        module = eqx.combine(params, static)

        def one(xi, state):
            # mode="ema" cannot mix bfloat16 batch statistics with its float32
            # running ones (lax.select), so x enters as float32 (a fused cast).
            return module(xi.astype(jnp.float32), state, inference=_not(train))

        for name in reversed(names):
            one = jax.vmap(one, in_axes=(0, None), out_axes=(0, None), axis_name=name)
        y, stats = one(x, stats)
        return y.astype(x.dtype), stats

    return JaxBatchNorm(params, stats, step)


# --- Plain jnp -----------------------------------------------------------------


def _two_pass_jnp(x: jax.Array) -> JaxBatchNorm:
    features = x.shape[-1]
    params = {
        "scale": jnp.ones((features,), jnp.float32),
        "bias": jnp.zeros((features,), jnp.float32),
    }
    stats = {
        "mean": jnp.zeros((features,), jnp.float32),
        "var": jnp.ones((features,), jnp.float32),
    }

    def step(params, stats, x, train):
        xf = x.astype(jnp.float32)
        if train is False:
            mean, var = stats["mean"], stats["var"]
        else:
            axes = _reduction_axes(x)
            mean = jnp.mean(xf, axis=axes)
            var = jnp.mean(jnp.square(xf - mean), axis=axes)
            new_stats = {
                "mean": MOMENTUM * stats["mean"] + (1 - MOMENTUM) * mean,
                "var": MOMENTUM * stats["var"] + (1 - MOMENTUM) * var,
            }
            if train is not True:  # a traced flag: select, no Python branch
                mean = jnp.where(train, mean, stats["mean"])
                var = jnp.where(train, var, stats["var"])
                new_stats = jax.tree.map(
                    lambda new, old: jnp.where(train, new, old), new_stats, stats
                )
            stats = new_stats
        inv = jax.lax.rsqrt(var + EPSILON) * params["scale"]
        y = (xf - mean) * inv + params["bias"]
        return y.astype(x.dtype), stats

    return JaxBatchNorm(params, stats, step)


# --- PyTorch -------------------------------------------------------------------


def _torch(x: jax.Array) -> TorchBatchNorm:
    import copy

    import torch  # pyright: ignore[reportMissingImports]

    torch.set_num_threads(2)
    features = x.shape[-1]
    if x.ndim == 4:
        module = torch.nn.BatchNorm2d(features, eps=EPSILON, momentum=1 - MOMENTUM)
    elif x.ndim == 2:
        module = torch.nn.BatchNorm1d(features, eps=EPSILON, momentum=1 - MOMENTUM)
    else:
        raise ValueError(f"no PyTorch batch norm for rank {x.ndim}")
    module.train()
    eval_module = copy.deepcopy(module).eval()
    return TorchBatchNorm(module, eval_module, torch)


def to_torch(torch: Any, x: jax.Array) -> Any:
    """The bytes of NHWC (or NC) ``x`` as a channels_last NCHW (or NC) tensor."""
    if x.dtype == jnp.bfloat16:
        array = np.array(x.astype(jnp.float32))  # writable, as torch wants
        tensor = torch.from_numpy(array).to(torch.bfloat16)
    else:
        tensor = torch.from_numpy(np.array(x))
    if x.ndim == 4:
        tensor = tensor.permute(0, 3, 1, 2)
        assert tensor.is_contiguous(memory_format=torch.channels_last)
    return tensor


def from_torch(torch: Any, y: Any) -> np.ndarray:
    """Inverse of :func:`to_torch`, as a float32 NumPy array in NHWC order."""
    if y.dim() == 4:
        y = y.permute(0, 2, 3, 1)
    return y.detach().to(torch.float32).contiguous().numpy()


IMPLEMENTATIONS: list[Implementation] = [
    Implementation("jaxbn", _jaxbn_core, note="jaxbn.batch_norm (core)"),
    Implementation("jaxbn.linen", _jaxbn_linen, note="jaxbn.linen.BatchNorm"),
    Implementation("jaxbn.nnx", _jaxbn_nnx, note="jaxbn.nnx.BatchNorm"),
    Implementation("flax.linen", _flax_linen, note="flax.linen.BatchNorm defaults"),
    Implementation(
        "flax.linen-2pass",
        _flax_linen_two_pass,
        note="flax.linen.BatchNorm(use_fast_variance=False)",
    ),
    Implementation("flax.nnx", _flax_nnx, note="flax.nnx.BatchNorm defaults"),
    Implementation("haiku", _haiku, note="hk.BatchNorm via transform_with_state"),
    Implementation(
        "equinox", _equinox, note='eqx.nn.BatchNorm(mode="ema"), vmap over N,H,W'
    ),
    Implementation("jnp-2pass", _two_pass_jnp, note="plain two-pass jnp formula"),
    Implementation(
        "torch",
        _torch,
        kind="torch",
        note="torch BatchNorm2d channels_last (1d for 2-D), CPU, 2 threads",
    ),
]

BY_NAME = {impl.name: impl for impl in IMPLEMENTATIONS}
