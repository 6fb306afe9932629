"""Times every batch-norm implementation side by side: ``python -m benchmarks.run``.

By default the run is made twice, in two child processes: once with glibc's
allocator tuned so that freed buffers are reused (``MALLOC_MMAP_MAX_=0
MALLOC_TRIM_THRESHOLD_=4000000000``; the headline table) and once with glibc's
defaults. Within one child every implementation, shape and operation is timed
in one round-robin per shape, so the ratios are taken side by side.
See benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import time
from typing import Any

TUNED_ALLOCATOR = {"MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": "4000000000"}
ALLOCATOR_VARS = (*TUNED_ALLOCATOR, "MALLOC_TOP_PAD_", "MALLOC_ARENA_MAX")

# name: (shape, dtype)
SHAPES: dict[str, tuple[tuple[int, ...], str]] = {
    "nhwc-128x32x32x64": ((128, 32, 32, 64), "float32"),
    "nhwc-256x14x14x256": ((256, 14, 14, 256), "float32"),
    "2d-4096x1024": ((4096, 1024), "float32"),
    "nhwc-128x32x32x64-bf16": ((128, 32, 32, 64), "bfloat16"),
}
QUICK_SHAPES: dict[str, tuple[tuple[int, ...], str]] = {
    "nhwc-32x16x16x64": ((32, 16, 16, 64), "float32"),
}
REFERENCE = "flax.linen"
TORCH = "torch"


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _parse(argv: list[str] | None) -> argparse.Namespace:
    from benchmarks.cases import OPS
    from benchmarks.implementations import BY_NAME

    p = argparse.ArgumentParser(
        prog="python -m benchmarks.run", description=(__doc__ or "").splitlines()[0]
    )
    p.add_argument(
        "--shapes",
        default=",".join(SHAPES),
        help=f"comma-separated names from {list(SHAPES) + list(QUICK_SHAPES)}",
    )
    p.add_argument("--ops", default=",".join(OPS), help=f"subset of {OPS}")
    p.add_argument("--impls", default=",".join(BY_NAME), help=f"from {list(BY_NAME)}")
    p.add_argument("--reps", type=int, default=21, help="samples per case (>= 20)")
    p.add_argument("--warmup", type=int, default=2, help="untimed calls per case")
    p.add_argument(
        "--quick",
        action="store_true",
        help="smoke test: one small shape, 5 reps, 1 warm-up, this process only",
    )
    p.add_argument(
        "--donate",
        action="store_true",
        help="donate x (g for bwd) so outputs may reuse the input buffer",
    )
    p.add_argument(
        "--allocator",
        choices=("both", "tuned", "default", "inherit"),
        default=None,
        help="glibc malloc setting of the timed process(es): both (default), "
        "tuned, default, or inherit (time in this process with its environment "
        "as it is; the default with --quick)",
    )
    p.add_argument(
        "--flush-mib",
        type=int,
        default=None,
        help="cache-flush buffer in MiB (default: 1.25 x the last-level cache)",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the shuffles")
    p.add_argument("--command", default=None, help=argparse.SUPPRESS)
    p.add_argument("--json", default=None, help="write the results to this path")
    p.add_argument("--markdown", default=None, help="write the tables to this path")
    args = p.parse_args(argv)
    if args.quick:
        if args.shapes == ",".join(SHAPES):
            args.shapes = ",".join(QUICK_SHAPES)
        args.reps, args.warmup = 5, 1
    if args.allocator is None:
        args.allocator = "inherit" if args.quick else "both"
    known = {**SHAPES, **QUICK_SHAPES}
    for option, names, valid in (
        ("--shapes", args.shapes, known),
        ("--ops", args.ops, OPS),
        ("--impls", args.impls, BY_NAME),
    ):
        for name in names.split(","):
            if name not in valid:
                p.error(
                    f"{option}: unknown name {name!r}; expected one of {list(valid)}"
                )
    return args


# --- machine description -------------------------------------------------------


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _versions() -> dict[str, str]:
    from importlib import metadata

    versions = {"python": platform.python_version()}
    for package in ("jax", "jaxlib", "flax", "dm-haiku", "equinox", "numpy", "torch"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = "not installed"
    return versions


def _machine(flush_bytes: int) -> dict[str, Any]:
    from benchmarks.timing import last_level_cache_bytes

    with open("/proc/meminfo") as f:
        mem_kib = int(f.readline().split()[1])
    return {
        "cpu": _cpu_model(),
        "cores": os.cpu_count(),
        "memory_gib": round(mem_kib / (1 << 20), 1),
        "llc_bytes": last_level_cache_bytes(),
        "flush_bytes": flush_bytes,
        "platform": platform.platform(),
        "versions": _versions(),
    }


# --- one timed process ---------------------------------------------------------


def _run_shape(
    name: str,
    shape: tuple[int, ...],
    dtype_name: str,
    args: argparse.Namespace,
    flush: Any,
) -> dict[str, Any]:
    import jax
    import jax.numpy as jnp
    import numpy as np

    from benchmarks import cases as cs
    from benchmarks import implementations as impls
    from benchmarks.timing import Case, Summary, measure

    dtype = jnp.dtype(dtype_name)
    kx, kg = jax.random.split(jax.random.key(args.seed))
    x = jax.random.normal(kx, shape, jnp.float32).astype(dtype)
    g = jax.random.normal(kg, shape, jnp.float32).astype(dtype)
    size = x.nbytes
    reference = cs.reference_train(np.asarray(x.astype(jnp.float32)))
    tol = cs.tolerance(dtype)
    ops = args.ops.split(",")
    out: dict[str, Any] = {
        "name": name,
        "shape": list(shape),
        "dtype": dtype_name,
        "bytes": size,
        "skipped": {},
        "facts": {},
        "compile": {},
        "results": {},
    }
    built: dict[str, Any] = {}
    timed: list[Case] = [cs.roofline_case(("roofline", "copy"), x)]
    for impl_name in args.impls.split(","):
        impl = impls.BY_NAME[impl_name]
        _log(f"[{name}] build and check {impl_name}")
        try:
            bn = impl.build(x)
            if isinstance(bn, impls.TorchBatchNorm):
                cases = cs.TorchCases(bn, x, g)
            else:
                cases = cs.JaxCases(bn, x, g, args.donate)
                out["compile"][impl_name] = cs.compile_seconds(bn, x, g)
            problem = cs.check_close(impl_name, cases.y, reference, tol)
            if problem:
                raise RuntimeError(f"wrong result, not timed: {problem}")
            own = [cases.case((impl_name, op), op) for op in ops]
            for case in own:  # a first call, so that a failing case is skipped
                case.run(case.prepare())
            out["facts"][impl_name] = cases.facts()
        except Exception as e:  # an adapter that cannot run here is skipped
            reason = f"{type(e).__name__}: {e}".splitlines()[0][:200]
            out["skipped"][impl_name] = reason
            out["compile"].pop(impl_name, None)
            _log(f"[{name}] skip {impl_name}: {reason}")
            continue
        built[impl_name] = cases
        timed += own
    _log(f"[{name}] timing {len(timed)} cases x {args.reps} reps")
    samples = measure(
        timed,
        reps=args.reps,
        warmup=args.warmup,
        flush=flush,
        seed=args.seed,
        progress=lambda m: _log(f"[{name}] {m}"),
    )
    summaries: dict[Any, Summary] = {k: Summary.of(s) for k, s in samples.items()}
    copy = summaries[("roofline", "copy")]
    out["roofline"] = {
        "copy_ms": _ms(copy),
        "bandwidth_gbs": 2 * size / copy.median / 1e9,
    }
    for (impl_name, op), summary in summaries.items():
        if impl_name == "roofline":
            continue
        entry = _ms(summary)
        entry["samples_ms"] = [1e3 * t for t in samples[(impl_name, op)]]
        entry["roofline_fraction"] = cs.PASSES[op] * copy.median / 2 / summary.median
        for label, other in (("vs_flax_linen", REFERENCE), ("vs_torch", TORCH)):
            if (other, op) in summaries:
                entry[label] = summaries[(other, op)].median / summary.median
        out["results"].setdefault(impl_name, {})[op] = entry
    built.clear()
    return out


def _ms(summary: Any) -> dict[str, Any]:
    return {
        "median_ms": summary.median * 1e3,
        "q1_ms": summary.q1 * 1e3,
        "q3_ms": summary.q3 * 1e3,
        "min_ms": summary.minimum * 1e3,
        "n": summary.n,
    }


def _traces(args: argparse.Namespace) -> dict[str, Any]:
    import jax
    import jax.numpy as jnp

    from benchmarks import cases as cs
    from benchmarks import implementations as impls

    x = jax.random.normal(jax.random.key(0), (8, 4, 4, 16), jnp.float32)
    traces: dict[str, Any] = {}
    for impl_name in args.impls.split(","):
        impl = impls.BY_NAME[impl_name]
        if impl.kind != "jax":
            continue
        try:
            bn = impl.build(x)
        except Exception as e:
            traces[impl_name] = {"skipped": f"{type(e).__name__}"}
            continue
        traces[impl_name] = {
            "static_bool": cs.count_traces(bn, x, traced=False),  # type: ignore[arg-type]
            "traced_bool": cs.count_traces(bn, x, traced=True),  # type: ignore[arg-type]
        }
    return traces


def _run_here(args: argparse.Namespace, argv: list[str]) -> dict[str, Any]:
    from benchmarks.implementations import BY_NAME
    from benchmarks.timing import cache_flusher

    flusher = cache_flusher(args.flush_mib)
    flush_bytes = flusher.nbytes
    start = time.perf_counter()
    run: dict[str, Any] = {
        "allocator": {k: os.environ[k] for k in ALLOCATOR_VARS if k in os.environ},
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "donate": args.donate,
        "reps": args.reps,
        "warmup": args.warmup,
        "loadavg_start": os.getloadavg(),
        "machine": _machine(flush_bytes),
        "command": args.command
        or shlex.join(["python", "-m", "benchmarks.run", *argv]),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(),
        "implementations": {name: BY_NAME[name].note for name in args.impls.split(",")},
        "shapes": [],
    }
    shapes = {**SHAPES, **QUICK_SHAPES}
    for name in args.shapes.split(","):
        shape, dtype = shapes[name]
        run["shapes"].append(_run_shape(name, shape, dtype, args, flusher))
    run["traces"] = _traces(args)
    run["loadavg_end"] = os.getloadavg()
    run["seconds"] = time.perf_counter() - start
    return run


# --- children per allocator setting -------------------------------------------


def _child_env(setting: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ALLOCATOR_VARS}
    if setting == "tuned":
        env.update(TUNED_ALLOCATOR)
    return env


def _run_child(setting: str, argv: list[str]) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "run.json")
        command = [
            sys.executable,
            "-m",
            "benchmarks.run",
            *_strip_outputs(argv),
            "--allocator",
            "inherit",
            "--json",
            path,
            "--command",
            shlex.join(["python", "-m", "benchmarks.run", *argv]),
        ]
        _log(f"== allocator {setting}: {shlex.join(command[1:])}")
        # The child's own table goes to stderr; this process prints them all.
        subprocess.run(command, env=_child_env(setting), check=True, stdout=sys.stderr)
        with open(path) as f:
            run = json.load(f)["runs"][0]
    run["allocator_setting"] = setting
    return run


def _strip_outputs(argv: list[str]) -> list[str]:
    """Drops --json/--markdown/--allocator (and their values) from argv."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
            continue
        if a in ("--json", "--markdown", "--allocator", "--command"):
            skip = True
            continue
        if a.split("=", 1)[0] in ("--json", "--markdown", "--allocator", "--command"):
            continue
        out.append(a)
    return out


def main(argv: list[str] | None = None) -> None:
    """Runs the benchmark and prints (and optionally writes) the tables."""
    from benchmarks.report import render

    argv = sys.argv[1:] if argv is None else argv
    args = _parse(argv)
    if args.reps < 20 and not args.quick:
        _log(f"warning: --reps {args.reps} is below the 20 samples the issue asks")
    if args.allocator == "inherit":
        run = _run_here(args, argv)
        run["allocator_setting"] = "inherited"
        runs = [run]
    else:
        settings = (
            ("tuned", "default") if args.allocator == "both" else (args.allocator,)
        )
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


if __name__ == "__main__":
    main()
