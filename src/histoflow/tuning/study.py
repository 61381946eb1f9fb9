"""Optuna tuning of the fusion head over the search space of tuning/search_space.yaml, then one full run.

Trials train the head alone on cached backbone features (histoflow.modeling.features, histoflow.tuning.head_trainer),
each as an MLflow run nested under the study's run. The best parameters are then trained as an
ordinary run of the variant (histoflow.modeling.training_run), ready for `register`.

With ``folds`` > 1 a trial is scored on the cv entry point's patient folds instead of one split: its head is
trained once per fold and judged on that fold's inner validation patients (never its held-out ones), the value
the mean; the best parameters are then cross-validated on the same folds (histoflow.modeling.cross_validation),
so `register` compares a CV mean whose held-out folds no trial has seen. On a few dozen patients one
validation split of ~10 ranks trials by noise; five of them average it.

``n_trials`` is the study's total: a run on an existing study (same study_name and storage) adds
only the trials still missing, so re-running an interrupted command finishes it, and a larger
n_trials extends the study. Complete and pruned trials count; failed ones are retried. Workers on
other processes or machines may share the storage (histoflow.tuning.workers).
"""

from __future__ import annotations

import hashlib
import logging
import math
import sys
from collections.abc import Callable
from dataclasses import dataclass, replace

import keras
import matplotlib.pyplot as plt
import mlflow
import numpy as np
import optuna
import sqlalchemy
from mlflow.tracking import MlflowClient
from optuna.trial import FrozenTrial, TrialState
from optuna_integration import KerasPruningCallback

from histoflow import tracking
from histoflow.config import local_folder
from histoflow.data.splits import cv_folds
from histoflow.data.step import PreparedData, log_data, prepare_data
from histoflow.errors import ConfigError
from histoflow.modeling import cross_validation, distributed, training_run
from histoflow.modeling.features import CachedFeatures, cache_key, head_dataset, load_or_extract
from histoflow.modeling.fitting import EpochMetrics, class_weights, fit
from histoflow.modeling.variants import CVConfig, TrainConfig
from histoflow.tuning import workers
from histoflow.tuning.head_trainer import HeadTrainer
from histoflow.tuning.search_space import SearchSpace
from histoflow.tuning.settings import MAX_FUSION_WIDTH, METRICS, STUDY_FIELDS, TuneConfig
from histoflow.tuning.workers import COUNTED, STATE_TAGS

log = logging.getLogger(__name__)

@dataclass(frozen=True)
class TuneResult:
    study_name: str
    parent_run_id: str
    new_trials: int
    best_trial: FrozenTrial | None
    final_run_id: str | None


def _pruner(name: str) -> optuna.pruners.BasePruner:
    return optuna.pruners.MedianPruner() if name == "median" else optuna.pruners.NopPruner()


def default_study_name(train: TrainConfig, key: str, space: SearchSpace) -> str:
    """Same data, backbone and search space: the same study, resumed; anything else: a new one."""
    return f"{train.variant}-{train.backbone}-{hashlib.sha256((key + space.digest()).encode()).hexdigest()[:8]}"


def open_study(config: TuneConfig, digest: str, key: str) -> optuna.Study:
    """Create the study, or load it to resume; refuse one whose trials were run on other features or space."""
    t = config.train
    name = config.study_name or default_study_name(t, key, config.space)
    try:
        study = optuna.create_study(
            storage=workers.storage(config.storage, config.n_trials, config.heartbeat_interval, config.grace_period),
            study_name=name, direction=METRICS[config.metric], pruner=_pruner(config.pruner), load_if_exists=True)
    except (sqlalchemy.exc.SQLAlchemyError, ImportError) as exc:
        raise ConfigError(f"cannot open the Optuna storage {workers.safe_url(config.storage)}: {exc}") from None
    if study.direction.name.lower() != METRICS[config.metric]:
        raise ConfigError(f"study {name!r} {study.direction.name.lower()}s its value; metric {config.metric} "
                          "needs the other direction: use another study_name")
    expected = {"histoflow.variant": t.variant, "histoflow.backbone": t.backbone,
                "histoflow.dataset_digest": digest, "histoflow.features": key,
                "histoflow.metric": config.metric, "histoflow.search_space": config.space.digest()}
    stored = study.user_attrs
    clash = [f"{k.split('.', 1)[1]} {stored[k]!r} (now {v!r})" for k, v in expected.items()
             if k in stored and stored[k] != v]
    if clash:
        raise ConfigError(f"study {name!r} in {workers.safe_url(config.storage)} was run with {', '.join(clash)}; "
                          "its trials are not comparable with these: use another study_name")
    for k, v in expected.items():
        if k not in stored:  # a new study, or one prepared outside histoflow (e.g. enqueued trials)
            study.set_user_attr(k, v)
    # Optuna checks for dead workers' trials only before starting one; a worker with none to run checks here.
    with workers.experimental():
        optuna.storages.fail_stale_trials(study)
    shared = workers.is_shared(config.storage)
    study.sampler = workers.sampler(config.sampler, workers.sampler_seed(t.seed, len(study.trials), shared), shared)
    return study


def _train_head(config: TuneConfig, parts: list[CachedFeatures], trainer: HeadTrainer, trial_config: TrainConfig,
                trial: optuna.Trial) -> float:
    """Fit the head on each part's cached vectors (one split, or one per fold); a part's value is the metric at
    the epoch early stopping keeps, the trial's their mean. With folds the pruner judges the running mean after
    each fold (per-epoch reports of different folds would not be comparable)."""
    t = trial_config
    values, seconds, best_epochs, epochs_run = [], 0.0, [], []
    for k, features in enumerate(parts):
        folded = len(parts) > 1
        epoch_metrics = EpochMetrics(batched=True, prefix=f"fold{k}_" if folded else "")
        pruning = [] if folded else [KerasPruningCallback(trial, config.metric)]
        # The same seed for every trial (and fold): differences come from the parameters.
        model = trainer.start(t.fusion_width, t.dropout, t.learning_rate, t.seed, t.optimizer, t.head_batchnorm)
        train_part, val_part = features.splits["train"], features.splits["val"]
        try:
            result = fit(model, head_dataset(train_part, t.batch_size, True, t.seed),
                         head_dataset(val_part, t.batch_size, False, t.seed), epochs=config.trial_epochs,
                         extra_callbacks=[epoch_metrics, *pruning],
                         class_weight=class_weights(train_part.labels, t.class_weight), patience=t.patience,
                         lr_patience=t.lr_patience)
        finally:
            epoch_metrics.flush()  # also the epochs of a trial the pruner stopped
        # The epoch of lowest val_loss: the weights the full run's early stopping would keep.
        values.append(result.history[config.metric][result.best_epoch - 1])
        seconds += result.seconds
        best_epochs.append(result.best_epoch)
        epochs_run.append(result.epochs_run)
        if folded:
            mean = float(np.mean(values))
            mlflow.log_metric(f"fold_{config.metric}", values[-1], step=k)
            trial.report(mean, k)
            if trial.should_prune():
                raise optuna.TrialPruned(f"mean {config.metric} {mean:.4f} after {k + 1} of {len(parts)} folds")
    mlflow.log_metrics({"train_time_s": seconds, "best_epoch": float(np.mean(best_epochs)),
                        "epochs_run": float(np.mean(epochs_run))})
    if len(parts) > 1:
        mlflow.log_metric(f"std_{config.metric}", float(np.std(values, ddof=1)))
    return float(np.mean(values))


def objective(config: TuneConfig, parts: list[CachedFeatures], study_name: str) -> Callable[[optuna.Trial], float]:
    """One trial: the head trained on the cached features (of each fold), as a nested MLflow run of the active one."""
    keras.backend.clear_session()  # earlier studies' graphs in this process
    trainer = HeadTrainer(parts[0].widths, MAX_FUSION_WIDTH, numbers=parts[0].numbers)

    def run_trial(trial: optuna.Trial) -> float:
        params = config.space.suggest(trial)
        trial.set_user_attr("worker", workers.worker_id())  # who to look for when it goes stale
        pruned: optuna.TrialPruned | None = None
        with mlflow.start_run(run_name=f"trial-{trial.number}", nested=True) as run:
            trial.set_user_attr("mlflow_run_id", run.info.run_id)
            mlflow.set_tags({"histoflow.step": "tune-trial", "optuna.study_name": study_name,
                             "optuna.trial_number": str(trial.number)})
            mlflow.log_params({**params, "trial_epochs": config.trial_epochs})
            try:
                value = _train_head(config, parts, trainer, replace(config.train, **params), trial)
            except optuna.TrialPruned as exc:
                pruned = exc  # raised after the run closes: a pruned trial is a finished run, not a failed one
            except BaseException:
                mlflow.set_tag("state", STATE_TAGS[TrialState.FAIL])
                raise
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


def _log_setup(config: TuneConfig, study: optuna.Study, prepared: PreparedData, parts: list[CachedFeatures],
               key: str) -> None:
    t = config.train
    searched = set(config.space.searched)
    training = {k: v for k, v in t.to_params().items() if k not in searched and k != "model"}
    study_settings = {k: getattr(config, k) for k in STUDY_FIELDS}
    tracking.log_new_params({**training, **study_settings, "study_name": study.study_name,
                             "storage": workers.safe_url(config.storage), "feature_cache_key": key,
                             "search_space_digest": config.space.digest()})
    mlflow.set_tags({"histoflow.step": "tune", "optuna.study_name": study.study_name,
                     "optuna.direction": METRICS[config.metric], "variant": t.variant, "model": t.model_name,
                     "optuna.searched": ",".join(sorted(searched)),
                     "feature_cache": "hit" if all(p.hit for p in parts) else "miss",
                     "feature_cache.path": str(parts[0].path)})
    mlflow.log_text(config.space.text, "optuna/search_space.yaml")
    mlflow.log_metric("feature_cache_s", sum(p.seconds for p in parts))
    log_data(prepared)


def _log_plots(study: optuna.Study, n_complete: int) -> None:
    from optuna.visualization import matplotlib as plots

    figures = {"optuna/optimization_history.png": plots.plot_optimization_history,
               "optuna/intermediate_values.png": plots.plot_intermediate_values}
    if n_complete >= 2:  # importances compare complete trials; one cannot vary anything
        figures["optuna/param_importances.png"] = plots.plot_param_importances
    else:
        log.info("parameter importances need >= 2 complete trials; %d so far, plot skipped", n_complete)
    with workers.experimental():
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


def final_config(config: TuneConfig, best: FrozenTrial, study_name: str, experiment: str) -> TrainConfig:
    """The final run's settings: the study's (the search space's fixed values included), the best trial's
    parameters over them."""
    t = config.train
    return replace(t, **best.params, experiment=experiment, run_name=t.run_name or f"{t.variant}-tuned-{study_name}")


def _final_run(config: TuneConfig, best: FrozenTrial, study_name: str, parent_run_id: str, experiment: str) -> str:
    """The best parameters as an ordinary training run of the variant, or (folds) cross-validated on the
    trials' folds (same logging, ready for register)."""
    final = final_config(config, best, study_name, experiment)
    run_id = (training_run.run(final) if config.folds == 1
              else cross_validation.run(CVConfig(final, folds=config.folds)))
    client = MlflowClient()
    client.set_tag(run_id, "optuna.study_name", study_name)
    client.set_tag(run_id, "optuna.parent_run_id", parent_run_id)
    client.set_tag(run_id, "optuna.best_trial_number", str(best.number))
    client.set_tag(parent_run_id, "optuna.final_run_id", run_id)
    return run_id


def study_parts(config: TuneConfig, prepared: PreparedData) -> list[PreparedData]:
    """What trials are scored on: the run's split, or (folds > 1) the cv entry point's folds of its first
    repeat (the same data and seed make the same folds, so the final cross-validation holds out the same
    patients the trials never judged on)."""
    if config.folds == 1:
        return [prepared]
    t = config.train
    return [replace(prepared, frame=fold.frame) for fold in cv_folds(
        prepared.dataset.frame, config.folds, 1, t.val_fraction, t.seed, prepared.dataset.class_names)]


def study_key(config: TuneConfig, parts: list[PreparedData]) -> str:
    """The features' identity the study is tied to: the split's cache key, or one for all the folds."""
    keys = [cache_key(config.train, p) for p in parts]
    return keys[0] if len(keys) == 1 else hashlib.sha256(" ".join(keys).encode()).hexdigest()[:24]


def study_features(config: TuneConfig, parts: list[PreparedData]) -> list[CachedFeatures]:
    """Each part's cached features (the dataset extracted into `cache_dir` on the first call, then shared)."""
    folder = local_folder(config.cache_dir, "features")
    return [load_or_extract(config.train, p, folder, training_run.stain_normalizer(config.train, p)) for p in parts]


def run(config: TuneConfig) -> TuneResult:
    """Run (or resume) the study as an MLflow parent run, then train the best parameters in full."""
    distributed.refuse_cluster("tune")
    tracking.configure(config.train.experiment)  # first: a tracking server that is down fails before any work
    prepared = prepare_data(config.train, config.train.split_table)
    digest = prepared.dataset.digest
    parts = study_parts(config, prepared)
    key = study_key(config, parts)
    study = open_study(config, digest, key)  # a bad storage fails early
    features = study_features(config, parts)
    finished_before = len(study.get_trials(deepcopy=False, states=tuple(STATE_TAGS)))
    counted = len(study.get_trials(deepcopy=False, states=COUNTED))
    new_trials = max(0, config.n_trials - counted)
    with mlflow.start_run(run_name=f"tune-{study.study_name}") as parent:
        _log_setup(config, study, prepared, features, key)
        print(f"study {study.study_name}: {counted} trials so far, {new_trials} to run to reach {config.n_trials}; "
              f"searching {', '.join(config.space.searched) or 'nothing'} ({config.space.source}); features "
              f"{'from' if features[0].hit else 'extracted into'} {features[0].path} "
              f"({sum(f.seconds for f in features):.1f} s)"
              + (f"; each trial scored on {config.folds} patient folds" if config.folds > 1 else ""))
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
    if not config.final:
        print(f"study {study.study_name}: best {config.metric} {best.value:.4f} in trial {best.number}; no final run "
              "(final=false)")
        return TuneResult(study.study_name, parent.info.run_id, ran, best, None)
    final_run_id = _final_run_once(config, study, best, parent.info.run_id, experiment)
    return TuneResult(study.study_name, parent.info.run_id, ran, best, final_run_id)


def _final_run_once(config: TuneConfig, study: optuna.Study, best: FrozenTrial, parent_run_id: str,
                    experiment: str) -> str | None:
    """The study's final run, trained by one worker only: the last to finish its trials (none of the study's
    trials running any more) that wins the claim (workers.claim_final). The others end here; a run of `tune`
    on a study whose final run is trained returns that run. Returns the final run's id (None: another
    worker trains it)."""
    name = study.study_name
    with workers.experimental():
        optuna.storages.fail_stale_trials(study)  # a dead worker's trial is not one to wait for
    running = study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
    if running:
        print(f"study {name}: {len(running)} trials still run in other workers; the last of them trains the final "
              "run")
        return None
    claim = workers.claim_final(config.storage, name, config.n_trials)
    if not claim.won:
        print(f"study {name}: its final run "
              + (f"is run {claim.run_id}" if claim.run_id else f"is trained by worker {claim.owner}"))
        return claim.run_id
    print(f"study {name}: best {config.metric} {best.value:.4f} in trial {best.number} with {best.params}; "
          f"training it in full (unfrozen_blocks={config.train.unfrozen_blocks})")
    run_id = None
    try:
        run_id = _final_run(config, best, name, parent_run_id, experiment)
    finally:  # a final run that failed is left to the next worker or run of tune
        workers.settle_final(config.storage, name, config.n_trials, run_id)
    return run_id
