"""The training run: a data step's split table handed on; mixed precision."""

import shutil
from pathlib import Path

import keras
import mlflow
import numpy as np
import pandas as pd
import pytest

from conftest import BREAKHIS, IDC, idc_patient_dirs
from histoflow.data import step
from histoflow.data.pipeline import make_dataset
from histoflow.errors import ConfigError, DataError
from histoflow.modeling import training_run
from histoflow.modeling.variants import make_train_config

TINY = {"epochs": 1, "image_size": 32, "batch_size": 16, "gradcam_per_class": 1}


@pytest.mark.slow
def test_a_training_run_reads_the_data_steps_split_table(tracking_uri, tmp_path):
    folder = tmp_path / "idc"
    for patient in idc_patient_dirs(12):
        shutil.copytree(patient, folder / patient.name)
    data = {"data_dir": str(folder), "max_images": 150, "seed": 3}
    data_run = step.run(step.DataStepConfig(**data, experiment="handover"))
    table = f"runs:/{data_run}/{step.SPLIT_TABLE}"
    # Images added after the data step: a run that discovered again would see (and hash) them.
    shutil.copytree(IDC / idc_patient_dirs(13)[-1].name, folder / "new-patient")

    run_id = training_run.run(make_train_config("baseline", **data, **TINY, split_table=table, experiment="handover"))
    run, made = mlflow.get_run(run_id), mlflow.get_run(data_run)
    assert run.data.params["split_table"] == table
    assert run.data.tags["dataset.digest"] == made.data.tags["dataset.digest"]
    mine, theirs = (pd.read_csv(mlflow.artifacts.download_artifacts(run_id=r, artifact_path=step.SPLIT_TABLE))
                    for r in (run_id, data_run))
    pd.testing.assert_frame_equal(mine, theirs)
    report = mlflow.artifacts.load_dict(f"runs:/{run_id}/{step.DATA_REPORT}")
    assert report["split_table"] == table and report["settings"]["seed"] == 3

    with pytest.raises(ConfigError, match=r"was made with seed=3 \(here 4\)"):
        training_run.run(make_train_config("baseline", **{**data, "seed": 4}, **TINY, split_table=table))
    shutil.rmtree(folder / theirs["relpath"].iloc[0].split("/")[0])
    with pytest.raises(DataError, match="images of the split table .* are missing"):
        training_run.run(make_train_config("baseline", **data, **TINY, split_table=table))
    with pytest.raises(DataError, match="cannot read"):
        training_run.run(make_train_config("baseline", **data, **TINY,
                                           split_table="runs:/0123456789abcdef/data/split.csv"))


@pytest.mark.slow
def test_mixed_precision_trains_float16_layers_with_a_float32_softmax(tracking_uri):
    config = make_train_config("baseline", data_dir=str(BREAKHIS), max_images=40, **TINY, mixed_precision="true")
    run_id = training_run.run(config)

    run = mlflow.get_run(run_id)
    assert run.info.status == "FINISHED" and run.data.params["mixed_precision"] == "True"
    assert np.isfinite(run.data.metrics["test_loss"])
    assert keras.config.dtype_policy().name == "float32"  # the global policy is restored after building

    path = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=training_run.KERAS_ARTIFACT_DIR)
    model = keras.saving.load_model(next(Path(path).glob("*.keras")), compile=False)
    assert model.get_layer("conv1").dtype_policy.name == "mixed_float16"
    assert model.get_layer("conv1").compute_dtype == "float16"
    assert model.get_layer("probabilities").dtype_policy.name == "float32"
    rows = step.prepare_data(config).rows("test")
    images = next(iter(make_dataset(rows["path"], rows["label"], 32, 16, training=False)))[0]
    probabilities = model(images)
    assert probabilities.dtype == "float32"
    np.testing.assert_allclose(np.asarray(probabilities).sum(axis=1), 1.0, rtol=1e-5)


@pytest.mark.slow
def test_a_training_run_logs_tensorboard_and_opens_as_model_training(tracking_uri, tmp_path):
    import tensorflow as tf

    config = make_train_config("baseline", data_dir=str(BREAKHIS), max_images=40, **{**TINY, "epochs": 2},
                               experiment="board", checkpoint_dir=str(tmp_path / "checkpoints"))
    run_id = training_run.run(config)
    run = mlflow.get_run(run_id)
    assert mlflow.get_experiment(run.info.experiment_id).tags["mlflow.experimentKind"] == "custom_model_development"
    board = Path(mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=training_run.TENSORBOARD_ARTIFACT,
                                                     dst_path=str(tmp_path / "board")))
    steps: dict[str, list[int]] = {}
    for events in board.rglob("events.out.tfevents.*"):
        for event in tf.compat.v1.train.summary_iterator(str(events)):
            for value in event.summary.value:
                steps.setdefault(f"{events.parent.name}/{value.tag}", []).append(event.step)
    assert sorted(steps["train/epoch_loss"]) == [0, 1] and sorted(steps["validation/epoch_loss"]) == [0, 1]
    # A kind set by someone else is left alone.
    client = mlflow.MlflowClient()
    client.set_experiment_tag(run.info.experiment_id, "mlflow.experimentKind", "finetuning")
    training_run.run(config)
    assert mlflow.get_experiment(run.info.experiment_id).tags["mlflow.experimentKind"] == "finetuning"
