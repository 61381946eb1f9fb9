"""The `main` workflow end to end on 60 BreaKHis images at 32 px: every step runs as a nested MLflow
Projects run, the model is registered and promoted, the comparison ends the run; run again with the
same parameters, every step is reused."""

from __future__ import annotations

import json

import mlflow
import pytest
from mlflow.tracking import MlflowClient

from conftest import BREAKHIS, REPO
from histoflow import workflow
from histoflow.errors import ConfigError
from histoflow.workflow import make_workflow_config, step_data_digest

STEPS = ["data", "baseline", "tune", "register", "promote"]


def _parameters(tmp_path) -> dict:
    return {"data_dir": str(BREAKHIS), "max_images": 60, "image_size": 32, "batch_size": 16, "epochs": 1,
            "variants": "baseline", "tune_variant": "transfer", "n_trials": 2, "trial_epochs": 2,
            "storage": f"sqlite:///{tmp_path / 'optuna.db'}", "cache_dir": str(tmp_path / "cache"),
            "model_name": "wf", "output_dir": str(tmp_path / "comparison")}


def _steps(run_id: str) -> list[dict]:
    path = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path="workflow/steps.json")
    with open(path) as f:
        return json.load(f)["steps"]


@pytest.mark.slow
def test_main_runs_every_step_once_then_reuses_them(tracking_uri, keras_home, tmp_path):
    client = MlflowClient()
    # `main` in-process: its steps are `mlflow run`s of the MLproject's entry points all the same (the MLproject's
    # main entry is checked against the code in tests/test_entrypoints.py).
    mlflow.set_experiment("workflow")
    main_id = workflow.run(make_workflow_config(**_parameters(tmp_path)))["run_id"]
    steps = _steps(main_id)
    assert [s["name"] for s in steps] == STEPS and not any(s["reused"] for s in steps)
    for step in steps:
        run = client.get_run(step["run_id"])
        assert run.info.status == "FINISHED", step
        assert run.data.tags["mlflow.parentRunId"] == main_id  # nested under main in the UI
        assert run.data.tags["mlflow.project.entryPoint"] == step["name"]
    data = client.get_run(steps[0]["run_id"])
    assert data.data.tags["dataset.name"] == "breakhis" and data.data.metrics["images"] == 60
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
    champion = client.get_model_version_by_alias("wf", "champion")
    assert client.get_model_version_by_alias("wf", "challenger").version == champion.version
    table = (tmp_path / "comparison" / "comparison.md").read_text()
    assert "baseline_cnn" in table and "mobilenet_fusion" in table and "transfer-tuned" in table
    assert "workflow/comparison.md" in [a.path for a in client.list_artifacts(main_id, "workflow")]

    # The same study again: every step reused.
    again_id = workflow.run(make_workflow_config(**_parameters(tmp_path)))["run_id"]
    again = _steps(again_id)
    assert all(s["reused"] for s in again), again
    assert [s["run_id"] for s in again] == [s["run_id"] for s in steps]
    assert again_id != main_id
    versions = client.search_model_versions("name = 'wf'")
    assert len(versions) == 1  # register was reused, not repeated


@pytest.mark.parametrize("params, message", [
    ({"variants": "baseline,resnet"}, "variants must be"),
    ({"variants": ""}, None),  # empty means the default
    ({"tune_variant": "baseline"}, "tune_variant must be"),
    ({"metric": "test_roc_auc"}, "validation metric"),
    ({"epochs": "many"}, "epochs must be an integer"),
    ({"image_size": "8"}, "image_size must be in"),
    ({"colour": "red"}, "unknown parameter"),
    ({"search_space": "missing.yaml"}, "search space file missing.yaml not found"),
])
def test_bad_workflow_parameters_fail_before_any_step(params, message):
    if message is None:
        assert make_workflow_config(**params).variant_list == ["baseline", "augmented", "densenet"]
        return
    with pytest.raises(ConfigError, match=message):
        make_workflow_config(**params)


def test_each_step_is_tagged_with_the_data_it_used(tracking_uri):
    """A step that computed a dataset digest is tagged with its own; one that used no data (register,
    promote) with the data step's."""
    client = MlflowClient()
    experiment = client.create_experiment("digests")
    trained = client.create_run(experiment, tags={"dataset.digest": "aaaa"}).info.run_id
    registered = client.create_run(experiment).info.run_id
    assert step_data_digest(client, trained, "bbbb") == "aaaa"
    assert step_data_digest(client, registered, "bbbb") == "bbbb"


def test_the_code_digest_covers_the_files_users_edit(tmp_path):
    import histoflow.workflow as workflow

    root = tmp_path / "project"
    for name in ("MLproject", "tuning/search_space.yaml", "registry/gate.yaml"):
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text((REPO / name).read_text())
    before = workflow.code_digest(root)
    assert workflow.code_digest(root) == before
    (root / "tuning/search_space.yaml").write_text("dropout: 0.2\n")
    assert workflow.code_digest(root) != before
