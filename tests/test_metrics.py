"""Known answers: the image- and patient-level metrics on cases worked out by hand."""

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import roc_auc_score

from histoflow.modeling.metrics import binary_metrics, confusion, evaluate, patient_metrics, patient_table

Y = np.array([0, 0, 0, 1, 1, 1, 1, 0])
P = np.array([0.1, 0.6, 0.2, 0.9, 0.4, 0.8, 0.7, 0.3])  # malignant probability
PROBS = np.column_stack([1 - P, P])


def test_image_metrics_by_hand():
    # Called malignant (p >= 0.5): images 1, 3, 5, 6. TP 3 (3, 5, 6), FN 1 (4), FP 1 (1), TN 3 (0, 2, 7).
    m = binary_metrics(Y, PROBS)
    for name in ("accuracy", "precision", "recall", "specificity", "f1", "balanced_accuracy"):
        assert m[name] == pytest.approx(0.75), name
    # 15 of the 16 (malignant, benign) pairs are ordered right: only 0.4 < 0.6 is not.
    assert m["roc_auc"] == pytest.approx(15 / 16)
    # The probabilities given to the true class are 0.9, 0.4, 0.8, 0.7 (benign) and the same (malignant).
    assert m["loss"] == pytest.approx(-np.mean(np.log([0.9, 0.4, 0.8, 0.7])))
    np.testing.assert_array_equal(confusion(Y, PROBS), [[3, 1], [1, 3]])


def test_metrics_of_a_one_class_split_are_undefined_not_wrong():
    m = binary_metrics(np.zeros(4, int), np.column_stack([np.full(4, 0.8), np.full(4, 0.2)]))
    assert m["accuracy"] == 1.0 and m["specificity"] == 1.0
    assert np.isnan(m["roc_auc"]) and np.isnan(m["balanced_accuracy"])


def test_patient_metrics_by_hand():
    patients = ["A", "A", "A", "B", "B", "C", "D", "D"]
    y = np.array([1, 1, 0, 0, 0, 1, 0, 1])
    p = np.array([0.9, 0.8, 0.2, 0.6, 0.7, 0.3, 0.4, 0.7])
    table = patient_table(patients, p, y).set_index("patient")
    # A: label 1 (2 of 3), mean 0.633 -> 1, every image right. B: label 0, mean 0.65 -> 1, no image right.
    # C: label 1, 0.3 -> 0. D: a tie counts as malignant (label 1), mean 0.55 -> 1, both images right.
    assert table["label"].to_dict() == {"A": 1, "B": 0, "C": 1, "D": 1}
    assert table["predicted"].to_dict() == {"A": 1, "B": 1, "C": 0, "D": 1}
    assert table["score"].to_dict() == {"A": 1.0, "B": 0.0, "C": 0.0, "D": 1.0}
    assert table["images"].to_dict() == {"A": 3, "B": 2, "C": 1, "D": 2}
    assert table.loc["A", "mean_p"] == pytest.approx((0.9 + 0.8 + 0.2) / 3)
    m = patient_metrics(pd.Series(patients), y, np.column_stack([1 - p, p]))
    assert m == {"patient_accuracy": 0.5, "patient_score": 0.5, "patients": 4.0}
    frame = pd.DataFrame({"patient": patients, "label": y})
    assert evaluate(frame, np.column_stack([1 - p, p]))["patient_accuracy"] == 0.5
    # Without labels: the calls only.
    assert list(patient_table(patients, p)) == ["patient", "images", "mean_p", "predicted"]


def test_paired_bootstrap_by_construction():
    """The same model twice differs by nothing (p = 1); a perfect model against a coin differs clearly."""
    from histoflow.modeling.metrics import paired_patient_bootstrap

    rng = np.random.default_rng(5)
    patients = np.repeat(np.arange(60), 4)
    y = np.repeat(rng.integers(0, 2, 60), 4)
    repeats = np.zeros(len(y), int)
    coin = rng.random(len(y))
    same = paired_patient_bootstrap(patients, y, repeats, (coin, coin >= 0.5), (coin, coin >= 0.5), resamples=200)
    assert same["roc_auc"] == (0.0, 0.0, 0.0, 1.0) and same["balanced_accuracy"] == (0.0, 0.0, 0.0, 1.0)
    perfect = y * 0.8 + 0.1
    result = paired_patient_bootstrap(patients, y, repeats, (perfect, perfect >= 0.5), (coin, coin >= 0.5),
                                      resamples=200)
    difference, low, high, p = result["roc_auc"]
    assert difference == pytest.approx(1.0 - roc_auc_score(y, coin)) and 0 < low <= difference <= high and p < 0.01
    # Two repeats of the same rows: each metric is the mean over the repeats (here the same twice).
    twice = paired_patient_bootstrap(np.tile(patients, 2), np.tile(y, 2), np.repeat([0, 1], len(y)),
                                     (np.tile(perfect, 2), np.tile(perfect >= 0.5, 2)),
                                     (np.tile(coin, 2), np.tile(coin >= 0.5, 2)), resamples=50)
    assert twice["roc_auc"][0] == pytest.approx(difference)


def test_resampled_metrics_are_scikit_learns_on_the_resampled_rows():
    """Each resample scored as weights equals scikit-learn on that resample's rows (ties in the scores, resamples
    of one class, a row drawn several times), so the intervals are those of the rows."""
    from sklearn.metrics import accuracy_score, balanced_accuracy_score, f1_score

    from histoflow.modeling.metrics import resample_weights, weighted_auc, weighted_decisions

    rng = np.random.default_rng(0)
    patients = np.repeat(np.arange(12), rng.integers(1, 5, 12))
    y = np.isin(patients, [0, 5]).astype(int)  # two malignant patients of 12: some resamples hold none
    p = np.round(rng.random(len(patients)), 1)  # ties
    weights = resample_weights(patients, 300, seed=1)
    assert weights.shape == (300, len(patients)) and (weights.sum(axis=1) > 0).all()
    auc, decided = weighted_auc(y, p, weights), weighted_decisions(y, p >= 0.5, weights)
    one_class = 0
    for k, w in enumerate(weights):
        rows = np.repeat(np.arange(len(y)), w)
        yr, pr = y[rows], p[rows]
        assert decided["accuracy"][k] == pytest.approx(accuracy_score(yr, pr >= 0.5))
        assert decided["f1"][k] == pytest.approx(f1_score(yr, pr >= 0.5, zero_division=0))
        if len(np.unique(yr)) == 2:
            assert auc[k] == pytest.approx(roc_auc_score(yr, pr))
            assert decided["balanced_accuracy"][k] == pytest.approx(balanced_accuracy_score(yr, pr >= 0.5))
        else:
            one_class += 1
            assert np.isnan(auc[k]) and np.isnan(decided["balanced_accuracy"][k])
    assert one_class > 0  # the case was met
