"""Tables and plots of the benchmark results in ``benchmarks/results/*.json``.

The performance page calls these functions when the site is built, so its tables
and figures always match the committed results; run this file to write the same
figures as PNG files (no timing is done here, only reading)::

    python docs/perf_figures.py --out /tmp/figures
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any, NamedTuple

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
OPS = ("fwd", "fwdbwd", "bwd", "eval")
OP_NAMES = {
    "fwd": "training forward",
    "fwdbwd": "training forward + backward",
    "bwd": "backward",
    "eval": "evaluation",
}
COMPARED = ("jaxbn", "flax.linen", "torch")
_MIB = float(1 << 20)
# The runs with every layer-level case, newest by date first in latest_run.
SPEED_SOURCES = ("cpu-2core",)


def load_run(name: str, allocator: str = "tuned") -> dict[str, Any]:
    """The run of ``benchmarks/results/<name>.json`` with the given allocator."""
    runs = json.loads((RESULTS / f"{name}.json").read_text())["runs"]
    for run in runs:
        if run.get("allocator_setting") == allocator:
            return run
    raise ValueError(f"{name}.json has no run with allocator {allocator!r}")


def latest_run(names: tuple[str, ...] = SPEED_SOURCES) -> tuple[str, dict[str, Any]]:
    """The newest (by its ``date``) tuned-allocator run of the given files.

    The speed figures quoted in the prose of other pages (``speed_range``) come
    from it, so that they follow the newest measurement without an edit.
    """
    runs = [(name, load_run(name)) for name in names]
    return max(runs, key=lambda item: item[1]["date"])


def ratio(shape: dict[str, Any], other: str, op: str, source: str = "results") -> float:
    """``other``'s median time ÷ jaxbn's (above 1: jaxbn is faster)."""
    results = shape[source]
    return results[other][op]["median_ms"] / results["jaxbn"][op]["median_ms"]


def speed_range(
    run: dict[str, Any], op: str = "fwdbwd", other: str = "flax.linen"
) -> tuple[float, float]:
    """The smallest and largest float32 ratio ``other`` ÷ jaxbn of ``op``."""
    ratios = [ratio(s, other, op) for s in run["shapes"] if s["dtype"] == "float32"]
    return min(ratios), max(ratios)


def substitutions() -> dict[str, str]:
    """The speed figures that the pages' prose quotes (MyST substitutions).

    ``perf_fwdbwd_vs_flax``: float32 forward+backward, flax.linen ÷ jaxbn, as
    ``"1.82–2.07×"``; ``perf_run``: the file and date it comes from.
    """
    name, run = latest_run()
    low, high = speed_range(run)
    p = json.loads((RESULTS / f"{name}.json").read_text())["provenance"]
    return {
        "perf_fwdbwd_vs_flax": f"{low:.2f}–{high:.2f}×",
        "perf_run": (
            f"`benchmarks/results/{name}.json`: {p['cpu']}, commit {p['commit']}, "
            f"{p['date'][:10]}"
        ),
    }


def provenance_line(path: str | Path) -> str:
    """Where a results file comes from, for the line under its table (Markdown).

    ``path`` is repository-relative; the file's ``"provenance"`` block is the
    one ``python -m benchmarks.figures`` writes.
    """
    record = json.loads((ROOT / path).read_text())
    p = record["provenance"]
    return (
        f"Measured on {p['cpu']} ({p['cores']} cores), commit {p['commit']}, "
        f"{p['date'][:10]}, jax {p['versions'].get('jax', '?')}: `{p['command']}` "
        f"(`{path}`)."
    )


def recalibration() -> dict[str, str]:
    """The recalibration figures of ``after_training.md`` (MyST substitutions).

    From ``examples/mnist/recalibration.json`` (``python -m benchmarks.figures
    --only recalibration``): ``recal_<rule>_<evaluation>`` is a test accuracy
    such as ``"65.2%"``, ``recal_source`` the file's provenance line.
    """
    path = "examples/mnist/recalibration.json"
    record = json.loads((ROOT / path).read_text())
    total = record["settings"]["test_images"]
    subs = {
        f"recal_{rule}_{name}": f"{100 * correct / total:.1f}%"
        for rule, counts in record["correct"].items()
        for name, correct in counts.items()
    }
    subs["recal_source"] = provenance_line(path)
    return subs


def restore_time() -> dict[str, str]:
    """The FAQ's restore figures (MyST substitutions).

    From ``benchmarks/results/restore-time.json`` (``python -m
    benchmarks.figures --only restore-time``): ``restore_<phase>`` is a
    median in seconds, such as ``"0.25 s"``; ``restore_source`` the file's
    provenance line.
    """
    path = "benchmarks/results/restore-time.json"
    record = json.loads((ROOT / path).read_text())
    subs = {f"restore_{k}": f"{v:.2f} s" for k, v in record["median_s"].items()}
    subs["restore_source"] = provenance_line(path)
    return subs


def load_text(run: dict[str, Any], donated: dict[str, Any]) -> str:
    """The load averages at the start and the end of the two runs (Markdown)."""
    return (
        "The 1-minute load average was "
        f"{run['loadavg_start'][0]:.2f} when the run started and "
        f"{donated['loadavg_start'][0]:.2f} for the donation run "
        f"({run['loadavg_end'][0]:.2f} and {donated['loadavg_end'][0]:.2f} at "
        "their ends, which include the benchmark's own two busy threads)."
    )


def spread_text(run: dict[str, Any]) -> str:
    """The spread of jaxbn's samples: the interquartile range ÷ the median."""
    spreads = [
        (r["q3_ms"] - r["q1_ms"]) / r["median_ms"]
        for s in run["shapes"]
        for r in (s["results"]["jaxbn"][op] for op in OPS)
    ]
    return (
        "In this run the interquartile range of jaxbn's samples was typically "
        f"{100 * float(sorted(spreads)[len(spreads) // 2]):.0f}% of the median "
        f"(up to {100 * max(spreads):.0f}%), so ratios near 1 are ties."
    )


def compile_text(run: dict[str, Any]) -> str:
    """How much longer jaxbn's forward+backward takes to compile than flax.linen's."""
    extra = [
        s["compile"]["jaxbn"]["compile_s"] - s["compile"]["flax.linen"]["compile_s"]
        for s in run["shapes"]
    ]
    return (
        "Compile time of a fresh training step (forward+backward) is "
        f"{1e3 * min(extra):.0f}–{1e3 * max(extra):.0f} ms longer than "
        "flax.linen's in these results."
    )


def _label(shape: dict[str, Any]) -> str:
    dtype = {"float32": "f32", "bfloat16": "bf16"}.get(shape["dtype"], shape["dtype"])
    return f"{tuple(shape['shape'])} {dtype}"


def setup_text(run: dict[str, Any]) -> str:
    """One paragraph (Markdown) describing the machine and the method of a run."""
    m = run["machine"]
    versions = ", ".join(f"{k} {v}" for k, v in m["versions"].items())
    return (
        f"{m['cpu']}, {m['cores']} cores, {m['memory_gib']} GiB; {versions}. "
        f"{run['reps']} samples per case, cache flushed before each call, medians; "
        f"allocator {run['allocator_setting']}, donation "
        f"{'on' if run['donate'] else 'off'}; command `{run['command']}`; "
        f"date {run['date'][:10]}."
    )


def headline_table(run: dict[str, Any], donated: dict[str, Any]) -> str:
    """The main tables (Markdown), one per shape: jaxbn against flax.linen, torch.

    Columns: jaxbn's and flax.linen's median times, the ratios flax.linen ÷
    jaxbn, flax.linen(use_fast_variance=False) ÷ jaxbn and torch ÷ jaxbn
    (above 1: jaxbn is faster), jaxbn's fraction of the roofline, and the same
    two for jaxbn in the run with x donated.
    """
    donated_shapes = {s["name"]: s for s in donated["shapes"]}
    out = []
    for shape in run["shapes"]:
        results = shape["results"]
        out += [
            f"**{_label(shape)}**, S = {shape['bytes'] / _MIB:.0f} MiB",
            "",
            "| op | jaxbn ms | flax ms | flax ÷ jaxbn | 2-pass ÷ jaxbn "
            "| torch ÷ jaxbn | roofline | donated: ms, roofline |",
            "|---|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for op in OPS:
            ours = results["jaxbn"][op]["median_ms"]
            flax = results["flax.linen"][op]["median_ms"]
            two_pass = results["flax.linen-2pass"][op]["median_ms"]
            torch = results["torch"][op]["median_ms"]
            d = donated_shapes[shape["name"]]["results"]["jaxbn"][op]
            out.append(
                f"| {op} | {ours:.2f} | {flax:.2f} "
                f"| {flax / ours:.2f}× | {two_pass / ours:.2f}× | {torch / ours:.2f}× "
                f"| {100 * results['jaxbn'][op]['roofline_fraction']:.0f}% "
                f"| {d['median_ms']:.2f}, {100 * d['roofline_fraction']:.0f}% |"
            )
        out.append("")
    return "\n".join(out)


class Target(NamedTuple):
    """A performance target: a figure of each shape and its threshold."""

    goal: str  # the target, as the table states it
    kind: str  # "ratio" (other ÷ jaxbn), "roofline" or "residuals" (÷ S)
    op: str = "fwdbwd"
    other: str = "flax.linen"  # for ratios
    threshold: float = 1.0
    donated: bool = False  # judged on the run with x donated


TARGETS = (
    Target("forward+backward ≥ 1.4× flax.linen", "ratio", threshold=1.4),
    Target(
        "forward+backward ≥ 2× flax two-pass",
        "ratio",
        other="flax.linen-2pass",
        threshold=2.0,
    ),
    Target(
        "training forward ≥ 1.4× flax two-pass", "ratio", "fwd", "flax.linen-2pass", 1.4
    ),
    Target("training forward not slower than flax.linen", "ratio", "fwd"),
    Target("evaluation not slower than flax.linen", "ratio", "eval"),
    Target("forward+backward faster than torch", "ratio", other="torch"),
    Target("residuals ≤ 1.1 S", "residuals", threshold=1.1),
    Target(
        "x donated: evaluation ≥ 85% of roofline",
        "roofline",
        "eval",
        threshold=0.85,
        donated=True,
    ),
    Target(
        "x donated: training forward ≥ 60% of roofline",
        "roofline",
        "fwd",
        threshold=0.6,
        donated=True,
    ),
    Target(
        "x donated: forward+backward ≥ 45% of roofline",
        "roofline",
        threshold=0.45,
        donated=True,
    ),
)


def _figure(target: Target, shape: dict[str, Any]) -> tuple[float, str, bool]:
    """The target's figure for one shape: value, text and whether it is met."""
    if target.kind == "residuals":
        value = shape["facts"]["jaxbn"]["residual_bytes"] / shape["bytes"]
        return value, f"{value:.2f} S", value <= target.threshold
    if target.kind == "roofline":
        value = shape["results"]["jaxbn"][target.op]["roofline_fraction"]
        return value, f"{100 * value:.0f}%", value >= target.threshold
    value = ratio(shape, target.other, target.op)
    return value, f"{value:.2f}×", value >= target.threshold


def targets_table(run: dict[str, Any], donated: dict[str, Any]) -> str:
    """The performance targets, each shape's figure, ✓ where met (Markdown).

    A ratio target is judged on ``run``; the donation run's figure follows in
    parentheses. A "x donated" target is judged on ``donated``.
    """
    donated_shapes = {s["name"]: s for s in donated["shapes"]}
    rows = [
        "| target | " + " | ".join(_label(s) for s in run["shapes"]) + " |",
        "|---|" + "---:|" * len(run["shapes"]),
    ]
    for target in TARGETS:
        cells = []
        for shape in run["shapes"]:
            other = donated_shapes[shape["name"]]
            judged = other if target.donated else shape
            _, text, met = _figure(target, judged)
            if target.kind == "ratio":
                text += f" ({_figure(target, other)[1]})"
            cells.append(f"{text} {'✓' if met else '✗'}")
        rows.append(f"| {target.goal} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def memory_table(run: dict[str, Any]) -> str:
    """Residuals, XLA scratch and compile time (Markdown), jaxbn vs flax.linen."""
    rows = [
        "| shape | S MiB | residuals ÷ S (jaxbn / flax.linen) "
        "| fwd+bwd XLA temp ÷ S (jaxbn / flax.linen) "
        "| compile ms (jaxbn / flax.linen) |",
        "|---|---:|---:|---:|---:|",
    ]
    for shape in run["shapes"]:
        size, facts, comp = shape["bytes"], shape["facts"], shape["compile"]
        pair = ("jaxbn", "flax.linen")
        res = " / ".join(f"{facts[i]['residual_bytes'] / size:.2f}" for i in pair)
        temp = " / ".join(f"{facts[i]['fwdbwd_temp_bytes'] / size:.2f}" for i in pair)
        ms = " / ".join(f"{1e3 * comp[i]['compile_s']:.0f}" for i in pair)
        rows.append(f"| {_label(shape)} | {size / _MIB:.0f} | {res} | {temp} | {ms} |")
    return "\n".join(rows)


def traces_table(run: dict[str, Any]) -> str:
    """Traces of a step called 8 times alternating train=True/False (Markdown)."""
    rows = [
        "| implementation | static Python bool | traced boolean array |",
        "|---|---:|---:|",
    ]
    for impl, t in run["traces"].items():
        rows.append(
            f"| {impl} | {t.get('static_bool', '–')} | {t.get('traced_bool', '–')} |"
        )
    return "\n".join(rows)


def plot_times(run: dict[str, Any]) -> Any:
    """Median time against the size of x (float32 shapes), one panel per op."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(11, 7), layout="constrained")
    axes = fig.subplots(2, 2).ravel()
    shapes = sorted(
        (s for s in run["shapes"] if s["dtype"] == "float32"), key=lambda s: s["bytes"]
    )
    for ax, op in zip(axes, OPS, strict=True):
        for impl, style in zip(COMPARED, ("o-", "s--", "^:"), strict=True):
            sizes = [s["bytes"] / _MIB for s in shapes]
            times = [s["results"][impl][op]["median_ms"] for s in shapes]
            ax.plot(sizes, times, style, label=impl)
        for s in shapes:
            ax.annotate(
                str(tuple(s["shape"])),
                (s["bytes"] / _MIB, s["results"]["jaxbn"][op]["median_ms"]),
                fontsize=7,
                xytext=(4, -10),
                textcoords="offset points",
            )
        ax.set(
            title=OP_NAMES[op],
            xlabel="size of x (MiB, float32)",
            ylabel="median time (ms)",
            ylim=(0, None),
        )
        ax.grid(alpha=0.3)
    axes[0].legend()
    return fig


def plot_roofline(run: dict[str, Any], donated: dict[str, Any]) -> Any:
    """The fraction of the memory roofline per case: jaxbn, flax.linen, donation."""
    import numpy as np
    from matplotlib.figure import Figure

    fig = Figure(figsize=(11, 4), layout="constrained")
    axes = fig.subplots(1, len(run["shapes"]), sharey=True)
    donated_shapes = {s["name"]: s for s in donated["shapes"]}
    x = np.arange(len(OPS))
    for ax, shape in zip(axes, run["shapes"], strict=True):
        for i, (impl, source) in enumerate(
            (("jaxbn", shape), ("flax.linen", shape), ("jaxbn", None))
        ):
            src = donated_shapes[shape["name"]] if source is None else source
            values = [100 * src["results"][impl][op]["roofline_fraction"] for op in OPS]
            label = impl if source is not None else "jaxbn, x donated"
            ax.bar(x + (i - 1) * 0.27, values, 0.27, label=label)
        ax.set_xticks(x, list(OPS))
        ax.set_title(_label(shape), fontsize=9)
        ax.axhline(100, color="k", lw=0.8)
        ax.grid(axis="y", alpha=0.3)
    axes[0].set_ylabel("% of roofline")
    axes[0].legend(fontsize=8)
    return fig


def _benchmark_report(name: str, module: str, what: str) -> str:
    """``benchmarks.<module>.render`` of ``benchmarks/results/<name>.json``.

    Says so, naming the file, when it has not been committed yet.
    """
    path = RESULTS / f"{name}.json"
    if not path.exists():
        return (
            f"No {what} results are committed yet (`{path.relative_to(ROOT)}`); "
            "the command above writes them."
        )
    import importlib
    import sys

    sys.path.insert(0, str(ROOT))
    render = importlib.import_module(f"benchmarks.{module}").render
    return render(json.loads(path.read_text()))


def end_to_end_markdown(name: str = "end-to-end") -> str:
    """The whole-model report of ``benchmarks/results/<name>.json`` (Markdown).

    Headings become bold lines, so the report can sit inside a page section.
    """
    lines = _benchmark_report(name, "end_to_end_report", "whole-model").splitlines()
    return "\n".join(
        f"**{line.lstrip('#').strip()}**" if line.startswith("#") else line
        for line in lines
    )


def compile_time_markdown(name: str = "compile-time") -> str:
    """The whole-model compile-time table of ``benchmarks/results/<name>.json``."""
    return _benchmark_report(name, "compile_time", "compile-time")


def png(fig: Any) -> Any:
    """The figure as an ``IPython.display.Image`` (PNG), for an executed page."""
    import io

    from IPython.display import Image

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    return Image(data=buf.getvalue(), format="png")


def main() -> None:
    """Writes the two figures of the performance page as PNG files."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="output directory")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    run, donated = load_run("cpu-2core"), load_run("cpu-2core-donate")
    plot_times(run).savefig(args.out / "times.png", dpi=100)
    plot_roofline(run, donated).savefig(args.out / "roofline.png", dpi=100)
    print(f"wrote {args.out}/times.png and {args.out}/roofline.png")


if __name__ == "__main__":
    main()
