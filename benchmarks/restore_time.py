"""Where the time goes after restoring a checkpoint: the FAQ's figures.

Users report that "restoring takes forever". This separates the restore from
what follows it, for the MNIST example's CNN (the default config) and its
Orbax checkpoint, each in a new process as a user's restarted program would
be: the restore itself, the first training step after it (which compiles),
the second step; and, in another new process that shares the first one's
persistent compilation cache, the first step again. Medians over repetitions::

    python -m benchmarks.restore_time --json benchmarks/results/restore-time.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent


def _timed(fn: Any, *args: Any) -> tuple[float, Any]:
    """``(seconds, result)`` of ``fn(*args)``, waiting for its arrays."""
    import jax

    start = time.perf_counter()
    result = jax.block_until_ready(fn(*args))
    return time.perf_counter() - start, result


def phase(name: str, checkpoint: str, cache: str) -> dict[str, float]:
    """One process's measurements.

    ``save`` writes the checkpoint; ``cold`` and ``cached`` restore it and time
    the steps (``cached`` runs after ``cold`` filled the compilation cache).
    """
    import jax
    import numpy as np
    import orbax.checkpoint as ocp

    from examples.mnist import train
    from examples.mnist.configs.default import Config

    jax.config.update("jax_compilation_cache_dir", cache)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    config = Config()
    state = train.create_train_state(config, jax.random.key(0), steps_per_epoch=100)
    manager = train.checkpoint_manager(checkpoint, max_to_keep=1)
    if name == "save":
        manager.save(1, args=ocp.args.StandardSave(train.state_to_save(state)))
        manager.wait_until_finished()
        manager.close()
        return {}
    rng = np.random.default_rng(0)
    images = rng.random((config.batch_size, 28, 28, 1), np.float32)
    labels = rng.integers(0, 10, config.batch_size).astype(np.int32)
    restore_s, restored = _timed(train.restore_checkpoint, manager, state)
    manager.close()
    first_s, _ = _timed(train.train_step, restored, images, labels)
    second_s, _ = _timed(train.train_step, restored, images, labels)
    if name == "cached":
        return {"first_step_cached": first_s}
    return {"restore": restore_s, "first_step": first_s, "second_step": second_s}


def _in_new_process(name: str, checkpoint: str, cache: str) -> dict[str, float]:
    command = [sys.executable, "-m", "benchmarks.restore_time", "--phase", name]
    command += ["--checkpoint", checkpoint, "--cache", cache]
    out = subprocess.run(command, cwd=ROOT, check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def measure(reps: int) -> dict[str, list[float]]:
    """Seconds of each phase, one sample per repetition (fresh cache each)."""
    samples: dict[str, list[float]] = {}
    for _ in range(reps):
        checkpoint, cache = tempfile.mkdtemp(), tempfile.mkdtemp()
        _in_new_process("save", checkpoint, tempfile.mkdtemp())
        found = _in_new_process("cold", checkpoint, cache)
        found |= _in_new_process("cached", checkpoint, cache)
        for name, seconds in found.items():
            samples.setdefault(name, []).append(seconds)
    return samples


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(prog="python -m benchmarks.restore_time")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--json", type=Path)
    p.add_argument("--phase", choices=("save", "cold", "cached"), help="internal")
    p.add_argument("--checkpoint", help="internal")
    p.add_argument("--cache", help="internal")
    args = p.parse_args(argv)
    if args.phase is not None:  # one measured process
        print(json.dumps(phase(args.phase, args.checkpoint, args.cache)))
        return {}
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
