"""Training that survives a killed process: per-run checkpoints and what a resumed run needs.

Keras's BackupAndRestore saves the weights (optimizer state included) and the epoch after every epoch.
A run needs more to continue as if never interrupted, so this callback also keeps, in the same folder:

- ``epochs.jsonl``: each finished epoch's logs and the training time so far, written before the weights,
  so that a resumed run can log the epochs MLflow never received (a kill between the checkpoint and
  the asynchronous metric upload) and report one training time;
- ``best.weights.h5``: the weights of the best epoch so far, so that EarlyStopping's best-weights
  restore and its patience count continue across the interruption (ReduceLROnPlateau's count too);
- ``final.weights.h5`` and ``done``: the weights fit ended with, so that a run killed later (during
  evaluation or model logging) resumes there without training again.

The folder is the run's (``<checkpoint_dir>/<run id>``) and is removed when the run has finished; a
head warm-up (``warmup_epochs``) keeps the same files for its own fit in the subfolder ``warmup``.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

import keras
import numpy as np

from histoflow.config import local_folder

HISTORY = "epochs.jsonl"
BEST = "best.weights.h5"
FINAL = "final.weights.h5"
DONE = "done"
MONITOR = "val_loss"
WARMUP = "warmup"


def run_checkpoint_dir(checkpoint_dir: str, run_id: str) -> Path | None:
    """The run's checkpoint folder (None when checkpoints are off)."""
    folder = local_folder(checkpoint_dir, "checkpoints")
    return None if folder is None else folder / run_id


def has_checkpoint(directory: Path | None) -> bool:
    """Whether a run has saved an epoch: of its fit or, killed before that began, of its warm-up."""
    return directory is not None and any((d / HISTORY).is_file() for d in (directory, directory / WARMUP))


def saved_epochs(directory: Path) -> list[dict[str, Any]]:
    """The finished epochs of a checkpoint folder, in order: {"epoch", "logs", "elapsed_s"}."""
    path = directory / HISTORY
    if not path.is_file():
        return []
    entries = []
    for line in path.read_text().splitlines():
        try:
            entries.append(json.loads(line))
        except ValueError:  # a line cut by the kill: that epoch did not finish saving
            break
    return entries


def _completed_epochs(directory: Path) -> int:
    """Epochs whose weights were saved (Keras's training metadata)."""
    meta = directory / "training_metadata.json"
    try:
        return int(json.loads(meta.read_text())["epoch"])
    except (OSError, ValueError, KeyError):
        return 0


def _append(path: Path, entry: dict[str, Any]) -> None:
    with open(path, "a") as fh:
        fh.write(json.dumps(entry) + "\n")
        fh.flush()
        os.fsync(fh.fileno())


class Checkpoint(keras.callbacks.BackupAndRestore):
    """BackupAndRestore plus the epochs' logs, the best weights and the callbacks' patience counts.

    Place it after EarlyStopping and ReduceLROnPlateau (their on_train_begin resets what this one
    restores) and before the metric logger (so that an epoch is saved before it is reported).
    """

    def __init__(self, directory: Path, early_stopping: keras.callbacks.EarlyStopping,
                 plateau: keras.callbacks.ReduceLROnPlateau) -> None:
        super().__init__(str(directory), delete_checkpoint=False)
        self.directory = directory
        self.early_stopping = early_stopping
        self.plateau = plateau
        self.restored: list[dict[str, Any]] = []
        self._epoch_start = time.perf_counter()
        self._trained_s = 0.0

    def on_train_begin(self, logs: dict | None = None) -> None:
        super().on_train_begin(logs)
        completed = _completed_epochs(self.directory)
        self.restored = [e for e in saved_epochs(self.directory) if e["epoch"] < completed]
        # What a kill left beyond the saved weights is trained again: drop it from the history file.
        self.directory.mkdir(parents=True, exist_ok=True)
        (self.directory / HISTORY).write_text("".join(json.dumps(e) + "\n" for e in self.restored))
        if self.restored:
            self._restore_patience()
            self._trained_s = float(self.restored[-1]["elapsed_s"])

    def on_epoch_begin(self, epoch: int, logs: dict | None = None) -> None:
        super().on_epoch_begin(epoch, logs)
        self._epoch_start = time.perf_counter()

    def _restore_patience(self) -> None:
        losses = [e["logs"].get(MONITOR, np.inf) for e in self.restored]
        best = int(np.argmin(losses))
        since_best = len(losses) - 1 - best
        stopper, plateau = self.early_stopping, self.plateau
        stopper.best, stopper.best_epoch, stopper.wait = losses[best], best, since_best
        plateau.best, plateau.wait = losses[best], since_best
        if stopper.restore_best_weights and (self.directory / BEST).is_file():
            current = self.model.get_weights()
            self.model.load_weights(self.directory / BEST)
            stopper.best_weights = self.model.get_weights()
            self.model.set_weights(current)

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        self._trained_s += time.perf_counter() - self._epoch_start
        logs = {k: float(v) for k, v in (logs or {}).items()}
        previous = [e["logs"].get(MONITOR, np.inf) for e in self.restored]
        if not previous or logs.get(MONITOR, np.inf) < min(previous):
            self.model.save_weights(self.directory / BEST)
        entry = {"epoch": epoch, "logs": logs, "elapsed_s": self.elapsed_s}
        self.restored.append(entry)
        _append(self.directory / HISTORY, entry)
        super().on_epoch_end(epoch, logs)

    @property
    def elapsed_s(self) -> float:
        """Seconds spent in epochs (training and validation), the interrupted run's included; not the time
        between epochs or after the last, where logging may wait for a tracking server."""
        return self._trained_s

    def on_train_end(self, logs: dict | None = None) -> None:
        # After EarlyStopping's restore (it comes first in the list): the weights fit ends with.
        self.model.save_weights(self.directory / FINAL)
        (self.directory / DONE).write_text(json.dumps({"elapsed_s": self.elapsed_s}))


def finished_training(directory: Path | None) -> bool:
    return directory is not None and (directory / DONE).is_file() and (directory / FINAL).is_file()


def load_finished(model: keras.Model, directory: Path) -> tuple[list[dict[str, Any]], float]:
    """The weights fit ended with (the optimizer's state too: the logged .keras file carries it, as an
    uninterrupted run's does), its epochs and its training time (a run killed after training)."""
    if model.optimizer is not None and not model.optimizer.built:
        model.optimizer.build(model.trainable_variables)  # an unbuilt optimizer skips its saved variables
    model.load_weights(directory / FINAL)
    return saved_epochs(directory), float(json.loads((directory / DONE).read_text())["elapsed_s"])


def remove(directory: Path | None) -> None:
    if directory is not None:
        shutil.rmtree(directory, ignore_errors=True)
