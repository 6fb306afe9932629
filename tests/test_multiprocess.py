"""Multi-process data parallelism: 2 processes x 4 CPU devices, one mesh of 8.

Launches ``tests/multiprocess_worker.py`` twice on 127.0.0.1 with
``jax.distributed.initialize`` (CPU collectives over gloo) and checks that one
training step gives the same parameters and statistics as the same step in
this process, which has 8 devices.
"""

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import chex
import jax
import multiprocess_worker as worker
import numpy as np
import pytest
from jax.sharding import NamedSharding

TIMEOUT = 180  # seconds: a hang fails the test instead of blocking CI


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(tmp_path: Path) -> list[subprocess.CompletedProcess]:
    port = _free_port()
    env = dict(os.environ)
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={worker.LOCAL_DEVICES}"
    env["JAX_PLATFORMS"] = "cpu"
    script = Path(worker.__file__)
    procs = [
        subprocess.Popen(
            [sys.executable, str(script), str(i), "2", str(port), str(tmp_path)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(2)
    ]
    done = []
    deadline = time.monotonic() + TIMEOUT
    try:
        for p in procs:
            out, err = p.communicate(timeout=max(1.0, deadline - time.monotonic()))
            done.append(subprocess.CompletedProcess(p.args, p.returncode, out, err))
    except subprocess.TimeoutExpired:
        for p in procs:
            p.kill()
            p.wait()
        pytest.fail(f"the worker processes did not finish within {TIMEOUT} s")
    return done


def test_two_processes_match_one_process_with_8_devices(tmp_path):
    start = time.perf_counter()
    done = _launch(tmp_path)
    if any(d.returncode == worker.EXIT_NO_COLLECTIVES for d in done):
        reason = " ".join(d.stderr.strip() for d in done)
        print(f"skipping: {reason}")
        pytest.skip(reason)
    for d in done:
        assert d.returncode == 0, f"worker failed:\n{d.stdout}\n{d.stderr[-4000:]}"
    wall = time.perf_counter() - start
    print(f"2 worker processes took {wall:.1f} s")

    assert jax.device_count() == 8
    mesh = jax.make_mesh((8,), ("data",))

    def make_global(a, spec):
        return jax.device_put(a, NamedSharding(mesh, spec))

    expected = worker.run(mesh, make_global)
    for i in range(2):
        got = dict(np.load(tmp_path / f"result_{i}.npz"))
        assert int(got.pop("device_count")) == 8
        assert int(got.pop("local_device_count")) == worker.LOCAL_DEVICES
        assert got.keys() == expected.keys()
        chex.assert_trees_all_close(got, expected, rtol=1e-5, atol=1e-6)
    # The step did something: the statistics moved away from their init.
    assert int(expected["shard_map['stats']['bn1']['count']"]) == 1
    chex.assert_trees_all_close(
        expected["shard_map['stats']['bn1']['mean']"],
        expected["sharded_jit['stats']['bn1']['mean']"],
        rtol=1e-5,
        atol=1e-6,
    )
