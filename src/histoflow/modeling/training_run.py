"""The training run (the variants' entry points): data -> split -> pipeline -> model -> fit -> evaluate -> MLflow."""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import keras
import mlflow
import numpy as np
import tensorflow as tf
from mlflow.models import Model, ModelSignature
from mlflow.types.schema import Schema, TensorSpec

from histoflow import tracking
from histoflow.artifacts import KERAS_ARTIFACT_DIR, MODEL_ARTIFACT, STAIN_ARTIFACT, TENSORBOARD_ARTIFACT
from histoflow.config import local_folder
from histoflow.data.pipeline import augmented_size, make_dataset
from histoflow.data.stain import StainNormalizer, fit_reference
from histoflow.data.step import PreparedData, log_data, prepare_data
from histoflow.modeling import checkpoints, distributed, evaluation, figures, resume
from histoflow.modeling.architectures import (
    build_baseline,
    build_cnn_lstm,
    build_fusion,
    compile_model,
    head_only,
    tap_numbers,
)
from histoflow.modeling.calibration import Calibration
from histoflow.modeling.catalog import BACKBONES
from histoflow.modeling.features import (
    CACHED_AUGMENT,
    CachedFeatures,
    copy_head,
    exact,
    head_dataset,
    load_or_extract,
    run_head,
)
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
from histoflow.modeling.variants import TrainConfig

log = logging.getLogger(__name__)


def build(config: TrainConfig, within: tf.distribute.Strategy | None = None) -> keras.Model:
    """The compiled model of `config`, its variables placed by `within` (default: `fitting.strategy()`)."""
    with (within or strategy()).scope(), precision_policy(config.mixed_precision):
        if config.uses_backbone:
            model = build_fusion(config.backbone, config.image_size, config.weights, config.fusion_width,
                                 config.dropout, config.alpha, config.unfrozen_blocks, config.head_batchnorm,
                                 taps=config.fusion_taps)
            _draw_head_as_a_trial(config, model)
        elif config.variant == "cnn_lstm":
            model = build_cnn_lstm(config.image_size, config.dropout)
        else:
            model = build_baseline(config.image_size, config.dropout)
        return compile_model(model, config.learning_rate, config.optimizer)


def _draw_head_as_a_trial(config: TrainConfig, model: keras.Model) -> None:
    """The fusion head's weights drawn again right after set_seeds(seed), as a tuning trial draws its own
    (HeadTrainer.start): a study's best settings then train from the trial's very start. Built after the
    backbone, the head would start elsewhere, and on a few hundred training images the start alone can decide
    between a good head and a degenerate one (docs/results.md, "Tuned")."""
    numbers = tap_numbers(config.fusion_taps, len(BACKBONES[config.backbone].taps))
    widths = [model.get_layer(f"fusion{i}_gap").output.shape[-1] for i in numbers]
    set_seeds(config.seed)
    copy_head(run_head(config, widths, numbers), model)


def stain_normalizer(config: TrainConfig, prepared: PreparedData) -> StainNormalizer:
    """The stain reference of `config.stain_norm`, fitted on the training split only."""
    return StainNormalizer(fit_reference(config.stain_norm, prepared.rows("train")["path"].tolist(), config.seed))


def datasets(config: TrainConfig, prepared: PreparedData, stain: StainNormalizer | None = None,
             train: bool = True):
    """The train, validation and test pipelines (augmentation on the training split only); without `train`,
    None for the training split (a fit on cached features never reads its images)."""
    def part(name: str, training: bool, cached: bool):
        rows = prepared.rows(name)
        return make_dataset(rows["path"], rows["label"], config.image_size, config.batch_size,
                            training=training, augment=config.augment if training else "none",
                            seed=config.seed, stain=stain,
                            cache_dir=local_folder(config.image_cache, "images") if cached else None)
    # Train and validation are read every epoch: from the disk cache. Test is read once: decoded as it streams.
    return part("train", True, True) if train else None, part("val", False, True), part("test", False, False)


def on_features(config: TrainConfig, phase: str) -> bool:
    """Whether a phase ("warmup" or "fit") trains the head on cached features rather than on images."""
    if not config.uses_backbone or config.feature_cache == "off" or distributed.cluster() is not None:
        return False  # the workers of a cluster train in step on images
    if phase == "warmup":  # the warm-up's point is a head fitted to the frozen features: the seed copies serve
        return True
    return config.unfrozen_blocks == 0 and (config.feature_cache == "on" or exact(config.augment))


@dataclass(frozen=True)
class _TrainingSetup:
    """What fit needs, made the same way by the run (or the chief) and by every other worker."""

    stain: StainNormalizer
    datasets: tuple  # train, validation, test pipelines
    model: keras.Model
    class_weight: dict[int, float] | None


def _training_setup(config: TrainConfig, prepared: PreparedData) -> _TrainingSetup:
    stain = stain_normalizer(config, prepared)
    train = not on_features(config, "fit")
    return _TrainingSetup(stain, datasets(config, prepared, stain, train), build(config),
                         class_weights(prepared.rows("train")["label"].to_numpy(), config.class_weight))


def fit_head_on_features(config: TrainConfig, model: keras.Model, prepared: PreparedData, stain: StainNormalizer,
                         *, epochs: int, learning_rate: float, extra_callbacks: list[keras.callbacks.Callback],
                         class_weight: dict[int, float] | None,
                         checkpoint: Path | None) -> tuple[FitResult, CachedFeatures]:
    """The fusion head of `model` trained alone on its frozen backbone's cached features (extracted through
    `model` on a miss), from the head's current weights, and put back into `model`. The same fit as on images
    with a frozen backbone (the backbone's BatchNorm runs in inference mode either way), minus the backbone's
    forward pass every epoch. Returns the fit and the features (the evaluation reads them too)."""
    features = load_or_extract(config, prepared, local_folder(config.image_cache, "features"), stain, model)
    print(f"backbone features {'read from' if features.hit else 'extracted into'} "
          f"{features.path or 'memory'} ({features.seconds:.1f} s)", flush=True)
    mlflow.set_tags({"feature_cache": "hit" if features.hit else "miss",
                     "feature_cache.path": str(features.path or "")})
    mlflow.log_metric("feature_cache_s", features.seconds)
    if not exact(config.augment):
        copies = CACHED_AUGMENT[config.augment]
        mlflow.set_tag("histoflow.feature_cache.augment", f"{config.augment} trained as the {copies} copies, "
                       "without colour jitter")
    set_seeds(config.seed)  # its dropout layers' seeds as a tuning trial's head draws them
    with precision_policy(config.mixed_precision):
        head = compile_model(run_head(config, features.widths, features.numbers), learning_rate, config.optimizer)
    copy_head(model, head)
    result = fit(head, head_dataset(features.splits["train"], config.batch_size, True, config.seed),
                 head_dataset(features.splits["val"], config.batch_size, False, config.seed), epochs=epochs,
                 extra_callbacks=extra_callbacks, class_weight=class_weight, patience=config.patience,
                 lr_patience=config.lr_patience, checkpoint_dir=checkpoint)  # a head's test step traces in no time
    copy_head(head, model)
    return result, features


def warm_up_head(config: TrainConfig, setup: _TrainingSetup, prepared: PreparedData,
                 checkpoint: Path | None) -> FitResult | None:
    """`warmup_epochs` of the head alone on the frozen backbone (early stopping as in the fit; on its cached
    features unless feature_cache=off), then the model compiled again for fine-tuning its unfrozen stages at
    `learning_rate`; None without a warm-up. Its epochs are logged as warmup_train_loss, warmup_val_loss, ...
    and checkpointed in the run's folder."""
    if not config.warmup_epochs:
        return None
    model, (train_ds, val_ds, _) = setup.model, setup.datasets
    phase = {"epochs": config.warmup_epochs, "extra_callbacks": [EpochMetrics(prefix="warmup_")],
             "class_weight": setup.class_weight}
    warmup_checkpoint = checkpoint and checkpoint / checkpoints.WARMUP
    print(f"warm-up: {config.warmup_epochs} epochs of the head alone at {config.warmup_learning_rate:g}", flush=True)
    if on_features(config, "warmup"):
        result, _ = fit_head_on_features(config, model, prepared, setup.stain, checkpoint=warmup_checkpoint,
                                         learning_rate=config.warmup_learning_rate, **phase)
    else:
        with head_only(model), model.distribute_strategy.scope():
            compile_model(model, config.warmup_learning_rate, config.optimizer)
            result = fit(model, train_ds, val_ds, patience=config.patience, lr_patience=config.lr_patience,
                         checkpoint_dir=warmup_checkpoint, inference_validation=True, **phase)
    with model.distribute_strategy.scope():  # a new optimizer: its state belonged to the head alone
        compile_model(model, config.learning_rate, config.optimizer)
    print(f"warm-up done (best epoch {result.best_epoch}): fine-tuning {config.unfrozen_blocks} backbone stages "
          f"at {config.learning_rate:g}", flush=True)
    return result


class _KerasFlavor:
    """mlflow.keras, with the model folder created first: MLflow 3.17's keras save_model writes the
    input example before it creates the folder (FileNotFoundError whenever an example is given)."""

    __name__ = "mlflow.keras"

    @staticmethod
    def save_model(path: str, validate_serving_input: bool = True, copy_to: Path | None = None, **kwargs) -> None:
        # validate_serving_input is Model.log's (it reaches the flavor too); mlflow.keras has no such argument.
        os.makedirs(path, exist_ok=True)
        mlflow.keras.save_model(path=path, **kwargs)
        if copy_to is not None:  # the .keras file it saved: the run's own artifact is that file, not a second save
            shutil.copyfile(next(Path(path, "data").glob("*.keras")), copy_to)


def _log_model(model: keras.Model, config: TrainConfig, example: np.ndarray, class_names: list[str]) -> float:
    """The MLflow model (keras flavor) and its .keras file as an artifact of its own (saved once: seconds for a
    DenseNet); returns the file size in MB."""
    # The signature from the shapes (a prediction for it would trace the network for one more input shape), and
    # no serving check of the example (MLflow would load the model back and predict it: seconds for a DenseNet;
    # the served classifier of `register` is checked when it is logged).
    signature = ModelSignature(inputs=Schema([TensorSpec(np.dtype("float32"), (-1, *model.input_shape[1:]))]),
                              outputs=Schema([TensorSpec(np.dtype("float32"), (-1, *model.output_shape[1:]))]))
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"{config.model_name}.keras"
        Model.log(
            artifact_path=None, name=MODEL_ARTIFACT, flavor=_KerasFlavor, flavor_name="mlflow.keras", model=model,
            signature=signature, input_example=example, validate_serving_input=False, copy_to=path,
            pip_requirements=tracking.pinned_requirements("mlflow", "keras", "numpy"),
            metadata={"class_names": class_names, "image_size": config.image_size, "variant": config.variant,
                      "model": config.model_name, "input": "float32 RGB in [0, 1], resized with "
                      "histoflow.data.images.resize_and_scale"},
        )
        mlflow.log_artifact(str(path), KERAS_ARTIFACT_DIR)
        return path.stat().st_size / 2**20


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


def run(config: TrainConfig) -> str:
    """Train and evaluate one variant as one MLflow run; returns the run id."""
    config.validate()
    cluster = distributed.cluster()
    if cluster is not None and not cluster.is_chief:
        return train_worker(config, cluster)
    tracking.configure(config.experiment)  # first: a tracking server that is down fails before any work
    if cluster is not None:
        distributed.join(cluster, config.resume, config.warmup_epochs)
    resumed = resume.resumable(config)
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
        resume.explain_outage(config, run_id, exc)
        raise


def _keep_the_better(model: keras.Model, warmed: list[np.ndarray], warm: FitResult, tuned: FitResult) -> None:
    """The warmed-up head's weights back when no fine-tuning epoch reached its validation loss: early stopping
    chooses among the fine-tuning epochs only, and the end of the warm-up is a candidate too (on a few hundred
    images a first epoch of fine-tuning can already be worse than the head alone). Tagged either way."""
    warm_loss, tuned_loss = min(warm.history["val_loss"]), min(tuned.history["val_loss"])
    kept = "warmup" if tuned_loss > warm_loss else "finetuned"
    if kept == "warmup":
        model.set_weights(warmed)
        print(f"fine-tuning never reached the warmed-up head's validation loss ({tuned_loss:.4f} against "
              f"{warm_loss:.4f}): the warmed-up head is kept", flush=True)
    mlflow.set_tags({"histoflow.finetune.kept": kept, "histoflow.finetune.val_loss":
                     f"warm-up {warm_loss:.4f}, fine-tuned {tuned_loss:.4f}"})


def train_worker(config: TrainConfig, cluster: distributed.Cluster) -> str:
    """A worker other than the chief: the chief's data, model and training steps, in step with it; it logs
    nothing and saves nothing (the chief's MLflow run holds the result). Returns an empty run id."""
    if os.environ.get("MLFLOW_RUN_ID"):
        log.warning("%s was started by `mlflow run`, which opened a run of its own: start workers other than "
                    "the chief with `histoflow train` (docs/scaling.md)", cluster)
    distributed.join(cluster, config.resume, config.warmup_epochs)
    prepared = prepare_data(config, config.split_table)
    set_seeds(config.seed)
    setup = _training_setup(config, prepared)
    train_ds, val_ds, _ = setup.datasets
    fit(setup.model, train_ds, val_ds, epochs=config.epochs, extra_callbacks=[], class_weight=setup.class_weight,
        patience=config.patience, lr_patience=config.lr_patience)
    print(f"{cluster}: training finished; weights sha256 {distributed.weights_digest(setup.model)}; waiting for the "
          "chief to evaluate and log the run", flush=True)
    distributed.barrier()
    return ""


def train_in_run(config: TrainConfig, prepared: PreparedData, run_name: str) -> TrainOutcome:
    """Train and evaluate in the active run: data, model, fit, evaluation (histoflow.modeling.evaluation), model
    files."""
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
        warm = warm_up_head(config, setup, prepared, checkpoint)
        warmed = model.get_weights() if warm and not cluster else None
        callbacks = [EpochMetrics(), tensorboard(board)]
        features = None  # the backbone's cached features, when the fit trained the head on them
        if on_features(config, "fit"):
            result, features = fit_head_on_features(config, model, prepared, stain, epochs=config.epochs,
                                                    learning_rate=config.learning_rate, extra_callbacks=callbacks,
                                                    class_weight=weights, checkpoint=checkpoint)
        else:
            result = fit(model, train_ds, val_ds, epochs=config.epochs, extra_callbacks=callbacks,
                         class_weight=weights, patience=config.patience, lr_patience=config.lr_patience,
                         checkpoint_dir=checkpoint, inference_validation=True)
        if warmed is not None:
            _keep_the_better(model, warmed, warm, result)
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
    evaluation.log_figure(figures.history_figure(result.history, run_name), "evaluation/training_curves.png")
    evaluated = evaluation.evaluate(model, config, prepared, stain, val_ds, test_ds, features)
    example = next(iter(test_ds))[0].numpy()[:1]
    mlflow.log_metric("model_size_mb", _log_model(model, config, example, prepared.dataset.class_names))
    run_id = mlflow.active_run().info.run_id
    checkpoints.remove(checkpoint)  # the run is complete: nothing left to resume
    test = evaluated.test
    print(f"{run_name}: test accuracy {test['accuracy']:.4f}, balanced accuracy {test['balanced_accuracy']:.4f}, "
          f"ROC AUC {test['roc_auc']:.4f} (run {run_id})")
    print(f"  in the MLflow UI: {tracking.ui_link(mlflow.active_run().info.experiment_id, run_id)}")
    return TrainOutcome(run_id, evaluated.validation, test, evaluated.test_probabilities, evaluated.calibration)
