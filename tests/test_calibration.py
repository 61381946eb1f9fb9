"""Known answers: temperature scaling, the threshold policies, ECE, and patient bootstrap intervals."""

import numpy as np
import pytest
from scipy.stats import norm

from histoflow.errors import ConfigError
from histoflow.modeling.calibration import (
    Calibration,
    apply_temperature,
    choose_threshold,
    expected_calibration_error,
    fit_calibration,
    fit_temperature,
    parse_threshold_policy,
)
from histoflow.modeling.metrics import patient_bootstrap


def _softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def test_temperature_scaling_recovers_a_known_temperature():
    """Labels drawn from sigmoid(z / 2.5) while the network says sigmoid(z): overconfident by T = 2.5."""
    rng = np.random.default_rng(0)
    z = rng.normal(0, 4, 20_000)
    y = (rng.random(z.size) < 1 / (1 + np.exp(-z / 2.5))).astype(int)
    probabilities = _softmax(np.column_stack([np.zeros_like(z), z]))
    t = fit_temperature(y, probabilities)
    assert t == pytest.approx(2.5, rel=0.05)
    calibrated = apply_temperature(probabilities, t)
    assert expected_calibration_error(y, calibrated[:, 1]) < 0.02 < expected_calibration_error(y, probabilities[:, 1])
    # The ranking is untouched: the same order of malignant probabilities.
    np.testing.assert_array_equal(np.argsort(calibrated[:, 1], kind="stable"), np.argsort(probabilities[:, 1],
                                                                                            kind="stable"))
    assert fit_temperature(np.zeros(10, int), probabilities[:10]) == 1.0  # one class: nothing to fit


def test_ece_by_hand():
    # Two bins of 15 used: [0.0, 0.067) holds 0.0 (label 0) and 0.05 (label 1); [0.933, 1] holds 1.0, 1.0 (1, 0).
    # |0.025 - 0.5| * 2/4 + |1.0 - 0.5| * 2/4 = 0.2375 + 0.25
    assert expected_calibration_error([0, 1, 1, 0], [0.0, 0.05, 1.0, 1.0]) == pytest.approx(0.4875)
    assert expected_calibration_error([0, 1], [0.0, 1.0]) == 0.0


def test_threshold_policies_by_hand():
    y = np.array([0, 0, 0, 0, 1, 1, 1, 1])
    p = np.array([0.1, 0.3, 0.45, 0.5, 0.4, 0.6, 0.8, 0.9])
    assert choose_threshold("argmax", y, p) == 0.5
    # Youden: at 0.6, sensitivity 3/4 and specificity 4/4 (J = 0.75); every other cut gives at most 0.5.
    assert choose_threshold("youden", y, p) == 0.6
    # All malignant images found: the highest threshold is 0.4 (at the cost of 2 benign calls).
    assert choose_threshold("sensitivity:0.99", y, p) == 0.4
    assert choose_threshold("sensitivity:0.5", y, p) == 0.8
    # At least 3 of 4 benign images right: the lowest such threshold is 0.5 (0.45 would leave 2 of 4).
    assert choose_threshold("specificity:0.75", y, p) == 0.5
    assert choose_threshold("youden", np.zeros(4, int), p[:4]) == 0.5  # one class: the plain rule
    for bad in ("median", "sensitivity", "sensitivity:1.5", "specificity:0", "youden:0.9"):
        with pytest.raises(ConfigError, match="threshold_policy"):
            parse_threshold_policy(bad)


def test_a_fitted_calibration_decides_with_its_threshold():
    y = np.array([0, 0, 0, 0, 1, 1, 1, 1])
    p = np.array([0.1, 0.3, 0.45, 0.5, 0.4, 0.6, 0.8, 0.9])
    probabilities = np.column_stack([1 - p, p])
    fitted = fit_calibration("temperature", "sensitivity:0.99", y, probabilities)
    calibrated = fitted.apply(probabilities)
    assert fitted.decide(calibrated).tolist() == (calibrated[:, 1] >= fitted.threshold).astype(int).tolist()
    assert fitted.decide(calibrated)[4] == 1  # the malignant image at 0.4 is found
    np.testing.assert_array_equal(Calibration().apply(probabilities), probabilities)  # the identity by default
    with pytest.raises(ConfigError, match="calibration must be one of"):
        fit_calibration("platt", "argmax", y, probabilities)


def test_patient_bootstrap_interval_covers_the_true_auc():
    """200 patients, 5 images each; malignant scores N(1, 1), benign N(0, 1): the AUC is Phi(1 / sqrt 2)."""
    rng = np.random.default_rng(1)
    patients = np.repeat(np.arange(200), 5)
    y = np.repeat(rng.integers(0, 2, 200), 5)
    scores = rng.normal(y.astype(float), 1.0)
    p = 1 / (1 + np.exp(-scores))
    intervals = patient_bootstrap(patients, y, np.column_stack([1 - p, p]), resamples=200, seed=3)
    low, high = intervals["roc_auc"]
    assert low < norm.cdf(1 / np.sqrt(2)) < high and 0.02 < high - low < 0.12
    assert intervals == patient_bootstrap(patients, y, np.column_stack([1 - p, p]), resamples=200, seed=3)
    for name in ("balanced_accuracy", "f1", "accuracy"):
        assert 0 < intervals[name][0] < intervals[name][1] < 1
