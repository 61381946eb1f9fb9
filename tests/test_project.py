"""The project as a user runs it, from a clean copy of the repository: `main` (data -> baseline -> tune ->
register -> promote, each step an `mlflow run` of its entry point, on 60 real images), the card's
`mlflow run . -e densenet`, then compare, register, promote and predict. The runs hold what a reviewer needs,
the other variants' runs (trained in-process for the registry tests) hold the same, a second `main` reuses
every step, and nothing is written into the repository."""

from __future__ import annotations

import json
import shutil
import subprocess

import keras
import mlflow
import numpy as np
import optuna
import pandas as pd
import pytest
from mlflow.tracking import MlflowClient

from conftest import (
    BREAKHIS,
    DENSENET_WEIGHTS,
    REPO,
    TINY_RUNS,
    TINY_SETTINGS,
    idc_patient_dirs,
    sqlite_store,
    working_tree_state,
)
from histoflow import artifacts, workflow
from histoflow.data.pipeline import make_dataset
from histoflow.data.splits import patient_overlap
from histoflow.modeling.metrics import METRIC_NAMES
from histoflow.registry.selection import select
from histoflow.tuning import study as tuning
from histoflow.tuning.settings import make_tune_config
from histoflow.workflow import make_workflow_config

pytestmark = pytest.mark.slow
IMAGES, EPOCHS, SIZE = 60, 1, 32


def readme_first_command() -> dict[str, str]:
    """The parameters of the README's first command, `... && mlflow run . -e densenet --env-manager local -P ...`."""
    text = (REPO / "README.md").read_text()
    block = text.split("## Set up", 1)[1].split("```bash", 1)[1].split("```", 1)[0]
    words = block[block.index("mlflow run"):].split()
    assert words[:7] == ["mlflow", "run", ".", "-e", "densenet", "--env-manager", "local"], words
    assert all(word == "-P" for word in words[7::2]), words
    return dict(word.split("=", 1) for word in words[8::2])


# The card's `mlflow run . -e densenet` as the README's first command runs it (the shipped IDC sample, the
# quick profile), as written but for an epoch cap and the pretrained weights by path (no download here).
README_EPOCHS, SAMPLE_IMAGES = 3, 970
DENSENET = {**readme_first_command(), "epochs": README_EPOCHS, "weights": str(DENSENET_WEIGHTS)}
EXPERIMENT = "project-test"
STEPS = ["data", "baseline", "tune", "register", "promote"]


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


def _workflow_parameters(store) -> dict:
    return {"data_dir": str(BREAKHIS), "max_images": IMAGES, "image_size": SIZE, "batch_size": 16,
            "epochs": EPOCHS, "variants": "baseline", "tune_variant": "transfer", "n_trials": 2, "trial_epochs": 2,
            "storage": f"sqlite:///{store / 'optuna.db'}", "cache_dir": str(store / "features"),
            "model_name": "wf", "output_dir": str(store / "comparison")}


def _main(clone, store) -> str:
    """`main` as `mlflow run . -e main` runs it: in the clone, its steps `mlflow run`s of the clone's entry
    points (in-process here; its own `mlflow run` is checked against the code in tests/test_entrypoints.py)."""
    mlflow.set_experiment(EXPERIMENT)  # created here, not in the clone: a SQLite store keeps artifacts in ./mlruns
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(clone)
        return workflow.run(make_workflow_config(**_workflow_parameters(store)))["run_id"]


def _steps(run_id: str) -> list[dict]:
    path = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path="workflow/steps.json")
    with open(path) as f:
        return json.load(f)["steps"]


@pytest.fixture(scope="module")
def study(store, clone) -> str:
    """The main run's id."""
    return _main(clone, store)


@pytest.fixture(scope="module")
def runs(study, store, clone):
    baseline = next(s for s in _steps(study) if s["name"] == "baseline")
    return {"baseline": MlflowClient().get_run(baseline["run_id"]), "densenet": _project(clone, "densenet", **DENSENET)}


def _artifacts(run_id: str, path: str = "") -> set[str]:
    found = set()
    for item in MlflowClient().list_artifacts(run_id, path):
        found |= _artifacts(run_id, item.path) if item.is_dir else {item.path}
    return found


def _check_run(run, epochs: int, max_images: int, images: int = 0) -> None:
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
    assert len(split) == (images or max_images) and set(split["split"]) == {"train", "val", "test"}
    assert patient_overlap(split) == set()
    matrix = json.loads(mlflow.artifacts.load_text(f"runs:/{run.info.run_id}/evaluation/test_confusion_matrix.json"))
    assert np.asarray(matrix["matrix"]).sum() == (split["split"] == "test").sum()


def test_main_runs_every_step_once_then_reuses_them(study, store, clone):
    client = MlflowClient()
    steps = _steps(study)
    assert [s["name"] for s in steps] == STEPS and not any(s["reused"] for s in steps)
    for step in steps:
        run = client.get_run(step["run_id"])
        assert run.info.status == "FINISHED", step
        assert run.data.tags["mlflow.parentRunId"] == study  # nested under main in the UI
        assert run.data.tags["mlflow.project.entryPoint"] == step["name"]
    data = client.get_run(steps[0]["run_id"])
    assert data.data.tags["dataset.name"] == "breakhis" and data.data.metrics["images"] == IMAGES
    assert "data/data_report.json" in [a.path for a in client.list_artifacts(data.info.run_id, "data")]
    # Each later step read the data step's split table instead of discovering and splitting again.
    table = f"runs:/{data.info.run_id}/data/split.csv"
    for step in steps[1:3]:  # baseline, tune
        run = client.get_run(step["run_id"])
        assert run.data.params["split_table"] == table, step["name"]
        assert run.data.tags["dataset.digest"] == data.data.tags["dataset.digest"]
        assert run.data.tags["histoflow.workflow.data_digest"] == run.data.tags["dataset.digest"]
    # What tune derives is logged as used (the search space's fixed values, the variant's augmentation, the
    # study's name), never as MLflow Projects' placeholder for "not given".
    tune = client.get_run(steps[2]["run_id"]).data.params
    assert (tune["augment"], tune["optimizer"], tune["unfrozen_blocks"], tune["batch_size"]) == ("random", "adam", "0",
                                                                                                 "16")
    assert tune["study_name"].startswith("transfer-mobilenet-") and "''" not in tune.values()
    # The study's final run: the best trial's parameters over the search space's fixed values, tagged both ways.
    best = optuna.load_study(study_name=tune["study_name"], storage=f"sqlite:///{store / 'optuna.db'}").best_trial
    final = client.get_run(client.get_run(steps[2]["run_id"]).data.tags["optuna.final_run_id"])
    assert final.data.tags["optuna.study_name"] == tune["study_name"] and final.data.tags["variant"] == "transfer"
    assert final.data.tags["optuna.parent_run_id"] == steps[2]["run_id"]
    assert final.data.params["unfrozen_blocks"] == "0"  # the search space file: the model the trials measured
    assert float(final.data.params["learning_rate"]) == best.params["learning_rate"]
    assert 0.0 <= final.data.metrics["test_accuracy"] <= 1.0
    # tune again as main ran it: the study is complete and its final run trained, so neither is done again.
    [step] = [s for s in workflow.plan(make_workflow_config(**_workflow_parameters(store)), EXPERIMENT, table)
              if s.name == "tune"]
    again = tuning.run(make_tune_config(**step.parameters, experiment=EXPERIMENT))
    assert again.new_trials == 0 and again.final_run_id == final.info.run_id
    champion = client.get_model_version_by_alias("wf", "champion")
    assert client.get_model_version_by_alias("wf", "challenger").version == champion.version
    table = (store / "comparison" / "comparison.md").read_text()
    assert "baseline_cnn" in table and "mobilenet_fusion" in table and "transfer-tuned" in table
    assert "workflow/comparison.md" in [a.path for a in client.list_artifacts(study, "workflow")]

    # The same study again: every step reused.
    again_id = _main(clone, store)
    again = _steps(again_id)
    assert all(s["reused"] for s in again), again
    assert [s["run_id"] for s in again] == [s["run_id"] for s in steps]
    assert again_id != study
    assert len(client.search_model_versions("name = 'wf'")) == 1  # register was reused, not repeated


@pytest.mark.parametrize("entry_point", ["baseline", "densenet"])
def test_run_holds_params_metrics_provenance_and_artifacts(runs, entry_point):
    run = runs[entry_point]
    assert run.data.params["variant"] == entry_point
    assert run.data.tags["mlflow.project.entryPoint"] == entry_point
    _check_run(run, *((EPOCHS, IMAGES) if entry_point == "baseline" else (README_EPOCHS, 0, SAMPLE_IMAGES)))


def test_the_readmes_first_command_trains_densenet121_on_the_shipped_sample(runs):
    """Its quick profile: the shipped IDC patches, the head trained on the frozen backbone's cached features."""
    run = runs["densenet"]
    assert run.data.params["data_dir"] == "sample" and run.data.tags["dataset.name"] == "idc-sample"
    report = mlflow.artifacts.load_dict(f"runs:/{run.info.run_id}/data/data_report.json")
    assert (report["layout"], report["images"], report["patients"]) == ("idc", SAMPLE_IMAGES, 40)
    assert run.data.tags["feature_cache"] in ("miss", "hit") and run.data.params["unfrozen_blocks"] == "0"
    assert run.data.metrics["epochs_run"] == README_EPOCHS
    assert run.data.metrics["test_roc_auc"] > 0.7  # pretrained features separate IDC from the rest already


@pytest.mark.parametrize("variant", list(TINY_RUNS))
def test_in_process_runs_hold_the_same(use_store, variant):
    run = MlflowClient().get_run(use_store[2][variant])
    assert run.data.params["variant"] == variant
    _check_run(run, TINY_RUNS[variant]["epochs"], TINY_SETTINGS["max_images"])


def test_logged_model_predicts_like_the_keras_file(runs):
    run = runs["baseline"]
    [model_id] = [o.model_id for o in run.outputs.model_outputs  # the network; register added the classifier
                  if mlflow.get_logged_model(o.model_id).name == artifacts.MODEL_ARTIFACT]
    pyfunc = mlflow.pyfunc.load_model(f"models:/{model_id}")
    keras_dir = mlflow.artifacts.download_artifacts(run_id=run.info.run_id, artifact_path="keras")
    model = keras.saving.load_model(f"{keras_dir}/baseline_cnn.keras")
    split = pd.read_csv(mlflow.artifacts.download_artifacts(run_id=run.info.run_id, artifact_path="data/split.csv"))
    test = split[split["split"] == "test"]
    images = next(iter(make_dataset([str(BREAKHIS / p) for p in test["relpath"]], test["label"], SIZE, 64)))[0]
    expected = model.predict(images.numpy(), verbose=0)
    got = np.asarray(pyfunc.predict(images.numpy()))
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)
    assert list(pyfunc.metadata.signature.inputs.to_dict()[0]["tensor-spec"]["shape"]) == [-1, SIZE, SIZE, 3]
    assert pyfunc.metadata.metadata["class_names"] == ["benign", "malignant"]


def test_compare_entry_point_tabulates_every_variant(study, runs, store):
    """`compare` in-process (main's own comparison ran it before the densenet run existed)."""
    from histoflow.cli import main

    mlflow.set_experiment(EXPERIMENT)
    assert main(["compare", "--experiment", EXPERIMENT, "--output_dir", str(store / "cmp")]) == 0
    table = pd.read_csv(store / "cmp" / "comparison.csv")
    tune = next(s for s in _steps(study) if s["name"] == "tune")
    tuned = mlflow.get_run(tune["run_id"]).data.tags["optuna.final_run_id"]
    assert set(table["run_id"]) == {*(r.info.run_id for r in runs.values()), tuned}
    for run in runs.values():
        row = table[table["run_id"] == run.info.run_id].iloc[0]
        assert row["Accuracy"] == pytest.approx(run.data.metrics["test_accuracy"])
        assert row["AUC"] == pytest.approx(run.data.metrics["test_roc_auc"])
    markdown = (store / "cmp" / "comparison.md").read_text()
    assert "| Model" in markdown and "densenet121_fusion" in markdown and "baseline_cnn" in markdown
    # The MLflow UI compare view lines the variants up: the same test metric names everywhere.
    names = [{k for k in r.data.metrics if k.startswith("test_")} for r in runs.values()]
    assert all(n == names[0] for n in names)
    assert len(mlflow.search_runs(experiment_names=[EXPERIMENT], filter_string="tags.histoflow.step = 'compare'")) == 1


def test_registry_entry_points_register_promote_and_predict(runs, store):
    """register, promote and predict through the command line, in-process (main's register and promote steps
    are `mlflow run`s of theirs)."""
    from histoflow.cli import main

    mlflow.set_experiment(EXPERIMENT)
    assert main(["register", "--experiment", EXPERIMENT, "--metric", "validation_accuracy",
                 "--name", "project-model"]) == 0
    candidates = mlflow.search_runs(experiment_names=[EXPERIMENT], output_format="list",
                                    filter_string="attributes.status = 'FINISHED' and metrics.validation_accuracy >= 0 "
                                                  "and tags.split_leaky = 'false'")
    assert {r.info.run_id for r in runs.values()} <= {r.info.run_id for r in candidates}
    # The best by the metric, or the cheapest run tied with it (tests/test_registry.py tests the rule).
    chosen = select(EXPERIMENT, "validation_accuracy")
    top = max(r.data.metrics["validation_accuracy"] for r in candidates)
    assert max(r.data.metrics["validation_accuracy"] for r in [chosen.run, *chosen.tied]) == top
    version = MlflowClient().get_model_version_by_alias("project-model", "challenger")
    assert version.tags["run_id"] == chosen.run.info.run_id
    # Promote as `mlflow run . -e promote -P min_balanced_accuracy=0 ...` starts it: in a run that holds the given
    # parameters as given ("0"), named by MLFLOW_RUN_ID. It must not try to log 0.0 over "0" (MLflow refuses).
    given = {"name": "project-model", "min_balanced_accuracy": "0", "max_images": "20"}
    client = MlflowClient()
    run_id = client.create_run(mlflow.get_experiment_by_name(EXPERIMENT).experiment_id).info.run_id
    for key, value in given.items():
        client.log_param(run_id, key, value)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_RUN_ID", run_id)
        assert main(["promote", *(f"--{k}={v}" for k, v in given.items())]) == 0
    promoted = client.get_run(run_id)
    assert promoted.info.status == "FINISHED" and promoted.data.tags["histoflow.step"] == "promote"
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
    """`main` and the runs above through `mlflow run .` in a clone leave it as it was: the image cache, the
    features and checkpoints are in the user's cache (HISTOFLOW_CACHE here), not in `.`."""
    assert working_tree_state(clone) == set()
