"""Times whole train and eval steps: ``python -m benchmarks.end_to_end``.

For a CIFAR ResNet and the MNIST example's CNN (``benchmarks/models.py``), the
train step (forward, backward, adam update, statistics update; the example's
``train_step``, jitted with the train state donated) and the eval step (the
example's ``eval_step``) are timed with ``flax.linen.BatchNorm`` and with
``jaxbn.linen.BatchNorm``, interleaved in one round-robin per model and batch
size. See benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import datetime
import inspect
import json
import math
import os
import shlex
import subprocess
import sys
import tempfile
import time
from typing import Any, cast

from benchmarks.models import IMPLEMENTATIONS, MODELS, NUM_CLASSES, REFERENCE
from benchmarks.run import ALLOCATOR_VARS, _child_env, _log, _machine, _strip_outputs

PROG = "python -m benchmarks.end_to_end"
DEFAULT_IMPLS = (REFERENCE, "jaxbn.linen")
STEPS = ("train", "eval")
LEARNING_RATE = 1e-3
# Relative tolerance on the losses of the check. The two layers differ only in
# how float32 rounding falls (flax's one-pass E[x^2] - E[x]^2 variance, jaxbn's
# two-pass one): about 1e-6 relative per normalization, compounded over up to 21
# layers and amplified by adam's first, sign-like update (m / sqrt(v)), for
# parameters whose gradient is near zero, before the second loss (seen here:
# 2.6e-5 for ResNet-20 at batch 128, 1e-7 for the MNIST CNN). 1e-3 is far
# above that and far below what a missing update or a layer that does not
# normalize changes.
LOSS_RTOL = 1e-3


def _parse(argv: list[str]) -> argparse.Namespace:
    doc = (__doc__ or "").splitlines()[0]
    p = argparse.ArgumentParser(prog=PROG, description=doc)
    p.add_argument("--models", default="resnet,mnist", help=f"from {list(MODELS)}")
    p.add_argument("--batch", default="128", help="comma-separated batch sizes")
    p.add_argument(
        "--impls",
        default=",".join(DEFAULT_IMPLS),
        help=f"from {list(IMPLEMENTATIONS)}; {REFERENCE} is always included",
    )
    p.add_argument("--reps", type=int, default=21, help="samples per case (>= 20)")
    p.add_argument("--warmup", type=int, default=2, help="untimed calls per case")
    p.add_argument(
        "--quick",
        action="store_true",
        help="smoke test: small models, batch 8, 5 reps, 1 warm-up, this process",
    )
    p.add_argument(
        "--allocator",
        choices=("both", "tuned", "default", "inherit"),
        default=None,
        help="glibc malloc setting, as in benchmarks.run (default: both; "
        "inherit with --quick)",
    )
    p.add_argument(
        "--flush-mib",
        type=int,
        default=None,
        help="cache-flush buffer in MiB (default: 1.25 x the last-level cache; "
        "0: no flush)",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of data and shuffles")
    p.add_argument("--command", default=None, help=argparse.SUPPRESS)
    p.add_argument("--json", default=None, help="write the results to this path")
    p.add_argument("--markdown", default=None, help="write the table to this path")
    args = p.parse_args(argv)
    if args.quick:
        if args.batch == "128":
            args.batch = "8"
        args.reps, args.warmup = min(args.reps, 5), 1
    if args.allocator is None:
        args.allocator = "inherit" if args.quick else "both"
    impls = [REFERENCE] + [i for i in args.impls.split(",") if i != REFERENCE]
    args.impls = ",".join(impls)
    for option, names, valid in (
        ("--models", args.models, MODELS),
        ("--impls", args.impls, IMPLEMENTATIONS),
    ):
        for name in names.split(","):
            if name not in valid:
                p.error(
                    f"{option}: unknown name {name!r}; expected one of {list(valid)}"
                )
    try:
        args.batches = [int(b) for b in args.batch.split(",")]
    except ValueError:
        p.error(f"--batch: expected comma-separated integers, got {args.batch!r}")
    if any(b < 2 for b in args.batches):
        p.error(f"--batch: batch norm needs at least 2 examples, got {args.batch!r}")
    return args


# --- one model and batch size ----------------------------------------------------


class _TrainChain:
    """Runs the donated train step on the state the previous call returned."""

    def __init__(self, step: Any, state: Any, images: Any, labels: Any):
        self.step, self.state, self.images, self.labels = step, state, images, labels

    def __call__(self, _: Any) -> None:
        import jax

        self.state, metrics = self.step(self.state, self.images, self.labels)
        jax.block_until_ready((self.state, metrics))


def _build(
    model_name: str, impl_name: str, batch: int, args: argparse.Namespace
) -> tuple[list[Any], dict[str, Any], dict[str, float]]:
    """Returns the timed cases of one build, its check values, first-call times."""
    import jax
    import jax.numpy as jnp
    import optax

    from benchmarks.timing import Case
    from examples.mnist import train as example

    spec = MODELS[model_name]
    model = spec.build(IMPLEMENTATIONS[impl_name], args.quick)
    image = spec.quick_image_shape if args.quick else spec.image_shape
    kx, ky = jax.random.split(jax.random.key(args.seed))
    images = jax.random.normal(kx, (batch, *image), jnp.float32)
    labels = jax.random.randint(ky, (batch,), 0, NUM_CLASSES)
    mask = jnp.ones((batch,), jnp.float32)
    # The same key for every implementation: identical initial parameters.
    variables = model.init(jax.random.key(1), images[:1], train=False)
    state = example.TrainState.create(
        apply_fn=model.apply,
        params=variables["params"],
        batch_stats=variables["batch_stats"],
        tx=optax.adam(LEARNING_RATE),
    )
    # The example's own steps, re-jitted: the train state donated, as users do.
    train_step = jax.jit(inspect.unwrap(example.train_step), donate_argnums=0)
    eval_step = jax.jit(inspect.unwrap(example.eval_step))

    first_call: dict[str, float] = {}
    t0 = time.perf_counter()
    sums = jax.block_until_ready(eval_step(state, images, labels, mask))
    first_call["eval"] = time.perf_counter() - t0
    check = {"eval_loss_initial": float(sums["loss_sum"]) / batch, "train_loss": []}
    for i in range(2):  # the loss before and after one update
        t0 = time.perf_counter()
        state, metrics = jax.block_until_ready(train_step(state, images, labels))
        if i == 0:
            first_call["train"] = time.perf_counter() - t0
        check["train_loss"].append(float(metrics["loss"]))
    eval_state = jax.tree.map(jnp.copy, state)  # train donates `state`
    cases = [
        Case((impl_name, "train"), _TrainChain(train_step, state, images, labels)),
        Case(
            (impl_name, "eval"),
            lambda _: jax.block_until_ready(
                eval_step(eval_state, images, labels, mask)
            ),
        ),
    ]
    return cases, check, first_call


def _mismatch(check: dict[str, Any], reference: dict[str, Any]) -> str:
    key = "eval_loss_initial"
    pairs = [(key, check[key], reference[key])]
    losses = zip(check["train_loss"], reference["train_loss"], strict=True)
    pairs += [(f"train_loss[{i}]", a, b) for i, (a, b) in enumerate(losses)]
    for name, a, b in pairs:
        if not (math.isfinite(a) and abs(a - b) <= LOSS_RTOL * abs(b)):
            return f"{name} = {a:.6g} but {REFERENCE} gives {b:.6g}"
    return ""


def _run_config(
    model_name: str, batch: int, args: argparse.Namespace, flush: Any
) -> dict[str, Any]:
    from benchmarks.run import _ms
    from benchmarks.timing import Summary, measure

    label = f"{model_name} batch {batch}"
    out: dict[str, Any] = {
        "model": model_name,
        "batch": batch,
        "checks": {},
        "first_call_s": {},
        "skipped": {},
        "results": {},
    }
    timed = []
    for impl_name in args.impls.split(","):
        _log(f"[{label}] build, compile and check {impl_name}")
        try:
            cases, check, first_call = _build(model_name, impl_name, batch, args)
            out["checks"][impl_name] = check
            out["first_call_s"][impl_name] = first_call
            if impl_name != REFERENCE:
                if REFERENCE not in out["checks"]:
                    raise RuntimeError(f"no {REFERENCE} result to check against")
                problem = _mismatch(check, out["checks"][REFERENCE])
                if problem:
                    raise RuntimeError(f"different loss, not timed: {problem}")
        except Exception as e:  # shown under the table, never timed
            reason = f"{type(e).__name__}: {e}".splitlines()[0][:200]
            out["skipped"][impl_name] = reason
            _log(f"[{label}] skip {impl_name}: {reason}")
            continue
        timed += cases
    _log(f"[{label}] timing {len(timed)} cases x {args.reps} reps")
    samples = measure(
        timed,
        reps=args.reps,
        warmup=args.warmup,
        flush=flush,
        seed=args.seed,
        progress=lambda m: _log(f"[{label}] {m}"),
    )
    summaries = {key: Summary.of(s) for key, s in samples.items()}
    for key, summary in summaries.items():
        impl_name, step = cast(tuple[str, str], key)
        entry = _ms(summary)
        entry["samples_ms"] = [1e3 * t for t in samples[key]]
        reference = summaries.get((REFERENCE, step))
        if reference is not None:
            entry["vs_flax_linen"] = reference.median / summary.median
        out["results"].setdefault(impl_name, {})[step] = entry
    timed.clear()
    return out


# --- the run ---------------------------------------------------------------------


def _run_here(args: argparse.Namespace, argv: list[str]) -> dict[str, Any]:
    from importlib import metadata

    from benchmarks.timing import cache_flusher

    flusher = cache_flusher(args.flush_mib)
    flush_bytes = flusher.nbytes
    machine = _machine(flush_bytes)
    machine["versions"]["optax"] = metadata.version("optax")
    start = time.perf_counter()
    run: dict[str, Any] = {
        "allocator": {k: os.environ[k] for k in ALLOCATOR_VARS if k in os.environ},
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "reps": args.reps,
        "warmup": args.warmup,
        "quick": args.quick,
        "loadavg_start": os.getloadavg(),
        "machine": machine,
        "command": args.command or shlex.join([*PROG.split(), *argv]),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(),
        "models": {name: MODELS[name].note for name in args.models.split(",")},
        "implementations": {
            name: IMPLEMENTATIONS[name].note for name in args.impls.split(",")
        },
        "configs": [],
    }
    for model_name in args.models.split(","):
        for batch in args.batches:
            run["configs"].append(_run_config(model_name, batch, args, flusher))
    run["loadavg_end"] = os.getloadavg()
    run["seconds"] = time.perf_counter() - start
    return run


def _run_child(setting: str, argv: list[str]) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "run.json")
        command = [
            sys.executable,
            "-m",
            "benchmarks.end_to_end",
            *_strip_outputs(argv),
            "--allocator",
            "inherit",
            "--json",
            path,
            "--command",
            shlex.join([*PROG.split(), *argv]),
        ]
        _log(f"== allocator {setting}: {shlex.join(command[1:])}")
        subprocess.run(command, env=_child_env(setting), check=True, stdout=sys.stderr)
        with open(path) as f:
            run = json.load(f)["runs"][0]
    run["allocator_setting"] = setting
    return run


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Runs the benchmark, prints the table and returns the results."""
    from benchmarks.end_to_end_report import render

    argv = sys.argv[1:] if argv is None else argv
    args = _parse(argv)
    if args.reps < 20 and not args.quick:
        _log(f"warning: --reps {args.reps} is below the 20 samples the issue asks")
    if args.allocator == "inherit":
        run = _run_here(args, argv)
        run["allocator_setting"] = "inherited"
        runs = [run]
    else:
        both = args.allocator == "both"
        settings = ("tuned", "default") if both else (args.allocator,)
        runs = [_run_child(setting, argv) for setting in settings]
    results = {"runs": runs}
    text = render(results)
    print(text)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(text)
    return results


if __name__ == "__main__":
    main()
