"""Recalibration after a short training: the figures of ``docs/after_training.md``.

Trains the example's CNN (small: features (8, 16), hidden 32) for 25 steps of
64 images on real MNIST, twice: with a plain moving average (``warmup=False``,
Flax's rule) and with jaxbn's warm-up (the default). For each, the test
accuracy on the first 1,000 test images with the running statistics, with
each batch's own statistics, and with the running statistics replaced by
``jaxbn.recalibrate`` on 320 training images. Run from the repository root::

    python -m examples.mnist.recalibration --json examples/mnist/recalibration.json

The accuracies are exact counts of correct images, so they compare exactly
across runs on one machine; another CPU may round differently and move a
count by one or two.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np

import jaxbn
from examples.mnist import input_pipeline, train
from examples.mnist.configs.default import Config

STEPS = 25
BATCH = 64
RECALIBRATION_IMAGES = 320
TEST_IMAGES = 1000


def run(warmup: bool) -> dict[str, Any]:
    """Accuracies of one short training, before and after recalibration."""
    config = Config(features=(8, 16), hidden=32, batch_size=BATCH, bn_warmup=warmup)
    train_x, train_y = input_pipeline.load_split("train", limit=STEPS * BATCH)
    test_x, test_y = input_pipeline.load_split("test", limit=TEST_IMAGES)
    create = jax.jit(train.create_train_state, static_argnums=(0, 2))
    state = create(config, jax.random.key(0), STEPS)
    rng = np.random.default_rng(0)
    for x, y in input_pipeline.train_batches(train_x, train_y, BATCH, rng):
        state, _ = train.train_step(state, x, y)
    model = train.create_model(config)
    variables = {"params": state.params, "batch_stats": state.batch_stats}
    images = input_pipeline.normalize(train_x[:RECALIBRATION_IMAGES])
    batches = [images[i : i + BATCH] for i in range(0, RECALIBRATION_IMAGES, BATCH)]
    new = jaxbn.recalibrate(model, iter(batches), variables, train=True)
    recalibrated = state.replace(batch_stats=new["batch_stats"])
    evaluations = {
        "running": train.evaluate(state, test_x, test_y, 500),
        "batch": train.evaluate(state, test_x, test_y, 500, batch_stats=True),
        "recalibrated": train.evaluate(recalibrated, test_x, test_y, 500),
    }
    return {name: int(e["correct"]) for name, e in evaluations.items()}


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(prog="python -m examples.mnist.recalibration")
    p.add_argument("--json", type=Path, help="also write the results to this file")
    args = p.parse_args(argv)
    record: dict[str, Any] = {
        "settings": {
            "steps": STEPS,
            "batch_size": BATCH,
            "recalibration_images": RECALIBRATION_IMAGES,
            "test_images": TEST_IMAGES,
        },
        "correct": {
            "plain_average": run(warmup=False),
            "warmup": run(warmup=True),
        },
    }
    for name, counts in record["correct"].items():
        line = ", ".join(f"{k} {100 * v / TEST_IMAGES:.1f}%" for k, v in counts.items())
        print(f"{name}: {line}")
    if args.json:
        args.json.write_text(json.dumps(record, indent=1) + "\n")
    return record


if __name__ == "__main__":
    main()
