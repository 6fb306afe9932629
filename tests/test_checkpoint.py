"""Checkpointing: params and batch statistics saved with orbax, restored elsewhere.

The test trains a small ``jaxbn.linen`` model for a few steps, saves its
variables (``params`` and ``batch_stats`` with the ``count``: float32 in the Flax adapters) with
``orbax.checkpoint.StandardCheckpointer``, and restores them in a fresh Python
process (``tests/checkpoint_worker.py``), which evaluates the model and writes
the restored variables and outputs: both must be bitwise equal to the
originals (the same jitted program on the same CPU with the same XLA flags is
deterministic).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import checkpoint_worker as worker
import jax
import jax.numpy as jnp
import numpy as np
import pytest

ocp = pytest.importorskip(
    "orbax.checkpoint", reason="orbax-checkpoint is not installed"
)

ROOT = Path(__file__).resolve().parents[1]


def test_orbax_round_trip_in_a_fresh_process(tmp_path):
    x = np.random.default_rng(0).normal(0.0, 1.0, (16, 5)).astype(np.float32)
    model = worker.Net()
    variables: dict[str, Any] = dict(model.init(jax.random.key(1), x, train=False))

    @jax.jit
    def train_step(variables, x):
        def loss(params):
            y, updates = model.apply(
                {**variables, "params": params}, x, train=True, mutable=["batch_stats"]
            )
            return jnp.mean(y**2), updates

        grads, updates = jax.grad(loss, has_aux=True)(variables["params"])
        params = jax.tree.map(lambda p, g: p - 0.1 * g, variables["params"], grads)
        return {"params": params, **updates}

    for _ in range(3):
        variables = train_step(variables, x)
    assert variables["batch_stats"]["BatchNorm_0"]["count"] == 3

    path = tmp_path / "ckpt"
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(path, variables)
    checkpointer.wait_until_finished()
    checkpointer.close()

    out = str(tmp_path / "restored")
    np.save(out + ".in.npy", x)
    run = subprocess.run(
        [sys.executable, str(Path(worker.__file__)), str(path), out],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},  # same XLA_FLAGS as here
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 0, run.stderr[-3000:]

    restored = np.load(out + ".npz")
    want = {"y": np.asarray(worker.evaluate(variables, x)), **worker.flat(variables)}
    assert sorted(restored.files) == sorted(want)
    assert "['batch_stats']['BatchNorm_1']['count']" in want
    for key, value in want.items():
        assert restored[key].dtype == value.dtype, key
        np.testing.assert_array_equal(restored[key], value, err_msg=key)
