"""Workers sharing one study: heartbeats, dead workers' trials, and samplers that keep workers apart.

Workers on other processes or machines may share the storage: trials send heartbeats, and the trial
of a worker that died is failed (its MLflow run marked KILLED) and queued again.
"""

from __future__ import annotations

import contextlib
import logging
import secrets
import warnings
from typing import Callable, Iterator

import mlflow
import optuna
import sqlalchemy
from mlflow.tracking import MlflowClient
from optuna.trial import FrozenTrial, TrialState

log = logging.getLogger(__name__)

COUNTED = (TrialState.COMPLETE, TrialState.PRUNED)
STATE_TAGS = {TrialState.COMPLETE: "complete", TrialState.PRUNED: "pruned", TrialState.FAIL: "failed"}
# A trial whose worker keeps dying (e.g. killed for memory) must not take down every worker in turn.
STALE_RETRIES = 2


@contextlib.contextmanager
def experimental() -> Iterator[None]:
    """Optuna marks the heartbeat API, the constant liar and the matplotlib plots experimental; nothing to act on."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        yield


def sampler(name: str, seed: int, shared: bool) -> optuna.samplers.BaseSampler:
    if name == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    # The constant liar counts other workers' running trials as bad, so TPE does not propose their parameters again.
    with experimental():
        return optuna.samplers.TPESampler(seed=seed, constant_liar=shared)


def is_shared(storage: str) -> bool:
    """A database server is there to be shared by workers; a SQLite file is taken to be one worker's."""
    try:
        return sqlalchemy.engine.make_url(storage).get_backend_name() != "sqlite"
    except sqlalchemy.exc.ArgumentError:
        return False


def sampler_seed(seed: int, n_trials: int, shared: bool) -> int:
    # Seeded per resumption: the same seed again would replay the first trials' random draws. Workers
    # that start together see the same trial count, so on shared storage a random part keeps them apart
    # (and a shared study's draws cannot be reproduced).
    return seed + n_trials + (secrets.randbits(31) if shared else 0)


def safe_url(url: str) -> str:
    try:
        return sqlalchemy.engine.make_url(url).render_as_string(hide_password=True)
    except sqlalchemy.exc.ArgumentError:
        return url


def _terminate_run(client: MlflowClient, run_id: str) -> None:
    if client.get_run(run_id).info.status == "RUNNING":
        client.set_terminated(run_id, status="KILLED")


def _close_stale_runs(trial: FrozenTrial) -> None:
    """End the MLflow runs a dead worker left RUNNING: the trial's run and its worker's study run."""
    run_id = trial.user_attrs.get("mlflow_run_id")
    if run_id is None:  # the worker died before its trial's run existed
        return
    client = MlflowClient()
    try:
        run = client.get_run(run_id)
    except mlflow.exceptions.MlflowException as exc:  # e.g. a worker logging to another tracking store
        log.warning("stale trial %d: its MLflow run %s cannot be closed here: %s", trial.number, run_id, exc)
        return
    client.set_tag(run_id, "state", STATE_TAGS[TrialState.FAIL])
    client.set_tag(run_id, "optuna.stale", "true")
    _terminate_run(client, run_id)
    if "mlflow.parentRunId" in run.data.tags:
        _terminate_run(client, run.data.tags["mlflow.parentRunId"])


def _stale_trial_callback(n_trials: int) -> Callable[[optuna.Study, FrozenTrial], None]:
    """Run by whichever worker finds a dead worker's trial, once Optuna has failed it."""
    with experimental():
        retry = optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=STALE_RETRIES)

    def on_stale_trial(study: optuna.Study, trial: FrozenTrial) -> None:
        log.warning("trial %d lost its worker (%s): failed, its MLflow runs marked KILLED", trial.number,
                    trial.user_attrs.get("worker", "unknown"))
        _close_stale_runs(trial)
        # Queued again (same parameters, as WAITING) only if the study still needs it: a full study
        # would keep the copy waiting for no one.
        if len(study.get_trials(deepcopy=False, states=COUNTED)) < n_trials:
            retry(study, trial)
    return on_stale_trial


def storage(url: str, n_trials: int, heartbeat_interval: int, grace_period: int) -> optuna.storages.RDBStorage:
    """The study's storage; with heartbeats (heartbeat_interval > 0), dead workers' trials are failed and retried."""
    heartbeats = {} if heartbeat_interval == 0 else {
        "heartbeat_interval": heartbeat_interval, "grace_period": grace_period or None,
        "heartbeat_stale_trial_callback": _stale_trial_callback(n_trials)}
    with experimental():
        return optuna.storages.RDBStorage(url, **heartbeats)


