"""One process of the multi-process test (``tests/test_multiprocess.py``).

Run as ``python multiprocess_worker.py PROCESS_ID NUM_PROCESSES PORT OUT_DIR``:
joins a ``jax.distributed`` job on 127.0.0.1 with 4 CPU devices per process
(CPU collectives over gloo), takes one data-parallel training step on a global
mesh of all devices, and writes the resulting parameters and statistics to
``OUT_DIR/result_PROCESS_ID.npz``.

The model and the step live here so that the test can run the very same code
in a single process with 8 devices and compare.
"""

from __future__ import annotations

import os
import sys
from typing import Any

LOCAL_DEVICES = 4
EXIT_NO_COLLECTIVES = 77  # the platform cannot run CPU collectives: skip

FEATURES = 6
HIDDEN = 16
CLASSES = 3
BATCH = 64  # global batch, split over the "data" axis


def data() -> tuple[Any, Any]:
    """The global batch, identical in every process."""
    import numpy as np

    rng = np.random.default_rng(0)
    x = rng.normal(3.0, 2.0, (BATCH, FEATURES)).astype(np.float32)
    labels = rng.integers(0, CLASSES, (BATCH,)).astype(np.int32)
    return x, labels


def model_init() -> tuple[dict, dict]:
    """Params and statistics of Dense -> BatchNorm -> relu -> Dense -> BatchNorm."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    import jaxbn

    # NumPy, not jax.random: XLA:CPU takes seconds to compile jax.random for a
    # shape with a short last axis such as (16, 3), in every process.
    rng = np.random.default_rng(42)
    w1, w2 = (
        jnp.asarray(rng.standard_normal(shape) / shape[0] ** 0.5, jnp.float32)
        for shape in ((FEATURES, HIDDEN), (HIDDEN, CLASSES))
    )
    bn = jaxbn.batch_norm(momentum=0.9)
    bn1_params, bn1_stats = bn.init(jax.ShapeDtypeStruct((BATCH, HIDDEN), jnp.float32))
    bn2_params, bn2_stats = bn.init(jax.ShapeDtypeStruct((BATCH, CLASSES), jnp.float32))
    params = {
        "w1": w1,
        "bn1": bn1_params,
        "w2": w2,
        "bn2": bn2_params,
    }
    return params, {"bn1": bn1_stats, "bn2": bn2_stats}


def make_steps(mesh: Any) -> dict[str, Any]:
    """Jitted training steps on ``mesh``: sharded jit and shard_map + axis_name.

    Each maps ``(params, stats, opt_state, x, labels)`` to ``(params, stats,
    opt_state, loss)``, all replicated but x and labels (sharded on "data").
    """
    import jax
    import jax.numpy as jnp
    import optax
    from jax.sharding import PartitionSpec as P

    import jaxbn

    opt = optax.sgd(0.1, momentum=0.9)

    def step_fn(axis_name: str | None) -> Any:
        bn = jaxbn.batch_norm(momentum=0.9, axis_name=axis_name)

        def loss_fn(params: dict, stats: dict, x: Any, labels: Any) -> Any:
            h = x @ params["w1"]
            h, s1 = bn.apply(params["bn1"], stats["bn1"], h, train=True)
            h = jax.nn.relu(h)
            logits = h @ params["w2"]
            logits, s2 = bn.apply(params["bn2"], stats["bn2"], logits, train=True)
            losses = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
            return jnp.sum(losses) / BATCH, {"bn1": s1, "bn2": s2}

        def step(params: dict, stats: dict, opt_state: Any, x: Any, labels: Any):
            grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
            (loss, stats), grads = grad_fn(params, stats, x, labels)
            if axis_name is not None:
                # The gradients of replicated params are already summed over
                # the devices (shard_map with check_vma); the loss is not.
                loss = jax.lax.psum(loss, axis_name)
            updates, opt_state = opt.update(grads, opt_state, params)
            return optax.apply_updates(params, updates), stats, opt_state, loss

        return step

    sharded_jit = jax.jit(step_fn(None))
    mapped = jax.shard_map(
        step_fn("data"),
        mesh=mesh,
        in_specs=(P(), P(), P(), P("data"), P("data")),
        out_specs=(P(), P(), P(), P()),
    )
    return {"sharded_jit": sharded_jit, "shard_map": jax.jit(mapped), "opt": opt}


def run(mesh: Any, make_global: Any) -> dict[str, Any]:
    """One step of each mode on ``mesh``; returns flat host arrays by name.

    ``make_global(array, spec)`` places a host array (the same in every process)
    as a global array sharded with ``PartitionSpec`` spec.
    """
    import jax
    import numpy as np
    from jax.sharding import PartitionSpec as P

    steps = make_steps(mesh)
    x, labels = data()
    params, stats = model_init()
    results: dict[str, Any] = {}
    with jax.set_mesh(mesh):
        gx = make_global(x, P("data"))
        glabels = make_global(labels, P("data"))
        for mode in ("sharded_jit", "shard_map"):
            p, s, o = jax.tree.map(
                lambda a: make_global(np.asarray(a), P()),
                (params, stats, steps["opt"].init(params)),
            )
            p, s, _, loss = steps[mode](p, s, o, gx, glabels)
            out = {"params": p, "stats": s, "loss": loss}
            for path, leaf in jax.tree_util.tree_leaves_with_path(out):
                name = mode + jax.tree_util.keystr(path)
                # Replicated: this process's first shard is the whole value.
                results[name] = np.asarray(leaf.addressable_data(0))
    return results


def main(argv: list[str]) -> int:
    process_id, num_processes, port, out_dir = argv
    import jax

    try:
        jax.config.update("jax_num_cpu_devices", LOCAL_DEVICES)
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    except Exception as err:  # an old jax without gloo CPU collectives
        print(f"no CPU collectives on this platform: {err!r}", file=sys.stderr)
        return EXIT_NO_COLLECTIVES
    jax.distributed.initialize(
        coordinator_address=f"127.0.0.1:{port}",
        num_processes=int(num_processes),
        process_id=int(process_id),
        initialization_timeout=120,
    )
    import numpy as np
    from jax.sharding import NamedSharding

    mesh = jax.make_mesh((jax.device_count(),), ("data",))

    def make_global(a: Any, spec: Any) -> Any:
        sharding = NamedSharding(mesh, spec)
        return jax.make_array_from_callback(a.shape, sharding, lambda i: a[i])

    results = run(mesh, make_global)
    results["device_count"] = np.asarray(jax.device_count())
    results["local_device_count"] = np.asarray(jax.local_device_count())
    np.savez(os.path.join(out_dir, f"result_{process_id}.npz"), **results)
    jax.distributed.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
