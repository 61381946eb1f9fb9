"""The team setup of docs/team-server.md, for real: `mlflow server` on the local PostgreSQL with proxied
artifacts in an S3 bucket (moto's S3 server) and MLflow's basic authentication. A study's tuning workers
(`histoflow tune` processes sharing one Optuna study on PostgreSQL, one SIGKILLed mid-trial and restarted),
its final training run, a registration and a promotion work with MLFLOW_TRACKING_URI and the user's name and
password alone (no S3 credentials), the artifacts land in the bucket, the champion is served back through the
proxy; a user the server refuses is told so.

The workers: the study still ends with its trials, each once in MLflow; the dead worker's trial is failed
(its MLflow run KILLED) and queued again instead of staying RUNNING; one worker only trains the final run."""

from __future__ import annotations

import base64
import collections
import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import boto3
import mlflow
import numpy as np
import optuna
import pandas as pd
import pytest
from mlflow.tracking import MlflowClient
from optuna.trial import FrozenTrial, TrialState

from conftest import BREAKHIS, IDC, REPO, free_port, postgres_database, wait_for
from histoflow.data.step import prepare_data
from histoflow.registry.aliases import register, rollback
from histoflow.registry.policy import load_policy
from histoflow.registry.promotion import promote
from histoflow.registry.selection import RegistryError
from histoflow.tuning import study as tuning
from histoflow.tuning.settings import make_tune_config

BUCKET = "histoflow-artifacts"
S3_ENV = {"AWS_ACCESS_KEY_ID": "team-key", "AWS_SECRET_ACCESS_KEY": "team-secret", "AWS_DEFAULT_REGION": "us-east-1"}
MODEL = "histoflow-team"
ADMIN = {"MLFLOW_TRACKING_USERNAME": "admin", "MLFLOW_TRACKING_PASSWORD": "a long admin secret"}
# docs/team-server.md's basic_auth.ini, with the user store in a SQLite file.
AUTH_INI = """[mlflow]
default_permission = READ
database_uri = sqlite:///{root}/basic_auth.db
admin_username = admin
authorization_function = mlflow.server.auth:authenticate_request_basic_auth
auth_cache_ttl_seconds = 60
"""
STUDY, N_TRIALS = "team-study", 4
HEARTBEAT, GRACE = 2, 6  # seconds: a dead worker's trial is found within seconds, not minutes
TUNE = {"data_dir": str(IDC), "max_images": 120, "image_size": 32, "batch_size": 16, "backbone": "mobilenet",
        "alpha": 0.75, "weights": "imagenet", "epochs": 1, "gradcam_per_class": 0, "experiment": "team",
        "n_trials": N_TRIALS, "trial_epochs": 4, "pruner": "none", "study_name": STUDY,
        "heartbeat_interval": HEARTBEAT, "grace_period": GRACE}


def _start(command: list[str], env: dict, log: Path) -> subprocess.Popen:
    return subprocess.Popen(command, stdout=log.open("w"), stderr=subprocess.STDOUT, env=env)


@pytest.fixture(scope="module")
def team_server(postgres_url, tmp_path_factory):
    """(tracking URI, S3 endpoint, server pid): moto's S3 server with a bucket, and mlflow server in front of both
    stores."""
    root = tmp_path_factory.mktemp("team")
    s3_port, mlflow_port = free_port(), free_port()
    s3_url = f"http://127.0.0.1:{s3_port}"
    s3 = _start([str(Path(sys.executable).with_name("moto_server")), "-H", "127.0.0.1", "-p", str(s3_port)],
                {**os.environ, **S3_ENV}, root / "s3.log")
    wait_for(s3_url, s3, timeout=60)
    boto3.client("s3", endpoint_url=s3_url, **_credentials()).create_bucket(Bucket=BUCKET)

    backend = postgres_database(postgres_url, "team")
    (root / "basic_auth.ini").write_text(AUTH_INI.format(root=root))
    server_env = {**os.environ, **S3_ENV, "MLFLOW_S3_ENDPOINT_URL": s3_url,
                  "MLFLOW_AUTH_CONFIG_PATH": str(root / "basic_auth.ini"),
                  "MLFLOW_AUTH_ADMIN_PASSWORD": ADMIN["MLFLOW_TRACKING_PASSWORD"],
                  "MLFLOW_FLASK_SERVER_SECRET_KEY": "the team's csrf secret"}
    server_env.pop("MLFLOW_TRACKING_URI", None)
    server = _start([sys.executable, "-m", "mlflow", "server", "--app-name", "basic-auth", "--backend-store-uri",
                     backend, "--artifacts-destination", f"s3://{BUCKET}/mlflow", "--host", "127.0.0.1",
                     "--port", str(mlflow_port), "--workers", "1"], server_env, root / "server.log")
    uri = f"http://127.0.0.1:{mlflow_port}"
    try:
        try:
            wait_for(f"{uri}/health", server, timeout=180)
        except (RuntimeError, TimeoutError):
            pytest.fail((root / "server.log").read_text()[-3000:])
        yield uri, s3_url, server.pid
    finally:
        for process in (server, s3):
            process.terminate()
            process.wait(30)


def _credentials() -> dict:
    return {"aws_access_key_id": S3_ENV["AWS_ACCESS_KEY_ID"], "aws_secret_access_key": S3_ENV["AWS_SECRET_ACCESS_KEY"],
            "region_name": S3_ENV["AWS_DEFAULT_REGION"]}


def _keys(s3_url: str) -> list[str]:
    client = boto3.client("s3", endpoint_url=s3_url, **_credentials())
    pages = client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET)
    return [item["Key"] for page in pages for item in page.get("Contents", [])]


def _worker(settings: dict, cwd: Path, name: str) -> subprocess.Popen:
    """`histoflow tune` as a team member starts it: this process's environment (the server's URI, the user)."""
    args = [f"--{k}={v}" for k, v in settings.items()]
    log = (cwd / f"{name}.log").open("w")  # a file, not a pipe nobody reads while the worker runs
    return subprocess.Popen([sys.executable, "-m", "histoflow.cli", "tune", "--variant", "transfer", *args],
                            stdout=log, stderr=subprocess.STDOUT, cwd=cwd)


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


def _tune_with_workers(settings: dict, cwd: Path) -> optuna.trial.FrozenTrial:
    """Two workers on one study, one SIGKILLed mid-trial and restarted after the grace period, as a supervisor
    would; the killed trial once both survivors have ended."""
    doomed = _worker(settings, cwd, "doomed")
    survivor = _worker(settings, cwd, "survivor")
    study = None
    while study is None:  # the workers create it
        assert doomed.poll() is None, (cwd / "doomed.log").read_text()[-3000:]
        try:
            study = optuna.load_study(study_name=STUDY, storage=settings["storage"])
        except KeyError:
            time.sleep(0.5)
    killed = _kill_mid_trial(doomed, study)
    time.sleep(GRACE)  # no heartbeat for a grace period: any worker starting a trial now fails it
    restarted = _worker(settings, cwd, "restarted")
    _finish(survivor, cwd / "survivor.log")
    _finish(restarted, cwd / "restarted.log")
    return killed


def _check_workers(killed: FrozenTrial, storage: str, cwd: Path):
    """The study's trials and MLflow runs after the workers; returns the study's one final run."""
    trials = optuna.load_study(study_name=STUDY, storage=storage).get_trials(deepcopy=False)
    states = collections.Counter(t.state for t in trials)
    # Live workers each finish the trial they hold when the study fills: one extra at most with two.
    assert N_TRIALS <= states[TrialState.COMPLETE] + states[TrialState.PRUNED] <= N_TRIALS + 1
    assert states[TrialState.RUNNING] == 0
    assert trials[killed.number].state == TrialState.FAIL
    retries = [t for t in trials if t.system_attrs.get("failed_trial") == killed.number]
    assert all(t.params == killed.params for t in retries) and len(retries) <= 1

    client = MlflowClient()
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
    logs = [(cwd / f"{name}.log").read_text() for name in ("survivor", "restarted")]
    assert sum("training it in full" in log for log in logs) == 1
    assert sum("the last of them trains the final run" in log or "its final run is" in log for log in logs) == 1
    dead = client.get_run(killed.user_attrs["mlflow_run_id"])
    assert dead.info.status == "KILLED" and dead.data.tags["state"] == "failed"
    assert dead.data.tags["optuna.stale"] == "true"
    assert client.get_run(dead.data.tags["mlflow.parentRunId"]).info.status == "KILLED"  # the dead worker's study run
    return finals[0]


@pytest.mark.slow
def test_a_study_s_workers_then_register_promote_and_serve_through_the_team_server(team_server, postgres_url,
                                                                                   keras_home, tmp_path,
                                                                                   monkeypatch):
    uri, s3_url, _ = team_server
    # The team's clients know the server's URI and their user's name and password, nothing else: no S3 endpoint
    # or keys (the workers inherit this environment).
    for name in (*S3_ENV, "MLFLOW_S3_ENDPOINT_URL", "AWS_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    mlflow.set_tracking_uri(uri)  # over an earlier test's in this process
    for name, value in ADMIN.items():
        monkeypatch.setenv(name, value)
    monkeypatch.chdir(tmp_path)
    settings = {**TUNE, "storage": postgres_database(postgres_url, "optuna"), "cache_dir": str(tmp_path / "cache")}
    config = make_tune_config("transfer", **settings)
    tuning.study_features(config, tuning.study_parts(config, prepare_data(config.train)))  # once, not per worker

    final = _check_workers(_tune_with_workers(settings, tmp_path), settings["storage"], tmp_path)
    # The gate's floors are tests/test_registry.py's: here any challenger is promoted (no champion yet).
    policy = load_policy(min_balanced_accuracy=0)
    version = register("team", "validation_roc_auc", MODEL, policy.aliases)
    decision = promote(MODEL, policy)

    client = MlflowClient()
    assert version.tags["run_id"] == final.info.run_id  # the study's final run: the experiment's only training run
    study_run = client.get_run(final.data.tags["optuna.parent_run_id"])
    assert study_run.info.status == "FINISHED"
    assert all(r.info.artifact_uri.startswith("mlflow-artifacts:/") for r in (final, study_run))  # proxied
    assert decision["decision"] == "promoted"
    assert client.get_model_version_by_alias(MODEL, "champion").version == version.version

    keys = _keys(s3_url)
    assert any(k.endswith(f"{final.info.run_id}/artifacts/keras/mobilenet_fusion.keras") for k in keys)
    assert any(f"{study_run.info.run_id}/artifacts/" in k for k in keys)  # the study's plots and best params
    assert any(k.endswith(f"{decision['promote_run_id']}/artifacts/promotion/decision.json") for k in keys)

    # Back out through the proxy: the champion loads and scores a real image on a client without S3 access.
    champion = mlflow.pyfunc.load_model(f"models:/{MODEL}@champion")
    image = base64.b64encode(next(BREAKHIS.rglob("*.png")).read_bytes()).decode()
    out = champion.predict(pd.DataFrame({"image": [image]}))
    probabilities = out["probabilities"][0]
    assert out["model_label"][0] in probabilities and np.isclose(sum(probabilities.values()), 1.0, atol=1e-4)

    # A user the server does not let read the model: promote stops with the server's answer; it must not take
    # the refusal for "no @champion yet" and promote the challenger against nothing.
    from mlflow.server import get_app_client

    auth = get_app_client("basic-auth", tracking_uri=uri)
    auth.create_user("bob", "bob's own secret")
    auth.grant_user_permission("bob", "registered_model", MODEL, "DENY")
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "bob")
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "bob's own secret")
    with pytest.raises(RegistryError, match=f"cannot read @challenger of model '{MODEL}' from {uri}: "
                                            "PERMISSION_DENIED") as refused:
        promote(MODEL, policy)
    assert isinstance(refused.value.__cause__, mlflow.exceptions.MlflowException)
    with pytest.raises(RegistryError, match="PERMISSION_DENIED"):
        rollback(MODEL, policy.aliases)


def _child_commands(pid: int) -> list[str]:
    """The command lines of `pid`'s child processes (`mlflow server` starts its uvicorn and its job runner)."""
    commands = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        for child in (task / "children").read_text().split():
            with contextlib.suppress(OSError):  # ended since the listing
                commands.append(Path(f"/proc/{child}/cmdline").read_bytes().replace(b"\0", b" ").decode())
    return commands


@pytest.mark.slow
def test_server_health_and_host_check(team_server):
    uri, _, pid = team_server
    # As docs/team-server.md starts it: without MLflow's GenAI job runners (a Huey consumer per kind of job).
    assert "export MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false" in (REPO / "docs" / "team-server.md").read_text()
    commands = _child_commands(pid)
    assert any("uvicorn" in c for c in commands) and not any("mlflow.server.jobs" in c for c in commands), commands
    with urllib.request.urlopen(f"{uri}/health", timeout=10) as response:
        assert response.status == 200
    # The server answers only the hosts it was told about (--allowed-hosts); localhost by default.
    request = urllib.request.Request(f"{uri}/api/2.0/mlflow/experiments/search?max_results=1",
                                     headers={"Host": "evil.example.com"})
    start = time.monotonic()
    with pytest.raises(urllib.error.HTTPError) as error:
        urllib.request.urlopen(request, timeout=10)
    assert 400 <= error.value.code < 500 and time.monotonic() - start < 10
