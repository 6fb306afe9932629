r"""Compile time of whole models: jaxbn.linen against flax.linen, side by side.

For each model (ResNet-18 and ResNet-50 in the style of Flax's ImageNet
example, and the MNIST example's CNN) and each batch norm, the training step
``jax.jit(jax.value_and_grad(loss, has_aux=True))`` (the new ``batch_stats`` as
aux) and the evaluation step are traced, lowered and compiled from a fresh
Python function after ``jax.clear_caches()``; the variables are abstract
(``jax.eval_shape``), so nothing else is compiled. Each repetition alternates
the order of the batch norms, and the tables give medians and the ratio
jaxbn / flax. The size of each lowered program (StableHLO text) is recorded too.

    python -m benchmarks.compile_time --json benchmarks/results/compile-time.json \\
        --markdown benchmarks/results/compile-time.md
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from benchmarks import imagenet_models
from benchmarks.run import _machine

REFERENCE = "flax.linen"


def _norms() -> dict[str, Callable[..., nn.Module]]:
    import jaxbn.linen

    return {
        REFERENCE: nn.BatchNorm,
        "jaxbn.linen": jaxbn.linen.BatchNorm,
        "jaxbn.linen-nowarmup": functools.partial(jaxbn.linen.BatchNorm, warmup=False),
    }


def _mnist(norm: Callable[..., nn.Module]) -> nn.Module:
    from examples.mnist.train import CNN

    name = "flax" if norm is nn.BatchNorm else "jaxbn"
    warmup = not isinstance(norm, functools.partial)
    return (
        CNN(batch_norm=name, bn_warmup=warmup)
        if name == "jaxbn"
        else CNN(batch_norm=name)
    )


# name: (builder, input shape, classes)
MODELS: dict[str, tuple[Callable[..., nn.Module], tuple[int, ...], int]] = {
    "resnet18": (imagenet_models.resnet18, (8, 64, 64, 3), imagenet_models.NUM_CLASSES),
    "resnet50": (imagenet_models.resnet50, (8, 64, 64, 3), imagenet_models.NUM_CLASSES),
    "mnist": (_mnist, (128, 28, 28, 1), 10),
}


def _steps(model: nn.Module) -> dict[str, Callable]:
    """Fresh (uncached) train and eval step functions of ``model``."""

    def loss(params, batch_stats, x, labels):
        logits, updates = model.apply(
            {"params": params, "batch_stats": batch_stats},
            x,
            train=True,
            mutable=["batch_stats"],
        )
        value = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
        return jnp.mean(value), updates["batch_stats"]

    def evaluate(params, batch_stats, x, labels):
        logits = model.apply(
            {"params": params, "batch_stats": batch_stats}, x, train=False
        )
        return jnp.mean(jnp.argmax(jnp.asarray(logits), -1) == labels)

    return {
        "train": jax.jit(jax.value_and_grad(loss, has_aux=True)),
        "eval": jax.jit(evaluate),
    }


def _time_step(step: Callable, args: tuple) -> dict[str, float]:
    t0 = time.perf_counter()
    traced = step.trace(*args)  # pyright: ignore[reportAttributeAccessIssue]
    t1 = time.perf_counter()
    lowered = traced.lower()
    t2 = time.perf_counter()
    lowered.compile()
    t3 = time.perf_counter()
    return {
        "trace_s": t1 - t0,
        "lower_s": t2 - t1,
        "compile_s": t3 - t2,
        "hlo_chars": float(len(lowered.as_text())),
    }


def measure_once(model_name: str, norm: Callable[..., nn.Module]) -> dict[str, dict]:
    """Trace, lower and compile both steps of one model, caches cleared first."""
    build, shape, classes = MODELS[model_name]
    model = build(norm)
    x = jax.ShapeDtypeStruct(shape, jnp.float32)
    labels = jax.ShapeDtypeStruct(shape[:1], jnp.int32)
    variables = jax.eval_shape(
        functools.partial(model.init, train=False), jax.random.key(0), x
    )
    args = (variables["params"], variables["batch_stats"], x, labels)
    out = {}
    for step_name, step in _steps(model).items():
        jax.clear_caches()
        out[step_name] = _time_step(step, args)
    del classes
    return out


def run(models: list[str], impls: list[str], reps: int) -> dict[str, Any]:
    """``{model: {step: {impl: {phase: [samples]}}}}``, orders alternated.

    Raises:
      ValueError: for a model or batch-norm name the benchmark does not know.
    """
    norms = _norms()
    for flag, names, known in (("--models", models, MODELS), ("--impls", impls, norms)):
        unknown = [n for n in names if n not in known]
        if unknown:
            raise ValueError(
                f"{flag} got {', '.join(unknown)}; expected some of {', '.join(known)}"
            )
    samples: dict[str, Any] = {}
    for model_name in models:
        for rep in range(reps):
            order = impls if rep % 2 == 0 else impls[::-1]
            for impl in order:
                got = measure_once(model_name, norms[impl])
                for step, phases in got.items():
                    slot = samples.setdefault(model_name, {}).setdefault(step, {})
                    for phase, value in phases.items():
                        slot.setdefault(impl, {}).setdefault(phase, []).append(value)
                print(
                    f"{model_name} rep {rep} {impl}: "
                    + ", ".join(f"{s} {v['compile_s']:.2f} s" for s, v in got.items()),
                    file=sys.stderr,
                    flush=True,
                )
    return samples


def summarize(samples: dict[str, Any]) -> dict[str, Any]:
    """Medians per phase and the ratio of each impl's to flax.linen's."""
    out: dict[str, Any] = {}
    for model, steps in samples.items():
        for step, impls in steps.items():
            ref = impls.get(REFERENCE)
            for impl, phases in impls.items():
                row = {p: statistics.median(v) for p, v in phases.items()}
                row["min_compile_s"] = min(phases["compile_s"])
                row["max_compile_s"] = max(phases["compile_s"])
                if ref is not None:
                    for p in ("trace_s", "lower_s", "compile_s", "hlo_chars"):
                        row[p.replace("_s", "") + "_ratio"] = row[
                            p
                        ] / statistics.median(ref[p])
                out.setdefault(model, {}).setdefault(step, {})[impl] = row
    return out


def render(result: dict[str, Any]) -> str:
    """A markdown table of the summary, with the machine and command."""
    m = result["machine"]
    lines = [
        f"Machine: {m['cpu']}, {m['cores']} cores; jax {m['versions']['jax']}, "
        f"flax {m['versions']['flax']}. {result['reps']} repetitions, order "
        "alternated, medians; ratio = this / flax.linen.",
        "",
        "| model | step | batch norm | trace s | lower s | compile s (min-max) "
        "| compile ratio | HLO chars ratio |",
        "|---|---|---|---:|---:|---:|---:|---:|",
    ]
    for model, steps in result["summary"].items():
        for step, impls in steps.items():
            for impl, r in impls.items():
                lines.append(
                    f"| {model} | {step} | {impl} | {r['trace_s']:.2f} | "
                    f"{r['lower_s']:.2f} | {r['compile_s']:.2f} "
                    f"({r['min_compile_s']:.2f}-{r['max_compile_s']:.2f}) | "
                    f"{r.get('compile_ratio', float('nan')):.2f}x | "
                    f"{r.get('hlo_chars_ratio', float('nan')):.2f}x |"
                )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Runs the benchmark; prints the table; writes JSON/markdown if asked."""
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    p.add_argument("--models", default="resnet50,resnet18,mnist")
    p.add_argument("--impls", default="flax.linen,jaxbn.linen")
    p.add_argument("--reps", type=int, default=4)
    p.add_argument("--json", type=Path)
    p.add_argument("--markdown", type=Path)
    args = p.parse_args(argv)
    samples = run(args.models.split(","), args.impls.split(","), args.reps)
    result = {
        "machine": _machine(0),
        "reps": args.reps,
        "command": "python -m benchmarks.compile_time "
        + " ".join(argv or sys.argv[1:]),
        "samples": samples,
        "summary": summarize(samples),
    }
    table = render(result)
    print(table)
    if args.json:
        args.json.write_text(json.dumps(result, indent=1) + "\n")
    if args.markdown:
        args.markdown.write_text(table)
    return result


if __name__ == "__main__":
    main()
