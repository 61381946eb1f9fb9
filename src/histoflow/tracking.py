"""MLflow tracking: where runs go, and the provenance every run carries (data, code, environment)."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import warnings
from importlib import metadata
from pathlib import Path
from typing import Any

import mlflow
import pandas as pd

from histoflow.errors import ConfigError, TrackingError

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"
# How long a finished training waits for an HTTP tracking server that stopped answering before it gives up
# (its checkpoint kept for --resume); seconds.
WAIT_ENV = "HISTOFLOW_TRACKING_WAIT"
DEFAULT_WAIT_S = 600.0
POLL_S = 5.0
# MLflow's asynchronous logging thread otherwise waits on its queue in polls of a second, and every flush (a fit's
# end, a run's end, the process's exit) waits for the poll to time out: ~2 s of every training run spent idle.
# With a buffer it waits on its stop signal instead, and sends what came in during the interval as one batch
# (fewer requests to a team's server). A user's own setting is kept.
ASYNC_BUFFER_ENV, ASYNC_BUFFER_S = "MLFLOW_ASYNC_LOGGING_BUFFERING_SECONDS", "1"


TRACKED_PACKAGES = ("histoflow", "tensorflow", "tensorflow-cpu", "keras", "mlflow", "optuna", "scikit-learn",
                    "numpy", "pandas", "pillow", "boto3")


def tracking_uri() -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI


def check_server(uri: str, timeout: float = 5.0) -> None:
    """Fail at once, naming the URI, when an HTTP tracking server does not answer (MLflow would retry for minutes)."""
    if not uri.startswith(("http://", "https://")):
        return
    try:
        with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout) as response:
            if response.status >= 500:
                raise TrackingError(f"MLflow tracking server {uri} answered HTTP {response.status}")
    except urllib.error.HTTPError as exc:
        if exc.code >= 500:
            raise TrackingError(f"MLflow tracking server {uri} answered HTTP {exc.code}") from None
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise TrackingError(
            f"cannot reach the MLflow tracking server at {uri} ({reason}); start it, or unset "
            f"MLFLOW_TRACKING_URI to use the local {DEFAULT_TRACKING_URI}"
        ) from None


def server_patience() -> float:
    """Seconds to wait for a tracking server that stopped answering: $HISTOFLOW_TRACKING_WAIT, default 600."""
    text = os.environ.get(WAIT_ENV, "").strip()
    try:
        seconds = float(text) if text else DEFAULT_WAIT_S
    except ValueError:
        seconds = -1.0
    if not seconds >= 0:
        raise ConfigError(f"{WAIT_ENV} must be a number of seconds >= 0; got {text!r}")
    return seconds


def wait_for_server(uri: str, what: str, patience: float | None = None) -> None:
    """Return once the tracking store answers: at once for a local store or a server that answers; otherwise
    poll the server every few seconds for up to `patience` seconds (default: server_patience()), saying so,
    and raise TrackingError when it does not come back. `what` says what waits (printed)."""
    if not uri.startswith(("http://", "https://")):
        return
    try:
        check_server(uri)
        return
    except TrackingError as exc:
        down = exc
    patience = server_patience() if patience is None else patience
    print(f"the tracking server {uri} does not answer ({what}): waiting up to {patience:.0f} s for it "
          f"({WAIT_ENV} sets how long)", flush=True)
    start = time.monotonic()
    while time.monotonic() - start < patience:
        time.sleep(min(POLL_S, max(0.0, patience - (time.monotonic() - start))))
        try:
            check_server(uri)
        except TrackingError:
            continue
        print(f"the tracking server {uri} answers again after {time.monotonic() - start:.0f} s", flush=True)
        return
    raise TrackingError(f"the tracking server {uri} did not answer for {patience:.0f} s") from down


def configure(experiment: str = "") -> str:
    """Point MLflow at the tracking store and experiment; returns the tracking URI."""
    os.environ.setdefault(ASYNC_BUFFER_ENV, ASYNC_BUFFER_S)
    uri = tracking_uri()
    check_server(uri)
    mlflow.set_tracking_uri(uri)
    # Under `mlflow run` the run (and so its experiment) already exists: MLFLOW_RUN_ID wins.
    if experiment and not os.environ.get("MLFLOW_RUN_ID"):
        # Then by id: when another process creates the experiment between MLflow's lookup and its create (workers
        # started together), MLflow 3.17's set_experiment returns it without making it the active one, and this
        # process's runs would go to the Default experiment.
        mlflow.set_experiment(experiment_id=mlflow.set_experiment(experiment).experiment_id)
    return uri


def package_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for name in TRACKED_PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return versions


def pinned_requirements(*distributions: str, tensorflow: bool = True) -> list[str]:
    """`name==version` of these installed distributions and (with `tensorflow`) of TensorFlow (the CPU or the
    full wheel): a logged model's pip requirements, given so that MLflow need not infer them (a subprocess that
    imports the model again, ~10 s a model)."""
    pins = [f"{name}=={metadata.version(name)}" for name in distributions]
    if not tensorflow:
        return pins
    for dist in ("tensorflow-cpu", "tensorflow"):
        try:
            return [*pins, f"{dist}=={metadata.version(dist)}"]
        except metadata.PackageNotFoundError:
            continue
    return pins


def git_commit(path: str | os.PathLike = ".") -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=path, capture_output=True, text=True,
                             timeout=5, check=True)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def git_dirty(path: str | os.PathLike = ".") -> bool:
    try:
        out = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=path,
                             capture_output=True, text=True, timeout=5, check=True)
        return bool(out.stdout.strip())
    except (OSError, subprocess.SubprocessError):
        return False


# The MLflow UI opens an experiment of this kind on its model-training view (runs, charts), not on the
# GenAI overview it shows an experiment without the tag.
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
MODEL_TRAINING_KIND = "custom_model_development"


def mark_model_training_experiment() -> None:
    """Tag the active run's experiment as model training, unless its kind was set already."""
    client = mlflow.MlflowClient()
    experiment = client.get_experiment(mlflow.active_run().info.experiment_id)
    if EXPERIMENT_KIND_TAG in experiment.tags:
        return
    try:
        client.set_experiment_tag(experiment.experiment_id, EXPERIMENT_KIND_TAG, MODEL_TRAINING_KIND)
    except mlflow.exceptions.MlflowException:
        # Workers that start together all find the tag missing; MLflow's look-up-then-insert lets only the
        # first insert, the others are refused (a unique-key violation on PostgreSQL). Theirs is set then.
        if EXPERIMENT_KIND_TAG not in client.get_experiment(experiment.experiment_id).tags:
            raise


def ui_link(experiment_id: str, run_id: str) -> str:
    """Where to see a run in the MLflow UI's model-training view: a URL for an HTTP tracking server, else the
    `mlflow ui` command and the page to open. MLflow 3.17's UI opens experiments in its GenAI view,
    whatever the experiment's kind tag says, unless the address asks for workflowType=machine_learning
    (or the user switches to "Model training", which the browser then remembers)."""
    page = f"#/experiments/{experiment_id}/runs/{run_id}?workflowType=machine_learning"
    uri = mlflow.get_tracking_uri()
    if uri.startswith(("http://", "https://")):
        return f"{uri.rstrip('/')}/{page}"
    return f"`mlflow ui --backend-store-uri {uri}`, then http://127.0.0.1:5000/{page}"


def log_environment() -> dict[str, Any]:
    """Code version and package versions as tags, and the full environment as an artifact (and the
    experiment marked as model training, for the MLflow UI). The GPUs are listed by steps that use TensorFlow;
    the others (data, main) do not load it for this (~8 s)."""
    tf = sys.modules.get("tensorflow")
    mark_model_training_experiment()

    versions = package_versions()
    code_dir = Path(__file__).resolve().parent
    commit = git_commit(code_dir)
    tags = {f"version.{k}": v for k, v in versions.items()}
    if commit:
        tags["git_commit"] = commit
        tags["git_dirty"] = str(git_dirty(code_dir)).lower()
    mlflow.set_tags(tags)
    environment = {
        "versions": versions,
        "git_commit": commit,
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "gpus": [d.name for d in tf.config.list_physical_devices("GPU")] if tf is not None else None,
    }
    mlflow.log_dict(environment, "environment.json")
    return environment


def _log_input(dataset, context: str, attempts: int = 3) -> None:
    for attempt in range(1, attempts + 1):
        try:
            mlflow.log_input(dataset, context=context)
            return
        except mlflow.exceptions.MlflowException as exc:
            # Processes starting together (tuning workers) log the same dataset at once: MLflow's store
            # looks it up, then inserts it, so all but one insert hit its unique key. The dataset
            # exists by then; logging again only links it to this run.
            message = str(exc).lower()
            if attempt == attempts or not ("duplicate key" in message or "unique constraint" in message):
                raise
            time.sleep(0.1 * attempt)


def log_new_params(params: dict[str, Any]) -> None:
    """Log the parameters the active run does not have yet.

    `mlflow run` logs an entry point's parameters as they were given ("1" for 1.0) before the command
    starts, and MLflow refuses to change a logged value: those stay, and only the rest (defaults the
    command resolved, derived settings) are added. Empty values ("not given") are not logged.
    """
    logged = mlflow.get_run(mlflow.active_run().info.run_id).data.params
    new = {k: v for k, v in params.items() if k not in logged and v not in ("", None)}
    if new:
        mlflow.log_params(new)


def log_dataset(name: str, digest: str, source: str, table: pd.DataFrame, artifact_file: str) -> None:
    """Log the dataset (mlflow.data, with our content digest per split) and its split table as an artifact."""
    for context, part in table.groupby("split", sort=False):
        part = part.reset_index(drop=True)
        with warnings.catch_warnings():
            # A local folder matches MLflow's local-artifact source twice (both resolve the same),
            # and the integer label column triggers a schema hint meant for model inputs.
            warnings.simplefilter("ignore", UserWarning)
            dataset = mlflow.data.from_pandas(part, source=source, targets="label", name=f"{name}:{context}",
                                              digest=f"{digest}-{context}"[:36])
            _log_input(dataset, context)
    log_table(table, artifact_file)


def log_table(table: pd.DataFrame, artifact_file: str) -> None:
    """A table as a CSV artifact (readable by pandas and spreadsheets, unlike mlflow.log_table's JSON)."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / Path(artifact_file).name
        table.to_csv(path, index=False)
        mlflow.log_artifact(str(path), str(Path(artifact_file).parent))


def log_json(obj: Any, artifact_file: str) -> None:
    mlflow.log_text(json.dumps(obj, indent=2, default=str), artifact_file)


def read_json(path: str | os.PathLike) -> Any:
    return json.loads(Path(path).read_text())


def current_experiment_name() -> str:
    """The experiment of the run `mlflow run` created, else MLFLOW_EXPERIMENT_NAME, else Default."""
    run_id = os.environ.get("MLFLOW_RUN_ID")
    if run_id:
        experiment_id = mlflow.get_run(run_id).info.experiment_id
        return mlflow.get_experiment(experiment_id).name
    return os.environ.get("MLFLOW_EXPERIMENT_NAME") or "Default"
