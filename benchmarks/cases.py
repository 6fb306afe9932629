"""From an implementation adapter to timed cases and per-implementation facts.

Operations (``OPS``) and the minimum traffic, in multiples of S = bytes of x,
that each needs (``PASSES``):

- ``fwd``: jitted training forward, ``(params, stats, x) -> (y, stats)``; 3S
  (read x for the statistics, read x again and write y).
- ``fwdbwd``: jitted ``jax.value_and_grad`` of ``sum(y * g)`` for a fixed
  cotangent g, w.r.t. x and params, returning the new stats as aux; 5S.
- ``bwd``: the function returned by ``jax.vjp`` of the jitted training forward,
  applied (jitted) to g; the residuals are computed once, outside the timing;
  3S (read x or a residual of its size, read g, write dx), a lower bound.
- ``eval``: jitted evaluation-mode forward, ``(params, stats, x) -> y``; 2S.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import implementations as impls
from benchmarks.timing import Case

OPS = ("fwd", "fwdbwd", "bwd", "eval")
PASSES = {"fwd": 3, "fwdbwd": 5, "bwd": 3, "eval": 2, "copy": 2}


def reference_train(x: np.ndarray) -> np.ndarray:
    """Two-pass batch norm of ``x`` in float64 NumPy (scale 1, bias 0)."""
    x64 = np.asarray(x, dtype=np.float64)
    axes = tuple(range(x64.ndim - 1))
    mean = x64.mean(axis=axes)
    var = np.square(x64 - mean).mean(axis=axes)
    return (x64 - mean) / np.sqrt(var + impls.EPSILON)


def tolerance(dtype: Any) -> float:
    """Absolute and relative tolerance of the correctness check."""
    return 1e-4 if jnp.dtype(dtype) == jnp.float32 else 5e-2


def check_close(name: str, y: np.ndarray, reference: np.ndarray, tol: float) -> str:
    """Returns "" when ``y`` matches ``reference``, else a reason to skip."""
    if y.shape != reference.shape:
        return f"{name}: y has shape {y.shape}, expected {reference.shape}"
    err = np.abs(y.astype(np.float64) - reference)
    bound = tol + tol * np.abs(reference)
    if not np.all(err <= bound):
        return f"{name}: training forward differs from the reference by {err.max():.3g}"
    return ""


def _block(tree: Any) -> Any:
    return jax.block_until_ready(tree)


def _fresh(a: jax.Array) -> jax.Array:
    return _block(jnp.array(a, copy=True))


def _is_input(leaf: jax.Array, inputs: list[jax.Array]) -> bool:
    """Whether ``leaf`` is one of ``inputs``: the same buffer or equal values."""
    for a in inputs:
        if leaf.shape != a.shape or leaf.dtype != a.dtype:
            continue
        if leaf.unsafe_buffer_pointer() == a.unsafe_buffer_pointer():
            return True
        if bool(jnp.array_equal(leaf, a)):
            return True
    return False


def _jax_residual_bytes(
    vjp_fn: Any, inputs: list[jax.Array]
) -> tuple[int, int, list[Any]]:
    """(all residual bytes, bytes of residuals that are an input, shapes).

    A residual "is an input" when it shares the input's buffer or holds the
    same values (a copy the backward could have read from the input itself).
    """
    total = of_inputs = 0
    shapes = []
    for leaf in jax.tree_util.tree_leaves(vjp_fn):
        if not isinstance(leaf, jax.Array):
            continue
        total += leaf.nbytes
        shapes.append([list(leaf.shape), str(leaf.dtype)])
        if _is_input(leaf, inputs):
            of_inputs += leaf.nbytes
    return total, of_inputs, shapes


class JaxCases:
    """Jitted operations of one JAX implementation on one input."""

    def __init__(
        self, bn: impls.JaxBatchNorm, x: jax.Array, g: jax.Array, donate: bool
    ):
        self.bn, self.x, self.g, self.donate = bn, x, g, donate
        step = bn.step

        def train(params, stats, x):
            return step(params, stats, x, True)

        def evaluate(params, stats, x):
            return step(params, stats, x, False)[0]

        def loss(x, params, stats, g):
            y, new_stats = step(params, stats, x, True)
            return jnp.sum(y.astype(jnp.float32) * g.astype(jnp.float32)), new_stats

        self.fwdbwd_fn = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)
        self.train = jax.jit(train, donate_argnums=(2,) if donate else ())
        self.evaluate = jax.jit(evaluate, donate_argnums=(2,) if donate else ())
        self.fwdbwd = jax.jit(self.fwdbwd_fn, donate_argnums=(0,) if donate else ())
        self.apply_vjp = jax.jit(
            lambda vjp_fn, g: vjp_fn(g), donate_argnums=(1,) if donate else ()
        )
        self.params = bn.params
        # Evaluate with the statistics of one training step, as after training.
        y, self.trained_stats = _block(jax.jit(train)(bn.params, bn.stats, x))
        self.y = np.asarray(y.astype(jnp.float32))
        self.y_dtype = str(y.dtype)
        # stats is an argument of the jitted function, not a closed-over
        # constant: nnx states hold Variables that must not leak into a trace.
        forward = jax.jit(lambda x, params, stats: step(params, stats, x, True))
        _, self.vjp_fn, _ = jax.vjp(
            lambda x, params: forward(x, params, bn.stats), x, bn.params, has_aux=True
        )
        _block(jax.tree_util.tree_leaves(self.vjp_fn))

    def case(self, key: Any, op: str) -> Case:
        """The timed case of ``op`` (one of ``OPS``), under ``key``."""
        bn, x, g = self.bn, self.x, self.g
        params, stats, donate = bn.params, bn.stats, self.donate
        fresh_x = (lambda: _fresh(x)) if donate else (lambda: x)
        if op == "fwd":
            return Case(key, lambda a: _block(self.train(params, stats, a)), fresh_x)
        if op == "eval":
            trained = self.trained_stats
            return Case(
                key, lambda a: _block(self.evaluate(params, trained, a)), fresh_x
            )
        if op == "fwdbwd":
            return Case(
                key, lambda a: _block(self.fwdbwd(a, params, stats, g)), fresh_x
            )
        if op == "bwd":
            vjp_fn = self.vjp_fn
            fresh_g = (lambda: _fresh(g)) if donate else (lambda: g)
            return Case(key, lambda a: _block(self.apply_vjp(vjp_fn, a)), fresh_g)
        raise ValueError(f"unknown op {op!r}; expected one of {OPS}")

    def facts(self) -> dict[str, Any]:
        """Residual bytes and the compiled step's memory analysis."""
        total, aliased, shapes = _jax_residual_bytes(
            self.vjp_fn, [self.x, *jax.tree_util.tree_leaves(self.params)]
        )
        facts: dict[str, Any] = {
            "residual_bytes": total,
            "residual_bytes_of_inputs": aliased,
            "residual_shapes": shapes,
            "y_dtype": self.y_dtype,
        }
        try:
            compiled = (
                jax.jit(self.fwdbwd_fn)
                .lower(self.x, self.params, self.bn.stats, self.g)
                .compile()
            )
            analysis = compiled.memory_analysis()
            if analysis is not None:
                facts["fwdbwd_temp_bytes"] = int(analysis.temp_size_in_bytes)
        except Exception as e:  # memory_analysis is best effort per backend
            facts["fwdbwd_temp_bytes_error"] = repr(e)
        if self.donate:  # how many output bytes reuse the donated x, per op
            for op, fn, args in (
                ("fwd", self.train, (self.params, self.bn.stats, self.x)),
                ("eval", self.evaluate, (self.params, self.trained_stats, self.x)),
                ("fwdbwd", self.fwdbwd, (self.x, self.params, self.bn.stats, self.g)),
            ):
                try:
                    analysis = fn.lower(*args).compile().memory_analysis()
                    if analysis is not None:
                        facts[f"{op}_alias_bytes"] = int(analysis.alias_size_in_bytes)
                except Exception as e:
                    facts[f"{op}_alias_bytes_error"] = repr(e)
        return facts


def compile_seconds(bn: impls.JaxBatchNorm, x: jax.Array, g: jax.Array) -> dict:
    """Wall time to trace+lower and to compile a fresh jitted training step.

    The training step is the fwd+bwd function (``jax.value_and_grad`` of
    ``sum(y * g)``); a new Python function each call defeats the trace cache.
    """

    def make():
        def loss(x, params, stats, g):
            y, new_stats = bn.step(params, stats, x, True)
            return jnp.sum(y.astype(jnp.float32) * g.astype(jnp.float32)), new_stats

        return jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))

    t0 = time.perf_counter()
    lowered = make().lower(x, bn.params, bn.stats, g)
    t1 = time.perf_counter()
    lowered.compile()
    t2 = time.perf_counter()
    return {"lower_s": t1 - t0, "compile_s": t2 - t1}


def count_traces(bn: impls.JaxBatchNorm, x: jax.Array, traced: bool) -> int | str:
    """Python traces of a jitted step alternating train=True/False 4 times.

    With ``traced=False`` the flag is a static Python bool; with ``traced=True``
    it is a boolean array argument, and an implementation that cannot take a
    traced flag gives "unsupported (<error type>)".
    """
    count = 0

    def step(params, stats, x, train):
        nonlocal count
        count += 1
        return bn.step(params, stats, x, train)

    jitted = jax.jit(step, static_argnums=() if traced else (3,))
    stats = bn.stats
    try:
        for _ in range(4):
            for flag in (True, False):
                train = jnp.asarray(flag) if traced else flag
                _, new_stats = _block(jitted(bn.params, stats, x, train))
                if flag:
                    stats = new_stats
    except Exception as e:
        return f"unsupported ({type(e).__name__})"
    return count


# --- PyTorch -------------------------------------------------------------------


class TorchCases:
    """The same operations on a PyTorch module (no donation, no jit)."""

    def __init__(self, bn: impls.TorchBatchNorm, x: jax.Array, g: jax.Array):
        torch = bn.torch
        self.bn, self.torch = bn, torch
        self.x = impls.to_torch(torch, x)
        self.g = impls.to_torch(torch, g)
        self.x_leaf = self.x.detach().clone(memory_format=torch.preserve_format)
        self.x_leaf.requires_grad_(True)
        module = bn.train_module
        self.inputs = (self.x_leaf, module.weight, module.bias)
        with torch.no_grad():
            y = module(self.x)
        self.y = impls.from_torch(torch, y)
        self.y_dtype = str(y.dtype)
        saved: list[Any] = []

        def pack(t):
            saved.append(t)
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            self.y_graph = module(self.x_leaf)
        self.saved = saved

    def case(self, key: Any, op: str) -> Case:
        """The timed case of ``op`` (one of ``OPS``), under ``key``."""
        torch, bn, x, g = self.torch, self.bn, self.x, self.g
        module, inputs = bn.train_module, self.inputs

        def fwd(_):
            with torch.no_grad():
                return module(x)

        def evaluate(_):
            with torch.no_grad():
                return bn.eval_module(x)

        def fwdbwd(_):
            y = module(self.x_leaf)
            return torch.autograd.grad(y, inputs, g)

        def bwd(_):
            return torch.autograd.grad(self.y_graph, inputs, g, retain_graph=True)

        run: Callable[[Any], Any] = {
            "fwd": fwd,
            "eval": evaluate,
            "fwdbwd": fwdbwd,
            "bwd": bwd,
        }[op]
        return Case(key, run)

    def facts(self) -> dict[str, Any]:
        """Bytes of the tensors autograd saves for the backward."""
        pointers = {t.data_ptr() for t in self.inputs}
        total = sum(t.numel() * t.element_size() for t in self.saved)
        aliased = sum(
            t.numel() * t.element_size() for t in self.saved if t.data_ptr() in pointers
        )
        return {
            "residual_bytes": total,
            "residual_bytes_of_inputs": aliased,
            "residual_shapes": [[list(t.shape), str(t.dtype)] for t in self.saved],
            "y_dtype": self.y_dtype,
        }


def roofline_case(key: Any, x: jax.Array) -> Case:
    """An in-place jitted negation of a copy of x: reads S and writes S bytes."""
    negate = jax.jit(lambda a: -a, donate_argnums=0)
    cell = [_fresh(x)]

    def run(_):
        cell[0] = _block(negate(cell[0]))

    return Case(key, run)
