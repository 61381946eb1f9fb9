"""Training options that change how the model computes: mixed precision."""

from pathlib import Path

import keras
import mlflow
import numpy as np

from conftest import BREAKHIS
from histoflow import train
from histoflow.config import make_config
from histoflow.pipeline import make_dataset


def test_mixed_precision_trains_float16_layers_with_a_float32_softmax(tracking_uri):
    config = make_config("baseline", data_dir=str(BREAKHIS), max_images=40, epochs=1, image_size=32,
                         batch_size=16, gradcam_per_class=1, mixed_precision="true")
    run_id = train.run(config)

    run = mlflow.get_run(run_id)
    assert run.info.status == "FINISHED" and run.data.params["mixed_precision"] == "True"
    assert np.isfinite(run.data.metrics["test_loss"])
    assert keras.config.dtype_policy().name == "float32"  # the global policy is restored after building

    path = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=train.KERAS_ARTIFACT_DIR)
    model = keras.saving.load_model(next(Path(path).glob("*.keras")), compile=False)
    assert model.get_layer("conv1").dtype_policy.name == "mixed_float16"
    assert model.get_layer("conv1").compute_dtype == "float16"
    assert model.get_layer("probabilities").dtype_policy.name == "float32"
    _, frame = train.prepare_data(config)
    rows = frame[frame["split"] == "test"]
    images = next(iter(make_dataset(rows["path"], rows["label"], 32, 16, training=False)))[0]
    probabilities = model(images)
    assert probabilities.dtype == "float32"
    np.testing.assert_allclose(np.asarray(probabilities).sum(axis=1), 1.0, rtol=1e-5)
