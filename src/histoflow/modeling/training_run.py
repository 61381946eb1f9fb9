"""The training run (the variants' entry points): data -> split -> pipeline -> model -> fit -> evaluate -> MLflow."""

from __future__ import annotations

import logging
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import keras
import matplotlib.pyplot as plt
import mlflow
import numpy as np
import pandas as pd
import tensorflow as tf
from mlflow.models import Model, infer_signature

from histoflow import tracking
from histoflow.data.pipeline import augmented_size, make_dataset
from histoflow.data.stain import StainNormalizer, fit_reference
from histoflow.data.step import PreparedData, log_data, prepare_data
from histoflow.config import typed_params
from histoflow.errors import ConfigError, TrackingError
from histoflow.data.quality import measure_files
from histoflow.modeling import checkpoints, distributed, explain, figures, inference, metrics, screening
from histoflow.modeling.architectures import (
    build_baseline,
    build_cnn_lstm,
    build_fusion,
    compile_model,
    gradcam_layer,
    head_only,
)
from histoflow.modeling.calibration import Calibration, calibration_metrics, fit_calibration
from histoflow.modeling.fitting import (
    EpochMetrics,
    FitResult,
    class_weights,
    fit,
    precision_policy,
    set_seeds,
    strategy,
    tensorboard,
)
from histoflow.modeling.variants import LOCAL_FIELDS, TrainConfig, variant_fields

log = logging.getLogger(__name__)
MODEL_ARTIFACT = "model"
KERAS_ARTIFACT_DIR = "keras"
# Temperature and threshold fitted on validation: the registered serving model applies them.
CALIBRATION_ARTIFACT = "evaluation/calibration.json"
# The stain reference fitted on the training split (stain_norm other than none): the served model applies it.
STAIN_ARTIFACT = "data/stain_reference.json"
# Quality and out-of-distribution checks fitted on training and validation: the served model applies them.
SCREENING_ARTIFACT = "evaluation/screening.npz"
# Keras's TensorBoard logs of the fit (`tensorboard --logdir` on the downloaded folder).
TENSORBOARD_ARTIFACT = "tensorboard"


def build(config: TrainConfig, within: tf.distribute.Strategy | None = None) -> keras.Model:
    """The compiled model of `config`, its variables placed by `within` (default: `fitting.strategy()`)."""
    with (within or strategy()).scope(), precision_policy(config.mixed_precision):
        if config.uses_backbone:
            model = build_fusion(config.backbone, config.image_size, config.weights, config.fusion_width,
                                 config.dropout, config.alpha, config.unfrozen_blocks, config.head_batchnorm)
        elif config.variant == "cnn_lstm":
            model = build_cnn_lstm(config.image_size, config.dropout)
        else:
            model = build_baseline(config.image_size, config.dropout)
        return compile_model(model, config.learning_rate, config.optimizer)


def stain_normalizer(config: TrainConfig, prepared: PreparedData) -> StainNormalizer:
    """The stain reference of `config.stain_norm`, fitted on the training split only."""
    return StainNormalizer(fit_reference(config.stain_norm, prepared.rows("train")["path"].tolist(), config.seed))


def datasets(config: TrainConfig, prepared: PreparedData, stain: StainNormalizer | None = None):
    """The train, validation and test pipelines (augmentation on the training split only)."""
    def part(name: str, training: bool, cached: bool):
        rows = prepared.rows(name)
        return make_dataset(rows["path"], rows["label"], config.image_size, config.batch_size,
                            training=training, augment=config.augment if training else "none",
                            seed=config.seed, stain=stain, cache_dir=config.image_cache if cached else None)
    # Train and validation are read every epoch: from the disk cache. Test is read once: decoded as it streams.
    return part("train", True, True), part("val", False, True), part("test", False, False)


@dataclass(frozen=True)
class _TrainingSetup:
    """What fit needs, made the same way by the run (or the chief) and by every other worker."""

    stain: StainNormalizer
    datasets: tuple  # train, validation, test pipelines
    model: keras.Model
    class_weight: dict[int, float] | None


def _training_setup(config: TrainConfig, prepared: PreparedData) -> _TrainingSetup:
    stain = stain_normalizer(config, prepared)
    return _TrainingSetup(stain, datasets(config, prepared, stain), build(config),
                         class_weights(prepared.rows("train")["label"].to_numpy(), config.class_weight))


def warm_up_head(config: TrainConfig, model: keras.Model, train_ds: tf.data.Dataset, val_ds: tf.data.Dataset,
                 class_weight: dict[int, float] | None, checkpoint: Path | None) -> FitResult | None:
    """`warmup_epochs` of the head alone on the frozen backbone (early stopping as in the fit), then the
    model compiled again for fine-tuning its unfrozen stages at `learning_rate`; None without a warm-up.
    Its epochs are logged as warmup_train_loss, warmup_val_loss, ... and checkpointed in the run's folder."""
    if not config.warmup_epochs:
        return None
    with head_only(model), model.distribute_strategy.scope():
        compile_model(model, config.warmup_learning_rate, config.optimizer)
        print(f"warm-up: {config.warmup_epochs} epochs of the head alone at {config.warmup_learning_rate:g}", flush=True)
        result = fit(model, train_ds, val_ds, config.warmup_epochs, [EpochMetrics(prefix="warmup_")], class_weight,
                     config.patience, config.lr_patience, checkpoint and checkpoint / checkpoints.WARMUP)
    with model.distribute_strategy.scope():  # a new optimizer: its state belonged to the head alone
        compile_model(model, config.learning_rate, config.optimizer)
    print(f"warm-up done (best epoch {result.best_epoch}): fine-tuning {config.unfrozen_blocks} backbone stages "
          f"at {config.learning_rate:g}", flush=True)
    return result


def log_figure(fig: plt.Figure, path: str) -> None:
    mlflow.log_figure(fig, path)
    plt.close(fig)


def _log_evaluation(split: str, rows: pd.DataFrame, raw: np.ndarray, calibration: Calibration,
                    class_names: list[str]) -> tuple[dict, np.ndarray]:
    """Metrics of the served decision (calibrated probabilities, the threshold) with a split prefix
    (validation_*, test_*), the uncalibrated ECE and Brier score beside them, the confusion matrix
    (PNG+JSON), ROC and reliability curves, report and predictions. Returns the metrics (the uncalibrated
    ones too) and the calibrated probabilities."""
    probabilities = calibration.apply(raw)
    threshold = calibration.threshold
    scores = metrics.evaluate(rows, probabilities, threshold)
    y = rows["label"].to_numpy()
    raw_calibration = calibration_metrics(y, raw[:, 1])
    mlflow.log_metrics({**{f"{split}_{k}": v for k, v in scores.items() if np.isfinite(v)},
                        **{f"{split}_{k}_uncalibrated": v for k, v in raw_calibration.items()}})
    matrix = metrics.confusion(y, probabilities, threshold)
    tracking.log_json({"labels": class_names, "matrix": matrix.tolist(), "rows": "true", "columns": "predicted",
                       "threshold": threshold}, f"evaluation/{split}_confusion_matrix.json")
    log_figure(figures.confusion_figure(matrix, class_names, f"{split} confusion matrix (threshold {threshold:.3g})"),
                f"evaluation/{split}_confusion_matrix.png")
    log_figure(figures.roc_figure(y, probabilities[:, 1], f"{split} ROC"), f"evaluation/{split}_roc_curve.png")
    log_figure(figures.reliability_figure(y, {"network": raw[:, 1], f"T = {calibration.temperature:.2f}":
                                               probabilities[:, 1]}, f"{split} reliability"),
                f"evaluation/{split}_reliability.png")
    mlflow.log_text(metrics.report_text(y, probabilities, class_names, threshold),
                    f"evaluation/{split}_classification_report.txt")
    predictions = rows[["relpath", "patient", "label"]].assign(probability_malignant=probabilities[:, 1],
                                                               probability_uncalibrated=raw[:, 1])
    mlflow.log_table(predictions, f"evaluation/{split}_predictions.json")
    # The uncalibrated ECE and Brier score travel too: a cross-validation reports both, before and after.
    return {**scores, **{f"{k}_uncalibrated": v for k, v in raw_calibration.items()}}, probabilities


def _log_intervals(config: TrainConfig, rows: pd.DataFrame, probabilities: np.ndarray, threshold: float) -> None:
    if config.bootstrap == 0:
        return
    intervals = metrics.patient_bootstrap(rows["patient"], rows["label"].to_numpy(), probabilities, threshold,
                                          resamples=config.bootstrap, seed=config.seed)
    mlflow.log_metrics({f"test_{name}_ci_{end}": value for name, (low, high) in intervals.items()
                        for end, value in (("low", low), ("high", high)) if np.isfinite(value)})


def _log_gradcam(model: keras.Model, config: TrainConfig, rows: pd.DataFrame, probabilities: np.ndarray,
                 calibration: Calibration, class_names: list[str], stain: StainNormalizer) -> None:
    if config.gradcam_per_class == 0:
        return
    labels = rows["label"].to_numpy()
    chosen = explain.pick_examples(labels, config.gradcam_per_class, config.seed)
    # Only the chosen images are read again, not the whole test split.
    picked = rows.iloc[chosen]
    images = np.concatenate([x for x, _ in make_dataset(picked["path"], picked["label"], config.image_size,
                                                         len(picked), stain=stain).as_numpy_iterator()])
    predicted = calibration.decide(probabilities[chosen])
    heatmaps = explain.GradCam(model, gradcam_layer(model))(images, predicted)
    captions = [f"true {class_names[labels[c]]}\npred {class_names[p]} {probabilities[c, p]:.2f}"
                for c, p in zip(chosen, predicted)]
    log_figure(figures.gradcam_figure(images, heatmaps, captions), "evaluation/gradcam.png")


def _fit_screening(model: keras.Model, config: TrainConfig, prepared: PreparedData, stain: StainNormalizer,
                   val_ds, test_ds) -> None:
    """Fit the served model's quality and OOD checks (training features, validation percentiles), log them,
    and how many validation and test images they flag (the test share is what users should expect)."""
    train = prepared.rows("train")
    if len(train) > screening.MAX_FIT_IMAGES:
        train = train.sample(n=screening.MAX_FIT_IMAGES, random_state=config.seed)
    extractor = screening.feature_model(model)

    def features(dataset) -> np.ndarray:
        return extractor.predict(dataset, verbose=0)[1]

    def quality(part: str) -> np.ndarray:
        return measure_files(prepared.rows(part)["path"].tolist(), config.image_size)

    train_features = features(make_dataset(train["path"], train["label"], config.image_size, config.batch_size,
                                           stain=stain))
    train_quality = measure_files(train["path"].tolist(), config.image_size)
    val_features, val_quality = features(val_ds), quality("val")
    fitted = screening.fit_screening(train_features, train_quality, val_features, val_quality)
    mlflow.log_metrics({"ood_threshold": fitted.features.threshold, "colour_threshold": fitted.colour.threshold,
                        "focus_threshold": fitted.min_focus,
                        "validation_flagged_share": screening.flagged_share(val_quality, val_features, fitted),
                        "test_flagged_share": screening.flagged_share(quality("test"), features(test_ds), fitted)})
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / Path(SCREENING_ARTIFACT).name
        fitted.save(path)
        mlflow.log_artifact(str(path), str(Path(SCREENING_ARTIFACT).parent))


class _KerasFlavor:
    """mlflow.keras, with the model folder created first: MLflow 3.17's keras save_model writes the
    input example before it creates the folder (FileNotFoundError whenever an example is given)."""

    __name__ = "mlflow.keras"

    @staticmethod
    def save_model(path: str, **kwargs) -> None:
        os.makedirs(path, exist_ok=True)
        mlflow.keras.save_model(path=path, **kwargs)


def _log_model(model: keras.Model, config: TrainConfig, example: np.ndarray, class_names: list[str]) -> float:
    """The .keras file as an artifact and the MLflow model (keras flavor); returns the file size in MB."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"{config.model_name}.keras"
        model.save(path)
        size_mb = path.stat().st_size / 2**20
        mlflow.log_artifact(str(path), KERAS_ARTIFACT_DIR)
    signature = infer_signature(example, model.predict(example, verbose=0))
    Model.log(
        artifact_path=None, name=MODEL_ARTIFACT, flavor=_KerasFlavor, flavor_name="mlflow.keras", model=model,
        signature=signature, input_example=example,
        pip_requirements=tracking.pinned_requirements("mlflow", "keras", "numpy"),
        metadata={"class_names": class_names, "image_size": config.image_size, "variant": config.variant,
                  "model": config.model_name, "input": "float32 RGB in [0, 1], resized with "
                  "histoflow.data.images.resize_and_scale"},
    )
    return size_mb


def _leave_cluster(config: TrainConfig, model: keras.Model, workers: int) -> keras.Model:
    """The chief's trained model as a local copy: evaluation, screening and saving run on the chief alone,
    which the distributed model cannot (each of its steps waits for every worker)."""
    mlflow.set_tags({"histoflow.distributed": f"MultiWorkerMirroredStrategy, {workers} workers",
                     "histoflow.weights_sha256": distributed.weights_digest(model)})
    return distributed.local_copy(model, build(config, tf.distribute.get_strategy()))


@dataclass(frozen=True)
class TrainOutcome:
    """What a training run leaves besides its logging: its id, metrics and the held-out predictions."""

    run_id: str
    validation: dict[str, float]
    test: dict[str, float]
    test_probabilities: np.ndarray  # calibrated, one row per test image in the split's order
    calibration: Calibration


def _resumable(config: TrainConfig) -> str:
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


def run(config: TrainConfig) -> str:
    """Train and evaluate one variant as one MLflow run; returns the run id."""
    config.validate()
    cluster = distributed.cluster()
    if cluster is not None and not cluster.is_chief:
        return train_worker(config, cluster)
    tracking.configure(config.experiment)  # first: a tracking server that is down fails before any work
    if cluster is not None:
        _join_cluster(config, cluster)
    resumed = _resumable(config)
    prepared = prepare_data(config, config.split_table)
    run_name = config.run_name or f"{config.variant}-{config.model_name}-{prepared.dataset.name}"
    wrapper = os.environ.get("MLFLOW_RUN_ID", "")
    if resumed and wrapper and wrapper != resumed:  # `mlflow run -P resume=<id>` made a run of its own
        mlflow.MlflowClient().set_tag(wrapper, "histoflow.resumed_in", resumed)
    run_id = resumed
    try:
        with mlflow.start_run(run_id=resumed or None, run_name=None if resumed else run_name) as active:
            run_id = active.info.run_id
            mlflow.set_tag("histoflow.step", "train")
            if resumed:
                print(f"resuming run {resumed} from its checkpoint")
            run_id = train_in_run(config, prepared, run_name).run_id
        if cluster is not None:
            distributed.barrier()  # the other workers have waited for the run to end
        return run_id
    except Exception as exc:
        _explain_outage(config, run_id, exc)
        raise


def _join_cluster(config: TrainConfig, cluster: distributed.Cluster) -> None:
    """Connect to the other workers (before any other TensorFlow operation). A multi-worker run keeps no
    checkpoints: the workers' weights could not be restored together."""
    if config.resume:
        raise ConfigError("resume: a multi-worker run (TF_CONFIG set) keeps no checkpoints, so it cannot be "
                          "resumed; start it again")
    if config.warmup_epochs:
        raise ConfigError("warmup_epochs: a multi-worker run has no head warm-up; warm up on one machine, or "
                          "train with warmup_epochs=0")
    print(f"{cluster}: waiting for the other workers", flush=True)
    distributed.multi_worker_strategy()


def train_worker(config: TrainConfig, cluster: distributed.Cluster) -> str:
    """A worker other than the chief: the chief's data, model and training steps, in step with it; it logs
    nothing and saves nothing (the chief's MLflow run holds the result). Returns an empty run id."""
    if os.environ.get("MLFLOW_RUN_ID"):
        log.warning("%s was started by `mlflow run`, which opened a run of its own: start workers other than "
                    "the chief with `histoflow train` (docs/scaling.md)", cluster)
    _join_cluster(config, cluster)
    prepared = prepare_data(config, config.split_table)
    set_seeds(config.seed)
    setup = _training_setup(config, prepared)
    train_ds, val_ds, _ = setup.datasets
    fit(setup.model, train_ds, val_ds, config.epochs, [], setup.class_weight, config.patience, config.lr_patience)
    print(f"{cluster}: training finished; weights sha256 {distributed.weights_digest(setup.model)}; waiting for the "
          "chief to evaluate and log the run", flush=True)
    distributed.barrier()
    return ""


def _explain_outage(config: TrainConfig, run_id: str, exc: Exception) -> None:
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


def train_in_run(config: TrainConfig, prepared: PreparedData, run_name: str) -> TrainOutcome:
    """Train and evaluate in the active run: data, model, fit, calibration, evaluation, intervals, model files."""
    dataset = prepared.dataset
    set_seeds(config.seed)
    tracking.log_new_params(config.to_params())
    mlflow.set_tags({"variant": config.variant, "model": config.model_name})
    log_data(prepared)
    setup = _training_setup(config, prepared)
    stain, model, weights = setup.stain, setup.model, setup.class_weight
    train_ds, val_ds, test_ds = setup.datasets
    if stain.method != "none":
        tracking.log_json(stain.reference, STAIN_ARTIFACT)
    cluster = distributed.cluster()
    checkpoint = None if cluster else checkpoints.run_checkpoint_dir(config.checkpoint_dir,
                                                                     mlflow.active_run().info.run_id)
    with tempfile.TemporaryDirectory() as tmp:
        # In the checkpoint, a resumed run's TensorBoard logs continue the interrupted run's.
        board = (checkpoint or Path(tmp)) / "tensorboard"
        warm = warm_up_head(config, model, train_ds, val_ds, weights, checkpoint)
        result = fit(model, train_ds, val_ds, config.epochs, [EpochMetrics(), tensorboard(board)], weights,
                     config.patience, config.lr_patience, checkpoint)
        if board.is_dir():
            mlflow.log_artifacts(str(board), TENSORBOARD_ARTIFACT)
    if cluster:
        model = _leave_cluster(config, model, len(cluster.workers))
    n_train = augmented_size(len(prepared.rows("train")), config.augment)
    seconds = result.seconds + (warm.seconds if warm else 0.0)
    epochs_run = result.epochs_run + (warm.epochs_run if warm else 0)
    # Logged once training is over, so that a resumed run logs each of these once.
    mlflow.log_metrics({"n_params": model.count_params(), "train_time_s": seconds,
                        "best_epoch": result.best_epoch, "epochs_run": result.epochs_run,
                        "train_images_per_s": n_train * epochs_run / seconds})
    if warm:
        mlflow.log_metrics({"warmup_best_epoch": warm.best_epoch, "warmup_epochs_run": warm.epochs_run,
                            "warmup_time_s": warm.seconds})
    if result.resumed_at:
        mlflow.set_tag("histoflow.resumed_at_epoch", str(result.resumed_at))
    log_figure(figures.history_figure(result.history, run_name), "evaluation/training_curves.png")
    # Selection happened on validation (early stopping, temperature, threshold); test is evaluated once, here.
    val_rows, test_rows = prepared.rows("val"), prepared.rows("test")
    val_raw = inference.predict(model, val_ds, config.tta)
    calibration = fit_calibration(config.calibration, config.threshold_policy, val_rows["label"].to_numpy(), val_raw)
    mlflow.log_metrics({"temperature": calibration.temperature, "decision_threshold": calibration.threshold})
    tracking.log_json({**calibration.to_dict(), "class_names": dataset.class_names}, CALIBRATION_ARTIFACT)
    validation, _ = _log_evaluation("validation", val_rows, val_raw, calibration, dataset.class_names)
    test, test_probabilities = _log_evaluation("test", test_rows, inference.predict(model, test_ds, config.tta),
                                               calibration, dataset.class_names)
    if stain.method != "none":  # images of all three splits left unchanged (too little tissue to normalise)
        mlflow.log_metric("stain_fallback_images", stain.fallbacks)
    _log_intervals(config, test_rows, test_probabilities, calibration.threshold)
    _fit_screening(model, config, prepared, stain, val_ds, test_ds)
    _log_gradcam(model, config, test_rows, test_probabilities, calibration, dataset.class_names, stain)
    example = next(iter(test_ds))[0].numpy()[:1]
    mlflow.log_metric("model_size_mb", _log_model(model, config, example, dataset.class_names))
    run_id = mlflow.active_run().info.run_id
    checkpoints.remove(checkpoint)  # the run is complete: nothing left to resume
    print(f"{run_name}: test accuracy {test['accuracy']:.4f}, balanced accuracy {test['balanced_accuracy']:.4f}, "
          f"ROC AUC {test['roc_auc']:.4f} (run {run_id})")
    print(f"  in the MLflow UI: {tracking.ui_link(mlflow.active_run().info.experiment_id, run_id)}")
    return TrainOutcome(run_id, validation, test, test_probabilities, calibration)
