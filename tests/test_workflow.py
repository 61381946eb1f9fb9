"""The `main` workflow's parameters, reuse keys and data tags (main end to end, from a clean clone:
tests/test_project.py)."""

from __future__ import annotations

import pytest
from mlflow.tracking import MlflowClient

from conftest import REPO
from histoflow import workflow
from histoflow.errors import ConfigError
from histoflow.workflow import make_workflow_config, step_data_digest


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

    root = tmp_path / "project"
    for name in ("MLproject", "tuning/search_space.yaml", "registry/gate.yaml"):
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text((REPO / name).read_text())
    before = workflow.code_digest(root)
    assert workflow.code_digest(root) == before
    (root / "tuning/search_space.yaml").write_text("dropout: 0.2\n")
    assert workflow.code_digest(root) != before
