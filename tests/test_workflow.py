"""`mlflow run . -e main` end to end on 60 BreaKHis images at 32 px: every step runs as a nested MLflow
Projects run, the model is registered and promoted, the comparison ends the run; run again with the
same parameters, every step is reused."""

from __future__ import annotations

import json

import mlflow
import pytest
from mlflow.tracking import MlflowClient

from conftest import BREAKHIS, REPO
from histoflow.errors import ConfigError
from histoflow.workflow import make_workflow_config

STEPS = ["data", "baseline", "transfer", "tune", "register", "promote"]


def _main(tmp_path) -> tuple[str, list[dict]]:
    parameters = {"data_dir": str(BREAKHIS), "max_images": 60, "image_size": 32, "batch_size": 16, "epochs": 1,
                  "variants": "baseline,transfer", "tune_variant": "transfer", "n_trials": 2, "trial_epochs": 2,
                  "storage": f"sqlite:///{tmp_path / 'optuna.db'}", "model_name": "wf",
                  "output_dir": str(tmp_path / "comparison")}
    submitted = mlflow.projects.run(str(REPO), entry_point="main", parameters=parameters, env_manager="local",
                                    experiment_name="workflow", synchronous=True)
    path = mlflow.artifacts.download_artifacts(run_id=submitted.run_id, artifact_path="workflow/steps.json")
    with open(path) as f:
        return submitted.run_id, json.load(f)["steps"]


@pytest.mark.slow
def test_main_runs_every_step_once_then_reuses_them(tracking_uri, keras_home, tmp_path):
    client = MlflowClient()
    main_id, steps = _main(tmp_path)
    assert [s["name"] for s in steps] == STEPS and not any(s["reused"] for s in steps)
    for step in steps:
        run = client.get_run(step["run_id"])
        assert run.info.status == "FINISHED", step
        assert run.data.tags["mlflow.parentRunId"] == main_id  # nested under main in the UI
        assert run.data.tags["mlflow.project.entryPoint"] == step["name"]
    data = client.get_run(steps[0]["run_id"])
    assert data.data.tags["dataset.name"] == "breakhis" and data.data.metrics["images"] == 60
    assert "data/data_report.json" in [a.path for a in client.list_artifacts(data.info.run_id, "data")]
    champion = client.get_model_version_by_alias("wf", "champion")
    assert client.get_model_version_by_alias("wf", "challenger").version == champion.version
    table = (tmp_path / "comparison" / "comparison.md").read_text()
    assert "baseline_cnn" in table and "mobilenet_fusion" in table and "transfer-tuned" in table
    assert "workflow/comparison.md" in [a.path for a in client.list_artifacts(main_id, "workflow")]

    again_id, again = _main(tmp_path)
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
])
def test_bad_workflow_parameters_fail_before_any_step(params, message):
    if message is None:
        assert make_workflow_config(**params).variant_list == ["baseline", "augmented", "densenet"]
        return
    with pytest.raises(ConfigError, match=message):
        make_workflow_config(**params)


def test_mlproject_main_and_data_defaults_match_the_code():
    import yaml

    from histoflow.config import make_config
    from histoflow.data_report import DATA_PARAMS
    from histoflow.workflow import WorkflowConfig

    project = yaml.safe_load((REPO / "MLproject").read_text())["entry_points"]
    main = project["main"]
    assert set(main["parameters"]) == {f for f in WorkflowConfig.__dataclass_fields__}
    for name, spec in main["parameters"].items():
        assert make_workflow_config(**{name: str(spec["default"])}) == WorkflowConfig(), name
        assert f"{{{name}}}" in main["command"], name
    data = project["data"]
    assert set(data["parameters"]) == set(DATA_PARAMS)
    for name, spec in data["parameters"].items():
        assert make_config("baseline", **{name: str(spec["default"])}) == make_config("baseline"), name
        assert f"{{{name}}}" in data["command"], name
