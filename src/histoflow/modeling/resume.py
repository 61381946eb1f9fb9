"""What lets a killed or cut-off training run finish as if it had not been: which run a resume continues (and
refusing one that cannot), and, when the tracking server stops answering, where the training is kept and how
to finish it. The checkpoints themselves are histoflow.modeling.checkpoints's."""

from __future__ import annotations

import os

import mlflow

from histoflow import tracking
from histoflow.config import typed_params
from histoflow.errors import ConfigError, TrackingError
from histoflow.modeling import checkpoints
from histoflow.modeling.variants import LOCAL_FIELDS, TrainConfig, variant_fields


def resumable(config: TrainConfig) -> str:
    """The run to continue: `resume`, or the run `mlflow run --run-id` retries when it left a checkpoint
    ("" for a new run). A resume that cannot continue fails here, before anything is changed."""
    retried = os.environ.get("MLFLOW_RUN_ID", "")
    run_id = config.resume or (retried if checkpoints.has_checkpoint(
        checkpoints.run_checkpoint_dir(config.checkpoint_dir, retried)) else "")
    if not run_id:
        return ""
    try:
        previous = mlflow.MlflowClient().get_run(run_id)
    except mlflow.exceptions.MlflowException:
        raise ConfigError(f"resume: there is no run {run_id} in {mlflow.get_tracking_uri()}") from None
    if previous.info.status == "FINISHED" and previous.data.metrics.get("model_size_mb") is not None:
        raise ConfigError(f"resume: run {run_id} has finished; start a new run instead")
    logged = {k: v for k, v in previous.data.params.items()
              if k in variant_fields(config.variant) and k not in LOCAL_FIELDS}
    given = config.to_params()
    differ = sorted(k for k, v in typed_params(TrainConfig, logged).items() if k in given and given[k] != v)
    if "model" in previous.data.params and previous.data.params["model"] != given["model"]:
        differ.append("model")
    if differ:
        raise ConfigError(f"resume: run {run_id} was started with other settings ("
                          + ", ".join(f"{k}={previous.data.params[k]} there, {given[k]} here" for k in differ)
                          + "); resume with the same settings or start a new run")
    if not checkpoints.has_checkpoint(checkpoints.run_checkpoint_dir(config.checkpoint_dir, run_id)):
        raise ConfigError(f"resume: run {run_id} has no checkpoint in {config.checkpoint_dir} (trained on another "
                          "machine or folder, or with checkpoint_dir=none); start a new run instead")
    return run_id


def explain_outage(config: TrainConfig, run_id: str, exc: Exception) -> None:
    """When the tracking server stopped answering for longer than MLflow's retries: where the training
    is kept and how to finish the run once the server is back (a resume logs what MLflow lacks)."""
    checkpoint = checkpoints.run_checkpoint_dir(config.checkpoint_dir, run_id) if run_id else None
    if not checkpoints.has_checkpoint(checkpoint):
        return
    try:
        tracking.check_server(mlflow.get_tracking_uri())
        return  # the server answers: another failure, reported as it is
    except TrackingError:
        pass
    done = "training finished" if checkpoints.finished_training(checkpoint) else "the epochs trained so far"
    raise TrackingError(
        f"the tracking server {mlflow.get_tracking_uri()} stopped answering ({type(exc).__name__}); {done} "
        f"and their metrics are kept in {checkpoint}. When the server is back, finish run {run_id} with "
        f"`histoflow train --variant {config.variant} ... --resume {run_id}` (the same settings) or "
        f"`mlflow run . -e {config.variant} --run-id {run_id} ...`") from exc
