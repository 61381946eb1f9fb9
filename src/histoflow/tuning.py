"""Optuna tuning of the fusion head (learning rate, dropout, fusion width), then one full training run.

Trials train the head alone on cached backbone features (histoflow.features), each as an MLflow run
nested under the study's run. The best parameters are then trained as an ordinary run of the
variant (histoflow.train.run), ready for `register`.

``n_trials`` is the study's total: a run on an existing study (same study_name and storage) adds
only the trials still missing, so re-running an interrupted command finishes it, and a larger
n_trials extends the study. Complete and pruned trials count; failed ones are retried.

Workers on other processes or machines may share the storage: trials send heartbeats, and the
trial of a worker that died is failed (its MLflow run marked KILLED) and queued again.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import secrets
import socket
import sys
import warnings
from dataclasses import asdict, dataclass, fields
from typing import Any, Callable, Iterator

import keras
import matplotlib.pyplot as plt
import mlflow
import optuna
import pandas as pd
import sqlalchemy
from mlflow.tracking import MlflowClient
from optuna.trial import FrozenTrial, TrialState
from optuna_integration import KerasPruningCallback

from histoflow import tracking
from histoflow import train as training_run
from histoflow.config import TrainConfig, coerce_fields, make_config
from histoflow.datasets import Dataset
from histoflow.errors import ConfigError
from histoflow.features import CachedFeatures, HeadTrainer, cache_key, head_dataset, load_or_extract
from histoflow.training import EpochMetrics, class_weights, fit

log = logging.getLogger(__name__)

TUNE_VARIANTS = ("densenet", "transfer")
SEARCHED = ("learning_rate", "dropout", "fusion_width")
FUSION_WIDTHS = (16, 256)
SAMPLERS = ("tpe", "random")
PRUNERS = ("median", "none")
# Keras' names for the per-epoch validation metrics of compile_model, and which way is better.
METRICS = {"val_auc": "maximize", "val_accuracy": "maximize", "val_loss": "minimize"}
COUNTED = (TrialState.COMPLETE, TrialState.PRUNED)
STATE_TAGS = {TrialState.COMPLETE: "complete", TrialState.PRUNED: "pruned", TrialState.FAIL: "failed"}
# A trial whose worker keeps dying (e.g. killed for memory) must not take down every worker in turn.
STALE_RETRIES = 2


@dataclass(frozen=True)
class TuneConfig:
    train: TrainConfig  # the variant's data and backbone settings; SEARCHED fields are the study's
    n_trials: int = 20
    timeout: float = 0.0  # seconds; 0 = no limit
    study_name: str = ""  # "" = <variant>-<backbone>-<feature cache key>: same data resumes, new data starts anew
    storage: str = "sqlite:///optuna.db"
    sampler: str = "tpe"
    pruner: str = "median"
    metric: str = "val_auc"
    fine_tune: bool = False
    trial_epochs: int = 20
    cache_dir: str = ".histoflow-cache/features"
    heartbeat_interval: int = 60  # seconds between a running trial's heartbeats; 0 = no heartbeats
    grace_period: int = 0  # seconds without a heartbeat before a trial counts as dead; 0 = 2 x heartbeat_interval


@dataclass(frozen=True)
class TuneResult:
    study_name: str
    parent_run_id: str
    new_trials: int
    best_trial: FrozenTrial | None
    final_run_id: str | None


def make_tune_config(variant: str, **params: Any) -> TuneConfig:
    """Validated settings from (possibly string) parameters: tuning ones here, data ones via make_config."""
    if variant not in TUNE_VARIANTS:
        raise ConfigError(f"tune applies to the variants {', '.join(TUNE_VARIANTS)} (a frozen backbone whose "
                          f"features can be cached); got {variant!r}")
    fixed = [k for k in (*SEARCHED, "freeze_backbone") if params.get(k) not in (None, "")]
    if fixed:
        raise ConfigError(f"{', '.join(fixed)}: searched by the study (freeze_backbone: set by fine_tune)")
    own = {f.name for f in fields(TuneConfig) if f.name != "train"}
    settings = coerce_fields(TuneConfig, params, exclude=("train",), strict=False)
    config = TuneConfig(make_config(variant, **{k: v for k, v in params.items() if k not in own}), **settings)
    _validate(config)
    return config


def _validate(c: TuneConfig) -> None:
    checks = [
        (c.n_trials >= 1, f"n_trials must be >= 1; got {c.n_trials}"),
        (c.timeout >= 0, "timeout must be >= 0 seconds (0 = no limit)"),
        (c.sampler in SAMPLERS, f"sampler must be one of {', '.join(SAMPLERS)}; got {c.sampler!r}"),
        (c.pruner in PRUNERS, f"pruner must be one of {', '.join(PRUNERS)}; got {c.pruner!r}"),
        (c.metric in METRICS, f"metric must be one of {', '.join(METRICS)}; got {c.metric!r}"),
        (c.trial_epochs >= 1, "trial_epochs must be >= 1"),
        (bool(c.storage.strip()), "storage must be a SQLAlchemy URL, e.g. sqlite:///optuna.db"),
        (bool(c.cache_dir.strip()), "cache_dir must be a folder"),
        (c.heartbeat_interval >= 0, "heartbeat_interval must be >= 0 seconds (0 = no heartbeats)"),
        # A grace not longer than the interval would fail trials that are alive between two beats.
        (c.grace_period == 0 or c.grace_period > c.heartbeat_interval,
         "grace_period must be longer than heartbeat_interval (0 = twice heartbeat_interval)"),
    ]
    for ok, message in checks:
        if not ok:
            raise ConfigError(message)


@contextlib.contextmanager
def _experimental() -> Iterator[None]:
    """Optuna marks the heartbeat API, the constant liar and the matplotlib plots experimental; nothing to act on."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        yield


def _sampler(name: str, seed: int, shared: bool) -> optuna.samplers.BaseSampler:
    if name == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    # The constant liar counts other workers' running trials as bad, so TPE does not propose their parameters again.
    with _experimental():
        return optuna.samplers.TPESampler(seed=seed, constant_liar=shared)


def _is_shared(storage: str) -> bool:
    """A database server is there to be shared by workers; a SQLite file is taken to be one worker's."""
    try:
        return sqlalchemy.engine.make_url(storage).get_backend_name() != "sqlite"
    except sqlalchemy.exc.ArgumentError:
        return False


def _sampler_seed(seed: int, n_trials: int, shared: bool) -> int:
    # Seeded per resumption: the same seed again would replay the first trials' random draws. Workers
    # that start together see the same trial count, so on shared storage a random part keeps them apart
    # (and a shared study's draws cannot be reproduced).
    return seed + n_trials + (secrets.randbits(31) if shared else 0)


def _pruner(name: str) -> optuna.pruners.BasePruner:
    return optuna.pruners.MedianPruner() if name == "median" else optuna.pruners.NopPruner()


def _safe_url(url: str) -> str:
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
    with _experimental():
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


def _storage(config: TuneConfig) -> optuna.storages.RDBStorage:
    heartbeats = {} if config.heartbeat_interval == 0 else {
        "heartbeat_interval": config.heartbeat_interval, "grace_period": config.grace_period or None,
        "heartbeat_stale_trial_callback": _stale_trial_callback(config.n_trials)}
    with _experimental():
        return optuna.storages.RDBStorage(config.storage, **heartbeats)


def open_study(config: TuneConfig, dataset: Dataset, key: str) -> optuna.Study:
    """Create the study, or load it to resume; refuse one whose trials were run on other features."""
    t = config.train
    name = config.study_name or f"{t.variant}-{t.backbone}-{key[:8]}"
    try:
        study = optuna.create_study(storage=_storage(config), study_name=name, direction=METRICS[config.metric],
                                    pruner=_pruner(config.pruner), load_if_exists=True)
    except (sqlalchemy.exc.SQLAlchemyError, ImportError) as exc:
        raise ConfigError(f"cannot open the Optuna storage {_safe_url(config.storage)}: {exc}") from None
    if study.direction.name.lower() != METRICS[config.metric]:
        raise ConfigError(f"study {name!r} {study.direction.name.lower()}s its value; metric {config.metric} "
                          "needs the other direction: use another study_name")
    expected = {"histoflow.variant": t.variant, "histoflow.backbone": t.backbone,
                "histoflow.dataset_digest": dataset.digest, "histoflow.features": key,
                "histoflow.metric": config.metric}
    stored = study.user_attrs
    clash = [f"{k.split('.', 1)[1]} {stored[k]!r} (now {v!r})" for k, v in expected.items()
             if k in stored and stored[k] != v]
    if clash:
        raise ConfigError(f"study {name!r} in {_safe_url(config.storage)} was run with {', '.join(clash)}; its "
                          "trials are not comparable with these: use another study_name")
    for k, v in expected.items():
        if k not in stored:  # a new study, or one prepared outside histoflow (e.g. enqueued trials)
            study.set_user_attr(k, v)
    # Optuna checks for dead workers' trials only before starting one; a worker with none to run checks here.
    with _experimental():
        optuna.storages.fail_stale_trials(study)
    shared = _is_shared(config.storage)
    study.sampler = _sampler(config.sampler, _sampler_seed(t.seed, len(study.trials), shared), shared)
    return study


def suggest(trial: optuna.Trial) -> dict[str, Any]:
    return {
        "learning_rate": trial.suggest_float("learning_rate", 1e-6, 1e-2, log=True),
        "dropout": trial.suggest_float("dropout", 0.0, 0.7),
        "fusion_width": trial.suggest_int("fusion_width", *FUSION_WIDTHS),
    }


def _train_head(config: TuneConfig, features: CachedFeatures, trainer: HeadTrainer, params: dict[str, Any],
                trial: optuna.Trial, epoch_metrics: EpochMetrics) -> float:
    """Fit the head on the cached vectors; the value is the metric at the epoch early stopping keeps."""
    t = config.train
    # The same seed for every trial: differences come from the parameters.
    model = trainer.start(params["fusion_width"], params["dropout"], params["learning_rate"], t.seed)
    train_part, val_part = features.splits["train"], features.splits["val"]
    result = fit(model, head_dataset(train_part, t.batch_size, True, t.seed),
                 head_dataset(val_part, t.batch_size, False, t.seed), config.trial_epochs,
                 [epoch_metrics, KerasPruningCallback(trial, config.metric)],
                 class_weights(train_part.labels, t.class_weight), t.patience, t.lr_patience)
    mlflow.log_metrics({"train_time_s": result.seconds, "best_epoch": result.best_epoch,
                        "epochs_run": result.epochs_run})
    # The epoch of lowest val_loss: the weights the full run's early stopping would keep.
    return result.history[config.metric][result.best_epoch - 1]


def objective(config: TuneConfig, features: CachedFeatures, study_name: str) -> Callable[[optuna.Trial], float]:
    """One trial: the head trained on the cached features, as a nested MLflow run of the active one."""
    keras.backend.clear_session()  # earlier studies' graphs in this process
    trainer = HeadTrainer(features.widths, FUSION_WIDTHS[1])

    def run_trial(trial: optuna.Trial) -> float:
        params = suggest(trial)
        trial.set_user_attr("worker", f"{socket.gethostname()}:{os.getpid()}")  # who to look for when it goes stale
        pruned: optuna.TrialPruned | None = None
        epoch_metrics = EpochMetrics(batched=True)
        with mlflow.start_run(run_name=f"trial-{trial.number}", nested=True) as run:
            trial.set_user_attr("mlflow_run_id", run.info.run_id)
            mlflow.set_tags({"histoflow.step": "tune-trial", "optuna.study_name": study_name,
                             "optuna.trial_number": str(trial.number)})
            mlflow.log_params({**params, "trial_epochs": config.trial_epochs})
            try:
                value = _train_head(config, features, trainer, params, trial, epoch_metrics)
            except optuna.TrialPruned as exc:
                pruned = exc  # raised after the run closes: a pruned trial is a finished run, not a failed one
            except BaseException:
                mlflow.set_tag("state", STATE_TAGS[TrialState.FAIL])
                raise
            finally:
                epoch_metrics.flush()  # also the epochs of a trial the pruner stopped
            if pruned is not None:
                state = TrialState.PRUNED
            else:  # Optuna fails a trial whose value is NaN (e.g. AUC of a one-class validation split)
                state = TrialState.COMPLETE if math.isfinite(value) else TrialState.FAIL
            mlflow.set_tag("state", STATE_TAGS[state])
            if state == TrialState.COMPLETE:
                mlflow.log_metric(f"final_{config.metric}", value)
        if pruned is not None:
            raise pruned
        return value
    return run_trial


def _log_setup(config: TuneConfig, study: optuna.Study, dataset: Dataset, frame: pd.DataFrame,
               features: CachedFeatures) -> None:
    run_id = mlflow.active_run().info.run_id
    # `mlflow run` has already logged the entry point's parameters (as given); add the rest.
    logged = mlflow.get_run(run_id).data.params
    data = {k: v for k, v in config.train.to_params().items() if k not in (*SEARCHED, "freeze_backbone", "model")}
    settings = {**asdict(config), "study_name": study.study_name, "storage": _safe_url(config.storage)}
    settings.pop("train")
    mlflow.log_params({k: v for k, v in {**data, **settings, "feature_cache_key": features.key}.items()
                       if k not in logged})
    t = config.train
    mlflow.set_tags({"histoflow.step": "tune", "optuna.study_name": study.study_name,
                     "optuna.direction": METRICS[config.metric], "variant": t.variant, "model": t.model_name,
                     "dataset.name": dataset.name, "dataset.digest": dataset.digest, "split_mode": t.split,
                     "feature_cache": "hit" if features.hit else "miss",
                     "feature_cache.path": str(features.path)})
    mlflow.log_metric("feature_cache_s", features.seconds)
    tracking.log_environment()
    tracking.log_dataset(dataset.name, dataset.digest, str(dataset.root), frame)


def _log_plots(study: optuna.Study, n_complete: int) -> None:
    from optuna.visualization import matplotlib as plots

    figures = {"optuna/optimization_history.png": plots.plot_optimization_history,
               "optuna/intermediate_values.png": plots.plot_intermediate_values}
    if n_complete >= 2:  # importances compare complete trials; one cannot vary anything
        figures["optuna/param_importances.png"] = plots.plot_param_importances
    else:
        log.info("parameter importances need >= 2 complete trials; %d so far, plot skipped", n_complete)
    with _experimental():
        for path, plot in figures.items():
            figure = plot(study).figure
            figure.tight_layout()
            mlflow.log_figure(figure, path)
            plt.close(figure)


def _log_results(study: optuna.Study, metric: str) -> FrozenTrial | None:
    """Trial counts, and the best trial's parameters, value and plots; None when no trial completed."""
    states = [t.state for t in study.get_trials(deepcopy=False)]
    mlflow.log_metrics({"trials_total": len(states),
                        **{f"trials_{tag}": states.count(state) for state, tag in STATE_TAGS.items()}})
    n_complete = states.count(TrialState.COMPLETE)
    if n_complete == 0:
        return None
    best = study.best_trial
    mlflow.log_params({f"best_{k}": v for k, v in best.params.items()})
    mlflow.log_metrics({f"best_{metric}": best.value, "best_trial_number": best.number})
    if "mlflow_run_id" in best.user_attrs:
        mlflow.set_tag("optuna.best_trial_run_id", best.user_attrs["mlflow_run_id"])
    _log_plots(study, n_complete)
    return best


def _final_run(config: TuneConfig, best: FrozenTrial, study_name: str, parent_run_id: str, experiment: str) -> str:
    """The best parameters as an ordinary training run of the variant (same logging, ready for register)."""
    t = config.train
    overrides = {k: v for k, v in asdict(t).items() if k != "variant"}
    overrides.update(best.params, freeze_backbone=not config.fine_tune, experiment=experiment,
                     run_name=t.run_name or f"{t.variant}-tuned-{study_name}")
    run_id = training_run.run(make_config(t.variant, **overrides))
    client = MlflowClient()
    client.set_tag(run_id, "optuna.study_name", study_name)
    client.set_tag(run_id, "optuna.parent_run_id", parent_run_id)
    client.set_tag(run_id, "optuna.best_trial_number", str(best.number))
    client.set_tag(parent_run_id, "optuna.final_run_id", run_id)
    return run_id


def run(config: TuneConfig) -> TuneResult:
    """Run (or resume) the study as an MLflow parent run, then train the best parameters in full."""
    tracking.configure(config.train.experiment)  # first: a tracking server that is down fails before any work
    dataset, frame = training_run.prepare_data(config.train)
    study = open_study(config, dataset, cache_key(config.train, dataset.digest))  # a bad storage fails early
    features = load_or_extract(config.train, dataset.digest, frame, config.cache_dir)
    finished_before = len(study.get_trials(deepcopy=False, states=tuple(STATE_TAGS)))
    counted = len(study.get_trials(deepcopy=False, states=COUNTED))
    new_trials = max(0, config.n_trials - counted)
    with mlflow.start_run(run_name=f"tune-{study.study_name}") as parent:
        _log_setup(config, study, dataset, frame, features)
        print(f"study {study.study_name}: {counted} trials so far, {new_trials} to run to reach {config.n_trials}; "
              f"features {'from' if features.hit else 'extracted into'} {features.path} "
              f"({features.seconds:.1f} s)")
        if new_trials:
            # The callback stops this worker once the study holds n_trials, counting other workers' trials.
            study.optimize(objective(config, features, study.study_name), n_trials=new_trials,
                           timeout=config.timeout or None,
                           callbacks=[optuna.study.MaxTrialsCallback(config.n_trials, states=COUNTED)],
                           show_progress_bar=sys.stdout.isatty())
        best = _log_results(study, config.metric)
        experiment = mlflow.get_experiment(parent.info.experiment_id).name
    ran = len(study.get_trials(deepcopy=False, states=tuple(STATE_TAGS))) - finished_before
    if best is None:
        print(f"study {study.study_name}: no trial completed; no final run trained (see the trials' state tags)")
        return TuneResult(study.study_name, parent.info.run_id, ran, None, None)
    print(f"study {study.study_name}: best {config.metric} {best.value:.4f} in trial {best.number} with "
          f"{best.params}; training it in full (freeze_backbone={not config.fine_tune})")
    final_run_id = _final_run(config, best, study.study_name, parent.info.run_id, experiment)
    return TuneResult(study.study_name, parent.info.run_id, ran, best, final_run_id)
