"""The results file of a run, and the figures the documentation takes from it.

``train_and_evaluate`` writes ``workdir/results.json``: the per-epoch records,
the time the program took, the machine (CPU model, cores, load average) and the
package versions; ``--eval_only`` adds what it measured. The committed
``examples/mnist/results.json`` is that file from the run the documentation
reports: the docs pages render their table and figures from it when the site is
built, and ``tests/test_docs.py`` checks that the results section of
``examples/mnist/README.md`` is the one this module writes. After a new run::

    cp workdir/mnist/results.json workdir/mnist/metrics.png examples/mnist/
    python -m examples.mnist.report --update_readme
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
from collections.abc import Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results.json"
README = HERE / "README.md"
RESULTS_FILE = "results.json"
PACKAGES = ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "numpy")
BEGIN = "<!-- results: written by `python -m examples.mnist.report --update_readme` -->"
END = "<!-- end of results -->"


def cpu_model() -> str:
    """The CPU's model name from ``/proc/cpuinfo`` (else ``platform``'s guess)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def _commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=HERE,
            capture_output=True,
            text=True,
            check=True,
        )
    except (OSError, subprocess.CalledProcessError):
        return None
    return out.stdout.strip() or None


def machine() -> dict[str, Any]:
    """The CPU model, cores, 1-minute load average, platform and versions."""
    versions = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "loadavg_1min": round(os.getloadavg()[0], 2),
        "platform": platform.platform(),
        "versions": versions,
        "jaxbn_commit": _commit(),
    }


def write(
    workdir: str | Path,
    config: dict[str, Any],
    records: Sequence[dict[str, Any]],
    *,
    program_time_s: float,
    start: dict[str, Any],
    resumed_from: int | None,
) -> Path:
    """Writes ``workdir/results.json`` at the end of a training run.

    Args:
        workdir: the run's workdir.
        config: the run's configuration (as a dict).
        records: the per-epoch records of ``metrics.jsonl``.
        program_time_s: seconds from the start of ``train_and_evaluate`` to the end.
        start: :func:`machine` when the run started (its load average).
        resumed_from: the checkpoint's epoch if the run resumed, else None.

    Returns:
        The path written.
    """
    results = {
        "command": "python -m " + " ".join(["examples.mnist.main", *sys.argv[1:]])
        if sys.argv[0].endswith("main.py")
        else None,
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "machine": start,
        "loadavg_1min_end": round(os.getloadavg()[0], 2),
        "program_time_s": round(program_time_s, 1),
        "resumed_from_epoch": resumed_from,
        "config": config,
        "epochs": list(records),
        "eval_only": [],
    }
    path = Path(workdir) / RESULTS_FILE
    path.write_text(json.dumps(results, indent=1) + "\n")
    return path


def add_eval_only(workdir: str | Path, result: dict[str, Any], batch_size: int) -> None:
    """Appends an ``--eval_only`` measurement to ``workdir/results.json``, if any."""
    path = Path(workdir) / RESULTS_FILE
    if not path.exists():
        return
    results = json.loads(path.read_text())
    keys = ("epoch", "correct", "count", "accuracy", "reported_accuracy")
    entry = {k: result[k] for k in keys} | {"batch_size": batch_size}
    results["eval_only"].append(entry)
    path.write_text(json.dumps(results, indent=1) + "\n")


def load(path: str | Path = RESULTS) -> dict[str, Any]:
    """Reads a results file (by default the committed one)."""
    return json.loads(Path(path).read_text())


def percent(fraction: float) -> str:
    """An accuracy as the pages print it: ``0.99314`` is ``"99.31%"``."""
    return f"{100 * fraction:.2f}%"


def duration(seconds: float) -> str:
    """``"3 min 05 s"`` for 185 seconds."""
    minutes, rest = divmod(round(seconds), 60)
    return f"{minutes} min {rest:02d} s"


def figures(results: dict[str, Any]) -> dict[str, str]:
    """The figures that the pages quote in their prose, as text.

    ``accuracy`` (final test accuracy, evaluation mode), ``correct`` (as
    ``9931/10000``), ``epochs``, ``epoch_time`` (mean training time per epoch),
    ``program_time``, ``machine`` (CPU model and cores), ``load`` (the 1-minute
    load average at the start and the end), ``versions``, ``date``.
    """
    last = results["epochs"][-1]
    m = results["machine"]
    epoch_times = [r["train_time_s"] for r in results["epochs"]]
    versions = m["versions"]
    return {
        "accuracy": percent(last["test_accuracy"]),
        "correct": f"{last['test_correct']}/{last['test_count']}",
        "epochs": str(len(results["epochs"])),
        "epoch_time": f"{sum(epoch_times) / len(epoch_times):.0f} s",
        "program_time": duration(results["program_time_s"]),
        "machine": f"{m['cpu']}, {m['cores']} cores",
        "load": f"{m['loadavg_1min']:.2f} / {results['loadavg_1min_end']:.2f}",
        "versions": ", ".join(f"{k} {v}" for k, v in versions.items()),
        "date": results["date"][:10],
        "commit": m.get("jaxbn_commit") or "unknown",
    }


def epoch_table(results: dict[str, Any]) -> str:
    """The per-epoch table (Markdown), the best test accuracy in bold."""
    rows = [
        "| epoch | train loss | train accuracy (training mode) "
        "| test accuracy (evaluation mode) | test accuracy (batch statistics) "
        "| train time | eval time |",
        "| ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    best = max(r["test_accuracy"] for r in results["epochs"])
    for r in results["epochs"]:
        test = percent(r["test_accuracy"])
        if r["test_accuracy"] == best:
            test = f"**{test}**"
        rows.append(
            f"| {r['epoch']} | {r['train_loss']:.4f} | {percent(r['train_accuracy'])} "
            f"| {test} | {percent(r['test_accuracy_batch_stats'])} "
            f"| {r['train_time_s']:.1f} s | {r['eval_time_s']:.1f} s |"
        )
    return "\n".join(rows)


def eval_only_text(results: dict[str, Any]) -> str:
    """One sentence on the ``--eval_only`` measurements (empty if there are none)."""
    runs = results.get("eval_only") or []
    if not runs:
        return ""
    parts = [
        f"{r['correct']}/{r['count']} with `--eval_batch_size {r['batch_size']}`"
        for r in runs
    ]
    same = all(r["accuracy"] == r["reported_accuracy"] for r in runs)
    return (
        f"`--eval_only`, in a fresh process, restored the epoch-{runs[0]['epoch']} "
        f"checkpoint and counted {' and '.join(parts)}: "
        + (
            "exactly the accuracy recorded during training."
            if same
            else "NOT the accuracy recorded during training."
        )
    )


def summary(results: dict[str, Any]) -> str:
    """The paragraph (Markdown) that says what was run, where, and how long it took."""
    f = figures(results)
    cfg = results["config"]
    resumed = results.get("resumed_from_epoch")
    return (
        f"{f['epochs']} epochs of batch {cfg['batch_size']} (adam, warmup-cosine "
        f"schedule to {cfg['learning_rate']:g}, seed {cfg['seed']}) on {f['machine']} "
        f"(CPU only; 1-minute load average {f['load']} at the start / end), "
        f"{f['versions']}, jaxbn at commit {f['commit']}, on {f['date']}. "
        f"Final test accuracy **{f['accuracy']}** ({f['correct']}); about "
        f"{f['epoch_time']} of training per epoch and {f['program_time']} inside "
        "the program (data loading and checksums, compilation, training, "
        "evaluation, checkpoints and plots"
        + (f"; resumed from epoch {resumed}" if resumed else "")
        + '). "Eval time" covers two passes over the test set (running '
        "statistics and batch statistics); the first includes compilation."
        + (f" Command: `{results['command']}`." if results.get("command") else "")
    )


def readme_section(results: dict[str, Any]) -> str:
    """The generated results section of ``examples/mnist/README.md``."""
    parts = [BEGIN, "", summary(results), "", epoch_table(results), ""]
    if text := eval_only_text(results):
        parts += [text, ""]
    return "\n".join([*parts, END])


def update_readme(results: dict[str, Any], readme: Path = README) -> bool:
    """Rewrites the README's results section; returns whether it changed."""
    text = readme.read_text()
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    new = head + readme_section(results) + tail
    readme.write_text(new)
    return new != text


def main(argv: Sequence[str] | None = None) -> int:
    """Prints the README's results section, or with ``--update_readme`` writes it."""
    p = argparse.ArgumentParser(prog="python -m examples.mnist.report")
    p.add_argument("--results", type=Path, default=RESULTS)
    p.add_argument("--update_readme", action="store_true")
    args = p.parse_args(argv)
    results = load(args.results)
    if args.update_readme:
        changed = update_readme(results)
        print(f"{README} {'updated' if changed else 'already up to date'}.")
    else:
        print(readme_section(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
