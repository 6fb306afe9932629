"""Fingerprints of the compiled programs of jaxbn's layers, to prove a refactor.

A change of jaxbn's insides that promises "no behaviour change" can be held to
it: every program of the benchmark matrix (the core, ``jaxbn.linen`` and
``jaxbn.nnx`` entries, each shape, the training forward, its forward+backward,
evaluation and a run-time ``train`` flag) and of the training-time variants
(renorm, ghost batches, masks, weights, ``running_var``, ``eval_mode``,
``momentum=None``, ``axis_name`` under ``vmap``) is compiled, and the SHA-256
of its optimized HLO text is recorded, with ``metadata={...}`` (Python source
lines and op names) stripped, so moving code between files does not count.

Run it before and after the change and compare::

    python -m benchmarks.hlo_fingerprint --json /tmp/before.json
    python -m benchmarks.hlo_fingerprint --json /tmp/after.json \
        --compare /tmp/before.json

``--compare`` prints every program whose text differs (or is missing) and
exits with status 1 if any does.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import sys
from collections.abc import Callable, Iterator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import implementations as impls
from benchmarks.run import QUICK_SHAPES, SHAPES

_METADATA = re.compile(r",?\s*metadata=\{[^{}]*\}")
_MODULE = re.compile(r"^HloModule \S+", re.MULTILINE)
# The tables of Python source locations (file and function names, lines).
_SOURCE_TABLES = re.compile(
    r"^(FileNames|FunctionNames|FileLocations|StackFrames)\n(.+\n)*\n?", re.MULTILINE
)


def normalized(text: str) -> str:
    """Compiled HLO text without source locations, metadata or module name."""
    text = _SOURCE_TABLES.sub("", _METADATA.sub("", text))
    return _MODULE.sub("HloModule m", text)


def fingerprint(text: str) -> str:
    """SHA-256 of :func:`normalized` compiled HLO text."""
    return hashlib.sha256(normalized(text).encode()).hexdigest()


def compiled_text(fn: Callable, *args: Any) -> str:
    """The optimized HLO of ``jax.jit(fn)`` on ``args``."""
    text = jax.jit(fn).lower(*args).compile().as_text()
    assert text is not None, "the backend gives no HLO text"
    return text


def _programs_of(step: Callable, params: Any, stats: Any, x: jax.Array) -> Iterator:
    """(op, fn, args) of one ``step(params, stats, x, train)``."""

    def loss(x, params, stats):
        y, new_stats = step(params, stats, x, True)
        return jnp.sum(y.astype(jnp.float32) * 0.5), new_stats

    yield "fwd", (lambda p, s, x: step(p, s, x, True)), (params, stats, x)
    yield "eval", (lambda p, s, x: step(p, s, x, False)[0]), (params, stats, x)
    fwdbwd = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)
    yield "fwdbwd", fwdbwd, (x, params, stats)
    yield "traced", step, (params, stats, x, jnp.asarray(True))


def matrix(shapes: dict[str, tuple[tuple[int, ...], str]]) -> Iterator:
    """(name, fn, args) of the benchmark matrix's jaxbn programs."""
    for impl in ("jaxbn", "jaxbn.linen", "jaxbn.nnx"):
        for shape_name, (shape, dtype) in shapes.items():
            x = jnp.zeros(shape, dtype)
            bn = impls.BY_NAME[impl].build(x)
            assert isinstance(bn, impls.JaxBatchNorm)
            for op, fn, args in _programs_of(bn.step, bn.params, bn.stats, x):
                yield f"{impl}/{shape_name}/{op}", fn, args


# The variants, each on a small NHWC input: core options and call-time inputs.
VARIANTS: dict[str, tuple[dict[str, Any], tuple[str, ...]]] = {
    "renorm": ({"renorm": True}, ()),
    "renorm-schedule": (
        {"renorm": True, "rmax": lambda c: 1.0 + c / 100, "dmax": 2.0},
        (),
    ),
    "ghost": ({"virtual_batch_size": 4}, ()),
    "unbiased": ({"running_var": "unbiased"}, ()),
    "cumulative": ({"momentum": None}, ()),
    "frozen": ({"momentum": 1.0}, ()),
    "no-warmup": ({"warmup": False}, ()),
    "eval-batch": ({"eval_mode": "batch"}, ()),
    "no-affine": ({"center": False, "scale": False}, ()),
    "conditional": ({"center": False, "scale": False}, ("scale", "offset")),
    "mask": ({}, ("mask",)),
    "mask-zeroed": ({"zero_masked": True}, ("mask",)),
    "weights": ({}, ("weights",)),
    "bf16-out": ({"dtype": jnp.bfloat16}, ()),
    "axes-12": ({"axis": (1, 2)}, ()),
}


def _call_inputs(x: jax.Array, names: tuple[str, ...]) -> dict[str, jax.Array]:
    per_example = (x.shape[0], 1, 1, 1)
    made = {
        "mask": jnp.arange(x.shape[0]).reshape(per_example) < x.shape[0] - 2,
        "weights": jnp.linspace(0.5, 1.5, x.shape[0]).reshape(per_example),
        "scale": jnp.full((1, 1, 1, x.shape[-1]), 2.0),
        "offset": jnp.full((1, 1, 1, x.shape[-1]), 0.5),
    }
    return {k: made[k] for k in names}


def variants() -> Iterator:
    """(name, fn, args) of the core, linen and nnx variants on (8, 4, 4, 3)."""
    from flax import nnx

    import jaxbn
    import jaxbn.linen
    import jaxbn.nnx

    x = jax.random.normal(jax.random.key(0), (8, 4, 4, 3))
    for name, (options, call) in VARIANTS.items():
        kw = _call_inputs(x, call)
        layer = jaxbn.batch_norm(**options)
        params, stats = layer.init(x)

        def core_step(p, s, x, train, layer=layer, kw=kw):
            return layer.apply(p, s, x, train=train, **kw)

        for op, fn, args in _programs_of(core_step, params, stats, x):
            yield f"core/{name}/{op}", fn, args
        flax_options = dict(options)
        if "center" in flax_options:
            flax_options["use_bias"] = flax_options.pop("center")
            flax_options["use_scale"] = flax_options.pop("scale")
        module = jaxbn.linen.BatchNorm(**flax_options)
        variables = module.init(jax.random.key(0), x, False, **kw)  # pyright: ignore

        def linen_step(p, s, x, train, module=module, kw=kw):
            y, new = module.apply(
                {"params": p, "batch_stats": s},
                x,
                jnp.logical_not(train) if not isinstance(train, bool) else not train,
                mutable=["batch_stats"],
                **kw,
            )
            return y, new["batch_stats"]

        p, s = variables.get("params", {}), variables["batch_stats"]
        for op, fn, args in _programs_of(linen_step, p, s, x):
            yield f"linen/{name}/{op}", fn, args
        bn = jaxbn.nnx.BatchNorm(x.shape[-1], rngs=nnx.Rngs(0), **flax_options)
        if "axis" in flax_options:
            bn = jaxbn.nnx.BatchNorm(
                x.shape[1] * x.shape[2], rngs=nnx.Rngs(0), **flax_options
            )
        graphdef, state = nnx.split(bn)

        def nnx_step(_p, s, x, train, graphdef=graphdef, kw=kw):
            model = nnx.merge(graphdef, s, copy=True)
            mode = jnp.logical_not(train) if not isinstance(train, bool) else not train
            y = model(x, mode, **kw)
            return y, nnx.state(model)

        for op, fn, args in _programs_of(nnx_step, {}, state, x):
            yield f"nnx/{name}/{op}", fn, args
    # Statistics synchronized over a named vmap axis.
    layer = jaxbn.batch_norm(axis_name="batch")
    params, stats = layer.init(x[0:1].reshape(4, 4, 3))

    def mapped(p, s, x, train):
        f = jax.vmap(
            lambda xi: layer.apply(p, s, xi, train=train),
            axis_name="batch",
            out_axes=(0, None),
        )
        return f(x)

    for op, fn, args in _programs_of(mapped, params, stats, x):
        yield f"core/vmap-axis-name/{op}", fn, args


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--json", required=True, help="where to write the record")
    parser.add_argument("--compare", help="a record to compare with")
    parser.add_argument("--quick", action="store_true", help="the quick shape only")
    args = parser.parse_args(argv)
    shapes = QUICK_SHAPES if args.quick else SHAPES
    record: dict[str, str] = {}
    for name, fn, fn_args in [*matrix(shapes), *variants()]:
        record[name] = fingerprint(compiled_text(fn, *fn_args))
        print(f"{record[name][:12]}  {name}", file=sys.stderr, flush=True)
    with open(args.json, "w") as f:
        json.dump({"jax": jax.__version__, "programs": record}, f, indent=1)
    if not args.compare:
        return 0
    with open(args.compare) as f:
        before = json.load(f)["programs"]
    differ = sorted(
        k for k in before.keys() | record.keys() if before.get(k) != record.get(k)
    )
    for k in differ:
        print(f"DIFFERS: {k}")
    same = len(record) - len([k for k in differ if k in record])
    print(f"{same} of {len(record)} programs identical; {len(differ)} differ.")
    return 1 if differ else 0


if __name__ == "__main__":
    np.set_printoptions(precision=4)
    sys.exit(main())
