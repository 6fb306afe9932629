r"""What each of jaxbn's guarantees costs: the program without it.

One batch norm's program is larger than Flax's because it keeps guarantees
Flax's does not (``docs/performance.md``). To choose on figures whether one may
give, this builds copies of this checkout's ``jaxbn/`` with one guarantee
removed (a *knock-out*), loads each beside this one
(``benchmarks.ab.load_checkout``) and measures, for default options:

* the StableHLO ops of ``jaxbn.linen.BatchNorm``'s train step, training
  forward and evaluation (``benchmarks.program_size``'s count and shape),
  against ``flax.linen.BatchNorm``, with warm-up on and off (``warmup`` is an
  option: turning it off is the user's choice, not a knock-out);
* with ``--compile MODEL``, the compile time of that model's train step
  (``benchmarks.compile_time``'s models), every side alternated in one
  process (``benchmarks.ab``).

The knock-outs are text substitutions, each of which must match exactly once,
so that a change of the code fails here instead of measuring something else.
They are for measuring the default program only: the ``non-finite`` one breaks
masked batches. ``tests/test_knockouts_bench.py`` checks that each one loses
the guarantee it is named for.

    python -m benchmarks.knockouts
    python -m benchmarks.knockouts --compile resnet50 --reps 5
"""

from __future__ import annotations

import argparse
import functools
import importlib
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import ab, program_size
from benchmarks.run import _cpu_model

ROOT = Path(__file__).resolve().parents[1]


class KnockOut(NamedTuple):
    """One guarantee removed.

    Attributes:
      lost: the guarantee the copy no longer keeps.
      edits: ``(file in jaxbn/, text, replacement)``, each text found once.
    """

    lost: str
    edits: tuple[tuple[str, str, str], ...]


_LOOP = (("_passes.py", "lax.while_loop(again, one_more, state)", "one_more(state)"),)
_NON_FINITE = (
    (
        "_passes.py",
        "offset = lax.select(finite, s1 * inv_n, jnp.zeros_like(s1))",
        "offset = s1 * inv_n",
    ),
    (
        "_passes.py",
        "jnp.max(lax.select(finite, far, jnp.full_like(far, jnp.inf)))",
        "jnp.max(far)",
    ),
    (
        "_training.py",
        "Step(y, moments, jnp.isfinite(m.margin),",
        "Step(y, moments, None,",
    ),
    (
        "_running.py",
        "        d = jnp.broadcast_to(d.astype(real), moving.shape)",
        "        d = d.astype(real)",
    ),
    (
        "_running.py",
        "k = lax.select(moving, d, jnp.ones_like(d))",
        "k = d if moving is None else lax.select(moving, d, jnp.ones_like(d))",
    ),
    (
        "_running.py",
        "if not known_finite:",
        "if not known_finite and moving is not None:",
    ),
    (
        "_running.py",
        'batch_stats["count"] + recorded.astype(batch_stats["count"].dtype)',
        'batch_stats["count"] + (1 if recorded is None else '
        'recorded.astype(batch_stats["count"].dtype))',
    ),
)
_OVERFLOW_GUARD = (
    (
        "_training.py",
        "    per_c = jnp.where(r == 0, jnp.zeros_like(per_c), per_c)\n",
        "",
    ),
)

KNOCKOUTS: dict[str, KnockOut] = {
    "loop": KnockOut(
        "statistics within a few ulps of float64 when the batch mean is far "
        "from the running mean (the re-centring passes run once)",
        _LOOP,
    ),
    "non-finite": KnockOut(
        "a batch with a non-finite statistic leaves the running statistics "
        "intact; an overflowing feature normalizes to the bias",
        _NON_FINITE,
    ),
    "overflow-guard": KnockOut(
        "finite gradients of an overflowing feature (the backward's select)",
        _OVERFLOW_GUARD,
    ),
    "all": KnockOut("all three", _LOOP + _NON_FINITE + _OVERFLOW_GUARD),
}


def build(name: str, dest: Path) -> Path:
    """A copy of this checkout's ``jaxbn/`` under ``dest`` with knock-out ``name``.

    Raises:
      ValueError: if an edit's text is not found exactly once.
    """
    shutil.copytree(
        ROOT / "jaxbn", dest / "jaxbn", ignore=shutil.ignore_patterns("__pycache__")
    )
    for file, text, replacement in KNOCKOUTS[name].edits:
        path = dest / "jaxbn" / file
        source = path.read_text()
        if source.count(text) != 1:
            raise ValueError(
                f"knock-out {name!r}: {text!r} occurs {source.count(text)} times "
                f"in jaxbn/{file}, expected once: update benchmarks/knockouts.py"
            )
        path.write_text(source.replace(text, replacement))
    return dest


def load(name: str, dest: Path) -> Any:
    """Builds knock-out ``name`` under ``dest`` and imports it as a package."""
    package = "jaxbn_knockout_" + name.replace("-", "_")
    return ab.load_checkout(build(name, dest), package)


def sides(knockouts: dict[str, Any]) -> dict[str, Callable]:
    """The layers measured: flax.linen, this checkout and each knock-out.

    Each jaxbn side is measured also with ``warmup=False``.
    """
    import flax.linen as nn

    import jaxbn

    out: dict[str, Callable] = {"flax.linen": nn.BatchNorm}
    for name, module in {"this": jaxbn, **knockouts}.items():
        linen = importlib.import_module(module.__name__ + ".linen")
        out[name] = linen.BatchNorm
        out[name + ", warmup=False"] = functools.partial(linen.BatchNorm, warmup=False)
    return out


def op_counts(layers: dict[str, Callable]) -> dict[str, dict[str, int]]:
    """``benchmarks.program_size``'s counts of each layer's three programs."""
    x = jnp.asarray(
        np.random.default_rng(0).normal(3, 2, program_size.SHAPE), jnp.float32
    )
    counts = {}
    for name, layer in layers.items():
        progs = program_size._linen_programs(layer(), x)
        counts[name] = {
            p: program_size.count_ops(jax.jit(f).lower(*args).as_text())
            for p, (f, args) in progs.items()
        }
    return counts


def render(
    counts: dict[str, dict[str, int]], compile_s: dict[str, float] | None
) -> str:
    """A markdown table: op counts (ratio to flax.linen) and compile ratios."""
    ref = counts["flax.linen"]
    head = "| layer | " + " | ".join(program_size.PROGRAMS)
    head += " | compile |" if compile_s else " |"
    rows = [head, "|---" * (head.count("|") - 1) + "|"]
    for name, c in counts.items():
        cells = [f"{c[p]} ({c[p] / ref[p]:.2f}x)" for p in program_size.PROGRAMS]
        if compile_s:
            ratio = compile_s[name] / compile_s["flax.linen"]
            cells.append(f"{compile_s[name]:.2f} s ({ratio:.3f}x)")
        rows.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument(
        "--compile", metavar="MODEL", help="also compile MODEL's train step"
    )
    parser.add_argument("--reps", type=int, default=5, help="compile repetitions")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        modules = {k: load(k, Path(tmp) / k) for k in KNOCKOUTS}
        layers = sides(modules)
        counts = op_counts(layers)
        compile_s = None
        if args.compile:
            medians = ab.compile_sides(layers, args.compile, "train", args.reps)
            compile_s = {k: wall for k, (wall, _) in medians.items()}
    for name, knockout in KNOCKOUTS.items():
        print(f"- {name}, given up: {knockout.lost}")
    what = (
        f"{args.compile} train step, {args.reps} reps, medians" if args.compile else ""
    )
    print(f"\n{_cpu_model()}; x {program_size.SHAPE} float32. {what}\n")
    print(render(counts, compile_s))
    return {"counts": counts, "compile_s": compile_s}


if __name__ == "__main__":
    main()
