"""The team setup of docs/team-server.md, for real: `mlflow server` on the local PostgreSQL with proxied
artifacts in an S3 bucket (moto's S3 server) and MLflow's basic authentication. Training, a tuning study and
a promotion work with MLFLOW_TRACKING_URI and the user's name and password alone (the client has no S3
credentials), and the artifacts land in the bucket; a user the server refuses is told so."""

from __future__ import annotations

import base64
import contextlib
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import boto3
import mlflow
import numpy as np
import pandas as pd
import pytest
from mlflow.tracking import MlflowClient

from conftest import BREAKHIS, IDC, REPO, TRACKING_SERVER_ENV, free_port, postgres_database, wait_for
from histoflow.modeling import training_run
from histoflow.modeling.variants import make_train_config
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
    server_env = {**os.environ, **S3_ENV, **TRACKING_SERVER_ENV, "MLFLOW_S3_ENDPOINT_URL": s3_url,
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


@pytest.mark.slow
def test_train_tune_and_promote_through_the_team_server(team_server, postgres_url, keras_home, tmp_path,
                                                         monkeypatch):
    uri, s3_url, _ = team_server
    # The client knows the server's URI and its user's name and password, nothing else: no S3 endpoint or keys.
    for name in (*S3_ENV, "MLFLOW_S3_ENDPOINT_URL", "AWS_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    for name, value in ADMIN.items():
        monkeypatch.setenv(name, value)
    monkeypatch.chdir(tmp_path)

    trained = training_run.run(make_train_config("baseline", data_dir=str(BREAKHIS), max_images=60, epochs=1,
                                                 image_size=32, batch_size=16, gradcam_per_class=1, experiment="team"))
    study = tuning.run(make_tune_config(
        "transfer", data_dir=str(IDC), max_images=120, image_size=32, batch_size=16, backbone="mobilenet",
        alpha=0.75, weights="imagenet", epochs=1, gradcam_per_class=0, experiment="team", n_trials=2,
        trial_epochs=2, pruner="none", study_name="team-study", storage=postgres_database(postgres_url, "optuna"),
        cache_dir=str(tmp_path / "cache"), final="false"))  # trials only: a final run is a training run as above
    policy = load_policy()
    version = register("team", "validation_roc_auc", MODEL, policy.aliases)
    decision = promote(MODEL, policy)

    client = MlflowClient()
    assert study.final_run_id is None and study.best_trial is not None  # final=false: the trials only
    runs = [client.get_run(r) for r in (trained, study.parent_run_id)]
    assert all(r.info.status == "FINISHED" for r in runs)
    assert all(r.info.artifact_uri.startswith("mlflow-artifacts:/") for r in runs)  # proxied by the server
    assert decision["decision"] == "promoted"
    assert client.get_model_version_by_alias(MODEL, "champion").version == version.version

    keys = _keys(s3_url)
    assert any(k.endswith(f"{trained}/artifacts/keras/baseline_cnn.keras") for k in keys)
    assert any(f"{study.parent_run_id}/artifacts/" in k for k in keys)  # the study's plots and best params
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
