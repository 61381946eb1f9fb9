"""A training run killed mid-way and resumed: only the missing epochs train, every metric step once."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import pytest

from conftest import BREAKHIS, free_port, run_cli, wait_for
from histoflow.errors import ConfigError
from histoflow.modeling import training_run
from histoflow.modeling.variants import make_train_config

SETTINGS = {"data_dir": str(BREAKHIS), "max_images": 240, "image_size": 64, "batch_size": 16, "epochs": 4,
            "patience": 10, "lr_patience": 10, "gradcam_per_class": 0, "bootstrap": 0}
EPOCH_KEYS = ("train_loss", "train_accuracy", "val_loss", "val_accuracy", "learning_rate")


def _args(settings: dict) -> list[str]:
    return [a for k, v in settings.items() for a in (f"--{k}", str(v))]


def _epochs_saved(checkpoints: Path) -> int:
    saved = list(checkpoints.glob("*/training_metadata.json"))
    return json.loads(saved[0].read_text() or "{}").get("epoch", 0) if saved else 0


def _train_until(settings: dict, checkpoints: Path, epochs: int, env: dict, **popen) -> subprocess.Popen:
    """Start `histoflow train`; return it as soon as `epochs` epochs are saved (failing if it ends first)."""
    process = subprocess.Popen([sys.executable, "-m", "histoflow.cli", "train", "--variant", "baseline",
                                *_args(settings)], env={**os.environ, **env}, text=True, **popen)
    deadline = time.monotonic() + 600
    while _epochs_saved(checkpoints) < epochs:
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            pytest.fail(f"training ended or stalled before epoch {epochs} was saved")
        time.sleep(0.02)
    return process


def _kill_after_epochs(settings: dict, checkpoints: Path, epochs: int, env: dict) -> str:
    """Start `histoflow train`, SIGKILL it as soon as `epochs` epochs are saved; the run's id."""
    process = _train_until(settings, checkpoints, epochs, env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    return next(checkpoints.iterdir()).name


@pytest.mark.slow
def test_a_killed_run_resumes_from_its_last_epoch_and_logs_each_step_once(tracking_uri, tmp_path):
    checkpoints = tmp_path / "checkpoints"
    settings = {**SETTINGS, "checkpoint_dir": str(checkpoints), "image_cache": str(tmp_path / "images")}
    run_id = _kill_after_epochs(settings, checkpoints, 2, {"MLFLOW_TRACKING_URI": tracking_uri})
    assert mlflow.get_run(run_id).info.status == "RUNNING"  # killed: nobody ended it

    out = run_cli("train", "--variant", "baseline", *_args(settings), "--resume", run_id,
                  env={"MLFLOW_TRACKING_URI": tracking_uri})
    assert out.returncode == 0, out.stderr[-3000:]
    assert "Epoch 3/4" in out.stdout and "Epoch 4/4" in out.stdout
    assert "Epoch 1/4" not in out.stdout and "Epoch 2/4" not in out.stdout  # only epochs 3-4 trained

    run = mlflow.get_run(run_id)
    assert run.info.status == "FINISHED" and run.data.tags["histoflow.resumed_at_epoch"] in ("2", "3")
    client = mlflow.MlflowClient()
    for key in EPOCH_KEYS:
        steps = sorted(m.step for m in client.get_metric_history(run_id, key))
        assert steps == [0, 1, 2, 3], key
    for key in ("n_params", "train_time_s", "epochs_run", "test_roc_auc"):
        assert len(client.get_metric_history(run_id, key)) == 1, key
    assert run.data.metrics["epochs_run"] == 4
    assert len(mlflow.search_runs(experiment_ids=[run.info.experiment_id])) == 1  # no second run
    assert not (checkpoints / run_id).exists()  # the finished run's checkpoint is removed


@pytest.mark.slow
def test_a_resume_that_cannot_continue_fails_and_changes_nothing(tracking_uri, tmp_path):
    checkpoints = tmp_path / "checkpoints"
    settings = {**SETTINGS, "checkpoint_dir": str(checkpoints), "image_cache": str(tmp_path / "images")}
    with pytest.raises(ConfigError, match="there is no run 0123abcd"):
        training_run.run(make_train_config("baseline", **settings, resume="0123abcd"))
    run_id = _kill_after_epochs(settings, checkpoints, 1, {"MLFLOW_TRACKING_URI": tracking_uri})
    before = mlflow.get_run(run_id)
    files = sorted(p.name for p in (checkpoints / run_id).iterdir())

    with pytest.raises(ConfigError, match=r"other settings \(learning_rate=0.001 there, 0.01 here\)"):
        training_run.run(make_train_config("baseline", **settings, learning_rate=0.01, resume=run_id))
    with pytest.raises(ConfigError, match="has no checkpoint in"):
        training_run.run(make_train_config("baseline", **{**settings, "checkpoint_dir": str(tmp_path / "x")},
                                           resume=run_id))
    after = mlflow.get_run(run_id)
    assert after.data.to_dictionary() == before.data.to_dictionary() and after.info.status == before.info.status
    assert sorted(p.name for p in (checkpoints / run_id).iterdir()) == files


def _mlflow_server(root: Path, port: int) -> subprocess.Popen:
    process = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", f"sqlite:///{root / 'server.db'}",
         "--artifacts-destination", str(root / "artifacts"), "--host", "127.0.0.1", "--port", str(port),
         "--workers", "1"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    wait_for(f"http://127.0.0.1:{port}/health", process)
    return process


def _stop(process: subprocess.Popen) -> None:
    process.terminate()
    process.wait(timeout=60)


def _assert_each_step_once(uri: str, run_id: str, epochs: int) -> None:
    client = mlflow.MlflowClient(uri)
    for key in EPOCH_KEYS:
        assert sorted(m.step for m in client.get_metric_history(run_id, key)) == list(range(epochs)), key
    assert len(client.get_metric_history(run_id, "test_roc_auc")) == 1
    assert client.get_run(run_id).info.status == "FINISHED"


@pytest.mark.slow
def test_training_goes_on_through_a_tracking_server_outage(tmp_path):
    port = free_port()
    uri = f"http://127.0.0.1:{port}"
    server = _mlflow_server(tmp_path, port)
    checkpoints = tmp_path / "checkpoints"
    settings = {**SETTINGS, "checkpoint_dir": str(checkpoints), "image_cache": str(tmp_path / "images")}
    training = _train_until(settings, checkpoints, 1, {"MLFLOW_TRACKING_URI": uri}, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT)
    try:
        _stop(server)  # gone after epoch 1 ...
        time.sleep(20)
        server = _mlflow_server(tmp_path, port)  # ... and back ~20 s later
        out, _ = training.communicate(timeout=900)
        assert training.returncode == 0, out[-3000:]
        run_id = out.rsplit("(run ", 1)[1].split(")")[0]
        _assert_each_step_once(uri, run_id, 4)
    finally:
        training.kill()
        _stop(server)


@pytest.mark.slow
def test_a_server_down_for_good_keeps_the_training_and_a_resume_uploads_it(tmp_path):
    port = free_port()
    uri = f"http://127.0.0.1:{port}"
    server = _mlflow_server(tmp_path, port)
    checkpoints = tmp_path / "checkpoints"
    settings = {**SETTINGS, "checkpoint_dir": str(checkpoints), "image_cache": str(tmp_path / "images")}
    env = {"MLFLOW_TRACKING_URI": uri, "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "5"}
    training = _train_until(settings, checkpoints, 1, env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        _stop(server)
        _, err = training.communicate(timeout=900)
    finally:
        training.kill()
    assert training.returncode == 2, err[-3000:]
    run_id = next(checkpoints.iterdir()).name
    assert f"the tracking server {uri} stopped answering" in err
    assert f"kept in {checkpoints / run_id}" in err and f"--resume {run_id}" in err

    server = _mlflow_server(tmp_path, port)
    try:
        out = run_cli("train", "--variant", "baseline", *_args(settings), "--resume", run_id,
                      env={"MLFLOW_TRACKING_URI": uri})
        assert out.returncode == 0, out.stderr[-3000:]
        _assert_each_step_once(uri, run_id, 4)
    finally:
        _stop(server)
