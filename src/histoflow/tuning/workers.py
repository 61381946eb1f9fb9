"""Workers sharing one study: heartbeats, dead workers' trials, samplers that keep workers apart, and the one
worker that trains the study's final run.

Workers on other processes or machines may share the storage: trials send heartbeats, and the trial
of a worker that died is failed (its MLflow run marked KILLED) and queued again. When the study's trials
are done, the last worker to finish claims the final run in a table of the study's own database (an
insert that only one worker's can win): it trains the best parameters in full, the others end.
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import socket
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import mlflow
import optuna
import sqlalchemy
from mlflow.tracking import MlflowClient
from optuna.trial import FrozenTrial, TrialState

log = logging.getLogger(__name__)
SQLITE = "sqlite:///"

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
    if url.startswith(SQLITE):  # SQLite creates the file, not its folder (the default's is the cache root)
        with contextlib.suppress(OSError):  # a folder that cannot be: the storage's own error says why
            Path(url.removeprefix(SQLITE)).expanduser().parent.mkdir(parents=True, exist_ok=True)
    with experimental():
        return optuna.storages.RDBStorage(url, **heartbeats)




def worker_id() -> str:
    """This worker, as trials and claims name it: host and process id."""
    return f"{socket.gethostname()}:{os.getpid()}"


# One row per final run of a study: who trains it, and its MLflow run once trained.
FINAL_RUNS = sqlalchemy.Table(
    "histoflow_final_runs", sqlalchemy.MetaData(),
    sqlalchemy.Column("study_name", sqlalchemy.String(512), primary_key=True),
    sqlalchemy.Column("n_trials", sqlalchemy.Integer, primary_key=True),
    sqlalchemy.Column("owner", sqlalchemy.String(300), nullable=False),
    sqlalchemy.Column("claimed_at", sqlalchemy.Float, nullable=False),
    sqlalchemy.Column("run_id", sqlalchemy.String(64), nullable=True),
)


@dataclass(frozen=True)
class FinalClaim:
    """The claim on a study's final run: whether this worker won it, who holds it and the run trained so far."""

    won: bool
    owner: str
    run_id: str | None = None


def _engine(url: str) -> sqlalchemy.engine.Engine:
    engine = sqlalchemy.create_engine(url)
    try:
        FINAL_RUNS.create(engine, checkfirst=True)
    except sqlalchemy.exc.SQLAlchemyError:  # another worker created it between the check and the create
        if not sqlalchemy.inspect(engine).has_table(FINAL_RUNS.name):
            raise
    return engine


def _key(study_name: str, n_trials: int):
    return (FINAL_RUNS.c.study_name == study_name) & (FINAL_RUNS.c.n_trials == n_trials)


def _gone(owner: str) -> bool:
    """Whether the claim's worker is a process of this host that no longer exists."""
    host, _, pid = owner.rpartition(":")
    if host != socket.gethostname() or not pid.isdigit():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


def claim_final(url: str, study_name: str, n_trials: int) -> FinalClaim:
    """Claim the final run of `study_name` at `n_trials` trials. Exactly one worker wins it; a claim whose run
    failed or was killed, or whose worker died on this host before finishing it, is taken over. A claim whose
    run finished is not won again: its run is the final run."""
    me = worker_id()
    engine = _engine(url)
    try:
        try:
            with engine.begin() as connection:
                connection.execute(FINAL_RUNS.insert().values(study_name=study_name, n_trials=n_trials, owner=me,
                                                              claimed_at=time.time()))
            return FinalClaim(True, me)
        except sqlalchemy.exc.IntegrityError:
            pass
        with engine.begin() as connection:
            row = connection.execute(sqlalchemy.select(FINAL_RUNS).where(_key(study_name, n_trials))).one()
        status = MlflowClient().get_run(row.run_id).info.status if row.run_id else None
        if status == "FINISHED" or not (status in ("FAILED", "KILLED") or _gone(row.owner)):
            return FinalClaim(False, row.owner, row.run_id)
        with engine.begin() as connection:  # taken over only if nobody else took it over first
            taken = connection.execute(FINAL_RUNS.update().where(_key(study_name, n_trials)
                                                                 & (FINAL_RUNS.c.owner == row.owner))
                                       .values(owner=me, claimed_at=time.time(), run_id=None)).rowcount == 1
        return FinalClaim(taken, me if taken else row.owner)
    finally:
        engine.dispose()


def settle_final(url: str, study_name: str, n_trials: int, run_id: str | None) -> None:
    """The claim's outcome: the final run trained (its id recorded), or None: released, for a later worker."""
    engine = _engine(url)
    try:
        mine = _key(study_name, n_trials) & (FINAL_RUNS.c.owner == worker_id())
        with engine.begin() as connection:
            connection.execute(FINAL_RUNS.update().where(mine).values(run_id=run_id) if run_id
                               else FINAL_RUNS.delete().where(mine))
    finally:
        engine.dispose()
