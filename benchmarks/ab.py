r"""Paired A/B of two checkouts of jaxbn in one process: compile time and run time.

Separate processes drift: on a 2-core machine the same compile's ratio to
flax.linen moved by 0.1 or more between runs. This loads a second checkout's
``jaxbn`` under another name beside this one's and measures both side by side,
order alternated, in the same process:

* ``compile``: the training (or evaluation) step of a whole model of
  ``benchmarks.compile_time`` (ResNet-50, ResNet-18 or the MNIST example's
  CNN), traced and lowered, then compiled after ``jax.clear_caches()``, for
  flax.linen, the other checkout and this one; wall and CPU time.
* ``run``: the jitted training forward and forward+backward of
  ``jaxbn.batch_norm(momentum=0.9)`` of both checkouts, timed by
  ``benchmarks.timing.measure`` as ``benchmarks.run`` times its cases
  (round-robin in a shuffled order, the caches flushed before each call; run
  under its tuned allocator for figures: ``MALLOC_MMAP_MAX_=0
  MALLOC_TRIM_THRESHOLD_=4000000000``).

    git worktree add --detach ../jaxbn-base <commit>
    python -m benchmarks.ab compile --base ../jaxbn-base --model resnet50 --reps 7
    python -m benchmarks.ab run --base ../jaxbn-base --reps 300
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import importlib
import importlib.util
import statistics
import sys
import time
import unittest.mock
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp

from benchmarks import compile_time, timing
from benchmarks.run import _cpu_model

RUN_SHAPES = {"nhwc": (128, 32, 32, 64), "2d": (4096, 1024)}


def load_checkout(path: str | Path, name: str = "jaxbn_base") -> Any:
    """The ``jaxbn`` package of another checkout, imported as ``name``."""
    root = Path(path).resolve() / "jaxbn"
    if not (root / "__init__.py").exists():
        raise ValueError(f"--base={path!s} has no jaxbn/__init__.py")
    spec = importlib.util.spec_from_file_location(
        name, root / "__init__.py", submodule_search_locations=[str(root)]
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


@contextlib.contextmanager
def _layer_of(model: str, norm: Callable) -> Iterator[None]:
    """While tracing the MNIST CNN, its layer named ``"jaxbn"`` is ``norm``.

    The example's CNN picks its batch norm by name (``batch_norm_cls``, the
    one place it chooses), so this points that name at the side being timed;
    the ResNets take the layer as a parameter and need nothing.
    """
    if model != "mnist":
        yield
        return
    from examples.mnist import train

    with unittest.mock.patch.object(train, "batch_norm_cls", lambda _: norm):
        yield


def _compile_once(model: str, norm: Callable, step: str) -> tuple[float, float]:
    build, shape, _ = compile_time.MODELS[model]
    net = build(norm)
    x = jax.ShapeDtypeStruct(shape, jnp.float32)
    labels = jax.ShapeDtypeStruct(shape[:1], jnp.int32)
    with _layer_of(model, norm):
        v = jax.eval_shape(
            functools.partial(net.init, train=False), jax.random.key(0), x
        )
        fn = compile_time._steps(net)[step]
        jax.clear_caches()
        lowered = fn.trace(v["params"], v["batch_stats"], x, labels).lower()
    wall, cpu = time.perf_counter(), time.process_time()
    lowered.compile()
    return time.perf_counter() - wall, time.process_time() - cpu


def compile_sides(
    norms: dict[str, Callable], model: str, step: str, reps: int
) -> dict[str, tuple[float, float]]:
    """Median compile seconds (wall, cpu) of ``model``'s step with each layer.

    The sides are compiled in turn, the order reversed every other
    repetition, in this one process.
    """
    if model not in compile_time.MODELS:
        raise ValueError(
            f"--model={model!r}: expected one of {list(compile_time.MODELS)}"
        )
    samples: dict[str, list[tuple[float, float]]] = {k: [] for k in norms}
    for rep in range(reps):
        order = list(norms) if rep % 2 == 0 else list(norms)[::-1]
        for name in order:
            samples[name].append(_compile_once(model, norms[name], step))
    return {
        k: (statistics.median(w for w, _ in v), statistics.median(c for _, c in v))
        for k, v in samples.items()
    }


def compile_ab(base: Any, model: str, step: str, reps: int) -> dict[str, Any]:
    """Median compile seconds (wall, cpu) of flax, the base and this checkout."""
    import flax.linen as nn

    import jaxbn.linen

    base_linen = importlib.import_module(base.__name__ + ".linen")
    norms = {"flax": nn.BatchNorm, "base": base_linen.BatchNorm}
    norms["this"] = jaxbn.linen.BatchNorm
    med = compile_sides(norms, model, step, reps)
    return {"model": model, "step": step, "reps": reps, "median_s": med}


def _run_fns(module: Any, x: jax.Array) -> tuple[dict[str, Callable], tuple]:
    layer = module.batch_norm(momentum=0.9)
    params, stats = layer.init(x)

    def forward(p, s, x):
        return layer.apply(p, s, x, train=True)

    def loss(p, s, x):
        y, new = layer.apply(p, s, x, train=True)
        return jnp.sum(y * x), new

    grad = jax.grad(loss, argnums=(0, 2), has_aux=True)
    fns = {"forward": jax.jit(forward), "forward+backward": jax.jit(grad)}
    return fns, (params, stats, x)


def _case(key: tuple[str, str], f: Callable, args: tuple) -> timing.Case:
    return timing.Case(key, lambda _: jax.block_until_ready(f(*args)))


def run_ab(base: Any, reps: int, shapes: dict[str, tuple[int, ...]]) -> list[dict]:
    """Median milliseconds of the training forward and forward+backward.

    The round-robin, the cache flush and the warm-up are ``benchmarks.run``'s
    (``timing.measure``, a read of 1.25x the last-level cache before each call).
    """
    import jaxbn

    rows = []
    for shape_name, shape in shapes.items():
        x = jax.random.normal(jax.random.key(0), shape) * 2 + 1
        sides = {"base": _run_fns(base, x), "this": _run_fns(jaxbn, x)}
        cases = [
            _case((name, op), f, a)
            for name, (fns, a) in sides.items()
            for op, f in fns.items()
        ]
        flush = timing.cache_flusher(None)
        samples = timing.measure(cases, reps=reps, warmup=2, flush=flush)
        for op in ("forward", "forward+backward"):
            ms = {k: 1e3 * statistics.median(samples[(k, op)]) for k in sides}
            rows.append({"shape": shape_name, "op": op, "reps": reps, "median_ms": ms})
    return rows


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("what", choices=("compile", "run"))
    parser.add_argument("--base", required=True, help="the other checkout's root")
    parser.add_argument(
        "--model",
        default="resnet50",
        choices=list(compile_time.MODELS),
        help="compile: the model",
    )
    parser.add_argument("--step", default="train", choices=("train", "eval"))
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--shapes", default=",".join(RUN_SHAPES), help="run: shapes")
    args = parser.parse_args(argv)
    base = load_checkout(args.base)
    cpu = _cpu_model()
    if args.what == "compile":
        r = compile_ab(base, args.model, args.step, args.reps)
        med = r["median_s"]
        (fw, _), (bw, bc), (tw, tc) = med["flax"], med["base"], med["this"]
        print(
            f"{cpu}: {args.model} {args.step}, {args.reps} reps, medians: flax "
            f"{fw:.2f} s, base {bw:.2f} s ({bw / fw:.3f}x), this {tw:.2f} s "
            f"({tw / fw:.3f}x); this/base wall {tw / bw:.3f}, cpu {tc / bc:.3f}"
        )
        return [r]
    shapes = {k: RUN_SHAPES[k] for k in args.shapes.split(",")}
    rows = run_ab(base, args.reps, shapes)
    for r in rows:
        b, t = r["median_ms"]["base"], r["median_ms"]["this"]
        print(
            f"{cpu}: {r['shape']} {r['op']}: base {b:.3f} ms, this {t:.3f} ms, "
            f"this/base {t / b:.3f}"
        )
    return rows


if __name__ == "__main__":
    main()
