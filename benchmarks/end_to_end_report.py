"""The markdown table of ``benchmarks.end_to_end`` from its JSON results."""

from __future__ import annotations

from typing import Any

from benchmarks.models import REFERENCE
from benchmarks.report import _allocator, _fmt_ms

_MIB = float(1 << 20)
STEPS = ("train", "eval")


def _header(run: dict[str, Any]) -> list[str]:
    m = run["machine"]
    versions = ", ".join(f"{k} {v}" for k, v in m["versions"].items())
    load = "/".join(f"{v:.2f}" for v in run["loadavg_start"])
    load_end = "/".join(f"{v:.2f}" for v in run["loadavg_end"])
    busy = max(run["loadavg_start"][0], run["loadavg_end"][0]) > 0.5 * m["cores"]
    lines = [f"## Allocator {_allocator(run)}", ""]
    if run.get("quick"):
        lines += ["**Smoke run** (`--quick`: small models, few samples).", ""]
    if busy:
        lines += [
            "**Taken under load** (1-minute load average above half the cores): "
            "other processes shared the CPU, so these figures are noisy.",
            "",
        ]
    lines += [
        f"- Machine: {m['cpu']}, {m['cores']} cores, {m['memory_gib']} GiB, "
        f"last-level cache {m['llc_bytes'] / _MIB:.0f} MiB; {m['platform']}",
        f"- Versions: {versions}",
        f"- Command: `{run['command']}`; {run['reps']} samples per case after "
        f"{run['warmup']} warm-up call(s), round-robin in a shuffled order; cache "
        f"flushed with {m['flush_bytes'] / _MIB:.0f} MiB before each call",
        f"- Date {run['date']}; load average {load} at start, {load_end} at end; "
        f"{run['seconds']:.0f} s",
    ]
    lines += [f"- Model `{k}`: {v}" for k, v in run["models"].items()]
    lines += [f"- `{k}`: {v}" for k, v in run["implementations"].items()]
    lines.append("")
    return lines


def _cell(entry: dict[str, Any] | None) -> str:
    if entry is None:
        return "–"
    return (
        f"{_fmt_ms(entry['median_ms'])} "
        f"({_fmt_ms(entry['q1_ms'])}–{_fmt_ms(entry['q3_ms'])})"
    )


def _table(run: dict[str, Any]) -> list[str]:
    others = [i for i in run["implementations"] if i != REFERENCE]
    head = f"| model | step | batch | {REFERENCE} ms |"
    rule = "|---|---|---:|---:|"
    for impl in others:
        head += f" {impl} ms | {REFERENCE} ÷ {impl} |"
        rule += "---:|---:|"
    lines = [
        "Median ms per step (interquartile range); a ratio above 1 means the "
        "jaxbn model's step is faster.",
        "",
        head,
        rule,
    ]
    notes = []
    for config in run["configs"]:
        results = config["results"]
        for step in STEPS:
            row = (
                f"| {config['model']} | {step} | {config['batch']} "
                f"| {_cell(results.get(REFERENCE, {}).get(step))} |"
            )
            for impl in others:
                entry = results.get(impl, {}).get(step)
                ratio = "–"
                if entry is not None and "vs_flax_linen" in entry:
                    ratio = f"{entry['vs_flax_linen']:.2f}×"
                row += f" {_cell(entry)} | {ratio} |"
            lines.append(row)
        for impl, reason in config["skipped"].items():
            notes.append(
                f"- {config['model']} batch {config['batch']}: skipped {impl}: {reason}"
            )
        losses = ", ".join(
            f"{impl} " + "/".join(f"{v:.5f}" for v in c["train_loss"])
            for impl, c in config["checks"].items()
        )
        notes.append(
            f"- {config['model']} batch {config['batch']}: train loss of the "
            f"first two steps: {losses}"
        )
        first = ", ".join(
            f"{impl} {t['train']:.1f}/{t['eval']:.1f}"
            for impl, t in config["first_call_s"].items()
        )
        notes.append(
            f"- {config['model']} batch {config['batch']}: first (compiling) call "
            f"of the train/eval step, s: {first}"
        )
    return [*lines, "", *notes, ""]


def render(results: dict[str, Any]) -> str:
    """The markdown report of every run in ``results``."""
    lines = ["# End-to-end benchmark: train and eval steps", ""]
    for run in results["runs"]:
        lines += _header(run)
        lines += _table(run)
    return "\n".join(lines)
