"""Trains a CNN with batch normalization on MNIST (after flax/examples/mnist).

The model normalizes after each convolution and after the hidden dense layer. The
train state carries the running statistics (``batch_stats``) beside the
parameters; ``train_step`` updates them with ``mutable=['batch_stats']`` and
``eval_step`` uses them. Checkpoints (orbax) include them, so that ``eval_only``
reproduces the reported test accuracy exactly in a fresh process.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from flax.training import train_state
from tqdm import tqdm

import jaxbn
from examples.mnist import input_pipeline, report
from examples.mnist.configs.default import Config

CONFIG_FILE = "config.json"
METRICS_FILE = "metrics.jsonl"
PLOT_FILE = "metrics.png"
# The per-layer figures of jaxbn.describe that each epoch logs and plots.
LOGGED_STATS = ("mean_abs", "var_mean")
CHECKPOINT_DIR = "checkpoints"

BATCH_NORMS = ("jaxbn", "flax")


def batch_norm_cls(name: str) -> type[nn.Module]:
    """Returns the batch normalization layer selected by ``Config.batch_norm``.

    The one place where the example chooses between ``jaxbn.linen.BatchNorm`` and
    ``flax.linen.BatchNorm`` (the pitfalls script compares the two).

    Args:
        name: ``"jaxbn"`` or ``"flax"``.

    Returns:
        The layer class.

    Raises:
        ValueError: if ``name`` is neither.
    """
    if name == "jaxbn":
        import jaxbn.linen

        return jaxbn.linen.BatchNorm
    if name == "flax":
        return nn.BatchNorm
    raise ValueError(f"batch_norm must be one of {BATCH_NORMS}, got {name!r}.")


def max_pool_2x2(x: jax.Array) -> jax.Array:
    """2x2 max pooling with stride 2 on NHWC inputs (odd edges are dropped).

    Same output as ``nn.max_pool(x, (2, 2), (2, 2))``, written as reshape + max
    because XLA's CPU backward pass of ``nn.max_pool`` is much slower.
    """
    n, h, w, c = x.shape
    x = x[:, : h // 2 * 2, : w // 2 * 2, :]
    return x.reshape(n, h // 2, 2, w // 2, 2, c).max(axis=(2, 4))


class CNN(nn.Module):
    """Convolutions and a hidden dense layer, each followed by batch norm and ReLU.

    Attributes:
        features: output channels of the 3x3 convolutions, each followed by batch
            normalization, ReLU and 2x2 max pooling.
        hidden: width of the hidden dense layer.
        num_classes: number of outputs.
        batch_norm: ``"jaxbn"`` or ``"flax"`` (see ``batch_norm_cls``).
        bn_momentum: decay of the running averages.
        bn_warmup: jaxbn's warm-up of the decay (only with ``"jaxbn"``).
    """

    features: Sequence[int] = (32, 64)
    hidden: int = 128
    num_classes: int = input_pipeline.NUM_CLASSES
    batch_norm: str = "jaxbn"
    bn_momentum: float = 0.99
    bn_warmup: bool = True

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
        """Returns logits of shape ``(batch, num_classes)``.

        Args:
            x: float images of shape ``(batch, 28, 28, 1)``.
            train: normalize with the batch statistics and update the running
                statistics (``True``), or normalize with the running statistics.
        """
        kwargs: dict[str, Any] = {
            "use_running_average": not train,
            "momentum": self.bn_momentum,
        }
        if self.batch_norm == "jaxbn":
            kwargs["warmup"] = self.bn_warmup
        norm = functools.partial(batch_norm_cls(self.batch_norm), **kwargs)
        for features in self.features:
            # No bias: batch normalization's own bias replaces it.
            x = nn.Conv(features, (3, 3), use_bias=False)(x)
            x = nn.relu(norm()(x))
            x = max_pool_2x2(x)
        x = x.reshape((x.shape[0], -1))
        x = nn.Dense(self.hidden, use_bias=False)(x)
        x = nn.relu(norm()(x))
        return nn.Dense(self.num_classes)(x)


class TrainState(train_state.TrainState):
    """Flax's train state plus the running statistics of batch normalization."""

    batch_stats: Any


def create_model(config: Config) -> CNN:
    """Builds the model described by ``config``."""
    return CNN(
        features=tuple(config.features),
        hidden=config.hidden,
        batch_norm=config.batch_norm,
        bn_momentum=config.bn_momentum,
        bn_warmup=config.bn_warmup,
    )


def create_train_state(
    config: Config, rng: jax.Array, steps_per_epoch: int
) -> TrainState:
    """Initializes the parameters, running statistics and optimizer.

    Args:
        config: hyperparameters.
        rng: key for the parameter initialization.
        steps_per_epoch: training steps per epoch, for the learning rate schedule.

    Returns:
        The initial train state (step 0).
    """
    model = create_model(config)
    variables = model.init(
        rng, jnp.zeros((1, *input_pipeline.IMAGE_SHAPE, 1), jnp.float32), train=False
    )
    total_steps = max(1, config.num_epochs * steps_per_epoch)
    warmup_steps = min(total_steps - 1, round(config.warmup_epochs * steps_per_epoch))
    schedule = optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=config.learning_rate,
        warmup_steps=warmup_steps,
        decay_steps=total_steps,
    )
    return TrainState.create(
        apply_fn=model.apply,
        params=variables["params"],
        batch_stats=variables["batch_stats"],
        tx=optax.adam(schedule),
    )


def _accuracy(logits: jax.Array, labels: jax.Array) -> jax.Array:
    return jnp.mean(jnp.argmax(logits, -1) == labels)


@jax.jit
def train_step(
    state: TrainState, images: jax.Array, labels: jax.Array
) -> tuple[TrainState, dict[str, jax.Array]]:
    """One step of adam; batch normalization uses and updates the batch statistics.

    Args:
        state: current train state.
        images: float32 images of shape ``(batch, 28, 28, 1)``.
        labels: int32 labels of shape ``(batch,)``.

    Returns:
        The new state and the batch's ``loss`` and train-mode ``accuracy``.
    """

    def loss_fn(params: Any) -> tuple[jax.Array, tuple[jax.Array, Any]]:
        logits, updates = state.apply_fn(
            {"params": params, "batch_stats": state.batch_stats},
            images,
            train=True,
            mutable=["batch_stats"],
        )
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
        return loss, (logits, updates["batch_stats"])

    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
    (loss, (logits, batch_stats)), grads = grad_fn(state.params)
    state = state.apply_gradients(grads=grads, batch_stats=batch_stats)
    return state, {"loss": loss, "accuracy": _accuracy(logits, labels)}


def _eval_sums(
    logits: jax.Array, labels: jax.Array, mask: jax.Array
) -> dict[str, jax.Array]:
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
    correct = (jnp.argmax(logits, -1) == labels) & (mask > 0)
    return {"loss_sum": jnp.sum(loss * mask), "correct": jnp.sum(correct)}


@jax.jit
def eval_step(
    state: TrainState, images: jax.Array, labels: jax.Array, mask: jax.Array
) -> dict[str, jax.Array]:
    """Evaluates one batch with the running statistics (evaluation mode).

    Each example is normalized independently of the others, so the result does
    not depend on the batch size or on padding.

    Args:
        state: train state holding the parameters and running statistics.
        images: float32 images of shape ``(batch, 28, 28, 1)``.
        labels: int32 labels of shape ``(batch,)``.
        mask: 1 for real examples, 0 for padding.

    Returns:
        ``loss_sum`` (float32) and ``correct`` (int32) over the real examples.
    """
    variables = {"params": state.params, "batch_stats": state.batch_stats}
    logits = state.apply_fn(variables, images, train=False)
    return _eval_sums(logits, labels, mask)


@jax.jit
def eval_step_batch_stats(
    state: TrainState, images: jax.Array, labels: jax.Array, mask: jax.Array
) -> dict[str, jax.Array]:
    """Evaluates one batch normalized with its own statistics (training mode).

    The updated running statistics are discarded. This is the accuracy one would
    get by (wrongly) leaving the model in training mode at test time; it depends
    on the batch, so the batch must not be padded.

    Args:
        state: train state holding the parameters.
        images: float32 images of shape ``(batch, 28, 28, 1)``.
        labels: int32 labels of shape ``(batch,)``.
        mask: 1 for real examples, 0 for padding.

    Returns:
        ``loss_sum`` (float32) and ``correct`` (int32) over the real examples.
    """
    variables = {"params": state.params, "batch_stats": state.batch_stats}
    logits, _ = state.apply_fn(variables, images, train=True, mutable=["batch_stats"])
    return _eval_sums(logits, labels, mask)


def evaluate(
    state: TrainState,
    images: np.ndarray,
    labels: np.ndarray,
    batch_size: int,
    *,
    batch_stats: bool = False,
) -> dict[str, float]:
    """Evaluates on a whole split.

    Args:
        state: train state.
        images: uint8 images of shape ``(n, 28, 28, 1)``.
        labels: labels of shape ``(n,)``.
        batch_size: evaluation batch size.
        batch_stats: normalize with each batch's statistics instead of the running
            statistics (see ``eval_step_batch_stats``).

    Returns:
        ``accuracy``, ``loss``, ``correct`` and ``count``; ``correct`` is an exact
        integer count, so accuracies compare exactly across runs.
    """
    step = eval_step_batch_stats if batch_stats else eval_step
    correct = 0
    loss_sum = 0.0
    for x, y, mask in input_pipeline.eval_batches(
        images, labels, batch_size, pad=not batch_stats
    ):
        sums = jax.device_get(step(state, x, y, mask))
        correct += int(sums["correct"])
        loss_sum += float(sums["loss_sum"])
    count = len(images)
    return {
        "accuracy": correct / count,
        "loss": loss_sum / count,
        "correct": correct,
        "count": count,
    }


def _relative_change(new: Any, old: Any) -> dict[str, dict[str, float]]:
    """Change of each layer's running mean and variance, relative to their norm.

    Divides by the larger of the two norms, so that leaving the initial zero mean
    counts as a change of 1 rather than an infinite one.
    """
    out: dict[str, dict[str, float]] = {}
    for layer, stats in new.items():
        out[layer] = {}
        for name in ("mean", "var"):
            a, b = np.asarray(stats[name]), np.asarray(old[layer][name])
            scale = max(float(np.linalg.norm(a)), float(np.linalg.norm(b)), 1e-12)
            out[layer][name] = float(np.linalg.norm(a - b)) / scale
    return out


def stats_metrics(config: Config, batch_stats: Any) -> dict[str, float]:
    """Per-layer figures of the running statistics, flat, for the metric log.

    ``jaxbn.describe(...).as_metrics()``: ``"<layer>/mean_abs"`` (mean ``|mean|``
    over the features), ``"<layer>/var_mean"``, ``"<layer>/min_var"``, ...
    """
    described = jaxbn.describe(
        batch_stats,
        momentum=config.bn_momentum,
        warmup=config.bn_warmup and config.batch_norm == "jaxbn",
    )
    return described.as_metrics()


def stats_log_line(metrics: dict[str, float]) -> str:
    """The ``LOGGED_STATS`` of each layer on one line, for the console."""
    layers = dict.fromkeys(k.rsplit("/", 1)[0] for k in metrics)
    return "  running statistics: " + "; ".join(
        f"{layer} |mean| {metrics[f'{layer}/mean_abs']:.3g} "
        f"var {metrics[f'{layer}/var_mean']:.3g}"
        for layer in layers
    )


def checkpoint_manager(workdir: str | Path, max_to_keep: int) -> ocp.CheckpointManager:
    """Returns an orbax checkpoint manager for ``workdir/checkpoints``."""
    return ocp.CheckpointManager(
        Path(workdir).resolve() / CHECKPOINT_DIR,
        options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True),
    )


def state_to_save(state: TrainState) -> dict[str, Any]:
    return {
        "step": state.step,
        "params": state.params,
        "batch_stats": state.batch_stats,
        "opt_state": state.opt_state,
    }


def restore_checkpoint(
    manager: ocp.CheckpointManager, state: TrainState, epoch: int | None = None
) -> TrainState:
    """Restores parameters, running statistics and optimizer state into ``state``.

    Args:
        manager: checkpoint manager of the workdir.
        state: a freshly created state; gives the structure, shapes and dtypes.
        epoch: the epoch to restore; the latest if ``None``.

    Returns:
        ``state`` with the checkpoint's values.

    Raises:
        FileNotFoundError: if the workdir holds no checkpoint.
    """
    if epoch is None:
        epoch = manager.latest_step()
    if epoch is None:
        raise FileNotFoundError(
            f"No checkpoint in {manager.directory}; train first (without "
            "--eval_only) with the same --workdir."
        )
    target = jax.tree.map(ocp.utils.to_shape_dtype_struct, state_to_save(state))
    restored = manager.restore(epoch, args=ocp.args.StandardRestore(target))
    return state.replace(**restored)


def save_config(config: Config, workdir: str | Path) -> None:
    """Writes ``config`` to ``workdir/config.json``."""
    text = json.dumps(dataclasses.asdict(config), indent=2)
    (Path(workdir) / CONFIG_FILE).write_text(text + "\n")


def load_config(workdir: str | Path) -> Config | None:
    """Reads the config a run saved in ``workdir``, or ``None`` if there is none."""
    path = Path(workdir) / CONFIG_FILE
    if not path.exists():
        return None
    fields = json.loads(path.read_text())
    fields["features"] = tuple(fields["features"])
    return Config(**fields)


def read_metrics(workdir: str | Path) -> list[dict[str, Any]]:
    """Reads the per-epoch records that ``train_and_evaluate`` appended."""
    path = Path(workdir) / METRICS_FILE
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line]


def _plot_accuracy(ax: Any, records: Sequence[dict[str, Any]]) -> None:
    epochs = [r["epoch"] for r in records]
    for key, label, style in (
        ("train_accuracy", "train (training mode)", "o-"),
        ("test_accuracy", "test (evaluation mode, running statistics)", "s-"),
        ("test_accuracy_batch_stats", "test (batch statistics)", "^--"),
    ):
        ax.plot(epochs, [100 * r[key] for r in records], style, label=label)
    ax.set(xlabel="epoch", ylabel="accuracy (%)", title="Accuracy")
    ax.set_xticks(epochs)
    ax.grid(alpha=0.3)
    ax.legend()


def _plot_change(ax: Any, records: Sequence[dict[str, Any]]) -> None:
    trace = [point for r in records for point in r["running_stats_change"]]
    if trace:
        steps = [p["step"] for p in trace]
        for i, layer in enumerate(trace[0]["change"]):
            for name, style in (("var", "-"), ("mean", ":")):
                values = [p["change"][layer][name] for p in trace]
                ax.plot(steps, values, style, color=f"C{i}", label=f"{layer} {name}")
        ax.set_yscale("log")
    ax.set(
        xlabel="step",
        ylabel="relative change since previous point",
        title="Convergence of the running statistics",
    )
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small", ncol=2)


def _plot_layer_stats(ax: Any, records: Sequence[dict[str, Any]]) -> None:
    logged = [r for r in records if "batch_stats" in r]
    if logged:
        epochs = [r["epoch"] for r in logged]
        layers = dict.fromkeys(k.rsplit("/", 1)[0] for k in logged[0]["batch_stats"])
        top = 0.0
        for i, layer in enumerate(layers):
            for name, style, text in (
                ("var_mean", "o-", "mean var"),
                ("mean_abs", "s:", "mean |mean|"),
            ):
                values = [r["batch_stats"][f"{layer}/{name}"] for r in logged]
                ax.plot(epochs, values, style, color=f"C{i}", label=f"{layer} {text}")
                top = max(top, *values)
        ax.set_xticks(epochs)
        ax.set_yscale("log")
        ax.set_ylim(top=30 * top)  # room for the legend above the lines
    ax.set(
        xlabel="epoch",
        ylabel="mean over the layer's features",
        title="Running statistics per layer (jaxbn.describe)",
    )
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small", ncol=2, loc="upper center")


def plot_metrics(records: Sequence[dict[str, Any]], path: str | Path) -> None:
    """Plots accuracy per epoch, the running statistics' convergence and size.

    Left: accuracy per epoch. Middle: the relative change of each layer's running
    mean and variance every ``stats_every_steps`` steps. Right: each layer's mean
    ``|mean|`` and mean variance after each epoch (``LOGGED_STATS``).
    """
    from matplotlib.figure import Figure

    fig = Figure(figsize=(16, 4.6), layout="constrained")
    ax_acc, ax_change, ax_stats = fig.subplots(1, 3)
    _plot_accuracy(ax_acc, records)
    _plot_change(ax_change, records)
    _plot_layer_stats(ax_stats, records)
    fig.savefig(path, dpi=100)


def train_and_evaluate(config: Config, workdir: str | Path) -> TrainState:
    """Trains, evaluating and checkpointing after every epoch.

    Resumes from the latest checkpoint in ``workdir`` if there is one. Writes the
    config to ``workdir/config.json``. After each epoch it appends a record to
    ``workdir/metrics.jsonl`` (with each layer's running-statistics figures,
    ``stats_metrics``), prints it, redraws ``workdir/metrics.png`` and saves a
    checkpoint. At the end it writes ``workdir/results.json`` (``report.write``:
    the records, the time taken, the machine and the versions).

    Args:
        config: hyperparameters.
        workdir: directory for metrics, plot and checkpoints.

    Returns:
        The final train state.
    """
    run_start = time.perf_counter()
    machine = report.machine()  # with the load average at the start
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    train_x, train_y = input_pipeline.load_split("train", limit=config.train_limit)
    test_x, test_y = input_pipeline.load_split("test", limit=config.test_limit)
    steps_per_epoch = len(train_x) // config.batch_size
    if steps_per_epoch == 0:
        raise ValueError(
            f"batch_size={config.batch_size} is larger than the {len(train_x)} "
            "training images; lower batch_size or raise train_limit."
        )

    save_config(config, workdir)
    state = create_train_state(config, jax.random.key(config.seed), steps_per_epoch)
    manager = checkpoint_manager(workdir, config.max_checkpoints)
    metrics_path = workdir / METRICS_FILE
    latest = manager.latest_step()
    if latest is None:
        start_epoch = 1
        metrics_path.write_text("")
    else:
        state = restore_checkpoint(manager, state, latest)
        start_epoch = latest + 1
        tqdm.write(f"Resuming from the checkpoint of epoch {latest}.")

    stats_before = jax.device_get(state.batch_stats)
    for epoch in range(start_epoch, config.num_epochs + 1):
        rng = np.random.default_rng([config.seed, epoch])
        batches = input_pipeline.train_batches(train_x, train_y, config.batch_size, rng)
        step_metrics: list[dict[str, jax.Array]] = []
        stats_trace: list[dict[str, Any]] = []
        start = time.perf_counter()
        with tqdm(
            batches,
            total=steps_per_epoch,
            desc=f"epoch {epoch}/{config.num_epochs}",
            disable=not config.progress,
            leave=False,
        ) as bar:
            for i, (x, y) in enumerate(bar, start=1):
                state, metrics = train_step(state, x, y)
                step_metrics.append(metrics)
                if i % config.stats_every_steps == 0 or i == steps_per_epoch:
                    stats_now = jax.device_get(state.batch_stats)
                    stats_trace.append(
                        {
                            "step": int(state.step),
                            "change": _relative_change(stats_now, stats_before),
                        }
                    )
                    stats_before = stats_now
                if i % 20 == 0 or i == steps_per_epoch:
                    m = jax.device_get(metrics)
                    bar.set_postfix(
                        loss=f"{float(m['loss']):.4f}",
                        acc=f"{100 * float(m['accuracy']):.2f}%",
                    )
        train = jax.device_get(step_metrics)
        train_time = time.perf_counter() - start

        start = time.perf_counter()
        test = evaluate(state, test_x, test_y, config.eval_batch_size)
        test_bs = evaluate(
            state, test_x, test_y, config.eval_batch_size, batch_stats=True
        )
        eval_time = time.perf_counter() - start

        record = {
            "epoch": epoch,
            "step": int(state.step),
            "train_loss": float(np.mean([m["loss"] for m in train])),
            "train_accuracy": float(np.mean([m["accuracy"] for m in train])),
            "test_loss": test["loss"],
            "test_accuracy": test["accuracy"],
            "test_correct": test["correct"],
            "test_count": test["count"],
            "test_accuracy_batch_stats": test_bs["accuracy"],
            "train_time_s": round(train_time, 2),
            "eval_time_s": round(eval_time, 2),
            "running_stats_change": stats_trace,
            "batch_stats": stats_metrics(config, state.batch_stats),
        }
        with metrics_path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        manager.save(epoch, args=ocp.args.StandardSave(state_to_save(state)))
        plot_metrics(read_metrics(workdir), workdir / PLOT_FILE)
        tqdm.write(
            f"epoch {epoch:2d}  train loss {record['train_loss']:.4f}  "
            f"train acc {100 * record['train_accuracy']:.2f}% (training mode)  "
            f"test acc {100 * test['accuracy']:.2f}% (evaluation mode; "
            f"{100 * test_bs['accuracy']:.2f}% with batch statistics)  "
            f"{train_time:.1f}s train + {eval_time:.1f}s eval"
        )
        tqdm.write(stats_log_line(record["batch_stats"]))
    manager.wait_until_finished()
    manager.close()
    path = report.write(
        workdir,
        dataclasses.asdict(config),
        read_metrics(workdir),
        program_time_s=time.perf_counter() - run_start,
        start=machine,
        resumed_from=latest,
    )
    tqdm.write(
        f"Done in {time.perf_counter() - run_start:.0f} s (data loading, "
        f"compilation, training, evaluation, checkpoints); see {workdir}, and "
        f"{path.name} for the results with the machine and versions."
    )
    return state


def eval_only(
    config: Config, workdir: str | Path, epoch: int | None = None
) -> dict[str, Any]:
    """Restores a checkpoint and evaluates it on the test set.

    Args:
        config: the configuration used for training (the model must match).
        workdir: the training run's workdir.
        epoch: the epoch to restore; the latest if ``None``.

    Returns:
        ``epoch``, ``accuracy``, ``loss``, ``correct``, ``count`` and
        ``reported_accuracy``: the test accuracy recorded in ``metrics.jsonl``
        at training time (``None`` if it is not there).

    Raises:
        FileNotFoundError: if the workdir holds no checkpoint.
    """
    test_x, test_y = input_pipeline.load_split("test", limit=config.test_limit)
    # The optimizer state is restored too; its schedule does not matter here.
    state = create_train_state(config, jax.random.key(config.seed), 1)
    manager = checkpoint_manager(workdir, config.max_checkpoints)
    if epoch is None:
        epoch = manager.latest_step()
    state = restore_checkpoint(manager, state, epoch)
    manager.close()
    result: dict[str, Any] = {"epoch": epoch}
    result.update(evaluate(state, test_x, test_y, config.eval_batch_size))
    reported = [r for r in read_metrics(workdir) if r["epoch"] == epoch]
    result["reported_accuracy"] = reported[-1]["test_accuracy"] if reported else None
    return result
