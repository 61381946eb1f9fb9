"""Registry flow on a temporary SQLite store with two small trained models: register, gate, rollback."""

from __future__ import annotations

import json
import os

import mlflow
import numpy as np
import pandas as pd
import pytest
from mlflow import MlflowClient

from conftest import BREAKHIS, IDC, idc_patient_dirs
from histoflow.errors import ConfigError, DataError
from histoflow.registry.aliases import register, rollback
from histoflow.registry.policy import Gate, load_policy
from histoflow.registry.promotion import promote
from histoflow.registry.selection import TIE_RULE, RegistryError, best_run, select, serving_cost
from histoflow.serving.batch_predict import batch_predict

NAME = "histoflow-test"
POLICY = load_policy()
ALIASES = POLICY.aliases


def _policy(**thresholds):
    return load_policy(**thresholds)


def _aliases(name: str) -> dict[str, str]:
    return dict(MlflowClient().get_registered_model(name).aliases)


def test_selection_uses_validation_metrics_only(use_store):
    with pytest.raises(ConfigError, match="validation metric"):
        best_run("tiny", metric="test_roc_auc")
    with pytest.raises(RegistryError, match="no experiment"):
        best_run("no-such-experiment")
    _, _, runs = use_store
    scores = {r: mlflow.get_run(r).data.metrics["validation_accuracy"] for r in runs.values()}
    selection = select("tiny", metric="validation_accuracy")
    # The best by the metric is the chosen run or one it was tied with (12 validation images: wide intervals).
    considered = [selection.run, *selection.tied]
    assert max(r.data.metrics["validation_accuracy"] for r in considered) == max(scores.values())
    assert all(serving_cost(selection.run) <= serving_cost(r) for r in selection.tied)
    assert best_run("tiny", metric="validation_accuracy").info.run_id == selection.run.info.run_id


def _scored_run(name: str, patients: np.ndarray, labels: np.ndarray, malignant: np.ndarray, n_params: float) -> str:
    """A finished training run as selection sees one: its validation predictions and metrics, its size."""
    from histoflow.modeling.metrics import evaluate

    frame = pd.DataFrame({"relpath": [f"p{p}/{i}.png" for i, p in enumerate(patients)], "patient": patients,
                          "label": labels})
    scores = evaluate(frame, np.stack([1 - malignant, malignant], axis=1))
    with mlflow.start_run(run_name=name) as run:
        mlflow.log_params({"image_size": 96, "tta": "none"})
        mlflow.log_metrics({**{f"validation_{k}": v for k, v in scores.items() if np.isfinite(v)},
                            "n_params": n_params})
        mlflow.set_tag("split_leaky", "false")
        mlflow.log_table(frame.assign(probability_malignant=malignant, probability_uncalibrated=malignant),
                         "evaluation/validation_predictions.json")
    return run.info.run_id


def test_runs_inside_the_interval_of_the_best_are_ties_and_the_cheapest_is_chosen(tracking_uri):
    """Three runs scored on the same 200 validation images of 40 patients: a good network, a smaller one that
    differs from it by noise, and one that guesses. The guess is no tie; of the other two the smaller is served,
    though the larger's AUC is a little higher, and the description `register` gives the version says why."""
    rng = np.random.default_rng(0)
    patients = np.repeat(np.arange(40), 5)
    labels = np.repeat(rng.integers(0, 2, 40), 5)
    good = np.clip(0.25 + 0.5 * labels + rng.normal(0, 0.2, len(labels)), 0, 1)
    mlflow.set_experiment("ties")
    large = _scored_run("large", patients, labels, good, 2e7)
    small = _scored_run("small", patients, labels, np.clip(good + rng.normal(0, 0.05, len(labels)), 0, 1), 1e6)
    guess = _scored_run("guess", patients, labels, rng.uniform(0, 1, len(labels)), 1e5)
    auc = {r: mlflow.get_run(r).data.metrics["validation_roc_auc"] for r in (large, small, guess)}
    assert auc[large] > auc[small] > 0.8 > 0.6 > auc[guess]  # what the setting is meant to be

    selection = select("ties", "validation_roc_auc")
    assert selection.run.info.run_id == small
    assert [r.info.run_id for r in selection.tied] == [large]  # the guess, cheapest of all, is no tie
    assert f"tied with {large} ({auc[large]:.4f})" in selection.describe() and TIE_RULE in selection.describe()


def test_gate_thresholds():
    gate = _policy(min_balanced_accuracy_gain=0.02, max_recall_drop="0.01").gate
    first = gate.thresholds(None)
    assert first["balanced_accuracy"].threshold == 0.5 and first["recall_score"].threshold == 0.0
    against = gate.thresholds({"balanced_accuracy": 0.8, "recall_score": 0.9})
    assert against["balanced_accuracy"].min_absolute_change == 0.02
    assert against["recall_score"].threshold == pytest.approx(0.89)
    no_drop = POLICY.gate.thresholds({"balanced_accuracy": 0.8, "recall_score": 0.9})
    assert no_drop["balanced_accuracy"].threshold == 0.8 and no_drop["recall_score"].threshold == 0.9
    with pytest.raises(ConfigError, match="max_recall_drop"):
        _policy(max_recall_drop=2)
    with pytest.raises(ConfigError, match="unknown threshold 'min_auc'"):
        _policy(min_auc=0.9)


def test_the_policy_file_sets_the_gate_and_the_aliases(tmp_path):
    """The project's registry/gate.yaml is what promote applies; another file changes the gate and the names."""
    assert POLICY.source.endswith("registry/gate.yaml")
    assert POLICY.gate == Gate(min_balanced_accuracy=0.5, min_recall=0.0, min_balanced_accuracy_gain=0.0,
                               max_recall_drop=0.0)
    assert (ALIASES.challenger, ALIASES.champion, ALIASES.previous) == ("challenger", "champion", "previous")
    strict = tmp_path / "strict.yaml"
    strict.write_text("thresholds:\n  min_balanced_accuracy: 0.8\n  min_recall: 0.95\n"
                      "  min_balanced_accuracy_gain: 0.01\n  max_recall_drop: 0.0\n"
                      "aliases: {challenger: candidate, champion: production, previous: last-production}\n")
    policy = load_policy(str(strict), min_recall="0.9")  # a parameter wins over the file
    assert (policy.gate.min_balanced_accuracy, policy.gate.min_recall) == (0.8, 0.9)
    assert policy.aliases.champion == "production"
    assert policy.gate.thresholds(None)["balanced_accuracy"].threshold == 0.8
    for bad, message in [("thresholds: {min_recall: 0.5}\naliases: {challenger: a, champion: b, previous: c}\n",
                          "thresholds must set exactly"),
                         ("thresholds: {min_balanced_accuracy: 2, min_recall: 0, min_balanced_accuracy_gain: 0, "
                          "max_recall_drop: 0}\naliases: {challenger: a, champion: b, previous: c}\n",
                          "min_balanced_accuracy must be in 0..1"),
                         ("gate: {}\n", "unknown section 'gate'")]:
        strict.write_text(bad)
        with pytest.raises(ConfigError, match=message):
            load_policy(str(strict))


def test_promotion_follows_an_edited_policy_file(use_store, tmp_path):
    name = NAME + "-policy"
    policy_file = tmp_path / "gate.yaml"
    policy_file.write_text("thresholds:\n  min_balanced_accuracy: 1.0\n  min_recall: 1.0\n"
                           "  min_balanced_accuracy_gain: 0.0\n  max_recall_drop: 0.0\n"
                           "aliases: {challenger: candidate, champion: production, previous: before}\n")
    policy = load_policy(str(policy_file))
    register("tiny", "validation_roc_auc", name, policy.aliases)
    assert _aliases(name) == {"candidate": _aliases(name)["candidate"]}
    record = promote(name, policy)
    if record["metrics"]["challenger"]["balanced_accuracy"] < 1.0:  # a 1-epoch model at 32 px: not perfect
        assert record["decision"] == "rejected" and "production" not in _aliases(name)
    policy_file.write_text(policy_file.read_text().replace("1.0", "0.0"))
    record = promote(name, load_policy(str(policy_file)))
    assert record["decision"] == "promoted" and record["policy"] == str(policy_file)
    assert _aliases(name)["production"] == _aliases(name)["candidate"]


@pytest.mark.slow
def test_register_promote_reject_promote_rollback(use_store):
    client = MlflowClient()
    with pytest.raises(RegistryError, match="register"):
        promote(NAME, POLICY)

    first = register("tiny", "validation_roc_auc", NAME, ALIASES)
    assert _aliases(NAME) == {"challenger": first.version}
    assert first.tags["split_mode"] == "patient" and len(first.tags["dataset.digest"]) == 16
    assert first.tags["run_id"] == best_run("tiny", "validation_roc_auc").info.run_id
    assert "metric.validation_roc_auc" in first.tags and "selected by validation_roc_auc" in first.description
    tied = select("tiny", "validation_roc_auc").tied  # what the description says about them: the selection test's
    assert first.tags["selection.tied_with"] == ",".join(r.info.run_id for r in tied)
    served = mlflow.pyfunc.load_model(f"models:/{NAME}@challenger")
    assert served.metadata.get_input_schema().input_names() == ["image"]

    # No champion yet: the challenger becomes champion (absolute floors only).
    record = promote(NAME, _policy(min_balanced_accuracy=0.0))
    assert record["decision"] == "promoted" and record["champion_version"] is None
    assert _aliases(NAME)["champion"] == first.version
    assert set(record["metrics"]["challenger"]) >= {"balanced_accuracy", "recall_score", "accuracy_score"}

    # A new challenger that must improve balanced accuracy by more than is possible: rejected.
    second = register("tiny", "validation_roc_auc", NAME, ALIASES)
    assert second.version != first.version
    record = promote(NAME, _policy(min_balanced_accuracy=0.0, min_balanced_accuracy_gain=1.0))
    assert record["decision"] == "rejected" and "balanced_accuracy" in record["reason"]
    assert _aliases(NAME)["champion"] == first.version  # unchanged
    tags = client.get_model_version(NAME, second.version).tags
    assert tags["promotion.decision"] == "rejected" and tags["promotion.against"] == str(first.version)
    assert "promotion.champion.balanced_accuracy" in tags and "promotion.challenger.recall_score" in tags
    decision = json.loads(mlflow.artifacts.load_text(f"runs:/{tags['promotion.run_id']}/promotion/decision.json"))
    assert decision["metrics"]["champion"] and decision["decision"] == "rejected"

    # Same challenger, a gate it meets (recall may drop by up to 1, no floors): promoted, old one kept.
    record = promote(NAME, _policy(min_balanced_accuracy=0.0, max_recall_drop=1.0))
    assert record["decision"] == "promoted"
    assert _aliases(NAME) == {"challenger": second.version, "champion": second.version,
                              "previous": first.version}
    with pytest.raises(RegistryError, match="already"):
        promote(NAME, POLICY)

    assert rollback(NAME, ALIASES) == first.version
    assert _aliases(NAME)["champion"] == first.version and "previous" not in _aliases(NAME)
    assert client.get_model_version(NAME, second.version).tags["rolled_back"] == "true"
    with pytest.raises(RegistryError, match="no @previous"):
        rollback(NAME, ALIASES)


def test_promote_on_a_given_folder_of_the_models_classes(use_store, tmp_path):
    name = NAME + "-folder"
    register("tiny", "validation_roc_auc", name, ALIASES)
    folder = tmp_path / "breakhis"
    _breakhis_subset(folder, per_class=2)
    record = promote(name, _policy(min_balanced_accuracy=0.0), data_dir=str(folder), max_images=30)
    assert "30 images" in record["evaluation_data"] and record["positive_class"] == "malignant"


def test_promote_refuses_images_of_other_classes(use_store):
    """BreaKHis models (benign/malignant) scored on IDC patches (non-IDC/IDC) would give meaningless metrics."""
    name = NAME + "-classes"
    register("tiny", "validation_roc_auc", name, ALIASES)
    with pytest.raises(DataError, match=r"classifies \['benign', 'malignant'\], but the evaluation images .* are "
                                        r"\['non-IDC', 'IDC'\]"):
        promote(name, _policy(min_balanced_accuracy=0.0), data_dir=str(IDC), max_images=30)
    assert ALIASES.champion not in _aliases(name)


def _breakhis_subset(target, per_class: int = 1):
    """A BreakHis tree holding the first patient folder(s) of each class (symlinks to the real data)."""
    slides = BREAKHIS / "BreaKHis_v1" / "histology_slides" / "breast"
    chosen = []
    for cls in ("benign", "malignant"):
        patients = sorted(p for p in (slides / cls / "SOB").glob("*/*") if p.is_dir())[:per_class]
        for patient in patients:
            link = target / patient.relative_to(BREAKHIS)
            link.parent.mkdir(parents=True, exist_ok=True)
            link.symlink_to(patient)
            chosen.append(patient.name)
    return chosen


def test_batch_predict_writes_images_and_patients(use_store, classifier, tmp_path):
    model_uri, _ = classifier
    folder = tmp_path / "breakhis"
    patients = _breakhis_subset(folder)
    scored = batch_predict(model_uri, str(folder), str(tmp_path / "out"))
    written = pd.read_csv(tmp_path / "out" / "predictions.csv")
    files = [f for _, _, names in os.walk(folder, followlinks=True) for f in names if f.endswith(".png")]
    assert len(written) == len(scored) == len(files) > 0
    assert {"path", "label", "model_label", "positive_class", "positive_probability", "p_benign", "p_malignant",
            "patient", "true_label", "flags", "tissue_fraction", "focus", "ood_score", "colour_score"} <= set(written)
    assert ((written["p_benign"] + written["p_malignant"]).round(5) == 1).all()
    assert (written.loc[written["flags"].isna(), "label"] == written.loc[written["flags"].isna(), "model_label"]).all()
    assert set(written["true_label"]) == {"benign", "malignant"}
    summary = pd.read_csv(tmp_path / "out" / "patients.csv")
    assert sorted(summary["patient"]) == sorted(patients)
    assert (summary["images"].sum()) == len(written)
    # Same answers as the model loaded in-process on the same files.
    model = mlflow.pyfunc.load_model(model_uri)
    from histoflow.serving.requests import encode_file

    direct = model.predict(pd.DataFrame({"image": [encode_file(p) for p in written["path"][:5]]}))
    assert direct["label"].tolist() == written["label"][:5].tolist()


def test_batch_predict_gives_each_patient_its_majority_label(use_store, classifier, tmp_path):
    """IDC patients have patches of both classes: the patient's label is the majority of its patches' labels
    (the evaluation's rule), whatever the order of the files. (The model here is a BreaKHis one: its calls
    are benign/malignant, the folder's truth non-IDC/IDC, and no accuracy is claimed across the two.)"""
    model_uri, _ = classifier
    folder = tmp_path / "idc"
    folder.mkdir()
    chosen = {}
    for patient in idc_patient_dirs(40):
        counts = {c: len(list((patient / c).glob("*.png"))) for c in ("0", "1")}
        # A patient whose first file (class folder 0 sorts first) is of the minority class.
        if 0 < counts["0"] < counts["1"]:
            (folder / patient.name).symlink_to(patient)
            chosen[patient.name] = "IDC"
        if len(chosen) == 2:
            break
    assert len(chosen) == 2
    batch_predict(model_uri, str(folder), str(tmp_path / "out"))
    patients = pd.read_csv(tmp_path / "out" / "patients.csv", dtype={"patient": str})
    assert dict(zip(patients["patient"], patients["true_label"], strict=True)) == chosen
    scored = pd.read_csv(tmp_path / "out" / "predictions.csv", dtype={"patient": str})
    for row in patients.itertuples():
        mine = scored[scored["patient"] == row.patient]
        assert row.images == len(mine)
        assert row.mean_p_malignant == pytest.approx(mine["p_malignant"].mean())
        # At the model's own threshold (Youden's, on validation), as evaluation and the served label decide.
        assert row.label == ("malignant" if mine["p_malignant"].mean() >= mine["threshold"].iloc[0] else "benign")
    assert "patient_accuracy" not in mlflow.last_active_run().data.metrics


def test_compare_without_training_runs_says_so(tracking_uri):
    """An experiment holding only other runs (a data step, a study) has nothing to tabulate: a DataError
    naming the experiment, not a KeyError from an empty table."""
    from histoflow.registry.comparison import summary

    experiment = MlflowClient().create_experiment("no-training")
    MlflowClient().create_run(experiment, tags={"histoflow.step": "data"})
    for dataset in ("", "breakhis"):
        with pytest.raises(DataError, match="experiment 'no-training' has no finished training run"):
            summary("no-training", dataset)
    with pytest.raises(DataError, match="no experiment named 'absent'"):
        summary("absent")
