"""Model fitting: seeds, Keras callbacks, class weights, distribution strategy, precision policy."""

from __future__ import annotations

import contextlib
import logging
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import keras
import mlflow
import mlflow.keras
import numpy as np
import tensorflow as tf
from sklearn.utils.class_weight import compute_class_weight

from histoflow import tracking
from histoflow.modeling import checkpoints, distributed, inference
from histoflow.modeling.checkpoints import Checkpoint
from histoflow.progress import LogProgress

log = logging.getLogger(__name__)


def set_seeds(seed: int) -> None:
    """Python, NumPy and TensorFlow seeds (one call: keras.utils.set_random_seed)."""
    keras.utils.set_random_seed(seed)


def strategy() -> tf.distribute.Strategy:
    """MultiWorkerMirroredStrategy when `TF_CONFIG` describes several workers; else MirroredStrategy over
    all GPUs when there are several; the default strategy otherwise."""
    if distributed.cluster() is not None:
        return distributed.multi_worker_strategy()
    gpus = tf.config.list_logical_devices("GPU")
    if len(gpus) > 1:
        return tf.distribute.MirroredStrategy()
    return tf.distribute.get_strategy()


@contextlib.contextmanager
def precision_policy(mixed: bool) -> Iterator[None]:
    """Layers built inside take mixed_float16 (float16 compute, float32 variables) when `mixed`.

    The policy is global in Keras; it is restored afterwards so that later models (and the serving
    model loaded from the .keras file, whose layers carry their own policy) are not affected. Keras's
    compile wraps the optimizer in a LossScaleOptimizer for such a model.
    """
    if not mixed:
        yield
        return
    if not tf.config.list_logical_devices("GPU"):
        log.warning("mixed_precision=true without a GPU: float16 on a CPU is slower than float32, not faster")
    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy("mixed_float16")
    try:
        yield
    finally:
        keras.config.set_dtype_policy(previous)


def class_weights(labels: np.ndarray, mode: str) -> dict[int, float] | None:
    if mode == "none":
        return None
    classes = np.unique(labels)
    weights = compute_class_weight("balanced", classes=classes, y=labels)
    return {int(c): float(w) for c, w in zip(classes, weights, strict=True)}


def callbacks(patience: int, lr_patience: int
              ) -> tuple[keras.callbacks.EarlyStopping, keras.callbacks.ReduceLROnPlateau]:
    """Model selection on validation loss only; the best epoch's weights are restored."""
    return (
        keras.callbacks.EarlyStopping(monitor="val_loss", patience=patience, restore_best_weights=True,
                                      verbose=1),
        keras.callbacks.ReduceLROnPlateau(monitor="val_loss", factor=0.5, patience=lr_patience,
                                          min_lr=1e-7, verbose=1),
    )


def tensorboard(log_dir: Path) -> keras.callbacks.TensorBoard:
    """Keras's TensorBoard callback: epoch scalars and the learning rate; no graph, no profiling (both
    cost seconds per run for what MLflow already shows)."""
    return keras.callbacks.TensorBoard(log_dir=str(log_dir), write_graph=False, profile_batch=0,
                                       update_freq="epoch")


def _metric_names(logs: dict, prefix: str = "") -> dict[str, float]:
    return {prefix + (k if k.startswith("val_") or k == "learning_rate" else f"train_{k}"): v for k, v in logs.items()}


def log_missing_epochs(epochs: list[dict], prefix: str = "") -> None:
    """Log to the active run the saved epochs' metrics that it lacks (each step once)."""
    client, run_id = mlflow.MlflowClient(), mlflow.active_run().info.run_id
    now = int(time.time() * 1000)
    logged: dict[str, set[int]] = {}
    missing = []
    for entry in epochs:
        for key, value in _metric_names(entry["logs"], prefix).items():
            if key not in logged:
                logged[key] = {m.step for m in client.get_metric_history(run_id, key)}
            if entry["epoch"] not in logged[key]:
                missing.append(mlflow.entities.Metric(key, float(value), now, entry["epoch"]))
    if missing:
        log.info("logging %d metric values of %d epochs that MLflow had not received", len(missing),
                 len({m.step for m in missing}))
        client.log_batch(run_id, metrics=missing)


def confirm_epochs(epochs: list[dict], loggers: list[EpochMetrics], checkpoint: Path | None) -> None:
    """Every epoch's metrics in MLflow before training is reported done.

    The epoch loggers log asynchronously, so that a tracking server that stops answering does not stop
    training; MLflow's queue gives up on what it cannot deliver within its retries (a few minutes), silently.
    Here, once the queue is flushed, what MLflow has is read back and what it lacks is uploaded, after
    waiting for the server if it is down (tracking.wait_for_server); a server that does not come back raises
    TrackingError, with the epochs kept in the checkpoint for `--resume`.
    """
    loggers = [logger for logger in loggers if not logger.batched]
    if not loggers or not epochs:
        return
    mlflow.flush_async_logging()
    tracking.wait_for_server(mlflow.get_tracking_uri(), f"{len(epochs)} epochs trained"
                             + (f", kept in {checkpoint}" if checkpoint else ""))
    for logger in loggers:
        log_missing_epochs(epochs, logger.prefix)


class EpochProgress(keras.callbacks.Callback):
    """In a log (not a terminal): each epoch's start, and a line every ~10 % of its batches.

    Keras's verbose=2 prints a line when an epoch ends, and no "Epoch 1/1" header when there is one epoch:
    a 20-minute epoch would show nothing for 20 minutes."""

    def on_epoch_begin(self, epoch: int, logs: dict | None = None) -> None:
        total = self.params.get("epochs", 1)
        print(f"Epoch {epoch + 1}/{total}", flush=True)
        self.lines = LogProgress(self.params.get("steps"), f"epoch {epoch + 1}/{total}", "batch",
                                 emit=lambda line: print(line, flush=True), show_start=False)

    def on_train_batch_end(self, batch: int, logs: dict | None = None) -> None:
        self.lines.update()


class EpochMetrics(mlflow.keras.MlflowCallback):
    """MLflow's Keras callback with train_*/val_* names per epoch.

    Its on_test_end would also log unstepped validation_* metrics, which collide with the final
    validation evaluation (validation_accuracy, ...), so that hook is off.

    Asynchronous logging (the default) costs nothing per epoch but about 2 s to flush when fit ends:
    right for a training run, too much for a tuning trial that trains a head in about a second. With
    ``batched`` the epochs are kept and written in one request by ``flush()``, which the caller also
    calls when a pruner stops fit with an exception; nothing is logged when training begins (a
    trial logs its own parameters, and its head's summary would show the shared padded head).

    With a ``checkpoint`` that restored epochs (a resumed run), training begins by logging those of
    its epochs that MLflow lacks (the process was killed before they were uploaded), each step once.
    A ``prefix`` names another phase's metrics (``warmup_train_loss``, ...); such a phase logs only its
    epochs: the run's optimizer parameters and model summary are its main fit's (a second optimizer's
    parameters would collide with them, MLflow keeps a parameter's first value).
    """

    def __init__(self, batched: bool = False, prefix: str = "") -> None:
        super().__init__()
        self.batched = batched
        self.prefix = prefix
        self.pending: list[mlflow.entities.Metric] = []
        self.checkpoint: Checkpoint | None = None

    def on_train_begin(self, logs: dict | None = None) -> None:
        if self.checkpoint is not None and self.checkpoint.restored:
            log_missing_epochs(self.checkpoint.restored, self.prefix)
        elif not self.batched and not self.prefix:
            super().on_train_begin(logs)

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        if not logs:
            return
        renamed = _metric_names(logs, self.prefix)
        if self.batched:
            now = int(time.time() * 1000)
            self.pending += [mlflow.entities.Metric(k, float(v), now, epoch) for k, v in renamed.items()]
        else:
            super().on_epoch_end(epoch, renamed)

    def flush(self) -> None:
        """Write the kept epochs to the active run (batched mode)."""
        if self.pending:
            mlflow.MlflowClient().log_batch(mlflow.active_run().info.run_id, metrics=self.pending)
            self.pending = []

    def on_test_end(self, logs: dict | None = None) -> None:
        return None


def validation_metrics(model: keras.Model, dataset: tf.data.Dataset) -> dict[str, float]:
    """The compiled loss and metrics of `model` over a (batched) dataset of (images, one-hot labels), as Keras's
    evaluate gives them, from the network's traced inference graph (that of its screening extractor)."""
    step = inference.forward(inference.feature_model(model))
    model.reset_metrics()
    total, count = 0.0, 0
    for batch in dataset:
        images, labels = batch[0], batch[1]
        probabilities = step(images)[0]
        n = int(labels.shape[0])
        total += float(model.compute_loss(x=images, y=labels, y_pred=probabilities, training=False)) * n
        count += n
        model.compute_metrics(images, labels, probabilities)
    results = {name: float(value) for name, value in model.get_metrics_result().items()}
    model.reset_metrics()
    return {**results, "loss": total / max(count, 1)}


class InferenceValidation(keras.callbacks.Callback):
    """Each epoch's validation (val_loss and the compiled metrics) through the network's inference graph, which
    the run's evaluation traces anyway, instead of the test step Keras traces for validation alone (bench/tracing.py,
    fit + evaluation pass of DenseNet121 fusion: 30.8 -> 22.0 s). First among fit's callbacks: early stopping, the
    learning-rate schedule, checkpoints and the loggers read the values it adds to the logs."""

    def __init__(self, dataset: tf.data.Dataset) -> None:
        super().__init__()
        self.dataset = dataset

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        if logs is not None:
            logs.update({f"val_{k}": v for k, v in validation_metrics(self.model, self.dataset).items()})


@dataclass
class FitResult:
    history: dict[str, list[float]]
    seconds: float
    best_epoch: int
    epochs_run: int
    resumed_at: int = 0  # epochs restored from a checkpoint (0: trained from the start)


def _result(history: dict[str, list[float]], seconds: float, resumed_at: int = 0) -> FitResult:
    val_loss = history.get("val_loss", [0.0])
    return FitResult(history=history, seconds=seconds, best_epoch=int(np.argmin(val_loss)) + 1,
                     epochs_run=len(val_loss), resumed_at=resumed_at)


def _history(epochs: list[dict]) -> dict[str, list[float]]:
    keys = epochs[0]["logs"].keys() if epochs else []
    return {k: [float(e["logs"][k]) for e in epochs] for k in keys}


def build_training_state(model: keras.Model, dataset: tf.data.Dataset) -> None:
    """Create the optimizer's and the compiled metrics' variables before the first training step.

    Without a distribution strategy, Keras's TensorFlow trainer creates them while it traces the first
    step, and tf.function then traces the step a second time (variables created in a first trace): 12 s
    of DenseNet121 fusion tracing per fit on this machine, for nothing. Keras builds them this way itself
    under a strategy; its method is private, hence the guard (without it, only slower)."""
    build = getattr(model, "_symbolic_build", None)
    if build is not None and not model.optimizer.built:
        build(data_batch=dataset.element_spec)


def fit(model: keras.Model, train_ds: tf.data.Dataset, val_ds: tf.data.Dataset, *, epochs: int,
        extra_callbacks: list[keras.callbacks.Callback], class_weight: dict[int, float] | None,
        patience: int, lr_patience: int, checkpoint_dir: Path | None = None,
        inference_validation: bool = False) -> FitResult:
    """model.fit with early stopping on validation loss; with `checkpoint_dir`, every epoch is saved there
    and a fit that finds a checkpoint continues from its last saved epoch (or, when fit had ended,
    does not train again). With `inference_validation` (a network that evaluation will run anyway), validation
    goes through its inference graph (InferenceValidation). Under MultiWorkerMirroredStrategy (`TF_CONFIG`),
    the custom distributed loop trains instead, with the same callbacks and no checkpoint."""
    if distributed.cluster() is not None:
        start = time.perf_counter()
        history = distributed.fit(model, strategy(), train_ds, val_ds, epochs,
                                  [*callbacks(patience, lr_patience), *extra_callbacks], class_weight)
        if mlflow.active_run() is not None:
            mlflow.flush_async_logging()
        return _result(history, time.perf_counter() - start)
    loggers = [c for c in extra_callbacks if isinstance(c, EpochMetrics)]
    if checkpoints.finished_training(checkpoint_dir):
        done, seconds = checkpoints.load_finished(model, checkpoint_dir)
        log.info("training had finished before the interruption: its weights are restored, nothing is trained")
        confirm_epochs(done, loggers, checkpoint_dir)
        return _result(_history(done), seconds, resumed_at=len(done))
    stopper, plateau = callbacks(patience, lr_patience)
    saver = Checkpoint(checkpoint_dir, stopper, plateau) if checkpoint_dir is not None else None
    for logger in loggers:
        logger.checkpoint = saver
    # The progress bar on a terminal; in a log, Keras's line per epoch and ours every ~10 % of an epoch.
    terminal = sys.stdout.isatty()
    start = time.perf_counter()
    build_training_state(model, train_ds)
    validation = [InferenceValidation(val_ds)] if inference_validation else []
    history = model.fit(train_ds, validation_data=None if validation else val_ds, epochs=epochs,
                        verbose=1 if terminal else 2,
                        shuffle=False,  # the tf.data pipeline shuffles
                        class_weight=class_weight,
                        callbacks=[*validation, stopper, plateau, *([saver] if saver else []), *extra_callbacks,
                                   *([] if terminal else [EpochProgress()])])
    if saver is None:
        seconds = time.perf_counter() - start
        epochs_done = [{"epoch": i, "logs": {k: float(v[i]) for k, v in history.history.items()}}
                       for i in range(len(history.history.get("val_loss", [])))]
        confirm_epochs(epochs_done, loggers, None)
        return _result(_history(epochs_done), seconds)
    confirm_epochs(saver.restored, loggers, checkpoint_dir)
    resumed_at = len(saver.restored) - len(history.history.get("val_loss", []))
    return _result(_history(saver.restored), saver.elapsed_s, resumed_at)
