"""Reruns every figure the site quotes, on this machine and commit: one command.

    python -m benchmarks.figures                 # every step below, in order
    python -m benchmarks.figures --only mnist,recalibration
    python -m benchmarks.figures --list          # the steps and their commands

Each step runs its own command in a subprocess, one after the other, so run
it on an otherwise idle machine (the benchmarks print their load averages).
After a step, each JSON file it wrote gets a ``"provenance"`` block: the CPU
model, cores, commit (with ``-dirty`` if ``jaxbn/`` had uncommitted changes),
date, versions and the step's command, from which the pages print the machine
and commit next to their figures (``docs/perf_figures.provenance_line``).
The whole run took about 50 minutes on a 2-core AMD EPYC.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from importlib import metadata
from pathlib import Path
from typing import Any, NamedTuple

from benchmarks.run import _cpu_model

ROOT = Path(__file__).resolve().parent.parent
RESULTS = "benchmarks/results"
MNIST_WORKDIR = "workdir/figures/mnist"
PITFALL_STEPS = "25,50,75,100,150,200,300,400,500,600,700,800,900,1000"


class Step(NamedTuple):
    """One results file (or a few) and the commands that write it.

    Attributes:
      name: what ``--only`` selects.
      commands: the commands, each a list of arguments after ``python``.
      outputs: the JSON files the commands write (repository-relative).
      fresh: a working directory removed first (so nothing resumes), or None.
      copies: ``(source, destination)`` files copied after the commands.
      after: commands run after the copies.
    """

    name: str
    commands: tuple[tuple[str, ...], ...]
    outputs: tuple[str, ...]
    fresh: str | None = None
    copies: tuple[tuple[str, str], ...] = ()
    after: tuple[tuple[str, ...], ...] = ()


def _json_md(module: str, stem: str, *flags: str) -> tuple[str, ...]:
    json_path, md = f"{RESULTS}/{stem}.json", f"{RESULTS}/{stem}.md"
    return ("-m", module, *flags, "--json", json_path, "--markdown", md)


STEPS = (
    Step(
        "program-size",
        (("-m", "benchmarks.program_size", "--json", f"{RESULTS}/program-size.json"),),
        (f"{RESULTS}/program-size.json",),
    ),
    Step(
        "layer",
        (_json_md("benchmarks.run", "cpu-2core", "--allocator", "tuned"),),
        (f"{RESULTS}/cpu-2core.json",),
    ),
    Step(
        "layer-donated",
        (
            _json_md(
                "benchmarks.run", "cpu-2core-donate", "--donate", "--allocator", "tuned"
            ),
        ),
        (f"{RESULTS}/cpu-2core-donate.json",),
    ),
    Step(
        "compile-time",
        (_json_md("benchmarks.compile_time", "compile-time"),),
        (f"{RESULTS}/compile-time.json",),
    ),
    Step(
        "end-to-end",
        (_json_md("benchmarks.end_to_end", "end-to-end", "--allocator", "tuned"),),
        (f"{RESULTS}/end-to-end.json",),
    ),
    Step(
        "mnist",
        (
            ("-m", "examples.mnist.main", "--workdir", MNIST_WORKDIR, "--no_progress"),
            (
                "-m",
                "examples.mnist.main",
                "--workdir",
                MNIST_WORKDIR,
                "--eval_only",
                "--eval_batch_size",
                "1",
                "--no_progress",
            ),
        ),
        ("examples/mnist/results.json",),
        fresh=MNIST_WORKDIR,
        copies=(
            (f"{MNIST_WORKDIR}/results.json", "examples/mnist/results.json"),
            (f"{MNIST_WORKDIR}/metrics.png", "examples/mnist/metrics.png"),
        ),
        # The example's README quotes the run.
        after=(("-m", "examples.mnist.report", "--update_readme"),),
    ),
    Step(
        "pitfalls",
        (
            (
                "-m",
                "examples.mnist.pitfalls",
                "--steps",
                PITFALL_STEPS,
                "--json",
                "docs/_static/pitfalls.json",
                "--plot",
                "docs/_static/pitfalls.png",
            ),
        ),
        ("docs/_static/pitfalls.json",),
    ),
    Step(
        "restore-time",
        (
            (
                "-m",
                "benchmarks.restore_time",
                "--json",
                f"{RESULTS}/restore-time.json",
            ),
        ),
        (f"{RESULTS}/restore-time.json",),
    ),
    Step(
        "recalibration",
        (
            (
                "-m",
                "examples.mnist.recalibration",
                "--json",
                "examples/mnist/recalibration.json",
            ),
        ),
        ("examples/mnist/recalibration.json",),
    ),
)


def _git(*args: str) -> str:
    out = subprocess.run(
        ["git", *args], cwd=ROOT, capture_output=True, text=True, check=False
    )
    return out.stdout.strip()


def provenance(command: str, seconds: float) -> dict[str, Any]:
    """Where and from what a results file comes."""
    dirty = bool(_git("status", "--porcelain", "--", "jaxbn"))
    versions = {"python": platform.python_version()}
    for package in ("jax", "jaxlib", "flax", "optax", "numpy"):
        with contextlib.suppress(metadata.PackageNotFoundError):
            versions[package] = metadata.version(package)
    return {
        "cpu": _cpu_model(),
        "cores": os.cpu_count(),
        "commit": _git("rev-parse", "--short", "HEAD") + ("-dirty" if dirty else ""),
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "versions": versions,
        "command": command,
        "seconds": round(seconds, 1),
    }


def run_step(step: Step) -> None:
    """Runs a step's commands, copies its files and stamps its JSON outputs."""
    start = time.perf_counter()
    if step.fresh is not None:
        shutil.rmtree(ROOT / step.fresh, ignore_errors=True)
    for command in step.commands:
        print(f"[figures] {step.name}: python {shlex.join(command)}", flush=True)
        subprocess.run([sys.executable, *command], cwd=ROOT, check=True)
    for source, destination in step.copies:
        shutil.copyfile(ROOT / source, ROOT / destination)
    for command in step.after:
        subprocess.run([sys.executable, *command], cwd=ROOT, check=True)
    command = " && ".join(f"python {shlex.join(c)}" for c in step.commands)
    stamp = provenance(command, time.perf_counter() - start)
    for output in step.outputs:
        path = ROOT / output
        record = json.loads(path.read_text())
        record["provenance"] = stamp
        path.write_text(json.dumps(record, indent=1) + "\n")
    print(f"[figures] {step.name}: done in {stamp['seconds']:.0f} s", flush=True)


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks.figures")
    p.add_argument("--only", help="comma-separated step names (default: all)")
    p.add_argument("--list", action="store_true", help="print the steps and exit")
    args = p.parse_args(argv)
    names = [s.name for s in STEPS]
    chosen = names if args.only is None else args.only.split(",")
    unknown = sorted(set(chosen) - set(names))
    if unknown:
        raise SystemExit(f"--only got {unknown}; the steps are {names}")
    for step in STEPS:
        if step.name not in chosen:
            continue
        if args.list:
            for command in step.commands:
                print(f"{step.name}: python {shlex.join(command)}")
            continue
        run_step(step)


if __name__ == "__main__":
    main()
