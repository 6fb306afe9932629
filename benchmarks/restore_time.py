"""Where the time goes after restoring a checkpoint: the FAQ's figures.

Users report that "restoring takes forever". This separates the restore from
what follows it, for the MNIST example's CNN (the default config) and its
Orbax checkpoint: the restore itself, the first training step after it (which
compiles), a second step, and the first step of a new process-like start
(caches cleared) with a persistent compilation cache that the first compile
filled. Each phase is timed once per repetition, medians reported::

    python -m benchmarks.restore_time --json benchmarks/results/restore-time.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from examples.mnist import train
from examples.mnist.configs.default import Config


def _timed(fn: Any, *args: Any) -> tuple[float, Any]:
    """``(seconds, result)`` of ``fn(*args)``, waiting for its arrays."""
    start = time.perf_counter()
    result = jax.block_until_ready(fn(*args))
    return time.perf_counter() - start, result


def _one_repetition(
    config: Config, state: Any, images: np.ndarray, labels: np.ndarray
) -> dict[str, float]:
    """Saves ``state``, restores it into a fresh state and times each phase."""
    manager = train.checkpoint_manager(tempfile.mkdtemp(), max_to_keep=1)
    manager.save(1, args=ocp.args.StandardSave(train.state_to_save(state)))
    manager.wait_until_finished()
    jax.clear_caches()
    fresh = train.create_train_state(config, jax.random.key(1), 100)
    restore_s, restored = _timed(train.restore_checkpoint, manager, fresh)
    manager.close()
    first_s, _ = _timed(train.train_step, restored, images, labels)
    second_s, _ = _timed(train.train_step, restored, images, labels)
    jax.clear_caches()  # as a new process would start: the disk cache only
    cached_s, _ = _timed(train.train_step, restored, images, labels)
    return {
        "restore": restore_s,
        "first_step": first_s,
        "second_step": second_s,
        "first_step_cached": cached_s,
    }


def measure(reps: int) -> dict[str, list[float]]:
    """Seconds of each phase, one sample per repetition."""
    config = Config()
    state = train.create_train_state(config, jax.random.key(0), steps_per_epoch=100)
    rng = np.random.default_rng(0)
    images = rng.random((config.batch_size, 28, 28, 1), np.float32)
    labels = rng.integers(0, 10, config.batch_size).astype(np.int32)
    jax.config.update("jax_compilation_cache_dir", tempfile.mkdtemp())
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    samples: dict[str, list[float]] = {}
    for _ in range(reps):
        for name, seconds in _one_repetition(config, state, images, labels).items():
            samples.setdefault(name, []).append(seconds)
    return samples


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(prog="python -m benchmarks.restore_time")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)
    samples = measure(args.reps)
    medians = {k: statistics.median(v) for k, v in samples.items()}
    record = {"reps": args.reps, "samples_s": samples, "median_s": medians}
    for name, value in medians.items():
        print(f"{name}: {value:.3f} s")
    if args.json:
        args.json.write_text(json.dumps(record, indent=1) + "\n")
    return record


if __name__ == "__main__":
    main()
