"""Calibrated probabilities and the decision threshold, both chosen on the validation split.

Temperature scaling (Guo et al. 2017) divides the network's logits by one number T fitted to the
validation split's log loss: the ranking (and so ROC AUC) is unchanged, the probabilities stop being
over- or under-confident. The threshold on the calibrated malignant probability then follows a policy:
`argmax` (0.5, as an uncalibrated argmax would decide), `youden` (the ROC point maximising
sensitivity + specificity - 1), `sensitivity:0.95` (the highest threshold that still finds 95 % of the
malignant validation images) or `specificity:0.9`. Both travel with the served model.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from histoflow.errors import ConfigError
from histoflow.modeling.variants import CALIBRATIONS, parse_threshold_policy

EPS = 1e-7
# Temperatures outside this range mean a degenerate validation split (one class, a handful of images).
TEMPERATURE_RANGE = (0.05, 20.0)


def logits(probabilities: np.ndarray) -> np.ndarray:
    """The softmax's logits, up to a constant per row (all temperature scaling needs)."""
    return np.log(np.clip(np.asarray(probabilities, dtype=np.float64), EPS, 1.0))


def apply_temperature(probabilities: np.ndarray, temperature: float) -> np.ndarray:
    """softmax(logits / T), rows of class probabilities in, the same shape out."""
    z = logits(probabilities) / temperature
    z -= z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def fit_temperature(y_true: np.ndarray, probabilities: np.ndarray) -> float:
    """The T minimising the log loss of softmax(logits / T) on these (validation) labels."""
    y_true = np.asarray(y_true, dtype=int)
    if len(np.unique(y_true)) < 2:
        return 1.0  # one class: any T > 1 "improves" the loss by flattening; nothing to learn
    # Fitting-only imports: the served model loads this module without scikit-learn's ~1 s import (cold start).
    from scipy.optimize import minimize_scalar
    from sklearn.metrics import log_loss

    low, high = np.log(TEMPERATURE_RANGE)
    result = minimize_scalar(
        lambda log_t: log_loss(y_true, apply_temperature(probabilities, float(np.exp(log_t))), labels=[0, 1]),
        bounds=(low, high), method="bounded", options={"xatol": 1e-4})
    return float(np.exp(result.x))


def choose_threshold(policy: str, y_true: np.ndarray, positive_probability: np.ndarray) -> float:
    """The threshold on the positive probability the policy picks on these (validation) predictions."""
    kind, target = parse_threshold_policy(policy)
    y_true = np.asarray(y_true, dtype=int)
    if kind == "argmax" or len(np.unique(y_true)) < 2:
        return 0.5
    from sklearn.metrics import roc_curve  # fitting only, as in fit_temperature

    fpr, tpr, thresholds = roc_curve(y_true, positive_probability, drop_intermediate=False)  # every cut
    finite = np.isfinite(thresholds)  # roc_curve's first threshold is +inf (nothing called positive)
    fpr, tpr, thresholds = fpr[finite], tpr[finite], thresholds[finite]
    if kind == "youden":
        return float(thresholds[np.argmax(tpr - fpr)])
    if kind == "sensitivity":
        return float(thresholds[np.flatnonzero(tpr >= target)[0]])  # thresholds fall as tpr rises
    return float(thresholds[np.flatnonzero(1.0 - fpr >= target)[-1]])


def expected_calibration_error(y_true: np.ndarray, positive_probability: np.ndarray, bins: int = 15) -> float:
    """ECE of the positive probability: sum over equal-width bins of |mean probability - share positive|,
    weighted by the bin's share of the images."""
    y = np.asarray(y_true, dtype=float)
    p = np.asarray(positive_probability, dtype=float)
    which = np.minimum((p * bins).astype(int), bins - 1)
    total = 0.0
    for b in np.unique(which):
        members = which == b
        total += members.mean() * abs(p[members].mean() - y[members].mean())
    return float(total)


def calibration_metrics(y_true: np.ndarray, positive_probability: np.ndarray) -> dict[str, float]:
    from sklearn.metrics import brier_score_loss  # evaluation only, as in fit_temperature

    return {"ece": expected_calibration_error(y_true, positive_probability),
            "brier": float(brier_score_loss(np.asarray(y_true, dtype=int), positive_probability, pos_label=1))}


@dataclass(frozen=True)
class Calibration:
    """What the served model does to the network's probabilities: temperature, then the threshold."""

    temperature: float = 1.0
    threshold: float = 0.5
    method: str = "none"
    threshold_policy: str = "argmax"

    def apply(self, probabilities: np.ndarray) -> np.ndarray:
        return apply_temperature(probabilities, self.temperature) if self.temperature != 1.0 else \
            np.asarray(probabilities, dtype=np.float64)

    def decide(self, probabilities: np.ndarray) -> np.ndarray:
        """Class index per row of calibrated probabilities: positive when its probability reaches the threshold."""
        return (np.asarray(probabilities)[:, 1] >= self.threshold).astype(int)

    def to_dict(self) -> dict:
        return asdict(self)


def fit_calibration(method: str, threshold_policy: str, y_val: np.ndarray, val_probabilities: np.ndarray
                    ) -> Calibration:
    """Temperature (method "temperature") and threshold (the policy), both on the validation split."""
    if method not in CALIBRATIONS:
        raise ConfigError(f"calibration must be one of {', '.join(CALIBRATIONS)}; got {method!r}")
    temperature = fit_temperature(y_val, val_probabilities) if method == "temperature" else 1.0
    calibrated = apply_temperature(val_probabilities, temperature)
    return Calibration(temperature, choose_threshold(threshold_policy, y_val, calibrated[:, 1]), method,
                       threshold_policy)
