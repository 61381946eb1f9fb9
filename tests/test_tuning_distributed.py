"""Workers sharing one study on a real PostgreSQL: two `histoflow tune` processes, one SIGKILLed in the
middle of a trial and then restarted; the study still ends with its trials, each once in MLflow, the
dead worker's trial is failed (MLflow run KILLED) and queued again instead of staying RUNNING, and one
worker only trains the study's final run."""

from __future__ import annotations

import collections
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
from mlflow.tracking import MlflowClient
from optuna.trial import FrozenTrial, TrialState

from conftest import IDC, postgres_database
from histoflow.data.step import prepare_data
from histoflow.errors import ConfigError
from histoflow.tuning import study as tuning
from histoflow.tuning.feature_cache import load_or_extract
from histoflow.tuning.settings import make_tune_config

STUDY = "distributed"
N_TRIALS = 4
HEARTBEAT, GRACE = 2, 6  # seconds: a dead worker's trial is found within seconds, not minutes
DATA = {"data_dir": str(IDC), "max_images": 120, "image_size": 32, "batch_size": 16, "backbone": "mobilenet",
        "alpha": 0.75, "weights": "imagenet", "epochs": 1, "gradcam_per_class": 0}
TUNE = {"n_trials": N_TRIALS, "trial_epochs": 4, "pruner": "none", "study_name": STUDY,
        "heartbeat_interval": HEARTBEAT, "grace_period": GRACE}


def _mlflow_database(postgres_url: str) -> str:
    """A second database beside the Optuna one: two processes writing one SQLite store lock each other."""
    url = postgres_database(postgres_url, "mlflow")
    MlflowClient(url).search_experiments()  # creates MLflow's tables once, not in two workers at the same time
    return url


def _worker(settings: dict, env: dict, cwd: Path, name: str) -> subprocess.Popen:
    args = [f"--{k}={v}" for k, v in settings.items()]
    log = (cwd / f"{name}.log").open("w")  # a file, not a pipe nobody reads while the worker runs
    return subprocess.Popen([sys.executable, "-m", "histoflow.cli", "tune", "--variant", "transfer", *args],
                            stdout=log, stderr=subprocess.STDOUT, cwd=cwd, env=env)


def _running(study: optuna.Study, owner: str) -> list[FrozenTrial]:
    return [t for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
            if t.user_attrs.get("worker") == owner and "mlflow_run_id" in t.user_attrs]


def _kill_mid_trial(worker: subprocess.Popen, study: optuna.Study, timeout: float = 180) -> FrozenTrial:
    """SIGKILL the worker while it runs a trial (with its MLflow run open); returns that trial."""
    owner = f"{socket.gethostname()}:{worker.pid}"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert worker.poll() is None, "the worker to kill ended before it was seen running a trial"
        if _running(study, owner):
            worker.send_signal(signal.SIGSTOP)  # frozen, it cannot finish the trial between the look and the kill
            running = _running(study, owner)
            if running:
                worker.kill()
                worker.wait()
                return running[0]
            worker.send_signal(signal.SIGCONT)
        time.sleep(0.2)
    raise TimeoutError(f"worker {owner} ran no trial within {timeout} s")


def _finish(worker: subprocess.Popen, log: Path, timeout: float = 300) -> None:
    assert worker.wait(timeout) == 0, log.read_text()[-3000:]


@pytest.mark.slow
def test_workers_share_a_study_and_a_killed_workers_trial_is_failed_and_retried(postgres_url, keras_home,
                                                                                   tmp_path, monkeypatch):
    mlflow_url = _mlflow_database(postgres_url)
    settings = {**DATA, **TUNE, "storage": postgres_url, "cache_dir": str(tmp_path / "cache")}
    config = make_tune_config("transfer", **settings)
    load_or_extract(config.train, prepare_data(config.train), config.cache_dir)  # once, not in every worker
    env = {**os.environ, "MLFLOW_TRACKING_URI": mlflow_url}

    doomed = _worker(settings, env, tmp_path, "doomed")
    survivor = _worker(settings, env, tmp_path, "survivor")
    study = None
    while study is None:  # the workers create it
        assert doomed.poll() is None, (tmp_path / "doomed.log").read_text()[-3000:]
        try:
            study = optuna.load_study(study_name=STUDY, storage=postgres_url)
        except KeyError:
            time.sleep(0.5)
    killed = _kill_mid_trial(doomed, study)
    time.sleep(GRACE)  # no heartbeat for a grace period: any worker starting a trial now fails it
    restarted = _worker(settings, env, tmp_path, "restarted")  # as a supervisor would
    _finish(survivor, tmp_path / "survivor.log")
    _finish(restarted, tmp_path / "restarted.log")

    trials = optuna.load_study(study_name=STUDY, storage=postgres_url).get_trials(deepcopy=False)
    states = collections.Counter(t.state for t in trials)
    # Live workers each finish the trial they hold when the study fills: one extra at most with two.
    assert N_TRIALS <= states[TrialState.COMPLETE] + states[TrialState.PRUNED] <= N_TRIALS + 1
    assert states[TrialState.RUNNING] == 0
    assert trials[killed.number].state == TrialState.FAIL
    retries = [t for t in trials if t.system_attrs.get("failed_trial") == killed.number]
    assert all(t.params == killed.params for t in retries) and len(retries) <= 1

    client = MlflowClient(mlflow_url)
    experiments = [e.experiment_id for e in client.search_experiments()]
    runs = client.search_runs(experiments, f"tags.`optuna.study_name` = '{STUDY}' and "
                                           "tags.`histoflow.step` = 'tune-trial'")
    per_trial = collections.Counter(int(r.data.tags["optuna.trial_number"]) for r in runs)
    assert max(per_trial.values()) == 1, per_trial
    by_number = {int(r.data.tags["optuna.trial_number"]): r for r in runs}
    for trial in trials:
        if trial.state in (TrialState.COMPLETE, TrialState.PRUNED):
            run = by_number[trial.number]
            assert run.info.run_id == trial.user_attrs["mlflow_run_id"] and run.info.status == "FINISHED"
            assert run.data.tags["state"] == tuning.STATE_TAGS[trial.state]
    # One final run for the study, by the last worker to finish; the other ended after its trials.
    finals = client.search_runs(experiments,
                                f"tags.`optuna.study_name` = '{STUDY}' and tags.`histoflow.step` = 'train'")
    assert len(finals) == 1 and finals[0].info.status == "FINISHED", [r.info.run_id for r in finals]
    logs = [(tmp_path / f"{name}.log").read_text() for name in ("survivor", "restarted")]
    assert sum("training it in full" in log for log in logs) == 1
    assert sum("the last of them trains the final run" in log or "its final run is" in log for log in logs) == 1
    dead = client.get_run(killed.user_attrs["mlflow_run_id"])
    assert dead.info.status == "KILLED" and dead.data.tags["state"] == "failed"
    assert dead.data.tags["optuna.stale"] == "true"
    assert client.get_run(dead.data.tags["mlflow.parentRunId"]).info.status == "KILLED"  # the dead worker's study run


def test_a_grace_period_must_outlast_the_heartbeat_interval():
    with pytest.raises(ConfigError, match="grace_period must be longer than heartbeat_interval"):
        make_tune_config("transfer", heartbeat_interval=10, grace_period=10)
    with pytest.raises(ConfigError, match="heartbeat_interval must be >= 0"):
        make_tune_config("transfer", heartbeat_interval=-1)
    assert make_tune_config("transfer", heartbeat_interval=0).heartbeat_interval == 0  # 0 = off
