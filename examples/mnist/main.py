"""Command line of the MNIST example.

Run from the repository root::

    python -m examples.mnist.main --workdir workdir/mnist
    python -m examples.mnist.main --workdir workdir/mnist --eval_only
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from collections.abc import Sequence

from examples.mnist import report, train
from examples.mnist.configs import default


def int_list(text: str) -> tuple[int, ...]:
    """Parses a flag such as ``32,64`` into ``(32, 64)``."""
    try:
        return tuple(int(f) for f in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated integers such as 32,64, got {text!r}"
        ) from None


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parses the flags; unset config flags stay ``None``."""
    defaults = default.get_config()
    p = argparse.ArgumentParser(
        prog="python -m examples.mnist.main",
        description="Train and evaluate a CNN with jaxbn batch normalization on MNIST.",
    )
    p.add_argument("--workdir", required=True, help="metrics, plot, checkpoints")
    p.add_argument(
        "--eval_only",
        action="store_true",
        help="restore the latest checkpoint in --workdir and evaluate it",
    )
    p.add_argument("--eval_epoch", type=int, help="with --eval_only: which epoch")
    p.add_argument("--num_epochs", type=int, help=f"default {defaults.num_epochs}")
    p.add_argument("--batch_size", type=int, help=f"default {defaults.batch_size}")
    p.add_argument(
        "--eval_batch_size", type=int, help=f"default {defaults.eval_batch_size}"
    )
    p.add_argument(
        "--learning_rate", type=float, help=f"default {defaults.learning_rate}"
    )
    p.add_argument("--bn_momentum", type=float, help=f"default {defaults.bn_momentum}")
    p.add_argument(
        "--batch_norm", choices=train.BATCH_NORMS, help=f"default {defaults.batch_norm}"
    )
    p.add_argument(
        "--features",
        type=int_list,
        help="convolution widths, e.g. 16,32 (default "
        + ",".join(map(str, defaults.features))
        + ")",
    )
    p.add_argument("--hidden", type=int, help=f"default {defaults.hidden}")
    p.add_argument("--seed", type=int, help=f"default {defaults.seed}")
    p.add_argument("--train_limit", type=int, help="use the first N training images")
    p.add_argument("--test_limit", type=int, help="use the first N test images")
    p.add_argument("--no_progress", action="store_true", help="hide the progress bar")
    return p.parse_args(argv)


def get_config(args: argparse.Namespace) -> default.Config:
    """The config with the flags that were given applied.

    The base is the config saved in ``--workdir`` by an earlier run if there is
    one (so ``--eval_only`` and resuming use the trained model's shape), else the
    default config.
    """
    base = train.load_config(args.workdir) or default.get_config()
    fields = {f.name for f in dataclasses.fields(default.Config)}
    overrides = {k: v for k, v in vars(args).items() if k in fields and v is not None}
    overrides["progress"] = not args.no_progress
    return dataclasses.replace(base, **overrides)


def main(argv: Sequence[str] | None = None) -> int:
    """Trains and evaluates, or with ``--eval_only`` only evaluates."""
    args = parse_args(argv)
    config = get_config(args)
    if not args.eval_only:
        train.train_and_evaluate(config, args.workdir)
        return 0
    result = train.eval_only(config, args.workdir, args.eval_epoch)
    print(
        f"epoch {result['epoch']}: test accuracy {100 * result['accuracy']:.2f}% "
        f"({result['correct']}/{result['count']}, evaluation batch size "
        f"{config.eval_batch_size}), loss {result['loss']:.4f}"
    )
    report.add_eval_only(args.workdir, result, config.eval_batch_size)
    reported = result["reported_accuracy"]
    if reported is None:
        print("No test accuracy was recorded for this epoch in metrics.jsonl.")
    elif reported == result["accuracy"]:
        print(f"Matches the accuracy reported during training exactly: {reported}.")
    else:
        print(f"DIFFERS from the accuracy reported during training: {reported}.")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
