"""The served model: a pyfunc that takes image files (base64) and returns label, confidence, probabilities.

It is logged with MLflow's models-from-code (`serving_model.py`; pickling TensorFlow objects fails) and
carries the trained `.keras` file, the class names and image size, and this package (`code_paths`), so
the preprocessing is exactly the training one (`histoflow.preprocessing`). Inference runs through one
`tf.function` traced once at load time with a fixed input signature (a compiled graph, not
`model.predict` per request, which costs about 3x: MLflow issue #5259), all images of a request in
one batch.
"""

from __future__ import annotations

import base64
import binascii
import importlib.metadata
import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from mlflow.exceptions import MlflowException
from mlflow.models import ModelSignature
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE
from mlflow.pyfunc import PythonModel
from mlflow.types.schema import ColSpec, Map, Schema

from histoflow.errors import ImageDecodeError
from histoflow.preprocessing import MAX_PIXELS, decode_image, resize_and_scale

INPUT_COLUMN = "image"
MAX_IMAGES_PER_REQUEST = 64
# Largest accepted request body before base64 decoding (64 MiB): a full-size BreakHis PNG is ~0.5 MB.
MAX_BASE64_CHARS = 64 * 2**20
CLASSIFIER_ARTIFACT = "classifier"
MODEL_CODE = Path(__file__).with_name("serving_model.py")

SIGNATURE = ModelSignature(
    inputs=Schema([ColSpec("string", INPUT_COLUMN)]),
    outputs=Schema([ColSpec("string", "label"), ColSpec("double", "confidence"),
                    ColSpec(Map("double"), "probabilities")]),
)


class RequestError(MlflowException):
    """A bad scoring request: HTTP 400 with this message.

    MLflow's scoring server rewrites `message` of exceptions raised in `predict` to prepend the whole
    request payload (megabytes of base64 here); this keeps the message to what was wrong.
    """

    def __init__(self, message: str) -> None:
        self._text = message
        super().__init__(message, error_code=INVALID_PARAMETER_VALUE)

    @property
    def message(self) -> str:  # type: ignore[override]
        return self._text

    @message.setter
    def message(self, value: str) -> None:
        pass


def _as_strings(model_input: Any) -> list:
    if isinstance(model_input, pd.DataFrame):
        if INPUT_COLUMN not in model_input.columns:
            raise RequestError(f"expected a column {INPUT_COLUMN!r} of base64-encoded image files; got "
                               f"columns {list(model_input.columns)}")
        return model_input[INPUT_COLUMN].tolist()
    if isinstance(model_input, dict):
        if INPUT_COLUMN not in model_input:
            raise RequestError(f"expected the key {INPUT_COLUMN!r}; got {sorted(model_input)}")
        value = model_input[INPUT_COLUMN]
        return [value] if isinstance(value, (str, bytes)) else list(value)
    if isinstance(model_input, (str, bytes)):
        return [model_input]
    if isinstance(model_input, (list, tuple, np.ndarray, pd.Series)):
        return list(np.asarray(model_input, dtype=object).ravel())
    raise RequestError(f"expected base64-encoded image files; got {type(model_input).__name__}")


def request_items(model_input: Any, max_images: int | None = MAX_IMAGES_PER_REQUEST) -> list:
    """The base64 strings of a request, checked for count (no limit when max_images is None)."""
    items = _as_strings(model_input)
    if not items:
        raise RequestError("the request holds no images (empty list)")
    if max_images is not None and len(items) > max_images:
        raise RequestError(f"{len(items)} images in one request; the limit is {max_images}: split the request")
    return items


def decode_item(i: int, item: Any) -> np.ndarray:
    """One base64 image file -> RGB uint8 array; RequestError names the item."""
    if isinstance(item, bytes):
        data = item  # already decoded (binary columns, in-process calls)
    elif isinstance(item, str):
        if len(item) > MAX_BASE64_CHARS:
            raise RequestError(f"image {i}: {len(item):,} base64 characters, above the limit of "
                               f"{MAX_BASE64_CHARS:,}")
        try:
            data = base64.b64decode(item, validate=True)
        except (binascii.Error, ValueError):
            raise RequestError(f"image {i}: not valid base64 (encode the image file's bytes with "
                               "standard base64)") from None
    else:
        raise RequestError(f"image {i}: expected a base64 string, got {type(item).__name__}")
    try:
        return decode_image(data, MAX_PIXELS)
    except ImageDecodeError as exc:
        raise RequestError(f"image {i}: {exc}") from None


def decode_request(model_input: Any, max_images: int | None = MAX_IMAGES_PER_REQUEST) -> list[np.ndarray]:
    """Base64 image files of one request -> RGB uint8 arrays; RequestError names the first bad one."""
    return [decode_item(i, item) for i, item in enumerate(request_items(model_input, max_images))]


def in_scoring_server() -> bool:
    # Set by MLflow's scoring server: the per-request limit protects a server, not an in-process caller
    # (mlflow.models.evaluate, batch scoring), which is processed in chunks of the same size instead.
    return os.environ.get("_MLFLOW_IS_IN_SERVING_ENVIRONMENT", "").lower() == "true"


def encode_file(path: str | Path) -> str:
    """Base64 of an image file, as the scoring endpoint expects it."""
    return base64.b64encode(Path(path).read_bytes()).decode("ascii")


class ImageClassifier(PythonModel):
    """Image files in, one row per image out: label, confidence, probabilities (class -> p)."""

    def load_context(self, context) -> None:
        import keras
        import tensorflow as tf

        config = context.model_config or {}
        self.class_names: list[str] = list(config["class_names"])
        self.image_size = int(config["image_size"])
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
            chunks.append(self.probabilities([decode_item(start + i, item) for i, item in enumerate(part)]))
        probabilities = np.concatenate(chunks)
        best = probabilities.argmax(axis=1)
        return pd.DataFrame({
            "label": [self.class_names[k] for k in best],
            "confidence": probabilities.max(axis=1).astype(float),
            "probabilities": [dict(zip(self.class_names, map(float, row))) for row in probabilities],
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
                   metadata: dict | None = None, name: str = CLASSIFIER_ARTIFACT):
    """Log the serving pyfunc into the active run; returns MLflow's ModelInfo."""
    import mlflow

    import histoflow

    example = pd.DataFrame({INPUT_COLUMN: [encode_file(example_image)]})
    return mlflow.pyfunc.log_model(
        name=name,
        python_model=str(MODEL_CODE),
        artifacts={"keras_model": str(keras_path)},
        model_config={"class_names": list(class_names), "image_size": int(image_size)},
        code_paths=[str(Path(histoflow.__file__).parent)],
        signature=SIGNATURE,
        input_example=example,
        pip_requirements=pip_requirements(),
        metadata={"class_names": list(class_names), "image_size": int(image_size),
                  "input": f"base64 image files (PNG, JPEG, TIFF, BMP), column {INPUT_COLUMN!r}, at most "
                           f"{MAX_IMAGES_PER_REQUEST} per request and {MAX_PIXELS:,} pixels per image",
                  **(metadata or {})},
    )


def to_json_records(frame: pd.DataFrame) -> list[dict]:
    return json.loads(frame.to_json(orient="records"))
