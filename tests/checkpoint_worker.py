"""The fresh process of the checkpoint test (``tests/test_checkpoint.py``).

Run as ``python checkpoint_worker.py CHECKPOINT_DIR OUT``: restores the
variables of :class:`Net` saved with orbax into ``CHECKPOINT_DIR``, evaluates
the model on ``OUT.in.npy``, and writes the outputs (``y``) and every restored
variable (keyed by its ``jax.tree_util.keystr`` path) to ``OUT.npz``.

The model lives here so that the test trains and saves the very same one.
"""

from __future__ import annotations

import sys
from typing import Any

import flax.linen as nn
import jax
import numpy as np

import jaxbn.linen


class Net(nn.Module):
    """Dense, batch norm, relu, dense, batch norm."""

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        x = nn.Dense(8)(x)
        x = jaxbn.linen.BatchNorm(use_running_average=not train)(x)
        x = nn.relu(x)
        x = nn.Dense(3)(x)
        return jaxbn.linen.BatchNorm(use_running_average=not train)(x)


def evaluate(variables: Any, x: np.ndarray) -> jax.Array:
    """The model's evaluation output, jitted (the same program in both processes)."""
    return jax.jit(lambda v, x: Net().apply(v, x, train=False))(variables, x)


def flat(variables: Any) -> dict[str, np.ndarray]:
    """Every variable as a NumPy array keyed by its path."""
    leaves = jax.tree_util.tree_flatten_with_path(variables)[0]
    return {jax.tree_util.keystr(k): np.asarray(v) for k, v in leaves}


def main(path: str, out: str) -> None:
    """Restores, evaluates and writes ``out.npz``."""
    import orbax.checkpoint as ocp

    x = np.load(out + ".in.npy")
    # The restore target: shapes and dtypes only, from init under eval_shape.
    abstract = jax.eval_shape(lambda: Net().init(jax.random.key(0), x, train=False))
    variables = ocp.StandardCheckpointer().restore(path, abstract)
    arrays = {"y": np.asarray(evaluate(variables, x)), **flat(variables)}
    np.savez(out, **arrays)  # type: ignore[arg-type]


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
