"""The served model: a pyfunc that takes image files (base64) and returns label, confidence, probabilities.

It is logged with MLflow's models-from-code (`model_code.py`; pickling TensorFlow objects fails) and
carries the trained `.keras` file, the class names and image size, and this package (`code_paths`), so
the preprocessing is exactly the training one (`histoflow.data.images`). Inference runs through one
`tf.function` traced once at load time with a fixed input signature (a compiled graph, not
`model.predict` per request, which costs about 3x: MLflow issue #5259), all images of a request in
one batch.
"""

from __future__ import annotations

import importlib.metadata
from pathlib import Path

import numpy as np
import pandas as pd
from mlflow.models import ModelSignature
from mlflow.pyfunc import PythonModel
from mlflow.types.schema import ColSpec, Map, Schema

from histoflow.data.images import MAX_PIXELS, resize_and_scale
from histoflow.modeling.calibration import Calibration
from histoflow.serving.requests import (
    INPUT_COLUMN,
    MAX_IMAGES_PER_REQUEST,
    MAX_REQUEST_CHARS,
    check_size,
    decode_item,
    encode_file,
    in_scoring_server,
    request_items,
)

CLASSIFIER_ARTIFACT = "classifier"
MODEL_CODE = Path(__file__).with_name("model_code.py")

SIGNATURE = ModelSignature(
    inputs=Schema([ColSpec("string", INPUT_COLUMN)]),
    outputs=Schema([ColSpec("string", "label"), ColSpec("double", "confidence"),
                    ColSpec(Map("double"), "probabilities"), ColSpec("double", "threshold")]),
)


class ImageClassifier(PythonModel):
    """Image files in, one row per image out: label, confidence, probabilities (class -> p), threshold.

    The probabilities are calibrated (the temperature fitted on the run's validation split) and the label
    is the positive class when its probability reaches the threshold chosen there; the response names the
    threshold applied. Models logged before calibration existed have neither: T = 1, threshold 0.5.
    """

    def load_context(self, context) -> None:
        import keras
        import tensorflow as tf

        config = context.model_config or {}
        self.class_names: list[str] = list(config["class_names"])
        self.image_size = int(config["image_size"])
        self.calibration = Calibration(**config.get("calibration", {}))
        model = keras.saving.load_model(context.artifacts["keras_model"], compile=False)
        size = self.image_size
        batch_spec = tf.TensorSpec([None, size, size, 3], tf.float32)
        self._infer = tf.function(lambda x: model(x, training=False), input_signature=[batch_spec], autograph=False)
        # The training preprocessing, compiled once for any image size (graph calls beat eager ops here).
        self._prepare = tf.function(lambda image: resize_and_scale(image, size), autograph=False,
                                    input_signature=[tf.TensorSpec([None, None, 3], tf.uint8)])
        # Trace both now, so the first request does not pay for it (cold start = load + one tiny image).
        self.probabilities([np.zeros((8, 8, 3), np.uint8)])

    def probabilities(self, images: list[np.ndarray]) -> np.ndarray:
        import tensorflow as tf

        batch = tf.stack([self._prepare(image) for image in images])
        return self._infer(batch).numpy()

    def predict(self, context, model_input, params=None) -> pd.DataFrame:
        items = request_items(model_input, MAX_IMAGES_PER_REQUEST if in_scoring_server() else None)
        chunks = []
        for start in range(0, len(items), MAX_IMAGES_PER_REQUEST):
            part = items[start:start + MAX_IMAGES_PER_REQUEST]
            check_size(part, start)
            chunks.append(self.probabilities([decode_item(start + i, item) for i, item in enumerate(part)]))
        probabilities = self.calibration.apply(np.concatenate(chunks))
        decided = self.calibration.decide(probabilities)
        return pd.DataFrame({
            "label": [self.class_names[k] for k in decided],
            "confidence": probabilities[np.arange(len(decided)), decided].astype(float),
            "probabilities": [dict(zip(self.class_names, map(float, row))) for row in probabilities],
            "threshold": np.full(len(decided), self.calibration.threshold, dtype=float),
        })


def pip_requirements() -> list[str]:
    """The serving environment: what the model code imports, pinned to the versions it was trained with."""
    packages = {"mlflow": "mlflow", "keras": "keras", "pillow": "pillow", "pandas": "pandas", "numpy": "numpy"}
    pins = [f"{name}=={importlib.metadata.version(dist)}" for name, dist in packages.items()]
    for dist in ("tensorflow-cpu", "tensorflow"):
        try:
            pins.append(f"{dist}=={importlib.metadata.version(dist)}")
            break
        except importlib.metadata.PackageNotFoundError:
            continue
    return pins


def log_classifier(keras_path: str | Path, class_names: list[str], image_size: int, example_image: str | Path,
                   calibration: Calibration = Calibration(), metadata: dict | None = None,
                   name: str = CLASSIFIER_ARTIFACT):
    """Log the serving pyfunc into the active run; returns MLflow's ModelInfo."""
    import mlflow

    import histoflow

    example = pd.DataFrame({INPUT_COLUMN: [encode_file(example_image)]})
    return mlflow.pyfunc.log_model(
        name=name,
        python_model=str(MODEL_CODE),
        artifacts={"keras_model": str(keras_path)},
        model_config={"class_names": list(class_names), "image_size": int(image_size),
                      "calibration": calibration.to_dict()},
        code_paths=[str(Path(histoflow.__file__).parent)],
        signature=SIGNATURE,
        input_example=example,
        pip_requirements=pip_requirements(),
        metadata={"class_names": list(class_names), "image_size": int(image_size), **calibration.to_dict(),
                  "input": f"base64 image files (PNG, JPEG, TIFF, BMP), column {INPUT_COLUMN!r}, at most "
                           f"{MAX_IMAGES_PER_REQUEST} and {MAX_REQUEST_CHARS:,} base64 characters per request, "
                           f"{MAX_PIXELS:,} pixels per image",
                  **(metadata or {})},
    )
