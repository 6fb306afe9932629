r"""Program size: the StableHLO ops one batch norm puts into a user's program.

Each batch norm of a model adds its program to the model's; XLA's compile
time, and an un-jitted call's dispatch time, grow with it. For one layer with
default options on x (8, 16, 16, 64) float32 this lowers three programs with
``jax.jit(f).lower(...)`` and counts the lines of their text that define a
``stablehlo.`` op (constants and region returns included; ``chlo.`` ops and
function calls are not counted):

* ``step``: ``jax.value_and_grad`` of ``sum(y * y)`` with respect to the
  params and x, the new statistics as aux: a training step;
* ``forward``: the training forward, the new statistics returned;
* ``eval``: evaluation with the running statistics.

Rows: the core ``jaxbn.batch_norm``, ``jaxbn.linen`` against
``flax.linen.BatchNorm`` and ``jaxbn.nnx`` against ``flax.nnx.BatchNorm``
(through ``nnx.split``/``nnx.merge``), each with its ratio to its Flax peer
(the core's to ``flax.linen``). The counts do not depend on the machine.

    python -m benchmarks.program_size --json benchmarks/results/program-size.json
"""

from __future__ import annotations

import argparse
import datetime
import re
import sys
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import device

SHAPE = (8, 16, 16, 64)
PROGRAMS = ("step", "forward", "eval")
# Peer of each row: the ratios are taken against it.
PEERS = {
    "jaxbn": "flax.linen",
    "jaxbn.linen": "flax.linen",
    "jaxbn.nnx": "flax.nnx",
}
_OP_LINE = re.compile(r"^\s*(?:%\S+\s*=\s*)?\"?stablehlo\.[a-z_]+")


def count_ops(text: str) -> int:
    r"""The lines of StableHLO ``text`` that define a ``stablehlo.`` op.

    Examples:
      >>> count_ops('%0 = stablehlo.add %a, %b : tensor<f32>\\n'
      ...           '%1 = chlo.square %0\\n  stablehlo.return %1')
      2
    """
    return sum(1 for line in text.splitlines() if _OP_LINE.match(line))


def _linen_programs(module: Any, x: jax.Array) -> dict[str, tuple[Callable, tuple]]:
    variables = module.init(jax.random.key(0), x, use_running_average=False)

    def forward(v, x):
        return module.apply(v, x, use_running_average=False, mutable=["batch_stats"])

    def evaluate(v, x):
        return module.apply(v, x, use_running_average=True)

    def loss(params, x, stats):
        y, updates = module.apply(
            {"params": params, "batch_stats": stats},
            x,
            use_running_average=False,
            mutable=["batch_stats"],
        )
        return jnp.sum(y * y), updates

    step = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)
    return {
        "step": (step, (variables["params"], x, variables["batch_stats"])),
        "forward": (forward, (variables, x)),
        "eval": (evaluate, (variables, x)),
    }


def _nnx_programs(cls: Any, x: jax.Array) -> dict[str, tuple[Callable, tuple]]:
    from flax import nnx

    graphdef, params, rest = nnx.split(
        cls(x.shape[-1], rngs=nnx.Rngs(0)), nnx.Param, ...
    )

    def run(params, rest, x, evaluating):
        model = nnx.merge(graphdef, params, rest, copy=True)
        y = model(x, use_running_average=evaluating)
        return y, nnx.state(model, nnx.BatchStat)

    def loss(params, x, rest):
        y, stats = run(params, rest, x, False)
        return jnp.sum(y * y), stats

    step = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)
    return {
        "step": (step, (params, x, rest)),
        "forward": (lambda p, r, x: run(p, r, x, False), (params, rest, x)),
        "eval": (lambda p, r, x: run(p, r, x, True)[0], (params, rest, x)),
    }


def _core_programs(x: jax.Array) -> dict[str, tuple[Callable, tuple]]:
    import jaxbn

    layer = jaxbn.batch_norm()
    params, stats = layer.init(x)

    def loss(params, x, stats):
        y, new = layer.apply(params, stats, x, train=True)
        return jnp.sum(y * y), new

    step = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)
    return {
        "step": (step, (params, x, stats)),
        "forward": (
            lambda p, s, x: layer.apply(p, s, x, train=True),
            (params, stats, x),
        ),
        "eval": (
            lambda p, s, x: layer.apply(p, s, x, train=False)[0],
            (params, stats, x),
        ),
    }


def programs(name: str, x: jax.Array) -> dict[str, tuple[Callable, tuple]]:
    """The three programs of the batch norm ``name``, with their arguments."""
    import flax.linen as nn
    from flax import nnx

    import jaxbn.linen
    import jaxbn.nnx

    builders: dict[str, Callable[[], dict]] = {
        "flax.linen": lambda: _linen_programs(nn.BatchNorm(), x),
        "flax.nnx": lambda: _nnx_programs(nnx.BatchNorm, x),
        "jaxbn": lambda: _core_programs(x),
        "jaxbn.linen": lambda: _linen_programs(jaxbn.linen.BatchNorm(), x),
        "jaxbn.nnx": lambda: _nnx_programs(jaxbn.nnx.BatchNorm, x),
    }
    return builders[name]()


def measure(names: list[str]) -> dict[str, dict[str, int]]:
    """``{name: {program: op count}}``."""
    x = jnp.asarray(np.random.default_rng(0).normal(3, 2, SHAPE), jnp.float32)
    counts = {}
    for name in names:
        counts[name] = {
            program: count_ops(jax.jit(fn).lower(*args).as_text())
            for program, (fn, args) in programs(name, x).items()
        }
    return counts


def ratios(counts: dict[str, dict[str, int]]) -> dict[str, dict[str, float]]:
    """Each jaxbn row's counts divided by its Flax peer's (see ``PEERS``)."""
    return {
        name: {p: counts[name][p] / counts[peer][p] for p in PROGRAMS}
        for name, peer in PEERS.items()
        if name in counts and peer in counts
    }


def render(counts: dict[str, dict[str, int]]) -> str:
    """A markdown table: the counts, and each ratio to the Flax peer."""
    rows = ["| layer | " + " | ".join(PROGRAMS) + " |", "|---" * 4 + "|"]
    r = ratios(counts)
    for name, c in counts.items():
        cells = [
            f"{c[p]}" + (f" ({r[name][p]:.2f}x)" if name in r else "") for p in PROGRAMS
        ]
        rows.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description="Program size of one batch norm.")
    parser.add_argument("--json", help="write the counts and ratios here")
    args = parser.parse_args(argv)
    names = ["flax.linen", "flax.nnx", "jaxbn", "jaxbn.linen", "jaxbn.nnx"]
    counts = measure(names)
    result = {
        "shape": list(SHAPE),
        "dtype": "float32",
        "versions": {"jax": jax.__version__},
        "commit": device.commit(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(),
        "command": "python -m benchmarks.program_size"
        + "".join(f" {a}" for a in (argv if argv is not None else sys.argv[1:])),
        "counts": counts,
        "ratios": ratios(counts),
    }
    print(render(counts))
    device.write_results(result, args.json)
    return result


if __name__ == "__main__":
    main()
