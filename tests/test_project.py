"""Entry points through MLflow Projects, run from a clean copy of the repository: one CNN and one backbone
variant on ~100 real images for 1 epoch, then compare, register, promote and predict. The runs hold what a
reviewer needs, the other variants' runs (trained in-process for the registry tests) hold the same, and nothing
is written into the repository."""

from __future__ import annotations

import json
import shutil
import subprocess

import keras
import mlflow
import numpy as np
import pandas as pd
import pytest
from mlflow.tracking import MlflowClient

from conftest import BREAKHIS, IDC, REPO, TINY_RUNS, TINY_SETTINGS, idc_patient_dirs, sqlite_store, working_tree_state
from histoflow.data.pipeline import make_dataset
from histoflow.data.splits import patient_overlap
from histoflow.modeling.metrics import METRIC_NAMES

pytestmark = pytest.mark.slow
COMMON = {"max_images": 100, "epochs": 1, "batch_size": 16, "gradcam_per_class": 2, "bootstrap": 200}
RUNS = {
    "baseline": {"data_dir": str(IDC), "image_size": 64},
    # The card's `mlflow run . -e densenet`: DenseNet121 from scratch with its backbone frozen (the fusion head
    # trains): the same run as a fine-tuned one, at a fraction of its cost here.
    "densenet": {"data_dir": str(BREAKHIS), "image_size": 32, "weights": "none", "unfrozen_blocks": 0,
                 "gradcam_per_class": 0},  # a fusion model's Grad-CAM: tests/test_training_run.py's warm-up run
}
EXPERIMENT = "project-test"


@pytest.fixture(scope="module")
def clone(tmp_path_factory):
    """The repository as a user clones it: the working tree's tracked files, committed in a new repository."""
    root = tmp_path_factory.mktemp("clone") / "histoflow"
    listed = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True, text=True, check=True)
    for name in filter(None, listed.stdout.split("\0")):
        if (REPO / name).is_file():
            (root / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, root / name)
    git = ["git", "-c", "user.name=histoflow tests", "-c", "user.email=tests@histoflow.invalid"]
    for command in (["init", "-q"], ["add", "-A"], ["commit", "-q", "-m", "the working tree"]):
        subprocess.run([*git, *command], cwd=root, check=True, capture_output=True)
    assert working_tree_state(root) == set()
    return root


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    root = tmp_path_factory.mktemp("project")
    with sqlite_store(root):
        yield root


def _project(clone, entry_point: str, **parameters):
    submitted = mlflow.projects.run(str(clone), entry_point=entry_point, parameters=parameters,
                                    env_manager="local", experiment_name=EXPERIMENT, synchronous=True)
    return MlflowClient().get_run(submitted.run_id)


@pytest.fixture(scope="module")
def runs(store, clone):
    return {entry_point: _project(clone, entry_point, **{**COMMON, **params}) for entry_point, params in RUNS.items()}


def _artifacts(run_id: str, path: str = "") -> set[str]:
    found = set()
    for item in MlflowClient().list_artifacts(run_id, path):
        found |= _artifacts(run_id, item.path) if item.is_dir else {item.path}
    return found


def _check_run(run, epochs: int, max_images: int) -> None:
    """What every training run holds: its parameters, per-epoch and test metrics with intervals, provenance
    tags, the datasets of its three splits, and its artifacts."""
    assert run.info.status == "FINISHED"
    data = run.data
    assert data.params["epochs"] == str(epochs) and data.params["max_images"] == str(max_images)
    for name in METRIC_NAMES:
        assert 0.0 <= data.metrics[f"test_{name}"] <= (10.0 if name == "loss" else 1.0), name
        assert f"validation_{name}" in data.metrics
    for name in ("train_loss", "train_accuracy", "train_auc", "val_loss", "val_accuracy", "val_auc"):
        history = MlflowClient().get_metric_history(run.info.run_id, name)
        assert sorted(m.step for m in history) == list(range(epochs)), name
    assert data.metrics["n_params"] > 1e5 and data.metrics["model_size_mb"] > 0.1
    for name in ("roc_auc", "balanced_accuracy", "f1", "accuracy"):  # patient bootstrap intervals
        low, high = data.metrics.get(f"test_{name}_ci_low"), data.metrics.get(f"test_{name}_ci_high")
        if low is not None:  # a degenerate test split (one class in every resample) has none for AUC
            assert low <= data.metrics[f"test_{name}"] + 1e-9 and data.metrics[f"test_{name}"] <= high + 1e-9, name
    assert "test_accuracy_ci_low" in data.metrics and data.metrics["temperature"] > 0
    assert 0.0 <= data.metrics["decision_threshold"] <= 1.0 and "test_ece_uncalibrated" in data.metrics
    assert data.metrics["train_time_s"] > 0
    tags = data.tags
    assert tags["split_mode"] == "patient" and tags["split_leaky"] == "false"
    assert len(tags["dataset.digest"]) == 16
    assert len(tags.get("mlflow.source.git.commit") or tags.get("git_commit", "")) == 40
    assert {"version.tensorflow-cpu", "version.keras", "version.mlflow"} <= set(tags)
    contexts = {d.tags[0].value: d.dataset for d in run.inputs.dataset_inputs}
    assert set(contexts) == {"train", "val", "test"}
    assert all(d.digest.startswith(tags["dataset.digest"]) for d in contexts.values())
    expected = {"data/split.csv", "data/data_report.json", "environment.json",
                *(["evaluation/gradcam.png"] if data.params["gradcam_per_class"] != "0" else []),
                "evaluation/calibration.json", "evaluation/test_reliability.png",
                "evaluation/validation_reliability.png",
                "evaluation/test_confusion_matrix.png", "evaluation/test_confusion_matrix.json",
                "evaluation/test_roc_curve.png", "evaluation/training_curves.png",
                "evaluation/test_classification_report.txt", f"keras/{data.params['model']}.keras"}
    assert expected <= _artifacts(run.info.run_id)
    local = mlflow.artifacts.download_artifacts(run_id=run.info.run_id, artifact_path="data")
    split = pd.read_csv(f"{local}/split.csv")
    assert len(split) == max_images and set(split["split"]) == {"train", "val", "test"}
    assert patient_overlap(split) == set()
    matrix = json.loads(mlflow.artifacts.load_text(f"runs:/{run.info.run_id}/evaluation/test_confusion_matrix.json"))
    assert np.asarray(matrix["matrix"]).sum() == (split["split"] == "test").sum()


@pytest.mark.parametrize("entry_point", list(RUNS))
def test_run_holds_params_metrics_provenance_and_artifacts(runs, entry_point):
    run = runs[entry_point]
    assert run.data.params["variant"] == entry_point
    assert run.data.tags["mlflow.project.entryPoint"] == entry_point
    _check_run(run, COMMON["epochs"], COMMON["max_images"])


@pytest.mark.parametrize("variant", list(TINY_RUNS))
def test_in_process_runs_hold_the_same(use_store, variant):
    run = MlflowClient().get_run(use_store[2][variant])
    assert run.data.params["variant"] == variant
    _check_run(run, TINY_RUNS[variant]["epochs"], TINY_SETTINGS["max_images"])


def test_logged_model_predicts_like_the_keras_file(runs):
    run = runs["baseline"]
    [output] = run.outputs.model_outputs
    pyfunc = mlflow.pyfunc.load_model(f"models:/{output.model_id}")
    keras_dir = mlflow.artifacts.download_artifacts(run_id=run.info.run_id, artifact_path="keras")
    model = keras.saving.load_model(f"{keras_dir}/baseline_cnn.keras")
    split = pd.read_csv(mlflow.artifacts.download_artifacts(run_id=run.info.run_id, artifact_path="data/split.csv"))
    test = split[split["split"] == "test"]
    images = next(iter(make_dataset([str(IDC / p) for p in test["relpath"]], test["label"], 64, 64)))[0].numpy()
    expected = model.predict(images, verbose=0)
    got = np.asarray(pyfunc.predict(images))
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)
    assert list(pyfunc.metadata.signature.inputs.to_dict()[0]["tensor-spec"]["shape"]) == [-1, 64, 64, 3]
    assert pyfunc.metadata.metadata["class_names"] == ["non-IDC", "IDC"]


def test_compare_entry_point_tabulates_every_variant(runs, store, clone):
    _project(clone, "compare", output_dir=str(store / "cmp"))
    table = pd.read_csv(store / "cmp" / "comparison.csv")
    assert set(table["run_id"]) == {r.info.run_id for r in runs.values()}
    for run in runs.values():
        row = table[table["run_id"] == run.info.run_id].iloc[0]
        assert row["Accuracy"] == pytest.approx(run.data.metrics["test_accuracy"])
        assert row["AUC"] == pytest.approx(run.data.metrics["test_roc_auc"])
    markdown = (store / "cmp" / "comparison.md").read_text()
    assert "| Model" in markdown and "densenet121_fusion" in markdown and "baseline_cnn" in markdown
    # The MLflow UI compare view lines the variants up: the same test metric names everywhere.
    names = [{k for k in r.data.metrics if k.startswith("test_")} for r in runs.values()]
    assert all(n == names[0] for n in names)
    compare_run = mlflow.search_runs(experiment_names=[EXPERIMENT], filter_string="tags.histoflow.step = 'compare'")
    assert len(compare_run) == 1


def test_registry_entry_points_register_promote_and_predict(runs, store, clone):
    """register and predict through the command line in-process, promote through MLflow Projects (the parameters
    `mlflow run` logs as given are the subject there)."""
    from histoflow.cli import main

    mlflow.set_experiment(EXPERIMENT)
    assert main(["register", "--experiment", EXPERIMENT, "--metric", "validation_accuracy",
                 "--name", "project-model"]) == 0
    top = max(r.data.metrics["validation_accuracy"] for r in runs.values())
    best = min((r for r in runs.values() if r.data.metrics["validation_accuracy"] == top),
               key=lambda r: r.info.start_time)  # ties go to the earliest run
    version = MlflowClient().get_model_version_by_alias("project-model", "challenger")
    assert version.tags["run_id"] == best.info.run_id
    # "0" is logged by `mlflow run` as given; promote must not try to log 0.0 over it (MLflow refuses the change).
    promoted = _project(clone, "promote", name="project-model", min_balanced_accuracy="0", max_images="20")
    assert promoted.data.params["min_balanced_accuracy"] == "0" and promoted.data.params["min_recall"] == "0.0"
    assert promoted.data.params["policy"].endswith("registry/gate.yaml")
    assert MlflowClient().get_model_version_by_alias("project-model", "champion").version == version.version
    folder = store / "to-score"
    folder.mkdir()
    for patient in idc_patient_dirs(2):  # a folder assembled from links, as labs often do
        (folder / patient.name).symlink_to(patient)
    assert main(["predict", "--model_uri", "models:/project-model@champion", "--data_dir", str(folder),
                 "--output_dir", str(store / "pred")]) == 0
    scored = mlflow.last_active_run()
    assert scored.data.tags["histoflow.step"] == "predict" and int(scored.data.params["images"]) > 20
    assert (store / "pred" / "predictions.csv").is_file()


def test_nothing_is_written_into_the_clone(runs, clone):
    """Training, comparing and promoting (the tests above, in this order) through `mlflow run .` in a clone leave
    it as it was: the image cache and checkpoints are in the user's cache
    (HISTOFLOW_CACHE here), not in `.`."""
    assert working_tree_state(clone) == set()
