"""Smoke test of the whole-model compile-time benchmark (``benchmarks.compile_time``).

Runs the MNIST CNN once per batch norm and checks the record and its table:
both steps, every phase, finite positive times and ratios against flax.linen
(no timing assertion: speed targets live in the benchmark, not in tests).
"""

import json
import math
import statistics

import pytest

pytest.importorskip("optax", reason="the benchmark's loss uses optax")
pytest.importorskip("orbax.checkpoint", reason="the MNIST example imports orbax")
pytest.importorskip("tqdm", reason="the MNIST example imports tqdm")

from benchmarks import compile_time

PHASES = {"trace_s", "lower_s", "compile_s", "hlo_chars"}


def test_mnist_run_records_both_steps_of_both_batch_norms(tmp_path, capsys):
    json_path, md_path = tmp_path / "ct.json", tmp_path / "ct.md"
    outputs = ["--json", str(json_path), "--markdown", str(md_path)]
    compile_time.main(["--models", "mnist", "--reps", "2", *outputs])
    result = json.loads(json_path.read_text())
    assert result["machine"]["cpu"]
    samples = result["samples"]["mnist"]
    assert set(samples) == {"train", "eval"}
    for step in samples.values():
        assert set(step) == {"flax.linen", "jaxbn.linen"}
        for phases in step.values():
            assert set(phases) == PHASES
            # Two repetitions, order alternated: two samples of each phase.
            assert all(len(v) == 2 for v in phases.values())
            assert all(math.isfinite(t) and t > 0 for v in phases.values() for t in v)
    summary = result["summary"]["mnist"]
    for name, step in summary.items():
        assert step["flax.linen"]["compile_ratio"] == 1.0
        # The ratio is the medians' of the recorded samples, this / flax.
        ours, flax = (
            samples[name][k]["compile_s"] for k in ("jaxbn.linen", "flax.linen")
        )
        want = statistics.median(ours) / statistics.median(flax)
        assert step["jaxbn.linen"]["compile_ratio"] == pytest.approx(want, rel=1e-12)
        assert step["jaxbn.linen"]["compile_s"] == pytest.approx(
            statistics.median(ours)
        )
    table = md_path.read_text()
    assert table == capsys.readouterr().out.strip() + "\n"
    assert table.count("| mnist |") == 4


def test_unknown_model_names_the_choices():
    with pytest.raises(ValueError, match="--models got resnet51; expected .*resnet50"):
        compile_time.run(["resnet51"], ["flax.linen"], 1)
