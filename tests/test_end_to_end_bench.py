"""Smoke test of the end-to-end benchmark (``python -m benchmarks.end_to_end``).

Runs its ``--quick`` path (small models, batch 8, few samples) and checks that
the table holds both implementations with finite times; no timing assertion.
"""

import json
import math
import statistics

import pytest

pytest.importorskip("optax", reason="the benchmark's train step uses optax")
pytest.importorskip("orbax.checkpoint", reason="the MNIST example imports orbax")
pytest.importorskip("tqdm", reason="the MNIST example imports tqdm")

from benchmarks import end_to_end

# Any data and initial parameters do: see the fixture (conftest.py). With
# jax's default threefry, initializing the four models compiled for about 21 s
# of CPU time (their kernels (3, 3, c, k)); with this one, 9 s.
pytestmark = pytest.mark.usefixtures("non_partitionable_threefry")


def test_quick_run_times_both_implementations(tmp_path, capsys):
    json_path, md_path = tmp_path / "e2e.json", tmp_path / "e2e.md"
    outputs = ["--json", str(json_path), "--markdown", str(md_path)]
    end_to_end.main(["--quick", "--reps", "2", "--flush-mib", "1", *outputs])
    printed = capsys.readouterr().out
    (run,) = json.loads(json_path.read_text())["runs"]
    assert [(c["model"], c["batch"]) for c in run["configs"]] == [
        ("resnet", 8),
        ("mnist", 8),
    ]
    for config in run["configs"]:
        assert config["skipped"] == {}
        assert set(config["results"]) == {"flax.linen", "jaxbn.linen"}
        for impl, steps in config["results"].items():
            assert set(steps) == {"train", "eval"}, impl
            for step, entry in steps.items():
                assert len(entry["samples_ms"]) == 2
                assert all(math.isfinite(t) and t > 0 for t in entry["samples_ms"])
                # flax.linen's median over this one's, from the recorded samples.
                flax = config["results"]["flax.linen"][step]["samples_ms"]
                want = statistics.median(flax) / statistics.median(entry["samples_ms"])
                assert entry["vs_flax_linen"] == pytest.approx(want, rel=1e-9)
        # Equal work: the same losses (the benchmark's own check passed).
        flax_check = config["checks"]["flax.linen"]
        jaxbn_check = config["checks"]["jaxbn.linen"]
        assert jaxbn_check["train_loss"] == pytest.approx(
            flax_check["train_loss"], rel=end_to_end.LOSS_RTOL
        )
    table = md_path.read_text()
    assert table.strip() == printed.strip()
    assert "| model | step | batch | flax.linen ms | jaxbn.linen ms |" in table
    rows = [line for line in table.splitlines() if line.startswith("| resnet |")]
    assert [row.split("|")[2].strip() for row in rows] == ["train", "eval"]


def test_mismatch_names_the_differing_loss():
    reference = {"eval_loss_initial": 2.3, "train_loss": [2.5, 2.0]}
    same = {"eval_loss_initial": 2.3, "train_loss": [2.5, 2.0 * (1 + 1e-5)]}
    assert end_to_end._mismatch(same, reference) == ""
    wrong = {"eval_loss_initial": 2.3, "train_loss": [2.5, 2.1]}
    assert "train_loss[1] = 2.1" in end_to_end._mismatch(wrong, reference)
    nan = {"eval_loss_initial": math.nan, "train_loss": [2.5, 2.0]}
    assert "eval_loss_initial" in end_to_end._mismatch(nan, reference)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--models", "vgg"], "--models: unknown name 'vgg'"),
        (["--impls", "torch"], "--impls: unknown name 'torch'"),
        (["--batch", "8,x"], "--batch: expected comma-separated integers"),
        (["--batch", "1"], "--batch: batch norm needs at least 2 examples"),
    ],
)
def test_bad_options_are_rejected(argv, message, capsys):
    with pytest.raises(SystemExit):
        end_to_end._parse(argv)
    assert message in capsys.readouterr().err
