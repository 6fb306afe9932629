"""Markdown tables from the results that ``benchmarks.run`` writes as JSON."""

from __future__ import annotations

from typing import Any

from benchmarks.cases import OPS, PASSES

_MIB = float(1 << 20)


def _fmt_ratio(entry: dict[str, Any], key: str) -> str:
    return f"{entry[key]:.2f}×" if key in entry else "–"


def _fmt_ms(value: float) -> str:
    return f"{value:.3g}" if value < 100 else f"{value:.0f}"


def _allocator(run: dict[str, Any]) -> str:
    env = run["allocator"]
    setting = run.get("allocator_setting", "")
    if not env:
        return f"{setting}: glibc defaults (no MALLOC_* variable set)"
    return f"{setting}: " + " ".join(f"{k}={v}" for k, v in sorted(env.items()))


def _header(run: dict[str, Any]) -> list[str]:
    m = run["machine"]
    versions = ", ".join(f"{k} {v}" for k, v in m["versions"].items())
    load = "/".join(f"{v:.2f}" for v in run["loadavg_start"])
    load_end = "/".join(f"{v:.2f}" for v in run["loadavg_end"])
    busy = max(run["loadavg_start"][0], run["loadavg_end"][0]) > 0.5 * m["cores"]
    warning = (
        [
            "**Taken under load** (1-minute load average above half the cores): "
            "other processes shared the CPU, so these figures are noisy.",
            "",
        ]
        if busy
        else []
    )
    return [
        f"## Allocator {_allocator(run)}",
        "",
        *warning,
        f"- Machine: {m['cpu']}, {m['cores']} cores, {m['memory_gib']} GiB, "
        f"last-level cache {m['llc_bytes'] / _MIB:.0f} MiB; {m['platform']}",
        f"- Versions: {versions}",
        f"- Command: `{run['command']}`; {run['reps']} samples per case after "
        f"{run['warmup']} warm-up calls; cache flushed with "
        f"{m['flush_bytes'] / _MIB:.0f} MiB before each call; donation "
        f"{'on' if run['donate'] else 'off'}",
        f"- Date {run['date']}; load average {load} at start, {load_end} at end; "
        f"{run['seconds']:.0f} s",
        "",
    ]


def _shape_table(shape: dict[str, Any]) -> list[str]:
    size = shape["bytes"]
    roof = shape["roofline"]
    lines = [
        f"### {shape['name']}: {tuple(shape['shape'])} {shape['dtype']}, "
        f"S = {size / _MIB:.1f} MiB",
        "",
        f"Roofline: in-place copy of S bytes {_fmt_ms(roof['copy_ms']['median_ms'])}"
        f" ms → B = {roof['bandwidth_gbs']:.1f} GB/s (read + write).",
        "",
        "| op | implementation | median ms | IQR ms | flax.linen ÷ this "
        "| torch ÷ this | of roofline |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    results = shape["results"]
    for op in OPS:
        for impl, ops in results.items():
            if op not in ops:
                continue
            e = ops[op]
            lines.append(
                f"| {op} ({PASSES[op]}S) | {impl} | {_fmt_ms(e['median_ms'])} "
                f"| {_fmt_ms(e['q1_ms'])}–{_fmt_ms(e['q3_ms'])} "
                f"| {_fmt_ratio(e, 'vs_flax_linen')} | {_fmt_ratio(e, 'vs_torch')} "
                f"| {100 * e['roofline_fraction']:.0f}% |"
            )
    lines.append("")
    for impl, reason in shape["skipped"].items():
        lines.append(f"- skipped {impl}: {reason}")
    if shape["skipped"]:
        lines.append("")
    return lines


def _facts_table(shape: dict[str, Any]) -> list[str]:
    size = shape["bytes"]
    donated = any("fwd_alias_bytes" in f for f in shape["facts"].values())
    extra_head = " outputs in donated x ÷ S (fwd/eval/fwdbwd) |" if donated else ""
    lines = [
        f"Per implementation, {shape['name']}:",
        "",
        "| implementation | vjp residuals MiB | residuals ÷ S | of which inputs "
        "MiB | fwd+bwd XLA temp ÷ S | y dtype | trace+lower ms "
        "| compile ms |" + extra_head,
        "|---|---:|---:|---:|---:|---|---:|---:|" + ("---|" if donated else ""),
    ]
    for impl, f in shape["facts"].items():
        temp = f.get("fwdbwd_temp_bytes")
        c = shape["compile"].get(impl)
        lower = "–" if c is None else f"{1e3 * c['lower_s']:.0f}"
        compile_ms = "–" if c is None else f"{1e3 * c['compile_s']:.0f}"
        extra = ""
        if donated:
            aliases = [f.get(f"{op}_alias_bytes") for op in ("fwd", "eval", "fwdbwd")]
            extra = (
                " "
                + "/".join("–" if a is None else f"{a / size:.2f}" for a in aliases)
                + " |"
            )
        lines.append(
            f"| {impl} | {f['residual_bytes'] / _MIB:.1f} "
            f"| {f['residual_bytes'] / size:.2f} "
            f"| {f['residual_bytes_of_inputs'] / _MIB:.1f} "
            f"| {'–' if temp is None else f'{temp / size:.2f}'} | {f['y_dtype']} "
            f"| {lower} | {compile_ms} |" + extra
        )
    lines.append("")
    return lines


def _traces_table(run: dict[str, Any]) -> list[str]:
    lines = [
        "Python traces of a jitted step alternating train=True/False 4 times "
        "(8 calls):",
        "",
        "| implementation | static Python bool | traced bool array |",
        "|---|---:|---:|",
    ]
    for impl, t in run["traces"].items():
        if "skipped" in t:
            lines.append(f"| {impl} | skipped ({t['skipped']}) | – |")
        else:
            lines.append(f"| {impl} | {t['static_bool']} | {t['traced_bool']} |")
    lines.append("")
    return lines


def render(results: dict[str, Any]) -> str:
    """The markdown report of every run in ``results``."""
    lines = ["# Batch-norm benchmark", ""]
    for run in results["runs"]:
        lines += _header(run)
        for shape in run["shapes"]:
            lines += _shape_table(shape)
            lines += _facts_table(shape)
        lines += _traces_table(run)
    return "\n".join(lines)
