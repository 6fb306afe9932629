"""End-to-end test of the MNIST example on a small slice, and of the loader."""

from __future__ import annotations

import gzip
import json
import shutil
from pathlib import Path

import chex
import jax
import numpy as np
import pytest

from examples.mnist import input_pipeline, main, report, train
from examples.mnist.configs.default import Config

CONFIG = Config(
    features=(8, 16),
    hidden=32,
    batch_size=64,
    num_epochs=2,
    train_limit=2000,
    test_limit=500,
    eval_batch_size=250,
    progress=False,
)


# Any initial parameters do: see the fixture (conftest.py).
pytestmark = pytest.mark.usefixtures("non_partitionable_threefry")


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, train.TrainState]:
    workdir = tmp_path_factory.mktemp("mnist")
    state = train.train_and_evaluate(CONFIG, workdir)
    return workdir, state


def test_trains_above_chance(trained):
    workdir, state = trained
    records = train.read_metrics(workdir)
    assert [r["epoch"] for r in records] == [1, 2]
    last = records[-1]
    assert last["test_count"] == 500
    assert last["step"] == int(state.step) == 2 * (2000 // 64)
    # Chance is 10%; evaluation mode must not lag far behind batch statistics.
    assert last["test_accuracy"] > 0.8
    assert last["test_accuracy"] > last["test_accuracy_batch_stats"] - 0.05
    assert (workdir / train.PLOT_FILE).stat().st_size > 0
    assert train.load_config(workdir) == CONFIG
    assert sorted(p.name for p in (workdir / train.CHECKPOINT_DIR).iterdir()) == [
        "1",
        "2",
    ]


def test_each_epoch_logs_the_running_statistics_of_each_layer(trained, capsys):
    workdir, state = trained
    records = train.read_metrics(workdir)
    layers = sorted(state.batch_stats)
    assert layers == ["BatchNorm_0", "BatchNorm_1", "BatchNorm_2"]
    for record in records:
        logged = record["batch_stats"]
        assert {k.rsplit("/", 1)[0] for k in logged} == set(layers)
    # The last record describes the final state: NumPy float64 reference.
    last = records[-1]["batch_stats"]
    for layer in layers:
        mean = np.asarray(state.batch_stats[layer]["mean"], np.float64)
        var = np.asarray(state.batch_stats[layer]["var"], np.float64)
        # float32 statistics averaged in float64 on both sides.
        assert last[f"{layer}/mean_abs"] == pytest.approx(np.abs(mean).mean(), 1e-12)
        assert last[f"{layer}/var_mean"] == pytest.approx(var.mean(), rel=1e-12)
        assert last[f"{layer}/count"] == int(state.step)
    # Epoch 1's statistics differ from epoch 2's: each epoch logs its own.
    first = records[0]["batch_stats"]
    assert first["BatchNorm_0/var_mean"] != last["BatchNorm_0/var_mean"]
    line = train.stats_log_line(last)
    for layer in layers:
        assert f"{layer} |mean| {last[f'{layer}/mean_abs']:.3g}" in line


def test_plot_shows_the_logged_statistics(trained, tmp_path):
    from matplotlib.figure import Figure

    workdir, _ = trained
    records = train.read_metrics(workdir)
    drawn = {}

    def save(fig: Figure, path, **kwargs):
        drawn["axes"] = fig.axes

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(Figure, "savefig", save)
        train.plot_metrics(records, tmp_path / "plot.png")
    stats_axis = drawn["axes"][2]
    lines = {line.get_label(): line.get_ydata() for line in stats_axis.lines}
    assert len(lines) == 3 * len(train.LOGGED_STATS)
    np.testing.assert_array_equal(
        lines["BatchNorm_1 mean var"],
        [r["batch_stats"]["BatchNorm_1/var_mean"] for r in records],
    )


def test_results_file(trained):
    workdir, _ = trained
    results = report.load(workdir / report.RESULTS_FILE)
    assert results["epochs"] == train.read_metrics(workdir)
    assert results["config"]["num_epochs"] == 2
    assert results["resumed_from_epoch"] is None
    assert results["machine"]["cpu"] == report.cpu_model() != ""
    assert results["machine"]["versions"]["jax"] == jax.__version__
    assert 0 < results["program_time_s"] < 3600
    figures = report.figures(results)
    last = results["epochs"][-1]
    assert figures["accuracy"] == f"{100 * last['test_accuracy']:.2f}%"
    assert figures["correct"] == f"{last['test_correct']}/500"
    table = report.epoch_table(results).splitlines()
    assert len(table) == 2 + 2
    assert table[3].startswith(f"| 2 | {last['train_loss']:.4f} |")


def test_restore_gives_identical_variables_and_metrics(trained):
    workdir, state = trained
    fresh = train.create_train_state(CONFIG, jax.random.key(123), 2000 // 64)
    manager = train.checkpoint_manager(workdir, CONFIG.max_checkpoints)
    restored = train.restore_checkpoint(manager, fresh)
    manager.close()
    chex.assert_trees_all_equal(restored.params, state.params)
    chex.assert_trees_all_equal(restored.batch_stats, state.batch_stats)
    chex.assert_trees_all_equal(restored.opt_state, state.opt_state)
    assert int(restored.step) == int(state.step)

    result = train.eval_only(CONFIG, workdir)
    assert result["epoch"] == 2
    assert result["accuracy"] == result["reported_accuracy"]


def test_resume_continues_exactly(trained, tmp_path):
    workdir, state = trained
    # Simulate a run interrupted after epoch 1: copy its first checkpoint only.
    (tmp_path / train.CHECKPOINT_DIR).mkdir()
    shutil.copytree(
        workdir / train.CHECKPOINT_DIR / "1", tmp_path / train.CHECKPOINT_DIR / "1"
    )
    first = (workdir / train.METRICS_FILE).read_text().splitlines()[0]
    (tmp_path / train.METRICS_FILE).write_text(first + "\n")
    resumed = train.train_and_evaluate(CONFIG, tmp_path)
    chex.assert_trees_all_equal(resumed.params, state.params)
    chex.assert_trees_all_equal(resumed.batch_stats, state.batch_stats)
    records = train.read_metrics(tmp_path)
    assert [r["epoch"] for r in records] == [1, 2]
    assert (
        records[-1]["test_correct"] == train.read_metrics(workdir)[-1]["test_correct"]
    )


def test_eval_does_not_depend_on_batch_size(trained):
    _, state = trained
    images, labels = input_pipeline.load_split("test", limit=200)
    one = train.evaluate(state, images, labels, batch_size=1)
    many = train.evaluate(state, images, labels, batch_size=1000)
    odd = train.evaluate(state, images, labels, batch_size=64)  # padded last batch
    assert one["correct"] == many["correct"] == odd["correct"]


def test_main_eval_only_reports_match(trained, capsys):
    workdir, _ = trained
    # The model's shape and the test slice come from workdir/config.json.
    assert main.main(["--workdir", str(workdir), "--eval_only"]) == 0
    assert "Matches the accuracy reported during training exactly" in (
        capsys.readouterr().out
    )
    # --eval_only adds its measurement to the run's results file.
    results = json.loads((workdir / report.RESULTS_FILE).read_text())
    (entry,) = results["eval_only"]
    assert entry["batch_size"] == CONFIG.eval_batch_size
    assert entry["correct"] == results["epochs"][-1]["test_correct"]
    assert "exactly the accuracy recorded" in report.eval_only_text(results)


def test_eval_only_without_checkpoint(tmp_path):
    with pytest.raises(FileNotFoundError, match="No checkpoint"):
        train.eval_only(CONFIG, tmp_path)


LABELS = "t10k-labels-idx1-ubyte.gz"


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    shutil.copy(input_pipeline.DATA_DIR / LABELS, tmp_path / LABELS)
    return tmp_path


def test_loader_reads_shipped_files():
    images, labels = input_pipeline.load_split("test")
    assert images.shape == (10_000, 28, 28, 1)
    assert labels.shape == (10_000,)
    assert labels.max() == 9


def test_loader_missing_file(data_dir):
    (data_dir / LABELS).unlink()
    with pytest.raises(input_pipeline.DataError, match=r"missing.*git checkout"):
        input_pipeline.read_idx(data_dir / LABELS)


def test_loader_truncated_file(data_dir):
    path = data_dir / LABELS
    path.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(input_pipeline.DataError, match="not a complete gzip file"):
        input_pipeline.read_idx(path)


def test_loader_wrong_size(data_dir):
    path = data_dir / LABELS
    path.write_bytes(gzip.compress(gzip.decompress(path.read_bytes())[:-1]))
    with pytest.raises(input_pipeline.DataError, match="10007 bytes but 10008"):
        input_pipeline.read_idx(path)


def test_loader_wrong_checksum(data_dir):
    path = data_dir / LABELS
    raw = bytearray(gzip.decompress(path.read_bytes()))
    raw[100] = (raw[100] + 1) % 10  # one label changed: same size, other digest
    path.write_bytes(gzip.compress(bytes(raw)))
    with pytest.raises(input_pipeline.DataError, match="sha256"):
        input_pipeline.read_idx(path)


def test_loader_not_gzip(data_dir):
    path = data_dir / LABELS
    path.write_bytes(b"not a gzip file at all")
    with pytest.raises(input_pipeline.DataError, match="corrupt"):
        input_pipeline.read_idx(path)


def test_loader_unknown_file(tmp_path):
    with pytest.raises(input_pipeline.DataError, match="not one of the MNIST files"):
        input_pipeline.read_idx(tmp_path / "labels.gz")


def test_loader_bad_arguments():
    with pytest.raises(ValueError, match="split must be one of"):
        input_pipeline.load_split("validation")
    with pytest.raises(ValueError, match="limit must be a positive"):
        input_pipeline.load_split("test", limit=0)
