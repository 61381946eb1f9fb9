"""Evaluation with scikit-learn: image-level and patient-level metrics of a split's predictions."""

from __future__ import annotations

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
# Test metrics reported with a bootstrap interval over patients.
INTERVAL_METRICS = ("roc_auc", "balanced_accuracy", "f1", "accuracy")


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


def _patient_draws(patients: pd.Series | np.ndarray, resamples: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Each row's patient code, and the patients drawn by each bootstrap resample (as many as there are, with
    replacement): one row of `draws` per resample."""
    codes, _ = pd.factorize(np.asarray(patients))
    n_patients = codes.max() + 1
    rng = np.random.default_rng(seed)
    draws = np.stack([rng.integers(0, n_patients, n_patients) for _ in range(resamples)]) if resamples else \
        np.zeros((0, n_patients), int)
    return codes, draws


def resample_weights(patients: pd.Series | np.ndarray, resamples: int, seed: int) -> np.ndarray:
    """How many times each row is in each bootstrap resample of the patients (as many patients as there are,
    drawn with replacement, each with all of its images), one row per resample: a metric weighted by a row of
    this is the metric of that resample's rows."""
    codes, draws = _patient_draws(patients, resamples, seed)
    counts = np.zeros(draws.shape, dtype=np.int64)
    np.add.at(counts, (np.arange(len(draws))[:, None], draws), 1)
    return counts[:, codes]


def weighted_auc(y_true: np.ndarray, scores: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """ROC AUC of the rows weighted by each row of `weights`: the Mann-Whitney statistic (tied scores count
    half), what scikit-learn gives for the expanded rows; NaN where a resample holds one class only."""
    y = np.asarray(y_true, dtype=bool)
    w = np.asarray(weights, dtype=float)
    order = np.argsort(scores, kind="stable")
    ranked, labels = np.asarray(scores)[order], y[order]
    starts = np.flatnonzero(np.r_[True, ranked[1:] != ranked[:-1]])  # groups of tied scores
    neg = np.add.reduceat(w[:, order] * ~labels, starts, axis=1)
    pos = np.add.reduceat(w[:, order] * labels, starts, axis=1)
    below = np.cumsum(neg, axis=1) - neg
    positives, negatives = pos.sum(axis=1), neg.sum(axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where((positives > 0) & (negatives > 0),
                        (pos * (below + neg / 2)).sum(axis=1) / (positives * negatives), np.nan)


def weighted_decisions(y_true: np.ndarray, called: np.ndarray, weights: np.ndarray) -> dict[str, np.ndarray]:
    """Accuracy, balanced accuracy (NaN with one class) and F1 (0 without a positive call or label, as
    scikit-learn's zero_division=0) of decisions, for the rows weighted by each row of `weights`."""
    y, called = np.asarray(y_true, dtype=bool), np.asarray(called, dtype=bool)
    w = np.asarray(weights, dtype=float)
    tp, fn, fp, tn = (w @ (y & called), w @ (y & ~called), w @ (~y & called), w @ (~y & ~called))
    positives, negatives = tp + fn, tn + fp
    with np.errstate(divide="ignore", invalid="ignore"):
        return {"accuracy": (tp + tn) / (positives + negatives),
                "balanced_accuracy": np.where((positives > 0) & (negatives > 0),
                                              (tp / positives + tn / negatives) / 2, np.nan),
                "f1": np.where(2 * tp + fp + fn > 0, 2 * tp / (2 * tp + fp + fn), 0.0)}


def patient_bootstrap(patients: pd.Series | np.ndarray, y_true: np.ndarray, probabilities: np.ndarray,
                      threshold: float = 0.5, names: tuple[str, ...] = INTERVAL_METRICS, resamples: int = 1000,
                      level: float = 0.95, seed: int = 42) -> dict[str, tuple[float, float]]:
    """Percentile bootstrap intervals of image-level metrics, resampling patients (with all their images).

    Patients, not images, are the unit: images of one patient are correlated, and an interval from
    resampled images would be too narrow. A resample holding one class only has no AUC or balanced
    accuracy; such resamples are skipped for those metrics (scipy.stats.bootstrap resamples observations,
    not clusters). Every resample is scored at once, as weights (resample_weights): 1,000 resamples of
    thousands of images take a fraction of a second.
    """
    weights = resample_weights(patients, resamples, seed)
    positive = np.asarray(probabilities)[:, 1]
    scores = {"roc_auc": weighted_auc(y_true, positive, weights),
              **weighted_decisions(y_true, positive >= threshold, weights)}
    tail = 100 * (1 - level) / 2
    intervals = {}
    for name in names:
        values = scores[name][np.isfinite(scores[name])]
        intervals[name] = ((float(np.percentile(values, tail)), float(np.percentile(values, 100 - tail)))
                           if len(values) else (float("nan"), float("nan")))
    return intervals


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

    def differences(weights: np.ndarray) -> dict[str, np.ndarray]:
        """A - B per resample (row of weights): the mean over the repeats it holds rows of; NaN for both
        metrics where one of those repeats holds one class only."""
        sums = {"roc_auc": 0.0, "balanced_accuracy": 0.0}
        held = np.zeros(len(weights))
        for r in np.unique(repeats):
            mine = repeats == r
            w, y = weights[:, mine], y_true[mine]
            present = w.sum(axis=1) > 0
            auc = weighted_auc(y, a_p[mine], w) - weighted_auc(y, b_p[mine], w)
            balanced = (weighted_decisions(y, a_d[mine], w)["balanced_accuracy"]
                        - weighted_decisions(y, b_d[mine], w)["balanced_accuracy"])
            for name, value in (("roc_auc", auc), ("balanced_accuracy", balanced)):
                sums[name] = sums[name] + np.where(present, value, 0.0)
            held += present
        defined = np.isfinite(sums["roc_auc"]) & np.isfinite(sums["balanced_accuracy"])
        return {name: np.where(defined, total / np.maximum(held, 1), np.nan) for name, total in sums.items()}

    observed = {name: float(v[0]) for name, v in differences(np.ones((1, len(y_true)))).items()}
    if not all(np.isfinite(v) for v in observed.values()):
        return {}
    draws = differences(resample_weights(patients, resamples, seed))
    tail = 100 * (1 - level) / 2
    result = {}
    for name, values in draws.items():
        values = values[np.isfinite(values)]
        p = min(1.0, 2 * min((values <= 0).mean(), (values >= 0).mean()))
        result[name] = (observed[name], float(np.percentile(values, tail)), float(np.percentile(values, 100 - tail)),
                        float(p))
    return result
