r"""One accelerator run: batch norm ops, a ResNet-50 train step and MNIST.

Prepared for a machine with one GPU, run once, within 8 minutes, writing one
results file with the device, its driver, the package versions and the
commit::

    PYTHONPATH=. python -m benchmarks.device --json benchmarks/results/device-h100.json

What it measures, side by side in one process:

* **ops**: ``jaxbn``, ``jaxbn.linen``, ``flax.linen.BatchNorm`` and
  ``torch.nn.BatchNorm2d`` (on the same device, channels_last; ``BatchNorm1d``
  for 2-D) on the NHWC shapes a ResNet-50 meets at batch 256 and a 2-D
  (65536, 1024), float32 and bfloat16: the jitted training forward (``fwd``),
  the train step (``fwdbwd``: value and gradient, statistics as aux) and
  evaluation (``eval``), each as a median time and as a fraction of the
  bandwidth floor (2S eval, 3S forward, 5S forward and backward, S the bytes
  of x) at the copy bandwidth measured in the same run. Every
  implementation's training output is first checked against a float64 NumPy
  reference; one that disagrees is not timed, and the reason is recorded.
* **resnet50**: a ResNet-50 train step in the style of Flax's ImageNet
  example, with jaxbn's and Flax's batch norm, float32 and bfloat16: compile
  time (lower and compile) and the median step time.
* **mnist**: the MNIST example's training for one epoch, and its test
  accuracy.

``--quick`` is the same command on a CPU, small enough for a test
(``tests/test_device_bench.py``), so that it cannot rot between GPU runs.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import functools
import json
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import cases as bench_cases
from benchmarks import implementations as impls

IMPLS = ("jaxbn", "jaxbn.linen", "flax.linen", "torch")
OPS = ("fwd", "fwdbwd", "eval")


@dataclasses.dataclass(frozen=True)
class Plan:
    """The sizes of one run: the full GPU run or the CPU ``--quick`` one."""

    shapes: dict[str, tuple[int, ...]]
    dtypes: tuple[str, ...]
    reps: int
    resnet: str
    resnet_batch: int
    resnet_image: int
    resnet_reps: int
    mnist_limit: int | None


FULL = Plan(
    shapes={
        "nhwc-256x56x56x64": (256, 56, 56, 64),
        "nhwc-256x28x28x512": (256, 28, 28, 512),
        "nhwc-256x7x7x2048": (256, 7, 7, 2048),
        "2d-65536x1024": (65536, 1024),
    },
    dtypes=("float32", "bfloat16"),
    reps=20,
    resnet="resnet50",
    resnet_batch=128,
    resnet_image=224,
    resnet_reps=10,
    mnist_limit=None,
)
QUICK = Plan(
    shapes={"nhwc-8x8x8x16": (8, 8, 8, 16), "2d-256x64": (256, 64)},
    dtypes=("float32", "bfloat16"),
    reps=3,
    resnet="resnet18",
    resnet_batch=2,
    resnet_image=32,
    resnet_reps=2,
    mnist_limit=512,
)


def device_facts() -> dict[str, Any]:
    """The device, its driver (``nvidia-smi`` where there is one), the versions."""
    import flax

    device = jax.devices()[0]
    facts: dict[str, Any] = {
        "platform": device.platform,
        "device_kind": device.device_kind,
        "device_count": jax.device_count(),
        "host_cpu": platform.processor() or platform.machine(),
        "python": platform.python_version(),
        "jax": jax.__version__,
        "flax": flax.__version__,
    }
    try:
        import torch  # pyright: ignore[reportMissingImports]

        facts["torch"] = torch.__version__
        facts["torch_cuda"] = torch.version.cuda  # pyright: ignore
        facts["cudnn"] = (
            torch.backends.cudnn.version() if torch.cuda.is_available() else None
        )
    except ImportError:
        facts["torch"] = None
    try:
        query = "--query-gpu=name,driver_version,memory.total"
        out = subprocess.run(
            ["nvidia-smi", query, "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=30,
        )
        facts["nvidia_smi"] = out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        facts["nvidia_smi"] = None
    return facts


def commit() -> str:
    """The checkout's commit (``git rev-parse HEAD``), or "unknown"."""
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=30
        )
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def write_results(result: dict[str, Any], path: str | None) -> None:
    """Writes ``result`` as indented JSON to ``path`` (nothing if None)."""
    if path:
        with open(path, "w") as f:
            json.dump(result, f, indent=2)
            f.write("\n")


def _median_seconds(run: Callable[[], Any], reps: int, sync: Callable) -> float:
    """The median of ``reps`` timed calls after two untimed ones."""
    for _ in range(2):
        sync(run())
    samples = []
    for _ in range(reps):
        start = time.perf_counter()
        sync(run())
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


def _input(shape: tuple[int, ...], dtype: str) -> tuple[jax.Array, jax.Array]:
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(3.0, 2.0, shape).astype(np.float32), dtype)
    g = jnp.asarray(rng.standard_normal(shape).astype(np.float32), dtype)
    return x, g


class _TorchOnDevice:
    """``torch.nn.BatchNorm2d`` (or 1d) on the run's device, channels_last."""

    def __init__(self, x: jax.Array, g: jax.Array):
        import torch  # pyright: ignore[reportMissingImports]

        self.torch = torch
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        built = impls.BY_NAME["torch"].build(x)
        assert isinstance(built, impls.TorchBatchNorm)
        self.train = built.train_module.to(self.device)
        self.eval = built.eval_module.to(self.device)
        if x.dtype == jnp.bfloat16:  # the layer in x's dtype, as cuDNN runs it
            self.train, self.eval = self.train.bfloat16(), self.eval.bfloat16()
        layout = {"memory_format": torch.channels_last} if x.ndim == 4 else {}
        self.x = impls.to_torch(torch, x).to(self.device, **layout)
        self.g = impls.to_torch(torch, g).to(self.device, **layout)
        self.leaf = self.x.detach().clone().requires_grad_(True)

    def sync(self, out: Any) -> Any:
        if self.device == "cuda":
            self.torch.cuda.synchronize()
        return out

    def output(self) -> np.ndarray:
        with self.torch.no_grad():
            return impls.from_torch(self.torch, self.train(self.x).cpu())

    def run(self, op: str) -> Callable[[], Any]:
        torch, train = self.torch, self.train
        inputs = (self.leaf, train.weight, train.bias)

        def fwd():
            with torch.no_grad():
                return train(self.x)

        def fwdbwd():
            return torch.autograd.grad(train(self.leaf), inputs, self.g)

        def evaluate():
            with torch.no_grad():
                return self.eval(self.x)

        return {"fwd": fwd, "fwdbwd": fwdbwd, "eval": evaluate}[op]


def copy_bandwidth(x: jax.Array, reps: int) -> float:
    """Bytes per second of a jitted in-place negation (reads and writes x)."""
    case = bench_cases.roofline_case("copy", x)
    seconds = _median_seconds(lambda: case.run(None), reps, lambda out: out)
    return 2 * x.size * x.dtype.itemsize / seconds


def measure_ops(plan: Plan, progress: Callable[[str], None]) -> list[dict]:
    """Every implementation, shape, dtype and op: time and fraction of the floor."""
    rows = []
    for shape_name, shape in plan.shapes.items():
        for dtype in plan.dtypes:
            x, g = _input(shape, dtype)
            nbytes = x.size * x.dtype.itemsize
            bandwidth = copy_bandwidth(x, plan.reps)
            reference = bench_cases.reference_train(np.asarray(x.astype(jnp.float32)))
            tol = bench_cases.tolerance(x.dtype)
            for name in IMPLS:
                row: dict[str, Any] = {
                    "impl": name,
                    "shape": shape_name,
                    "dtype": dtype,
                    "bytes": nbytes,
                    "copy_bandwidth_gbs": bandwidth / 1e9,
                }
                try:
                    timer = _timer(name, x, g)
                except ImportError as err:
                    rows.append({**row, "skipped": f"not installed: {err}"})
                    continue
                y, run, sync = timer
                problem = bench_cases.check_close(name, y, reference, tol)
                if problem:
                    rows.append({**row, "skipped": problem})
                    continue
                for op in OPS:
                    seconds = _median_seconds(run(op), plan.reps, sync)
                    floor = bench_cases.PASSES[op] * nbytes / bandwidth
                    rows.append(
                        {
                            **row,
                            "op": op,
                            "median_ms": 1e3 * seconds,
                            "floor": floor / seconds,
                        }
                    )
                progress(f"{shape_name} {dtype} {name}")
    return rows


def _timer(
    name: str, x: jax.Array, g: jax.Array
) -> tuple[np.ndarray, Callable[[str], Callable[[], Any]], Callable[[Any], Any]]:
    """``(training output, run(op) -> call, sync)`` of one implementation."""
    if name == "torch":
        t = _TorchOnDevice(x, g)
        return t.output(), t.run, t.sync
    built = impls.BY_NAME[name].build(x)
    assert isinstance(built, impls.JaxBatchNorm)
    jc = bench_cases.JaxCases(built, x, g, donate=False)

    def run(op: str) -> Callable[[], Any]:
        case = jc.case(name, op)
        args = case.prepare()
        return lambda: case.run(args)

    return jc.y, run, lambda out: out


def measure_resnet(plan: Plan, progress: Callable[[str], None]) -> list[dict]:
    """A ResNet train step with each batch norm and dtype: compile and step time."""
    import flax.linen as nn
    import optax

    import jaxbn.linen
    from benchmarks import imagenet_models

    build = getattr(imagenet_models, plan.resnet)
    shape = (plan.resnet_batch, plan.resnet_image, plan.resnet_image, 3)
    rows = []
    for dtype in plan.dtypes:
        for norm_name, norm in (
            ("flax.linen", nn.BatchNorm),
            ("jaxbn.linen", jaxbn.linen.BatchNorm),
        ):
            model = build(norm, dtype=jnp.dtype(dtype))
            rng = np.random.default_rng(0)
            x = jnp.asarray(rng.standard_normal(shape).astype(np.float32), dtype)
            labels = jnp.asarray(rng.integers(0, 1000, shape[0]), jnp.int32)
            variables = jax.jit(functools.partial(model.init, train=False))(
                jax.random.key(0), x
            )

            def loss(params, batch_stats, x, labels, model=model):
                logits, updates = model.apply(
                    {"params": params, "batch_stats": batch_stats},
                    x,
                    train=True,
                    mutable=["batch_stats"],
                )
                value = optax.softmax_cross_entropy_with_integer_labels(
                    logits.astype(jnp.float32), labels
                )
                return jnp.mean(value), updates["batch_stats"]

            step = jax.jit(jax.value_and_grad(loss, has_aux=True))
            args = (variables["params"], variables["batch_stats"], x, labels)
            start = time.perf_counter()
            compiled = step.lower(*args).compile()
            compile_s = time.perf_counter() - start
            seconds = _median_seconds(
                lambda c=compiled, a=args: c(*a),
                plan.resnet_reps,
                jax.block_until_ready,
            )
            rows.append(
                {
                    "model": plan.resnet,
                    "batch_norm": norm_name,
                    "dtype": dtype,
                    "input": list(shape),
                    "compile_s": compile_s,
                    "step_ms": 1e3 * seconds,
                }
            )
            progress(f"{plan.resnet} {dtype} {norm_name}")
    return rows


def measure_mnist(plan: Plan) -> dict[str, Any]:
    """The MNIST example for one epoch: its time and test accuracy."""
    from examples.mnist import train
    from examples.mnist.configs import default

    config = dataclasses.replace(
        default.get_config(),
        num_epochs=1,
        progress=False,
        train_limit=plan.mnist_limit,
        test_limit=plan.mnist_limit,
    )
    with tempfile.TemporaryDirectory() as workdir:
        start = time.perf_counter()
        train.train_and_evaluate(config, workdir)
        seconds = time.perf_counter() - start
        record = train.read_metrics(workdir)[-1]
    return {
        "epochs": 1,
        "train_limit": plan.mnist_limit,
        "seconds": seconds,
        "train_time_s": record["train_time_s"],
        "test_accuracy": record["test_accuracy"],
    }


def summary(result: dict[str, Any]) -> str:
    """Markdown tables of the run."""
    lines = ["| shape | dtype | op | " + " | ".join(IMPLS) + " |"]
    lines.append("|---" * (3 + len(IMPLS)) + "|")
    ops = [r for r in result["ops"] if "op" in r]
    keys = sorted({(r["shape"], r["dtype"], r["op"]) for r in ops})
    for shape, dtype, op in keys:
        cells = []
        for impl in IMPLS:
            found = [
                r
                for r in ops
                if (r["shape"], r["dtype"], r["op"], r["impl"])
                == (shape, dtype, op, impl)
            ]
            cells.append(
                f"{found[0]['median_ms']:.3f} ms ({100 * found[0]['floor']:.0f}%)"
                if found
                else "—"
            )
        lines.append(f"| {shape} | {dtype} | {op} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "| model | dtype | batch norm | compile s | step ms |",
        "|---|---|---|---|---|",
    ]
    for r in result["resnet"]:
        lines.append(
            f"| {r['model']} | {r['dtype']} | {r['batch_norm']} | "
            f"{r['compile_s']:.1f} | {r['step_ms']:.2f} |"
        )
    m = result["mnist"]
    if m:
        lines.append(
            f"\nMNIST, one epoch: {m['seconds']:.1f} s, test accuracy "
            f"{100 * m['test_accuracy']:.2f}%"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description="One accelerator run of jaxbn.")
    parser.add_argument("--quick", action="store_true", help="the small CPU form")
    parser.add_argument("--json", help="write the results here")
    parser.add_argument(
        "--skip",
        default="",
        help="comma-separated sections to leave out: ops, resnet, mnist",
    )
    args = parser.parse_args(argv)
    plan = QUICK if args.quick else FULL
    skip = set(filter(None, args.skip.split(",")))

    def progress(message: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)

    started = time.perf_counter()
    result: dict[str, Any] = {
        "device": device_facts(),
        "commit": commit(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(),
        "command": "python -m benchmarks.device " + " ".join(argv or sys.argv[1:]),
        "quick": args.quick,
        "plan": dataclasses.asdict(plan),
        "ops": [] if "ops" in skip else measure_ops(plan, progress),
        "resnet": [] if "resnet" in skip else measure_resnet(plan, progress),
        "mnist": None if "mnist" in skip else measure_mnist(plan),
    }
    result["seconds"] = time.perf_counter() - started
    print(summary(result))
    write_results(result, args.json)
    return result


if __name__ == "__main__":
    main()
