"""A training run killed mid-way and resumed: only the missing epochs train, every metric step once."""

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import keras
import mlflow
import pytest

from conftest import BREAKHIS, free_port, new_sqlite_database, start_server, wait_for
from histoflow.errors import ConfigError
from histoflow.modeling import training_run
from histoflow.modeling.variants import make_train_config

# Epochs long enough (~1 s) for the killed run to be killed between two of them.
SETTINGS = {"data_dir": str(BREAKHIS), "max_images": 240, "image_size": 32, "batch_size": 16, "epochs": 4,
            "patience": 10, "lr_patience": 10, "gradcam_per_class": 0, "bootstrap": 0}
# The outage tests stop the training while the server goes away: their epochs need not be long.
OUTAGE_SETTINGS = {**SETTINGS, "max_images": 120}
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
            _, err = process.communicate()
            pytest.fail(f"training ended or stalled before epoch {epochs} was saved: {(err or '')[-3000:]}")
        time.sleep(0.02)
    return process


def _kill_after_epochs(settings: dict, checkpoints: Path, epochs: int, env: dict) -> str:
    """Start `histoflow train`, SIGKILL it as soon as `epochs` epochs are saved; the run's id."""
    process = _train_until(settings, checkpoints, epochs, env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    return next(checkpoints.iterdir()).name


@pytest.mark.slow
def test_a_killed_run_resumes_from_its_last_epoch_and_only_as_itself(tracking_uri, tmp_path, capfd):
    """Killed after 2 of 4 epochs: a resume that cannot continue (no such run, other settings, no checkpoint)
    fails and changes nothing; the resume trains epochs 3 and 4 only, in the same run, each step logged once."""
    checkpoints = tmp_path / "checkpoints"
    settings = {**SETTINGS, "checkpoint_dir": str(checkpoints), "image_cache": str(tmp_path / "images")}
    with pytest.raises(ConfigError, match="there is no run 0123abcd"):
        training_run.run(make_train_config("baseline", **settings, resume="0123abcd"))
    run_id = _kill_after_epochs(settings, checkpoints, 2, {"MLFLOW_TRACKING_URI": tracking_uri})
    before = mlflow.get_run(run_id)
    assert before.info.status == "RUNNING"  # killed: nobody ended it
    files = sorted(p.name for p in (checkpoints / run_id).iterdir())
    with pytest.raises(ConfigError, match=r"other settings \(learning_rate=0.001 there, 0.01 here\)"):
        training_run.run(make_train_config("baseline", **settings, learning_rate=0.01, resume=run_id))
    with pytest.raises(ConfigError, match="has no checkpoint in"):
        training_run.run(make_train_config("baseline", **{**settings, "checkpoint_dir": str(tmp_path / "x")},
                                           resume=run_id))
    after = mlflow.get_run(run_id)
    assert after.data.to_dictionary() == before.data.to_dictionary() and after.info.status == before.info.status
    assert sorted(p.name for p in (checkpoints / run_id).iterdir()) == files

    capfd.readouterr()
    assert training_run.run(make_train_config("baseline", **settings, resume=run_id)) == run_id
    out = capfd.readouterr().out
    assert "Epoch 3/4" in out and "Epoch 4/4" in out
    assert "Epoch 1/4" not in out and "Epoch 2/4" not in out  # only epochs 3-4 trained
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


class _Server:
    """`mlflow server` on a SQLite store and a local artifact folder, reached through a TCP relay on another port
    (`uri`): `stop()` drops every connection at once and refuses new ones, as a crashed machine or a lost network
    does to its clients (a graceful stop would wait for the open connection of a training held with SIGSTOP);
    `start()` takes connections again on the same port. The server process itself runs throughout: starting
    `mlflow server` a second time costs ~12 CPU seconds for what the clients see either way."""

    def __init__(self, root: Path) -> None:
        self.root, self.port, self.relay_port = root, free_port(), free_port()
        new_sqlite_database(root / "server.db")
        self.uri = f"http://127.0.0.1:{self.relay_port}"
        self.process = start_server(
            [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", f"sqlite:///{root / 'server.db'}",
             "--artifacts-destination", str(root / "artifacts"), "--host", "127.0.0.1", "--port", str(self.port),
             "--workers", "1"])
        self.listener: socket.socket | None = None
        self.connections: set[socket.socket] = set()
        self.lock = threading.Lock()
        wait_for(f"http://127.0.0.1:{self.port}/health", self.process)

    def start(self) -> None:
        self.listener = socket.create_server(("127.0.0.1", self.relay_port))  # SO_REUSEADDR: the same port again
        threading.Thread(target=self._accept, args=(self.listener,), daemon=True).start()
        wait_for(f"{self.uri}/health", self.process)

    def stop(self) -> None:
        with contextlib.suppress(OSError):
            self.listener.shutdown(socket.SHUT_RDWR)  # wakes the accepting thread
        self.listener.close()
        with self.lock:
            connections, self.connections = self.connections, set()
        for connection in connections:
            with contextlib.suppress(OSError):
                connection.shutdown(socket.SHUT_RDWR)
            connection.close()

    def close(self) -> None:
        self.stop()
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait(timeout=30)

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:  # stopped
                return
            try:
                upstream = socket.create_connection(("127.0.0.1", self.port))
            except OSError:
                client.close()
                continue
            with self.lock:
                self.connections |= {client, upstream}
            for source, target in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(source, target), daemon=True).start()

    @staticmethod
    def _pump(source: socket.socket, target: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while data := source.recv(65536):
                target.sendall(data)
        for end in (source, target):  # one side closed: the other learns it
            with contextlib.suppress(OSError):
                end.shutdown(socket.SHUT_RDWR)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    server = _Server(tmp_path_factory.mktemp("server"))
    server.start()
    yield server
    server.close()


def _assert_each_step_once(uri: str, run_id: str, epochs: int) -> None:
    client = mlflow.MlflowClient(uri)
    for key in EPOCH_KEYS:
        assert sorted(m.step for m in client.get_metric_history(run_id, key)) == list(range(epochs)), key
    assert len(client.get_metric_history(run_id, "test_roc_auc")) == 1
    assert client.get_run(run_id).info.status == "FINISHED"


def _wait_for_file(path: Path, process: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert process.poll() is None and time.monotonic() < deadline, f"{path} did not appear"
        time.sleep(0.05)


# Without retries, MLflow's asynchronous logging gives up on an epoch at once: what it does after minutes of
# retries in a long outage (7.5 minutes lost every epoch of a run that still ended FINISHED).
NO_RETRIES = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "5"}


def _held_after_first_epoch(settings: dict, waits: tuple[str, str], server: _Server, tmp_path: Path):
    """Two trainings against the server, each held (SIGSTOP) as soon as its first epoch is saved; their
    checkpoint folders, settings and processes. (One after the other: with MLflow's retries off, two runs
    created at once on the server's SQLite store can find it locked.)"""
    held = []
    for name, wait in zip(("waits", "gives-up"), waits, strict=True):
        checkpoints = tmp_path / name / "checkpoints"
        run = {**settings, "checkpoint_dir": str(checkpoints), "image_cache": str(tmp_path / name / "images")}
        env = {"MLFLOW_TRACKING_URI": server.uri, **NO_RETRIES, "HISTOFLOW_TRACKING_WAIT": wait}
        training = _train_until(run, checkpoints, 1, env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        training.send_signal(signal.SIGSTOP)
        held.append((checkpoints, run, training))
    return held


@pytest.mark.slow
def test_a_tracking_outage_loses_no_metric_and_a_server_down_for_good_keeps_the_training(server, tmp_path,
                                                                                        monkeypatch):
    """The server goes away after the first epoch of two trainings and comes back only after both have ended:
    the one that waits for it (HISTOFLOW_TRACKING_WAIT) uploads the epochs MLflow never received and ends
    FINISHED with every step once, its training time not counting the wait; the one that gives up first exits
    with status 2 and keeps its training, which a resume then uploads."""
    started = time.monotonic()
    (waits_dir, _, waits), (gives_up_dir, gives_up_settings, gives_up) = _held_after_first_epoch(
        OUTAGE_SETTINGS, ("300", "3"), server, tmp_path)
    try:
        try:
            server.stop()  # gone while both are held: their next epochs are trained without it
        finally:
            for training in (waits, gives_up):
                training.send_signal(signal.SIGCONT)
        waits_id, gives_up_id = next(waits_dir.iterdir()).name, next(gives_up_dir.iterdir()).name
        _wait_for_file(waits_dir / waits_id / "done", waits)
        trained = time.monotonic() - started  # process start, data, every epoch: more than the training alone
        _, gave_up = gives_up.communicate(timeout=600)
        assert gives_up.returncode == 2, gave_up[-3000:]
        server.start()  # back once both trainings have ended
        out, err = waits.communicate(timeout=600)
    finally:
        waits.kill()
        gives_up.kill()
    assert waits.returncode == 0, err[-3000:]
    assert f"the tracking server {server.uri} does not answer" in out and "answers again" in out
    _assert_each_step_once(server.uri, waits_id, 4)
    assert 0 < mlflow.MlflowClient(server.uri).get_run(waits_id).data.metrics["train_time_s"] < trained
    assert not (waits_dir / waits_id).exists()

    assert f"the tracking server {server.uri} stopped answering" in gave_up
    for noise in ("Add type hints", "oneDNN", "absl::InitializeLog", "TF_ENABLE_ONEDNN_OPTS"):
        assert noise not in gave_up + err, noise  # the command line is quiet: its own lines only
    assert f"kept in {gives_up_dir / gives_up_id}" in gave_up and f"--resume {gives_up_id}" in gave_up
    assert (gives_up_dir / gives_up_id / "done").is_file()  # training had ended: the resume trains nothing
    monkeypatch.setenv("MLFLOW_TRACKING_URI", server.uri)
    mlflow.set_tracking_uri(server.uri)
    assert training_run.run(make_train_config("baseline", **gives_up_settings, resume=gives_up_id)) == gives_up_id
    _assert_each_step_once(server.uri, gives_up_id, 4)
    # The logged model is the trained one, optimizer state included (as an uninterrupted run's).
    path = mlflow.artifacts.download_artifacts(run_id=gives_up_id, artifact_path="keras/baseline_cnn.keras",
                                               dst_path=str(tmp_path / "logged"))
    assert int(keras.saving.load_model(path).optimizer.iterations.numpy()) > 0
