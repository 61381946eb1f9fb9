"""Evaluation of a trained network in its run: the calibration fitted on validation, each split's metrics and
figures, the test metrics' patient intervals, the screening checks and the Grad-CAM figure.

Selection happens on validation (early stopping before this, then the temperature and the threshold here);
the test split is evaluated once, for reporting.
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import keras
import matplotlib.pyplot as plt
import mlflow
import numpy as np
import pandas as pd

from histoflow import tracking
from histoflow.artifacts import CALIBRATION_ARTIFACT, PREDICTIONS_ARTIFACT, SCREENING_ARTIFACT
from histoflow.data.pipeline import make_dataset
from histoflow.data.quality import measure_files
from histoflow.data.stain import StainNormalizer
from histoflow.data.step import PreparedData
from histoflow.modeling import explain, figures, inference, metrics, screening
from histoflow.modeling.architectures import gradcam_layer
from histoflow.modeling.calibration import Calibration, calibration_metrics, fit_calibration
from histoflow.modeling.features import CachedFeatures, copy_head, run_head
from histoflow.modeling.fitting import precision_policy
from histoflow.modeling.variants import TrainConfig

log = logging.getLogger(__name__)

# Fewer validation patients than this: a fitted temperature or threshold follows the split's chance.
MIN_CALIBRATION_PATIENTS = 20


def warn_small_validation(config: TrainConfig, val_rows: pd.DataFrame) -> None:
    """A warning (printed, and tagged on the run) when the temperature or a chosen threshold is fitted on too
    few validation patients: on ~10 BreaKHis patients, nearly separable, thresholds landed at 0.93-0.95."""
    fitted = [what for what, on in (("the temperature", config.calibration != "none"),
                                    (f"the {config.threshold_policy} threshold", config.threshold_policy != "argmax"))
              if on]
    patients = int(val_rows["patient"].nunique())
    if not fitted or patients >= MIN_CALIBRATION_PATIENTS:
        return
    message = (f"{' and '.join(fitted)} fitted on {patients} validation patients (fewer than "
               f"{MIN_CALIBRATION_PATIENTS}) follow that split's chance; a cross-validation (-e cv) fits its "
               "ensemble's threshold on the pooled out-of-fold predictions of every patient")
    log.warning(message)
    mlflow.set_tag("histoflow.calibration.warning", message)


@dataclass(frozen=True)
class Evaluation:
    """A trained network's results: validation and test metrics, the calibrated test probabilities (one row
    per test image, in the split's order) and the calibration they were made with."""

    validation: dict[str, float]
    test: dict[str, float]
    test_probabilities: np.ndarray
    calibration: Calibration


def evaluate(model: keras.Model, config: TrainConfig, prepared: PreparedData, stain: StainNormalizer,
             val_ds, test_ds, features: CachedFeatures | None = None) -> Evaluation:
    """Calibrate on validation, evaluate validation and test with it, and log everything into the active run.

    `features`: the frozen backbone's cached features the head was trained on; the network's outputs are then
    its head's on them (without test-time augmentation), not a second pass of the backbone over the images."""
    class_names = prepared.dataset.class_names
    val_rows, test_rows = prepared.rows("val"), prepared.rows("test")
    # One pass over each split gives the probabilities and the screening's features (a second pass for the
    # probabilities only with test-time augmentation).
    if features is not None and config.tta == "none":
        outputs = head_outputs(model, config, features)
        (val_raw, val_features), (test_raw, test_features) = outputs(val_rows), outputs(test_rows)
        fallbacks = features.fallbacks  # each image of the dataset normalised once, when extracted
    else:
        outputs = image_outputs(model, config, stain)
        (val_raw, val_features), (test_raw, test_features) = (inference.predict(inference.feature_model(model), d)
                                                              for d in (val_ds, test_ds))
        fallbacks = stain.fallbacks  # each image of the three splits normalised once by now
    if config.tta != "none":
        val_raw, test_raw = inference.predict(model, val_ds, config.tta), inference.predict(model, test_ds, config.tta)
    warn_small_validation(config, val_rows)
    calibration = fit_calibration(config.calibration, config.threshold_policy, val_rows["label"].to_numpy(), val_raw)
    mlflow.log_metrics({"temperature": calibration.temperature, "decision_threshold": calibration.threshold})
    tracking.log_json({**calibration.to_dict(), "class_names": class_names}, CALIBRATION_ARTIFACT)
    validation, _ = log_split("validation", val_rows, val_raw, calibration, class_names)
    test, test_probabilities = log_split("test", test_rows, test_raw, calibration, class_names)
    if stain.method != "none":  # images of all three splits left unchanged (too little tissue to normalise)
        mlflow.log_metric("stain_fallback_images", fallbacks)
    log_intervals(config, test_rows, test_probabilities, calibration.threshold)
    fit_screening(outputs, config, prepared, val_features, test_features)
    log_gradcam(model, config, test_rows, test_probabilities, calibration, class_names, stain)
    return Evaluation(validation, test, test_probabilities, calibration)


def log_figure(fig: plt.Figure, path: str) -> None:
    mlflow.log_figure(fig, path)
    plt.close(fig)


def log_split(split: str, rows: pd.DataFrame, raw: np.ndarray, calibration: Calibration,
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
    mlflow.log_table(predictions, PREDICTIONS_ARTIFACT.format(split=split))
    # The uncalibrated ECE and Brier score travel too: a cross-validation reports both, before and after.
    return {**scores, **{f"{k}_uncalibrated": v for k, v in raw_calibration.items()}}, probabilities


def log_intervals(config: TrainConfig, rows: pd.DataFrame, probabilities: np.ndarray, threshold: float) -> None:
    if config.bootstrap == 0:
        return
    intervals = metrics.patient_bootstrap(rows["patient"], rows["label"].to_numpy(), probabilities, threshold,
                                          resamples=config.bootstrap, seed=config.seed)
    mlflow.log_metrics({f"test_{name}_ci_{end}": value for name, (low, high) in intervals.items()
                        for end, value in (("low", low), ("high", high)) if np.isfinite(value)})


def log_gradcam(model: keras.Model, config: TrainConfig, rows: pd.DataFrame, probabilities: np.ndarray,
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
                for c, p in zip(chosen, predicted, strict=True)]
    log_figure(figures.gradcam_figure(images, heatmaps, captions), "evaluation/gradcam.png")


Outputs = Callable[[pd.DataFrame], list[np.ndarray]]  # rows -> the network's [probabilities, penultimate features]


def image_outputs(model: keras.Model, config: TrainConfig, stain: StainNormalizer) -> Outputs:
    """The network's outputs of rows, read from their image files."""
    extractor = inference.feature_model(model)

    def outputs(rows: pd.DataFrame) -> list[np.ndarray]:
        return inference.predict(extractor, make_dataset(rows["path"], rows["label"], config.image_size,
                                                         config.batch_size, stain=stain))
    return outputs


def head_outputs(model: keras.Model, config: TrainConfig, features: CachedFeatures) -> Outputs:
    """The network's outputs of rows, from its head on their cached backbone features: with the backbone frozen
    (its BatchNorm in inference mode), what the whole network gives on the images, at a fraction of the cost."""
    with precision_policy(config.mixed_precision):
        head = run_head(config, features.widths, features.numbers)
    copy_head(model, head)
    extractor = inference.feature_model(head)

    def outputs(rows: pd.DataFrame) -> list[np.ndarray]:
        taps = list(features.of(rows).taps)
        return [np.asarray(o) for o in extractor.predict(taps, batch_size=max(config.batch_size, 256), verbose=0)]
    return outputs


def fit_screening(outputs: Outputs, config: TrainConfig, prepared: PreparedData, val_features: np.ndarray,
                  test_features: np.ndarray) -> None:
    """Fit the served model's quality and OOD checks (training features, validation percentiles), log them,
    and how many validation and test images they flag (the test share is what users should expect).
    `outputs` gives the network's outputs of rows; the validation and test features are its."""
    train = prepared.rows("train")
    if len(train) > screening.MAX_FIT_IMAGES:
        train = train.sample(n=screening.MAX_FIT_IMAGES, random_state=config.seed)

    def quality(part: str) -> np.ndarray:
        return measure_files(prepared.rows(part)["path"].tolist(), config.image_size)

    train_features = outputs(train)[1]
    train_quality = measure_files(train["path"].tolist(), config.image_size)
    val_quality = quality("val")
    fitted = screening.fit_screening(train_features, train_quality, val_features, val_quality)
    mlflow.log_metrics({"ood_threshold": fitted.features.threshold, "colour_threshold": fitted.colour.threshold,
                        "focus_threshold": fitted.min_focus,
                        "validation_flagged_share": screening.flagged_share(val_quality, val_features, fitted),
                        "test_flagged_share": screening.flagged_share(quality("test"), test_features, fitted)})
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / Path(SCREENING_ARTIFACT).name
        fitted.save(path)
        mlflow.log_artifact(str(path), str(Path(SCREENING_ARTIFACT).parent))
