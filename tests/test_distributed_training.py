"""Training on several workers (MultiWorkerMirroredStrategy from TF_CONFIG): one MLflow run, workers in step."""

import json
import os
import re
import subprocess
import sys

import keras
import mlflow
import numpy as np
import pytest
import tensorflow as tf

from conftest import BREAKHIS, free_port
from histoflow import artifacts
from histoflow.errors import ConfigError
from histoflow.modeling import distributed, training_run
from histoflow.modeling.variants import make_train_config

SETTINGS = {"data_dir": str(BREAKHIS), "max_images": 120, "image_size": 64, "batch_size": 16, "epochs": 1,
            "gradcam_per_class": 0, "bootstrap": 0}


def _tf_config(workers: list[str], index: int, kind: str = "worker") -> dict[str, str]:
    return {"TF_CONFIG": json.dumps({"cluster": {"worker": workers}, "task": {"type": kind, "index": index}})}


def test_the_cluster_comes_from_tf_config():
    workers = ["10.0.0.1:2222", "10.0.0.2:2222"]
    assert distributed.cluster({}) is None
    assert distributed.cluster(_tf_config(workers[:1], 0)) is None  # one worker: nothing to distribute
    chief, other = distributed.cluster(_tf_config(workers, 0)), distributed.cluster(_tf_config(workers, 1))
    assert chief.is_chief and not other.is_chief and str(other) == "worker 1 of 2 (10.0.0.2:2222)"
    for bad, message in ((_tf_config(workers, 2), "not one of the 2 workers"),
                         (_tf_config(workers, 0, "ps"), "workers only"),
                         ({"TF_CONFIG": "{not json"}, "TF_CONFIG must look like"),
                         ({"TF_CONFIG": '{"cluster": {}}'}, "TF_CONFIG must look like")):
        with pytest.raises(ConfigError, match=message):
            distributed.cluster(bad)


def _small_model(seed: int) -> keras.Model:
    keras.utils.set_random_seed(seed)
    model = keras.Sequential([keras.Input((6,)), keras.layers.Dense(5, activation="relu"),
                              keras.layers.Dense(2, activation="softmax")])
    model.compile(keras.optimizers.SGD(0.3), "categorical_crossentropy")
    return model


def test_the_distributed_loop_takes_the_steps_keras_fit_takes():
    """The loop's loss (class weights, division by the global batch), gradients and validation loss equal
    Keras's own fit on one worker, where both can run."""
    rng = np.random.default_rng(0)
    x = rng.random((50, 6), dtype=np.float32)
    y = keras.utils.to_categorical((x[:, 0] + x[:, 1] > 1.2).astype(int), 2)
    data = tf.data.Dataset.from_tensor_slices((x, y)).batch(8)  # a partial last batch of 2
    weights = {0: 0.7, 1: 1.9}
    reference = _small_model(3)
    expected = reference.fit(data, validation_data=data, epochs=3, class_weight=weights, verbose=0, shuffle=False)
    model = _small_model(3)
    history = distributed.fit(model, tf.distribute.get_strategy(), data, data, 3, [], weights)
    for got, want in zip(model.get_weights(), reference.get_weights(), strict=True):
        np.testing.assert_allclose(got, want, atol=1e-5)
    np.testing.assert_allclose(history["val_loss"], expected.history["val_loss"], atol=1e-5)
    assert set(history) == {"loss", "accuracy", "auc", "val_loss", "val_accuracy", "val_auc"}


def test_a_multi_worker_run_cannot_be_resumed_and_fails_before_connecting(tracking_uri, monkeypatch):
    workers = [f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"]
    monkeypatch.setenv("TF_CONFIG", _tf_config(workers, 0)["TF_CONFIG"])
    with pytest.raises(ConfigError, match="cannot be resumed"):
        training_run.run(make_train_config("baseline", **SETTINGS, resume="0123abcd"))
    with pytest.raises(ConfigError, match="a multi-worker run has no head warm-up"):
        training_run.run(make_train_config("transfer", **SETTINGS, unfrozen_blocks=1, warmup_epochs=2))
    assert distributed.multi_worker_strategy.cache_info().currsize == 0  # no strategy, no connection attempt
    assert mlflow.search_runs(search_all_experiments=True).empty


@pytest.mark.slow
def test_two_workers_train_one_run_and_end_with_identical_weights(tracking_uri, tmp_path):
    workers = [f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"]
    args = [a for k, v in {**SETTINGS, "image_cache": tmp_path / "cache", "checkpoint_dir": tmp_path / "checkpoints"
                           }.items() for a in (f"--{k}", str(v))]
    env = {**os.environ, "MLFLOW_TRACKING_URI": tracking_uri}
    processes = [subprocess.Popen([sys.executable, "-m", "histoflow.cli", "train", "--variant", "baseline", *args],
                                  env={**env, **_tf_config(workers, index)}, stdout=subprocess.PIPE,
                                  stderr=subprocess.STDOUT, text=True) for index in (0, 1)]
    try:
        outputs = [p.communicate(timeout=600)[0] for p in processes]
    finally:
        for process in processes:
            process.kill()
    assert [p.returncode for p in processes] == [0, 0], outputs[0][-3000:] + outputs[1][-3000:]
    runs = mlflow.search_runs(search_all_experiments=True)
    assert len(runs) == 1  # the chief's: the other worker opened none
    run = mlflow.get_run(runs.run_id[0])
    assert run.data.tags["histoflow.distributed"] == "MultiWorkerMirroredStrategy, 2 workers"
    printed = re.search(r"worker 1 of 2 \(.*\): training finished; weights sha256 ([0-9a-f]{64})", outputs[1])
    assert printed, outputs[1][-3000:]
    assert run.data.tags["histoflow.weights_sha256"] == printed.group(1)
    # The model the chief saved is the one both workers trained.
    keras_dir = mlflow.artifacts.download_artifacts(run_id=run.info.run_id,
                                                    artifact_path=artifacts.KERAS_ARTIFACT_DIR)
    saved = keras.saving.load_model(next(os.path.join(keras_dir, f) for f in os.listdir(keras_dir)), compile=False)
    assert distributed.weights_digest(saved) == printed.group(1)
    history = mlflow.MlflowClient().get_metric_history(run.info.run_id, "train_loss")
    assert [m.step for m in history] == [0]
    assert "test_roc_auc" in run.data.metrics and "model_size_mb" in run.data.metrics


def test_cv_and_tune_refuse_a_cluster(monkeypatch):
    from histoflow.modeling.cross_validation import run as run_cv
    from histoflow.modeling.variants import make_cv_config
    from histoflow.tuning import study
    from histoflow.tuning.settings import make_tune_config

    monkeypatch.setenv("TF_CONFIG", _tf_config(["127.0.0.1:1", "127.0.0.1:2"], 0)["TF_CONFIG"])
    with pytest.raises(ConfigError, match="cv does not train across machines"):
        run_cv(make_cv_config("baseline", **SETTINGS))
    with pytest.raises(ConfigError, match="tune does not train across machines"):
        study.run(make_tune_config("transfer", data_dir=str(BREAKHIS)))
