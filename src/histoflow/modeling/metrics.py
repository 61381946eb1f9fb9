"""Evaluation with scikit-learn: image-level and patient-level metrics of a split's predictions."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pandas as pd
from sklearn.metrics import (
    accuracy_score,
    balanced_accuracy_score,
    classification_report,
    confusion_matrix,
    f1_score,
    log_loss,
    precision_score,
    recall_score,
    roc_auc_score,
)

from histoflow.modeling.calibration import calibration_metrics

# The same names for every variant, so the MLflow UI compare view lines them up.
METRIC_NAMES = ("accuracy", "loss", "precision", "recall", "specificity", "f1", "roc_auc",
                "balanced_accuracy", "ece", "brier", "patient_accuracy", "patient_score")
# Test metrics reported with a bootstrap interval over patients, and how each is computed there.
INTERVAL_SCORES = {
    "roc_auc": lambda y, p, t: roc_auc_score(y, p),
    "balanced_accuracy": lambda y, p, t: balanced_accuracy_score(y, p >= t),
    "f1": lambda y, p, t: f1_score(y, p >= t, zero_division=0),
    "accuracy": lambda y, p, t: accuracy_score(y, p >= t),
}
INTERVAL_METRICS = tuple(INTERVAL_SCORES)
ONE_CLASS_UNDEFINED = ("roc_auc", "balanced_accuracy")


def decision_metrics(y_true: np.ndarray, y_pred: np.ndarray) -> dict[str, float]:
    """Metrics of class decisions (1 = malignant) against the labels."""
    y_true, y_pred = np.asarray(y_true, dtype=int), np.asarray(y_pred, dtype=int)
    tn, fp, fn, tp = confusion_matrix(y_true, y_pred, labels=[0, 1]).ravel()
    two_classes = len(np.unique(y_true)) == 2
    return {
        "accuracy": float(accuracy_score(y_true, y_pred)),
        "precision": float(precision_score(y_true, y_pred, zero_division=0)),
        "recall": float(recall_score(y_true, y_pred, zero_division=0)),
        "specificity": float(tn / (tn + fp)) if tn + fp else float("nan"),
        "f1": float(f1_score(y_true, y_pred, zero_division=0)),
        "balanced_accuracy": float(balanced_accuracy_score(y_true, y_pred)) if two_classes else float("nan"),
    }


def binary_metrics(y_true: np.ndarray, probabilities: np.ndarray, threshold: float = 0.5) -> dict[str, float]:
    """Metrics of the positive (malignant) class; probabilities has one column per class."""
    y_true = np.asarray(y_true, dtype=int)
    positive = probabilities[:, 1]
    two_classes = len(np.unique(y_true)) == 2
    return {
        **decision_metrics(y_true, (positive >= threshold).astype(int)),
        "loss": float(log_loss(y_true, np.clip(probabilities, 1e-7, 1.0), labels=[0, 1])),
        "roc_auc": float(roc_auc_score(y_true, positive)) if two_classes else float("nan"),
    }


def patient_table(patients: pd.Series | np.ndarray, positive_probability: np.ndarray,
                  y_true: np.ndarray | None = None, threshold: float = 0.5) -> pd.DataFrame:
    """One row per patient: images, mean positive probability and the call made from it; with labels,
    the patient's label (the majority of its images' labels: IDC patients have both) and the share of
    its images classified correctly. The one patient-level rule of evaluation and batch prediction."""
    table = pd.DataFrame({"patient": np.asarray(patients), "p": np.asarray(positive_probability, dtype=float)})
    aggregations = {"images": ("p", "size"), "mean_p": ("p", "mean")}
    if y_true is not None:
        table["y"] = np.asarray(y_true, dtype=int)
        table["correct"] = (table["p"] >= threshold).astype(int) == table["y"]
        aggregations.update(y=("y", "mean"), score=("correct", "mean"))
    per_patient = table.groupby("patient", sort=True).agg(**aggregations)
    per_patient["predicted"] = (per_patient["mean_p"] >= threshold).astype(int)
    if y_true is not None:
        per_patient["label"] = (per_patient.pop("y") >= 0.5).astype(int)
    return per_patient.reset_index()


def patient_metrics(patients: pd.Series, y_true: np.ndarray, probabilities: np.ndarray, threshold: float = 0.5
                    ) -> dict[str, float]:
    """Patient-level results.

    patient_accuracy: the patient's mean malignant probability vs the patient's majority label.
    patient_score: BreaKHis' patient-level recognition rate (Spanhol et al. 2016), the mean over
    patients of the fraction of that patient's images classified correctly.
    """
    per_patient = patient_table(patients, probabilities[:, 1], y_true, threshold)
    return {
        "patient_accuracy": float((per_patient["label"] == per_patient["predicted"]).mean()),
        "patient_score": float(per_patient["score"].mean()),
        "patients": float(len(per_patient)),
    }


def evaluate(frame: pd.DataFrame, probabilities: np.ndarray, threshold: float = 0.5) -> dict[str, float]:
    """Image, calibration and patient metrics of one split, deciding malignant at `threshold`."""
    y_true = frame["label"].to_numpy()
    metrics = binary_metrics(y_true, probabilities, threshold)
    metrics.update(calibration_metrics(y_true, probabilities[:, 1]))
    metrics.update(patient_metrics(frame["patient"], y_true, probabilities, threshold))
    return metrics


def patient_resamples(patients: pd.Series | np.ndarray, resamples: int, seed: int) -> Iterator[np.ndarray]:
    """Row indices of each bootstrap resample of the patients: as many patients as there are, drawn with
    replacement, each with all of its images."""
    codes, _ = pd.factorize(np.asarray(patients))
    members = [np.flatnonzero(codes == k) for k in range(codes.max() + 1)]
    rng = np.random.default_rng(seed)
    for _ in range(resamples):
        yield np.concatenate([members[k] for k in rng.integers(0, len(members), len(members))])


def patient_bootstrap(patients: pd.Series | np.ndarray, y_true: np.ndarray, probabilities: np.ndarray,
                      threshold: float = 0.5, names: tuple[str, ...] = INTERVAL_METRICS, resamples: int = 1000,
                      level: float = 0.95, seed: int = 42) -> dict[str, tuple[float, float]]:
    """Percentile bootstrap intervals of image-level metrics, resampling patients (with all their images).

    Patients, not images, are the unit: images of one patient are correlated, and an interval from
    resampled images would be too narrow. A resample holding one class only has no AUC or balanced
    accuracy; such resamples are skipped for those metrics (scipy.stats.bootstrap resamples observations,
    not clusters, hence this loop).
    """
    y_true = np.asarray(y_true, dtype=int)
    draws: dict[str, list[float]] = {name: [] for name in names}
    positive = np.asarray(probabilities)[:, 1]
    for rows in patient_resamples(patients, resamples, seed):
        y, p = y_true[rows], positive[rows]
        both = len(np.unique(y)) == 2
        for name in names:
            if both or name not in ONE_CLASS_UNDEFINED:
                draws[name].append(INTERVAL_SCORES[name](y, p, threshold))
    tail = 100 * (1 - level) / 2
    return {name: (float(np.percentile(v, tail)), float(np.percentile(v, 100 - tail))) if v else
            (float("nan"), float("nan")) for name, v in draws.items()}


def report_text(y_true: np.ndarray, probabilities: np.ndarray, class_names: list[str], threshold: float = 0.5) -> str:
    y_pred = (probabilities[:, 1] >= threshold).astype(int)
    return classification_report(y_true, y_pred, labels=[0, 1], target_names=class_names, digits=4,
                                 zero_division=0)


def confusion(y_true: np.ndarray, probabilities: np.ndarray, threshold: float = 0.5) -> np.ndarray:
    return confusion_matrix(y_true, (probabilities[:, 1] >= threshold).astype(int), labels=[0, 1])


def paired_patient_bootstrap(patients: pd.Series | np.ndarray, y_true: np.ndarray, repeats: np.ndarray,
                             a: tuple[np.ndarray, np.ndarray], b: tuple[np.ndarray, np.ndarray],
                             resamples: int = 1000, level: float = 0.95, seed: int = 42
                             ) -> dict[str, tuple[float, float, float, float]]:
    """Model A against model B on the same images: the difference A - B of ROC AUC (from the positive
    probabilities) and balanced accuracy (from the decisions), with its percentile interval and two-sided
    bootstrap p-value, resampling patients (the same ones for both models, so what the two share cancels).

    `a` and `b` are (positive probability, decision) per row; rows of several cross-validation repeats
    are told apart by `repeats`, and a metric is the mean over repeats. Returns name -> (difference,
    low, high, p).
    """
    y_true, repeats = np.asarray(y_true, dtype=int), np.asarray(repeats)
    a_p, a_d, b_p, b_d = (np.asarray(v) for v in (*a, *b))

    def differences(rows: np.ndarray) -> dict[str, float]:
        per_repeat: dict[str, list[float]] = {"roc_auc": [], "balanced_accuracy": []}
        for r in np.unique(repeats[rows]):
            mine = rows[repeats[rows] == r]
            y = y_true[mine]
            if len(np.unique(y)) < 2:
                return {}
            per_repeat["roc_auc"].append(roc_auc_score(y, a_p[mine]) - roc_auc_score(y, b_p[mine]))
            per_repeat["balanced_accuracy"].append(balanced_accuracy_score(y, a_d[mine])
                                                   - balanced_accuracy_score(y, b_d[mine]))
        return {name: float(np.mean(values)) for name, values in per_repeat.items()}

    observed = differences(np.arange(len(y_true)))
    draws: dict[str, list[float]] = {name: [] for name in observed}
    for rows in patient_resamples(patients, resamples, seed):
        for name, value in differences(rows).items():
            draws[name].append(value)
    tail = 100 * (1 - level) / 2
    result = {}
    for name, values in draws.items():
        values = np.asarray(values)
        p = min(1.0, 2 * min((values <= 0).mean(), (values >= 0).mean()))
        result[name] = (observed[name], float(np.percentile(values, tail)), float(np.percentile(values, 100 - tail)),
                        float(p))
    return result
