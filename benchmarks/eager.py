r"""Eager (un-jitted) calls: one batch norm called as in a notebook or a debugger.

Each layer is called un-jitted on x (64, 32) float32, in training (the new
statistics returned) and in evaluation, after two warm-up calls; the calls of
the layers alternate, and the table gives each median and its ratio to the
Flax peer (``flax.linen.BatchNorm`` for the core and ``jaxbn.linen``,
``flax.nnx.BatchNorm`` for ``jaxbn.nnx``). An eager call dispatches every
primitive on its own, so its time follows the Python work per call and the
number of operations, not the data.

    python -m benchmarks.eager --reps 60
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.run import _cpu_model

PEERS = {"jaxbn": "flax.linen", "jaxbn.linen": "flax.linen", "jaxbn.nnx": "flax.nnx"}


def calls(x: jax.Array) -> dict[str, dict[str, Callable[[], object]]]:
    """``{layer: {"train": call, "eval": call}}``, each call un-jitted."""
    import flax.linen as nn
    from flax import nnx

    import jaxbn
    import jaxbn.linen
    import jaxbn.nnx

    out: dict[str, dict[str, Callable[[], object]]] = {}
    for name, module in [
        ("flax.linen", nn.BatchNorm()),
        ("jaxbn.linen", jaxbn.linen.BatchNorm()),
    ]:
        v = module.init(jax.random.key(0), x, use_running_average=False)
        out[name] = {
            "train": lambda m=module, v=v: m.apply(
                v, x, use_running_average=False, mutable=["batch_stats"]
            ),
            "eval": lambda m=module, v=v: m.apply(v, x, use_running_average=True),
        }
    for name, cls in [("flax.nnx", nnx.BatchNorm), ("jaxbn.nnx", jaxbn.nnx.BatchNorm)]:
        model = cls(x.shape[-1], rngs=nnx.Rngs(0))
        out[name] = {
            "train": lambda m=model: m(x, use_running_average=False),
            "eval": lambda m=model: m(x, use_running_average=True),
        }
    layer = jaxbn.batch_norm()
    params, stats = layer.init(x)
    out["jaxbn"] = {
        "train": lambda: layer.apply(params, stats, x, train=True),
        "eval": lambda: layer.apply(params, stats, x, train=False),
    }
    return out


def measure(reps: int) -> dict[str, dict[str, float]]:
    """Median seconds per call, ``{layer: {mode: seconds}}``."""
    x = jnp.asarray(np.random.default_rng(0).normal(3, 2, (64, 32)), jnp.float32)
    fns = calls(x)
    samples: dict[str, dict[str, list[float]]] = {
        n: {"train": [], "eval": []} for n in fns
    }
    for mode in ("train", "eval"):
        for fn in fns.values():
            for _ in range(2):
                jax.block_until_ready(fn[mode]())
        for _ in range(reps):
            for name, fn in fns.items():
                start = time.perf_counter()
                jax.block_until_ready(fn[mode]())
                samples[name][mode].append(time.perf_counter() - start)
    return {
        n: {m: statistics.median(v) for m, v in modes.items()}
        for n, modes in samples.items()
    }


def main(argv: list[str] | None = None) -> dict[str, dict[str, float]]:
    parser = argparse.ArgumentParser(description="Eager calls of one batch norm.")
    parser.add_argument("--reps", type=int, default=60)
    args = parser.parse_args(argv)
    medians = measure(args.reps)
    print(f"{_cpu_model()}, x (64, 32) float32, median of {args.reps} calls:")
    print("| layer | train ms | eval ms |\n|---|---|---|")
    for name, m in medians.items():
        peer = PEERS.get(name)
        cells = []
        for mode in ("train", "eval"):
            ratio = f" ({m[mode] / medians[peer][mode]:.2f}x)" if peer else ""
            cells.append(f"{1e3 * m[mode]:.2f}{ratio}")
        print(f"| {name} | " + " | ".join(cells) + " |")
    return medians


if __name__ == "__main__":
    main()
