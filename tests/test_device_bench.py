"""``benchmarks/device.py --quick``: the accelerator run's command, on the CPU.

The GPU run happens rarely, on a machine lent for minutes; this runs the same
command in its small form so that it cannot rot between such runs: every
section runs, every implementation's output passes the float64 check (or
its skip says why), and the recorded fractions of the bandwidth floor are
computed from the recorded times.
"""

from __future__ import annotations

import json

import pytest

from benchmarks import cases, device


@pytest.fixture(scope="module")
def result(tmp_path_factory):
    path = tmp_path_factory.mktemp("device") / "device.json"
    device.main(["--quick", "--json", str(path)])
    return json.loads(path.read_text())


def test_records_the_machine_versions_and_commit(result):
    facts = result["device"]
    assert facts["platform"] == "cpu" and facts["jax"] and facts["flax"]
    assert result["quick"] is True and len(result["commit"]) >= 7


def test_every_case_is_timed_or_says_why_not(result):
    plan = device.QUICK
    for shape in plan.shapes:
        for dtype in plan.dtypes:
            for impl in device.IMPLS:
                rows = [
                    r
                    for r in result["ops"]
                    if (r["shape"], r["dtype"], r["impl"]) == (shape, dtype, impl)
                ]
                skipped = [r for r in rows if "skipped" in r]
                if impl.startswith("jaxbn") or impl == "flax.linen":
                    assert not skipped, skipped  # the JAX layers always pass the check
                if not skipped:
                    assert sorted(r["op"] for r in rows) == sorted(device.OPS)


def test_floor_fractions_are_computed_from_the_recorded_times(result):
    for r in result["ops"]:
        if "op" in r:
            floor_s = (
                cases.PASSES[r["op"]] * r["bytes"] / (1e9 * r["copy_bandwidth_gbs"])
            )
            assert r["floor"] == pytest.approx(floor_s / (r["median_ms"] / 1e3))


def test_resnet_and_mnist_ran(result):
    runs = {(r["dtype"], r["batch_norm"]) for r in result["resnet"]}
    assert runs == {
        (d, n) for d in device.QUICK.dtypes for n in ("flax.linen", "jaxbn.linen")
    }
    assert all(r["compile_s"] > 0 and r["step_ms"] > 0 for r in result["resnet"])
    # 512 images, 4 steps: far above chance (10%); seen at 71% on one run.
    assert result["mnist"]["test_accuracy"] > 0.3
