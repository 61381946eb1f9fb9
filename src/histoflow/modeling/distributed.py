"""Training across machines: TensorFlow's MultiWorkerMirroredStrategy when `TF_CONFIG` describes a cluster.

Keras 3's `model.fit` does not run under MultiWorkerMirroredStrategy (keras-team/keras#20585: it
reduces the first data batch and the per-step metrics across workers in ways the strategy rejects), so
a multi-worker run trains with the custom loop TensorFlow documents for this strategy (`strategy.run`
of a train step per global batch) and drives the same Keras callbacks through a CallbackList:
EarlyStopping, ReduceLROnPlateau and, on the chief, MLflow's epoch metrics and TensorBoard.

Every worker computes the same epoch logs: losses and metrics are summed over all replicas of all
workers before any callback sees them, so that early stopping and the learning-rate schedule take the
same decision everywhere (a worker that stopped alone would leave the others waiting in a collective).
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import sys
import time
from dataclasses import dataclass

import keras
import numpy as np
import tensorflow as tf

from histoflow.errors import ConfigError


@dataclass(frozen=True)
class Cluster:
    """This process's place in the cluster `TF_CONFIG` describes."""

    workers: tuple[str, ...]
    index: int

    @property
    def is_chief(self) -> bool:
        """Worker 0 is the chief: it alone opens the MLflow run, evaluates and saves the model."""
        return self.index == 0

    def __str__(self) -> str:
        return f"worker {self.index} of {len(self.workers)} ({self.workers[self.index]})"


def cluster(environ: dict[str, str] | None = None) -> Cluster | None:
    """The cluster of `TF_CONFIG` (None when it is unset or names a single worker)."""
    text = (os.environ if environ is None else environ).get("TF_CONFIG", "").strip()
    if not text:
        return None
    try:
        config = json.loads(text)
        workers = tuple(config["cluster"]["worker"])
        task = config["task"]
        index = int(task["index"])
    except (ValueError, KeyError, TypeError) as exc:
        raise ConfigError('TF_CONFIG must look like {"cluster": {"worker": ["host1:port", "host2:port"]}, '
                          f'"task": {{"type": "worker", "index": 0}}}}; got {text!r} ({exc})') from None
    if set(config["cluster"]) - {"worker"} or task.get("type") != "worker":
        raise ConfigError("TF_CONFIG: histoflow's clusters have workers only (worker 0 is the chief); "
                          f"got cluster roles {sorted(config['cluster'])} and task type {task.get('type')!r}")
    if not 0 <= index < len(workers):
        raise ConfigError(f"TF_CONFIG: task index {index} is not one of the {len(workers)} workers")
    return Cluster(workers, index) if len(workers) > 1 else None


def refuse_cluster(command: str) -> None:
    """`cv` and `tune` train many models on one machine: a `TF_CONFIG` meant for `train` would make their
    training wait for workers that never come."""
    if cluster() is not None:
        raise ConfigError(f"{command} does not train across machines; unset TF_CONFIG (multi-worker training is "
                          "for `train`; several machines tune one study as separate `tune` workers)")


@functools.cache
def multi_worker_strategy() -> tf.distribute.MultiWorkerMirroredStrategy:
    """The process's one MultiWorkerMirroredStrategy (it must exist before any other TensorFlow operation
    runs, and only once: creating it connects to the other workers)."""
    return tf.distribute.MultiWorkerMirroredStrategy()


def barrier() -> None:
    """Wait until every worker reaches this point: the other workers wait here for the chief's evaluation
    and logging, so that none exits while the chief still runs (which it would report as a crashed task)."""
    strategy = multi_worker_strategy()
    strategy.reduce("SUM", tf.function(lambda: strategy.run(lambda: tf.constant(1.0)))(), axis=None)


def local_copy(model: keras.Model, local: keras.Model) -> keras.Model:
    """`local` (the same architecture, built outside the strategy) with `model`'s weights and optimizer state."""
    local.set_weights(model.get_weights())
    local.optimizer.build(local.trainable_variables)
    # Same optimizer, same variables in the same order; otherwise (not seen) the saved model keeps the
    # trained weights and a fresh optimizer state, which only matters to someone who trains it further.
    if len(local.optimizer.variables) == len(model.optimizer.variables):
        for target, source in zip(local.optimizer.variables, model.optimizer.variables, strict=True):
            target.assign(source.value)
    return local


def weights_digest(model: keras.Model) -> str:
    """SHA-256 of the model's weights, in order: equal on every worker of a run that stayed in sync."""
    digest = hashlib.sha256()
    for weight in model.get_weights():
        digest.update(np.ascontiguousarray(weight, dtype=weight.dtype).tobytes())
    return digest.hexdigest()


def _distribute(strategy: tf.distribute.Strategy, dataset: tf.data.Dataset):
    # Every worker runs the same (seeded) pipeline and keeps its share of each global batch: the images are
    # read from a list of paths, not from files TensorFlow could hand out per worker.
    options = tf.data.Options()
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.DATA
    return strategy.experimental_distribute_dataset(dataset.with_options(options))


class _Steps:
    """The compiled train and evaluation steps of one model under `strategy`."""

    def __init__(self, model: keras.Model, strategy: tf.distribute.Strategy,
                 class_weight: dict[int, float] | None) -> None:
        self.model, self.strategy = model, strategy
        table = np.ones(model.output_shape[-1], dtype=np.float32)
        for label, weight in (class_weight or {}).items():
            table[label] = weight
        with strategy.scope():
            self.class_weight = tf.constant(table)
            # Metric variables are summed over all replicas when read: every worker sees the global values.
            self.train_metrics = self._metrics("")
            self.val_metrics = self._metrics("val_")

    @staticmethod
    def _metrics(prefix: str) -> list[keras.metrics.Metric]:
        return [keras.metrics.Mean(name=f"{prefix}loss"), keras.metrics.CategoricalAccuracy(name=f"{prefix}accuracy"),
                keras.metrics.AUC(name=f"{prefix}auc")]

    def _train_replica(self, x: tf.Tensor, y: tf.Tensor) -> None:
        weights = tf.gather(self.class_weight, tf.argmax(y, axis=-1))
        # The loss of the global batch: the weighted sum here, divided by the images of all replicas.
        count = tf.distribute.get_replica_context().all_reduce("SUM", tf.cast(tf.shape(y)[0], tf.float32))
        with tf.GradientTape() as tape:
            predictions = self.model(x, training=True)
            losses = keras.losses.categorical_crossentropy(y, predictions) * weights
            loss = tf.reduce_sum(losses) / tf.maximum(count, 1.0)
            scaled = self.model.optimizer.scale_loss(loss)  # mixed precision: the LossScaleOptimizer's scale
        gradients = tape.gradient(scaled, self.model.trainable_variables)
        # The optimizer sums the replicas' gradients: each is already divided by the global count.
        self.model.optimizer.apply_gradients(zip(gradients, self.model.trainable_variables, strict=True))
        self._update(self.train_metrics, y, predictions, losses)

    def _val_replica(self, x: tf.Tensor, y: tf.Tensor) -> None:
        predictions = self.model(x, training=False)
        self._update(self.val_metrics, y, predictions, keras.losses.categorical_crossentropy(y, predictions))

    @staticmethod
    def _update(metrics: list[keras.metrics.Metric], y: tf.Tensor, predictions: tf.Tensor, losses: tf.Tensor) -> None:
        loss, accuracy, auc = metrics
        loss.update_state(losses)
        accuracy.update_state(y, predictions)
        auc.update_state(y, predictions)

    @tf.function
    def train_step(self, batch) -> None:
        self.strategy.run(self._train_replica, args=batch)

    @tf.function
    def val_step(self, batch) -> None:
        self.strategy.run(self._val_replica, args=batch)

    @staticmethod
    def results(metrics: list[keras.metrics.Metric]) -> dict[str, float]:
        values = {m.name: float(m.result()) for m in metrics}
        for metric in metrics:
            metric.reset_state()
        return values


def fit(model: keras.Model, strategy: tf.distribute.Strategy, train_ds: tf.data.Dataset,
        val_ds: tf.data.Dataset, epochs: int, callbacks: list[keras.callbacks.Callback],
        class_weight: dict[int, float] | None) -> dict[str, list[float]]:
    """Train `model` (built in `strategy`'s scope) with the custom loop; returns Keras's history dict."""
    steps = _Steps(model, strategy, class_weight)
    train, val = _distribute(strategy, train_ds), _distribute(strategy, val_ds)
    history = keras.callbacks.History()
    callback_list = keras.callbacks.CallbackList([*callbacks, history], model=model)
    batches = int(train_ds.cardinality())
    model.stop_training = False
    callback_list.on_train_begin()
    for epoch in range(epochs):
        callback_list.on_epoch_begin(epoch)
        print(f"Epoch {epoch + 1}/{epochs}", flush=True)
        start = time.perf_counter()
        progress = keras.utils.Progbar(batches, verbose=1 if sys.stdout.isatty() else 2) if batches > 0 else None
        for step, batch in enumerate(train):
            steps.train_step(batch)
            if progress is not None:
                progress.update(step + 1)
        for batch in val:
            steps.val_step(batch)
        logs = {**steps.results(steps.train_metrics), **steps.results(steps.val_metrics)}
        print(" - ".join([f"{time.perf_counter() - start:.1f}s", *(f"{k}: {v:.4f}" for k, v in logs.items())]),
              flush=True)
        callback_list.on_epoch_end(epoch, logs)
        if model.stop_training:
            break
    callback_list.on_train_end()
    return history.history


def join(cluster: Cluster, resume: str, warmup_epochs: int) -> None:
    """Connect to the other workers (before any other TensorFlow operation). A multi-worker run keeps no
    checkpoints: the workers' weights could not be restored together."""
    if resume:
        raise ConfigError("resume: a multi-worker run (TF_CONFIG set) keeps no checkpoints, so it cannot be "
                          "resumed; start it again")
    if warmup_epochs:
        raise ConfigError("warmup_epochs: a multi-worker run has no head warm-up; warm up on one machine, or "
                          "train with warmup_epochs=0")
    print(f"{cluster}: waiting for the other workers", flush=True)
    multi_worker_strategy()
