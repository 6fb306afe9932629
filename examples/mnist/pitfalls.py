"""The pitfalls table: running statistics after a short training, flax vs jaxbn.

Trains the same CNN twice from the same initialization and on the same batches,
with momentum 0.999, once with ``flax.linen.BatchNorm`` and once with
``jaxbn.linen.BatchNorm`` (warm-up of the decay on), and evaluates both on the
test set with their running statistics after a few hundred steps. Training in
training mode is identical for the two layers: only the running statistics
differ. The last column evaluates with each test batch's own statistics, which is
what the running statistics should approximate.

Run from the repository root::

    python -m examples.mnist.pitfalls

``--json PATH`` also writes the measured accuracies, and ``--plot PATH`` draws
test accuracy against training steps for both layers (the documentation's figure
comes from ``--steps 25,50,...,1000 --json ... --plot ...``, see
``docs/pitfalls.md``).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax

from examples.mnist import input_pipeline, train
from examples.mnist.configs.default import Config
from examples.mnist.main import int_list


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parses the flags."""
    p = argparse.ArgumentParser(prog="python -m examples.mnist.pitfalls")
    p.add_argument("--steps", type=int_list, default=(100, 300, 1000))
    p.add_argument("--momentum", type=float, default=0.999)
    p.add_argument("--features", type=int_list, default=(16, 32))
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--learning_rate", type=float, default=1e-3)
    p.add_argument("--batch_size", type=int, default=128)
    p.add_argument("--eval_batch_size", type=int, default=1000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--train_limit", type=int)
    p.add_argument("--test_limit", type=int)
    p.add_argument("--json", type=Path, help="also write the results to this file")
    p.add_argument("--plot", type=Path, help="also plot test accuracy vs steps")
    return p.parse_args(argv)


def run(
    config: Config,
    eval_steps: Sequence[int],
    learning_rate: float,
    data: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray],
) -> dict[int, dict[str, float]]:
    """Trains with constant-rate adam and evaluates at ``eval_steps``.

    Args:
        config: model, batch size, evaluation batch size and seed.
        eval_steps: steps after which to evaluate.
        learning_rate: adam's learning rate.
        data: ``(train_images, train_labels, test_images, test_labels)``.

    Returns:
        For each step of ``eval_steps``: ``running`` (test accuracy with the
        running statistics), ``batch`` (with each test batch's statistics) and
        ``train`` (mean training-mode accuracy over the last 50 training
        batches).
    """
    train_x, train_y, test_x, test_y = data
    model = train.create_model(config)
    variables = model.init(
        jax.random.key(config.seed),
        jnp.zeros((1, *input_pipeline.IMAGE_SHAPE, 1), jnp.float32),
        train=False,
    )
    state = train.TrainState.create(
        apply_fn=model.apply,
        params=variables["params"],
        batch_stats=variables["batch_stats"],
        tx=optax.adam(learning_rate),
    )
    results: dict[int, dict[str, float]] = {}
    train_acc: list[jax.Array] = []
    step, epoch = 0, 0
    while step < max(eval_steps):
        epoch += 1
        rng = np.random.default_rng([config.seed, epoch])
        for x, y in input_pipeline.train_batches(
            train_x, train_y, config.batch_size, rng
        ):
            state, metrics = train.train_step(state, x, y)
            train_acc = [*train_acc[-49:], metrics["accuracy"]]
            step += 1
            if step in eval_steps:
                running = train.evaluate(state, test_x, test_y, config.eval_batch_size)
                batch = train.evaluate(
                    state, test_x, test_y, config.eval_batch_size, batch_stats=True
                )
                results[step] = {
                    "running": running["accuracy"],
                    "batch": batch["accuracy"],
                    "train": float(np.mean(jax.device_get(train_acc))),
                }
            if step >= max(eval_steps):
                break
    return results


def plot_results(
    results: dict[str, dict[int, dict[str, float]]], momentum: float, path: Path
) -> None:
    """Plots test accuracy against training steps for both layers.

    Args:
        results: ``run``'s output for ``"flax"`` and ``"jaxbn"``.
        momentum: the momentum both runs used (for the title).
        path: the image file to write (PNG or SVG).
    """
    from matplotlib.figure import Figure

    fig = Figure(figsize=(8, 4.5), layout="constrained")
    ax = fig.subplots()
    steps = sorted(results["jaxbn"])
    for name, key, label, style in (
        ("jaxbn", "train", "train accuracy (training mode)", ":"),
        ("jaxbn", "batch", "test, batch statistics", "--"),
        ("jaxbn", "running", "test, jaxbn.linen.BatchNorm running statistics", "o-"),
        ("flax", "running", "test, flax.linen.BatchNorm running statistics", "s-"),
    ):
        values = [100 * results[name][s][key] for s in steps]
        ax.plot(steps, values, style, label=label)
    ax.set(
        xlabel="training steps",
        ylabel="accuracy (%)",
        title=f"MNIST, momentum {momentum}: evaluation with the running statistics",
        ylim=(0, 100),
    )
    ax.grid(alpha=0.3)
    ax.legend(loc="lower left")
    fig.savefig(path, dpi=100)


def main(argv: Sequence[str] | None = None) -> int:
    """Trains with both layers and prints the table (Markdown)."""
    args = parse_args(argv)
    train_x, train_y = input_pipeline.load_split("train", limit=args.train_limit)
    test_x, test_y = input_pipeline.load_split("test", limit=args.test_limit)
    data = (train_x, train_y, test_x, test_y)
    results = {}
    for name in train.BATCH_NORMS:
        config = Config(
            batch_norm=name,
            bn_momentum=args.momentum,
            bn_warmup=True,
            features=args.features,
            hidden=args.hidden,
            batch_size=args.batch_size,
            eval_batch_size=args.eval_batch_size,
            seed=args.seed,
        )
        start = time.perf_counter()
        results[name] = run(config, args.steps, args.learning_rate, data)
        print(
            f"trained with {name} for {max(args.steps)} steps in "
            f"{time.perf_counter() - start:.0f} s",
            file=sys.stderr,
        )

    def pct(v: float) -> str:
        return f"{100 * v:.1f}%"

    print(
        f"\nTest accuracy on {len(test_x)} MNIST test images, CNN "
        f"{'-'.join(map(str, args.features))}-{args.hidden}, adam "
        f"{args.learning_rate:g}, batch {args.batch_size}, momentum "
        f"{args.momentum}, seed {args.seed}:\n"
    )
    print(
        "| steps | train accuracy (training mode) | flax.linen.BatchNorm, "
        "running statistics | jaxbn.linen.BatchNorm, running statistics | "
        f"batch statistics (test batches of {args.eval_batch_size}) |"
    )
    print("| ---: | ---: | ---: | ---: | ---: |")
    for step in args.steps:
        flax_r, jaxbn_r = results["flax"][step], results["jaxbn"][step]
        print(
            f"| {step} | {pct(jaxbn_r['train'])} | {pct(flax_r['running'])} | "
            f"{pct(jaxbn_r['running'])} | {pct(jaxbn_r['batch'])} |"
        )
    # Training does not depend on the running statistics, so the two runs should
    # agree on everything but the running-statistics column.
    gaps = [
        abs(results["flax"][s]["batch"] - results["jaxbn"][s]["batch"])
        for s in args.steps
    ]
    print(
        "\nThe two runs' batch-statistics accuracies differ by at most "
        f"{100 * max(gaps):.2f} percentage points."
    )
    if args.json:
        settings = {k: v for k, v in vars(args).items() if k not in ("json", "plot")}
        record = {
            "settings": settings,
            "test_images": len(test_x),
            "results": results,
        }
        args.json.write_text(json.dumps(record, indent=1) + "\n")
    if args.plot:
        plot_results(results, args.momentum, args.plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
