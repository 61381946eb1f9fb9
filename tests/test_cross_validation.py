"""The `cv` entry point on a small real subset: folds by patient, nested fold runs, parent aggregates,
out-of-fold predictions; a class with fewer patients than folds is refused before any training."""

import mlflow
import numpy as np
import pandas as pd
import pytest
from mlflow.tracking import MlflowClient
from sklearn.metrics import balanced_accuracy_score

from conftest import BREAKHIS, sqlite_store
from histoflow import artifacts
from histoflow.data.discovery import discover
from histoflow.data.splits import cv_folds, patient_overlap
from histoflow.errors import ConfigError, DataError
from histoflow.modeling import cross_validation
from histoflow.modeling.variants import make_cv_config

TINY = {"data_dir": str(BREAKHIS), "max_images": 80, "image_size": 32, "batch_size": 16, "epochs": 1,
        "gradcam_per_class": 0, "bootstrap": 0}


def test_folds_hold_out_every_patient_once_per_repeat():
    frame = discover(BREAKHIS, max_images=200, seed=1).frame
    folds = cv_folds(frame, 4, 2, 0.2, 7, ["benign", "malignant"])
    assert [(f.repeat, f.fold) for f in folds] == [(r, k) for r in range(2) for k in range(4)]
    for repeat in range(2):
        held = pd.concat([f.frame[f.frame["split"] == "test"] for f in folds if f.repeat == repeat])
        assert sorted(held["relpath"]) == sorted(frame["relpath"])  # every image once
        owners = held.groupby("group")["relpath"].count()
        assert owners.sum() == len(frame)
        fold_of_group = {g: {f.fold for f in folds if f.repeat == repeat
                             and g in set(f.frame.loc[f.frame["split"] == "test", "group"])} for g in held["group"]}
        assert all(len(v) == 1 for v in fold_of_group.values())  # no patient group in two test folds
    for f in folds:
        assert patient_overlap(f.frame) == set() and set(f.frame["split"]) == {"train", "val", "test"}
    first, second = ([f.frame["split"].tolist() for f in folds if f.repeat == r] for r in (0, 1))
    assert first != second  # repeats shuffle differently


def test_a_class_with_fewer_patients_than_folds_is_refused_before_training():
    frame = discover(BREAKHIS).frame
    benign_groups = sorted(frame.loc[frame["label"] == 0, "group"].unique())[:3]
    few = frame[(frame["label"] == 1) | frame["group"].isin(benign_groups)]
    with pytest.raises(DataError, match="class 'benign' has 3 patient groups for 5 folds"):
        cv_folds(few, 5, 1, 0.2, 42, ["benign", "malignant"])
    with pytest.raises(ConfigError, match="folds must be in 2..20"):
        make_cv_config("baseline", folds="1")
    with pytest.raises(ConfigError, match="takes no split_table"):
        make_cv_config("baseline", split_table="runs:/x/data/split.csv")


def test_intervals_of_rates_stay_within_0_and_1():
    """Recall 1.0, 1.0, 1.0, 0.7, 1.0 over folds: Student's t reaches past 1, a recall cannot."""
    outcomes = [cross_validation.TrainOutcome("r", {"recall": v, "loss": 2 * v}, {"recall": v, "loss": 2 * v},
                                              np.zeros((1, 2)), None) for v in (1.0, 1.0, 1.0, 0.7, 1.0)]
    low, high = cross_validation.t_interval(np.array([1.0, 1.0, 1.0, 0.7, 1.0]))
    assert high > 1.0
    summary = cross_validation.summarise(outcomes)
    assert summary["cv_test_recall_ci_high"] == 1.0 and summary["cv_test_recall_ci_low"] == pytest.approx(low)
    assert summary["cv_test_loss_ci_high"] > 2.0  # a loss has no upper bound


@pytest.fixture(scope="module")
def cv_store(tmp_path_factory):
    """Two cross-validations on the same folds (2 folds, 1 repeat): the baseline and the augmented CNN.
    Repeats are checked without training (test_folds_hold_out_every_patient_once_per_repeat,
    test_pooled_results_of_several_repeats_are_their_mean)."""
    root = tmp_path_factory.mktemp("cv")
    with sqlite_store(root):
        yield root, {v: cross_validation.run(make_cv_config(v, **TINY, folds=2, repeats=1,
                                                                             experiment="cv"))
                     for v in ("baseline", "augmented")}


@pytest.mark.slow
def test_cv_run_nests_folds_and_aggregates_them(cv_store):
    parent_id = cv_store[1]["baseline"]
    client = MlflowClient()
    parent = client.get_run(parent_id)
    children = mlflow.search_runs(search_all_experiments=True, output_format="list",
                                  filter_string=f"tags.mlflow.parentRunId = '{parent_id}'")
    assert len(children) == 2 and all(c.info.status == "FINISHED" for c in children)
    m = parent.data.metrics
    for name in ("accuracy", "roc_auc", "balanced_accuracy", "ece", "ece_uncalibrated"):  # calibration: both
        values = [c.data.metrics[f"test_{name}"] for c in children]
        assert m[f"cv_test_{name}_mean"] == pytest.approx(np.mean(values))
        assert m[f"cv_test_{name}_std"] == pytest.approx(np.std(values, ddof=1))
        assert m[f"cv_test_{name}_ci_low"] <= m[f"cv_test_{name}_mean"] <= m[f"cv_test_{name}_ci_high"]
    assert "cv_validation_roc_auc_mean" in m and "oof_roc_auc" in m
    # The cost of the whole cross-validation: compare shows it beside single runs'.
    assert m["train_time_s"] == pytest.approx(sum(c.data.metrics["train_time_s"] for c in children))
    assert m["n_params"] == children[0].data.metrics["n_params"] > 0
    oof = pd.read_csv(mlflow.artifacts.download_artifacts(run_id=parent_id,
                                                          artifact_path=artifacts.OOF_ARTIFACT))
    split = discover(BREAKHIS, max_images=80, seed=42).frame
    assert set(oof["repeat"]) == {0}
    assert sorted(oof["relpath"]) == sorted(split["relpath"])  # each image exactly once
    assert oof["probability"].between(0, 1).all()
    assert set(oof["fold_run_id"]) == {c.info.run_id for c in children}
    logged = {a.path for a in client.list_artifacts(parent_id, "cv")}
    assert {"cv/oof_roc_curve.png", "cv/oof_confusion_matrix.png", "cv/oof_reliability.png", "cv/folds.csv",
            "cv/patients.json"} <= logged
    assert parent.data.tags["histoflow.step"] == "cv" and parent.data.params["folds"] == "2"


@pytest.mark.slow
def test_compare_shows_cross_validations_and_pairs_them(cv_store):
    from histoflow.registry import comparison

    root, runs = cv_store
    table = comparison.summary("cv")
    assert list(table["Kind"]) == ["cv", "cv"]  # the fold runs are parts, not rows
    row = table.set_index("run_id").loc[runs["baseline"]]
    assert row["AUC"] == pytest.approx(mlflow.get_run(runs["baseline"]).data.metrics["cv_test_roc_auc_mean"])
    assert "±" in comparison.to_markdown(table) and row["Split"] == "patient 2-fold CV x1"
    assert row["Params"] > 0 and row["Train time (s)"] > 0
    # Both are the baseline CNN: the table says what differs between them.
    assert table.set_index("run_id")["Settings"].to_dict() == {runs["baseline"]: "augment=none",
                                                               runs["augmented"]: "augment=seed"}
    pairs = comparison.paired(table, resamples=200)
    assert len(pairs) == 1
    pair = pairs.iloc[0]
    assert {pair["A"], pair["B"]} == {f"{n} (augment={a})" for n, a in
                                      zip(table.set_index("run_id").loc[[runs["baseline"], runs["augmented"]], "Run"],
                                          ("none", "seed"), strict=True)}
    for name in ("roc_auc", "balanced_accuracy"):
        assert pair[f"{name} low"] <= pair[f"{name} difference"] <= pair[f"{name} high"]
        assert 0 <= pair[f"{name} p"] <= 1
    markdown, files = comparison.write(table, str(root / "out"), pairs)
    assert "paired bootstrap over patients" in markdown and (root / "out" / "comparison_paired.csv").is_file()


@pytest.mark.slow
def test_the_fold_ensemble_is_registered_and_served(cv_store, tmp_path):
    """register by a cross-validation's mean validation metric: the fold models of its first repeat, each
    with its temperature, averaged, served as one pyfunc."""
    import keras

    from histoflow.data.pipeline import make_dataset
    from histoflow.modeling.calibration import apply_temperature
    from histoflow.registry.aliases import register
    from histoflow.registry.policy import load_policy
    from histoflow.registry.promotion import promote
    from histoflow.registry.selection import best_run, keras_artifact, run_calibration
    from histoflow.serving.requests import encode_file

    _, runs = cv_store
    aliases = load_policy().aliases
    best = best_run("cv", "cv_validation_roc_auc_mean")
    assert best.info.run_id in runs.values()
    version = register("cv", "cv_validation_roc_auc_mean", "cv-ensemble", aliases)
    assert version.tags["run_id"] == best.info.run_id and "average of its fold models" in version.description
    served = mlflow.pyfunc.load_model("models:/cv-ensemble@challenger")
    assert served.metadata.metadata["members"] == 2
    oof = pd.read_csv(mlflow.artifacts.download_artifacts(run_id=best.info.run_id,
                                                          artifact_path=artifacts.OOF_ARTIFACT))
    folds = oof[oof["repeat"] == 0].sort_values("fold")["fold_run_id"].unique()
    paths = sorted(str(p) for p in BREAKHIS.rglob("*.png"))[:6]
    out = served.predict(pd.DataFrame({"image": [encode_file(p) for p in paths]}))
    batch = next(iter(make_dataset(paths, [0] * len(paths), 32, len(paths))))[0]
    members = [apply_temperature(keras.saving.load_model(keras_artifact(r)).predict(batch, verbose=0),
                                 run_calibration(mlflow.get_run(r)).temperature) for r in folds]
    expected = np.mean(members, axis=0)
    np.testing.assert_allclose(np.array([[p["benign"], p["malignant"]] for p in out["probabilities"]]), expected,
                               atol=1e-5)
    # No held-out images (every one trained some fold): the gate reads the out-of-fold predictions, and says so.
    record = promote("cv-ensemble", load_policy(min_balanced_accuracy=0))
    assert record["decision"] == "promoted" and record["evaluation_data"].startswith("out-of-fold predictions")
    first = oof[oof["repeat"] == 0]
    expected_ba = balanced_accuracy_score(first["label"], first["predicted"])
    assert record["metrics"]["challenger"]["balanced_accuracy"] == pytest.approx(expected_ba)
    promoted = MlflowClient().get_model_version("cv-ensemble", version.version)
    assert promoted.tags["promotion.estimate"] == "out-of-fold" and "out-of-fold estimate" in promoted.description
    with pytest.raises(ConfigError, match="cv_validation_\\*_mean"):
        best_run("cv", "cv_validation_roc_auc_std")


def test_pooled_patient_calls_use_each_folds_threshold(tracking_uri):
    # Patient a (fold 0, threshold 0.2) is malignant at a mean probability of 0.3; patient b (fold 1,
    # threshold 0.5) benign at 0.4: both calls are right only at their own fold's threshold.
    oof = pd.DataFrame({"patient": ["a", "a", "b", "b"], "label": [1, 1, 0, 0], "probability": [0.25, 0.35, 0.3, 0.5],
                        "repeat": 0, "fold": [0, 0, 1, 1], "threshold": [0.2, 0.2, 0.5, 0.5]})
    oof["predicted"] = (oof["probability"] >= oof["threshold"]).astype(int)
    with mlflow.start_run():
        pooled = cross_validation._log_pooled(oof, ["benign", "malignant"])
    assert pooled["oof_patient_accuracy"] == 1.0


def test_pooled_results_of_several_repeats_are_their_mean(tracking_uri):
    """Out-of-fold metrics of a repeated cross-validation: each repeat pooled over its folds, then the mean."""
    rng = np.random.default_rng(3)
    one = pd.DataFrame({"patient": np.repeat(list("abcdefgh"), 5), "label": np.repeat([0, 1] * 4, 5),
                        "fold": np.repeat([0, 1] * 4, 5)})
    repeats = []
    for repeat in (0, 1):
        part = one.assign(repeat=repeat, probability=np.clip(one["label"] * 0.3 + rng.random(len(one)) * 0.7, 0, 1),
                          threshold=0.5)
        repeats.append(part.assign(predicted=(part["probability"] >= 0.5).astype(int)))
    with mlflow.start_run():
        pooled = cross_validation._log_pooled(pd.concat(repeats, ignore_index=True), ["benign", "malignant"])
        singles = []
        for part in repeats:
            with mlflow.start_run(nested=True):
                singles.append(cross_validation._log_pooled(part, ["benign", "malignant"]))
    for name in ("oof_roc_auc", "oof_balanced_accuracy", "oof_accuracy", "oof_patient_accuracy", "oof_ece"):
        assert pooled[name] == pytest.approx(np.mean([s[name] for s in singles])), name
    assert singles[0]["oof_roc_auc"] != pytest.approx(singles[1]["oof_roc_auc"])  # two different repeats
