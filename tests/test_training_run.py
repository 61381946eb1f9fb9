"""The training run: a data step's split table handed on; mixed precision; the head warm-up."""

import shutil
from dataclasses import replace
from pathlib import Path

import keras
import mlflow
import numpy as np
import pandas as pd
import pytest

from conftest import BREAKHIS, IDC, idc_patient_dirs
from histoflow import artifacts
from histoflow.data import step
from histoflow.data.pipeline import make_dataset
from histoflow.errors import ConfigError, DataError
from histoflow.modeling import checkpoints, training_run
from histoflow.modeling.fitting import FitResult
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

    # The images' resolution describes them without choosing or splitting them: the table serves it too.
    run_id = training_run.run(make_train_config("baseline", **data, **TINY, split_table=table, experiment="handover",
                                                mpp=4.0))
    run, made = mlflow.get_run(run_id), mlflow.get_run(data_run)
    assert run.data.params["split_table"] == table
    # The field of view: 4 um/px x the median side of the training patches (50x50; a few border patches smaller).
    assert float(run.data.params["field_um"]) == 200.0 and "field_um" not in made.data.params
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

    path = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=artifacts.KERAS_ARTIFACT_DIR)
    model = keras.saving.load_model(next(Path(path).glob("*.keras")), compile=False)
    assert model.get_layer("conv1").dtype_policy.name == "mixed_float16"
    assert model.get_layer("conv1").compute_dtype == "float16"
    assert model.get_layer("probabilities").dtype_policy.name == "float32"
    rows = step.prepare_data(config).rows("test")
    images = next(iter(make_dataset(rows["path"], rows["label"], 32, 16, training=False)))[0]
    probabilities = model(images)
    assert probabilities.dtype == "float32"
    np.testing.assert_allclose(np.asarray(probabilities).sum(axis=1), 1.0, rtol=1e-5)


def test_a_training_run_logs_tensorboard_and_opens_as_model_training(use_store, tmp_path):
    """The tiny baseline (2 epochs): Keras's TensorBoard logs of both epochs as an artifact, and its experiment
    tagged as model training; an experiment whose kind someone else set keeps it."""
    import tensorflow as tf

    from histoflow import tracking

    run_id = use_store[2]["baseline"]
    run = mlflow.get_run(run_id)
    assert mlflow.get_experiment(run.info.experiment_id).tags["mlflow.experimentKind"] == "custom_model_development"
    board = Path(mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=artifacts.TENSORBOARD_ARTIFACT,
                                                     dst_path=str(tmp_path / "board")))
    steps: dict[str, list[int]] = {}
    for events in board.rglob("events.out.tfevents.*"):
        for event in tf.compat.v1.train.summary_iterator(str(events)):
            for value in event.summary.value:
                steps.setdefault(f"{events.parent.name}/{value.tag}", []).append(event.step)
    assert sorted(steps["train/epoch_loss"]) == [0, 1] and sorted(steps["validation/epoch_loss"]) == [0, 1]
    # A kind set by someone else is left alone by what every run does when it logs its environment.
    client = mlflow.MlflowClient()
    experiment = client.create_experiment("fine-tuning", tags={"mlflow.experimentKind": "finetuning"})
    with mlflow.start_run(experiment_id=experiment):
        tracking.log_environment()
    assert mlflow.get_experiment(experiment).tags["mlflow.experimentKind"] == "finetuning"


@pytest.mark.slow
def test_a_warm_up_trains_the_head_alone_then_the_unfrozen_stages_train(tracking_uri, tmp_path):
    config = make_train_config("transfer", data_dir=str(BREAKHIS), max_images=40, **TINY, unfrozen_blocks=1,
                               warmup_epochs=2, warmup_learning_rate=3e-3, learning_rate=1e-4, patience=5,
                               image_cache=str(tmp_path / "cache"))
    prepared = step.prepare_data(config)
    setup = training_run._training_setup(config, prepared)
    model = setup.model

    def kernel(name: str, of: keras.Model = model) -> np.ndarray:
        return of.get_layer(name).kernel.numpy().copy()

    backbone, head, frozen = kernel("conv_pw_13"), kernel("fusion1_dense"), kernel("conv_pw_11")
    folder = tmp_path / "checkpoint"
    with mlflow.start_run() as run:
        warm = training_run.warm_up_head(config, setup, prepared, folder)
    np.testing.assert_array_equal(kernel("conv_pw_13"), backbone)  # the pretrained stage waited
    assert not np.allclose(kernel("fusion1_dense"), head)
    assert warm.epochs_run == 2 and checkpoints.has_checkpoint(folder) and not (folder / checkpoints.HISTORY).exists()
    history = mlflow.MlflowClient().get_metric_history(run.info.run_id, "warmup_val_loss")
    assert sorted(m.step for m in history) == [0, 1]
    # On the frozen backbone's features, extracted once into the cache (the seed copies of each image).
    assert mlflow.get_run(run.info.run_id).data.tags["feature_cache"] == "miss"
    # Compiled again for the fine-tuning: its learning rate, and the unfrozen stage trains now.
    assert float(model.optimizer.learning_rate) == pytest.approx(1e-4) and model.get_layer("conv_pw_13").trainable
    warmed = kernel("fusion1_dense")

    # A resumed run whose warm-up had finished takes its weights and trains no warm-up epoch again.
    fresh = training_run._training_setup(config, prepared)
    with mlflow.start_run():
        again = training_run.warm_up_head(config, fresh, prepared, folder)
    np.testing.assert_array_equal(kernel("fusion1_dense", fresh.model), warmed)
    assert again.resumed_at == 2

    # As a run: both phases' epochs, and the warm-up's summary; its features from the cache.
    run = mlflow.get_run(training_run.run(replace(config, checkpoint_dir=str(tmp_path / "runs"))))
    assert (run.data.params["warmup_epochs"], run.data.params["unfrozen_blocks"]) == ("2", "1")
    assert run.data.metrics["warmup_epochs_run"] == 2 and run.data.metrics["epochs_run"] == 1
    assert run.data.metrics["train_time_s"] > run.data.metrics["warmup_time_s"] > 0
    assert "warmup_train_loss" in run.data.metrics and "train_loss" in run.data.metrics
    assert run.data.tags["feature_cache"] == "hit"
    assert run.data.tags["histoflow.feature_cache.augment"].startswith("random trained as the seed copies")
    # The run's optimizer parameters are the fine-tuning's, not the warm-up's.
    assert float(run.data.params["optimizer_learning_rate"]) == pytest.approx(1e-4)
    # The fine-tuning trained the unfrozen stage (the top one), and only it.
    folder = mlflow.artifacts.download_artifacts(run_id=run.info.run_id, artifact_path=artifacts.KERAS_ARTIFACT_DIR,
                                                 dst_path=str(tmp_path / "logged"))
    trained = keras.saving.load_model(next(Path(folder).glob("*.keras")), compile=False)
    # ... unless no fine-tuning epoch reached the warmed-up head's validation loss: then that head is logged.
    client = mlflow.MlflowClient()
    warm_loss, tuned_loss = (min(m.value for m in client.get_metric_history(run.info.run_id, name))
                             for name in ("warmup_val_loss", "val_loss"))
    kept = run.data.tags["histoflow.finetune.kept"]
    assert kept == ("warmup" if tuned_loss > warm_loss else "finetuned")
    assert np.allclose(kernel("conv_pw_13", trained), backbone) == (kept == "warmup")
    np.testing.assert_array_equal(kernel("conv_pw_11", trained), frozen)
    # The fusion model's Grad-CAM figure (its deepest tap explained).
    assert "evaluation/gradcam.png" in {a.path for a in mlflow.MlflowClient().list_artifacts(run.info.run_id,
                                                                                             "evaluation")}


def test_fine_tuning_that_never_beats_the_warmed_up_head_gives_the_warmed_up_head_back(tracking_uri):
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    warmed = [w.copy() for w in model.get_weights()]
    model.set_weights([w + 1.0 for w in warmed])  # what fine-tuning made of it
    warm = FitResult({"val_loss": [0.6, 0.30, 0.31]}, 1.0, 2, 3)
    for tuned_losses, kept in (([0.35, 0.32], "warmup"), ([0.29, 0.33], "finetuned")):
        with mlflow.start_run() as run:
            training_run._keep_the_better(model, warmed, warm, FitResult({"val_loss": tuned_losses}, 1.0, 1, 2))
        assert mlflow.get_run(run.info.run_id).data.tags["histoflow.finetune.kept"] == kept
        assert all(np.array_equal(a, b) for a, b in zip(model.get_weights(), warmed, strict=True)) == (kept == "warmup")
        model.set_weights([w + 1.0 for w in warmed])


@pytest.mark.slow
def test_a_frozen_backbone_trains_its_head_on_cached_features_as_it_would_on_images(tracking_uri, tmp_path):
    """Dropout 0, so that both routes draw nothing at random but the shuffle, which is the same: the head's
    fit on the cached vectors and the fit of the whole model on the images are one computation."""
    config = make_train_config("transfer", data_dir=str(BREAKHIS), max_images=40,
                               **{**TINY, "epochs": 3, "gradcam_per_class": 0}, unfrozen_blocks=0, augment="seed",
                               dropout=0.0, learning_rate=3e-3, bootstrap=0,
                               image_cache=str(tmp_path / "cache"))
    runs = {route: mlflow.get_run(training_run.run(replace(config, feature_cache=route))) for route in ("auto", "off")}
    cached, images = runs["auto"], runs["off"]
    assert cached.data.tags["feature_cache"] == "miss" and "feature_cache" not in images.data.tags
    assert cached.data.params["feature_cache"] == "auto" and images.data.params["feature_cache"] == "off"
    client = mlflow.MlflowClient()
    curves = {route: [m.value for m in sorted(client.get_metric_history(run.info.run_id, "val_loss"),
                                              key=lambda m: m.step)] for route, run in runs.items()}
    assert len(curves["auto"]) == 3 and curves["auto"][0] != curves["auto"][-1]  # it trained
    np.testing.assert_allclose(curves["auto"], curves["off"], rtol=2e-4)
    # Evaluated through the head on the cached features, as the whole model on the images: the same metrics,
    # calibration and screening (the screening's features are the network's penultimate ones).
    for metric in ("test_roc_auc", "test_loss", "validation_loss", "temperature", "decision_threshold",
                   "ood_threshold", "validation_flagged_share", "test_flagged_share"):
        assert cached.data.metrics[metric] == pytest.approx(images.data.metrics[metric], rel=1e-3, abs=1e-4), metric
    predictions = {route: mlflow.load_table(artifacts.PREDICTIONS_ARTIFACT.format(split="test"),
                                            run_ids=[run.info.run_id]) for route, run in runs.items()}
    assert list(predictions["auto"]["relpath"]) == list(predictions["off"]["relpath"])
    np.testing.assert_allclose(predictions["auto"]["probability_malignant"],
                               predictions["off"]["probability_malignant"], atol=1e-4)

    # Another split of the same images: their features come from the same store entry.
    other = mlflow.get_run(training_run.run(replace(config, val_fraction=0.3, epochs=1)))
    assert other.data.tags["feature_cache"] == "hit"
    assert other.data.tags["feature_cache.path"] == cached.data.tags["feature_cache.path"]
    # Augmentation drawn every epoch is not what the cache holds: images, unless asked for.
    assert training_run.on_features(replace(config, augment="hed"), "fit") is False
    assert training_run.on_features(replace(config, augment="hed", feature_cache="on"), "fit") is True
    assert training_run.on_features(replace(config, unfrozen_blocks=1), "fit") is False


def test_an_unreadable_split_table_says_why_and_keeps_mlflows_error(tracking_uri):
    from histoflow.data.settings import DataConfig

    with pytest.raises(DataError, match="cannot read runs:/0123456789abcdef/data/split.csv") as err:
        step.read_split_table("runs:/0123456789abcdef/data/split.csv", DataConfig())
    assert isinstance(err.value.__cause__, mlflow.exceptions.MlflowException)  # the store's own answer
