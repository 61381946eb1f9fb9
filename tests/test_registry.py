"""Registry flow on a temporary SQLite store with two small trained models: register, gate, rollback."""

from __future__ import annotations

import json
import os

import mlflow
import pandas as pd
import pytest
from mlflow import MlflowClient

from conftest import BREAKHIS, IDC
from histoflow import registry
from histoflow.errors import ConfigError
from histoflow.registry import Gate, RegistryError

NAME = "histoflow-test"


def _aliases(name: str) -> dict[str, str]:
    return dict(MlflowClient().get_registered_model(name).aliases)


def test_selection_uses_validation_metrics_only(use_store):
    with pytest.raises(ConfigError, match="validation metric"):
        registry.best_run("tiny", metric="test_roc_auc")
    with pytest.raises(RegistryError, match="no experiment"):
        registry.best_run("no-such-experiment")
    _, _, runs = use_store
    best = registry.best_run("tiny", metric="validation_accuracy")
    scores = {v: mlflow.get_run(r).data.metrics["validation_accuracy"] for v, r in runs.items()}
    assert best.data.metrics["validation_accuracy"] == max(scores.values())


def test_gate_thresholds():
    gate = Gate(min_balanced_accuracy_gain=0.02, max_recall_drop=0.01)
    first = gate.thresholds(None)
    assert first["balanced_accuracy"].threshold == 0.5 and first["recall_score"].threshold == 0.0
    against = gate.thresholds({"balanced_accuracy": 0.8, "recall_score": 0.9})
    assert against["balanced_accuracy"].min_absolute_change == 0.02
    assert against["recall_score"].threshold == pytest.approx(0.89)
    no_drop = Gate().thresholds({"balanced_accuracy": 0.8, "recall_score": 0.9})
    assert no_drop["balanced_accuracy"].threshold == 0.8 and no_drop["recall_score"].threshold == 0.9
    with pytest.raises(ConfigError, match="max_recall_drop"):
        Gate(max_recall_drop=2)


def test_register_promote_reject_promote_rollback(use_store):
    client = MlflowClient()
    with pytest.raises(RegistryError, match="register"):
        registry.promote(NAME)

    first = registry.register("tiny", metric="validation_roc_auc", name=NAME)
    assert _aliases(NAME) == {"challenger": first.version}
    assert first.tags["split_mode"] == "patient" and len(first.tags["dataset.digest"]) == 16
    assert first.tags["run_id"] == registry.best_run("tiny", "validation_roc_auc").info.run_id
    assert "metric.validation_roc_auc" in first.tags and "selected by validation_roc_auc" in first.description
    served = mlflow.pyfunc.load_model(f"models:/{NAME}@challenger")
    assert served.metadata.get_input_schema().input_names() == ["image"]

    # No champion yet: the challenger becomes champion (absolute floors only).
    record = registry.promote(NAME, Gate(min_balanced_accuracy=0.0))
    assert record["decision"] == "promoted" and record["champion_version"] is None
    assert _aliases(NAME)["champion"] == first.version
    assert set(record["metrics"]["challenger"]) >= {"balanced_accuracy", "recall_score", "accuracy_score"}

    # A new challenger that must improve balanced accuracy by more than is possible: rejected.
    second = registry.register("tiny", metric="validation_roc_auc", name=NAME)
    assert second.version != first.version
    record = registry.promote(NAME, Gate(min_balanced_accuracy=0.0, min_balanced_accuracy_gain=1.0))
    assert record["decision"] == "rejected" and "balanced_accuracy" in record["reason"]
    assert _aliases(NAME)["champion"] == first.version  # unchanged
    tags = client.get_model_version(NAME, second.version).tags
    assert tags["promotion.decision"] == "rejected" and tags["promotion.against"] == str(first.version)
    assert "promotion.champion.balanced_accuracy" in tags and "promotion.challenger.recall_score" in tags
    decision = json.loads(mlflow.artifacts.load_text(f"runs:/{tags['promotion.run_id']}/promotion/decision.json"))
    assert decision["metrics"]["champion"] and decision["decision"] == "rejected"

    # Same challenger, a gate it meets (recall may drop by up to 1, no floors): promoted, old one kept.
    record = registry.promote(NAME, Gate(min_balanced_accuracy=0.0, max_recall_drop=1.0))
    assert record["decision"] == "promoted"
    assert _aliases(NAME) == {"challenger": second.version, "champion": second.version,
                              "previous": first.version}
    with pytest.raises(RegistryError, match="already"):
        registry.promote(NAME)

    assert registry.rollback(NAME) == first.version
    assert _aliases(NAME)["champion"] == first.version and "previous" not in _aliases(NAME)
    assert client.get_model_version(NAME, second.version).tags["rolled_back"] == "true"
    with pytest.raises(RegistryError, match="no @previous"):
        registry.rollback(NAME)


def test_promote_on_a_given_folder(use_store):
    name = NAME + "-folder"
    registry.register("tiny", name=name)
    record = registry.promote(name, Gate(min_balanced_accuracy=0.0), data_dir=str(IDC), max_images=30)
    assert "30 images" in record["evaluation_data"] and record["positive_class"] == "IDC"


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
    scored = registry.batch_predict(model_uri, str(folder), str(tmp_path / "out"))
    written = pd.read_csv(tmp_path / "out" / "predictions.csv")
    files = [f for _, _, names in os.walk(folder, followlinks=True) for f in names if f.endswith(".png")]
    assert len(written) == len(scored) == len(files) > 0
    assert {"path", "label", "confidence", "p_benign", "p_malignant", "patient", "true_label"} <= set(written)
    assert ((written["p_benign"] + written["p_malignant"]).round(5) == 1).all()
    assert set(written["true_label"]) == {"benign", "malignant"}
    summary = pd.read_csv(tmp_path / "out" / "patients.csv")
    assert sorted(summary["patient"]) == sorted(patients)
    assert (summary["images"].sum()) == len(written)
    # Same answers as the model loaded in-process on the same files.
    model = mlflow.pyfunc.load_model(model_uri)
    from histoflow.serving import encode_file

    direct = model.predict(pd.DataFrame({"image": [encode_file(p) for p in written["path"][:5]]}))
    assert direct["label"].tolist() == written["label"][:5].tolist()
