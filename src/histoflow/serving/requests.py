"""Scoring requests and answers: base64 image files in, decoded RGB arrays out, a 4xx message for anything
else; the decision read from an answer.

Limits protect the scoring server: at most MAX_IMAGES_PER_REQUEST images, MAX_REQUEST_CHARS of
base64 in all (raw bytes count as their base64 length) and MAX_PIXELS pixels per image.
"""

from __future__ import annotations

import base64
import binascii
import os
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE, TEMPORARILY_UNAVAILABLE

from histoflow.data.images import MAX_PIXELS, decode_image
from histoflow.errors import ImageDecodeError

INPUT_COLUMN = "image"
MAX_IMAGES_PER_REQUEST = 64
# Images of one request together, as base64 (64 MiB, ~48 MiB of files): a full-size BreakHis PNG is
# ~0.5 MB, so a full request of them fits; MLflow's container accepts 100 MB bodies.
MAX_REQUEST_CHARS = 64 * 2**20


class RequestError(MlflowException):
    """A bad scoring request: HTTP 400 with this message.

    MLflow's scoring server rewrites `message` of exceptions raised in `predict` to prepend the whole
    request payload (megabytes of base64 here); this keeps the message to what was wrong.
    """

    def __init__(self, message: str, error_code: int = INVALID_PARAMETER_VALUE) -> None:
        self._text = message
        super().__init__(message, error_code=error_code)

    @property
    def message(self) -> str:  # type: ignore[override]
        return self._text

    @message.setter
    def message(self, value: str) -> None:
        pass


def overloaded(exc: TimeoutError) -> RequestError:
    """HTTP 503 for a request that waited too long for its forward pass: the client may retry."""
    return RequestError(str(exc), TEMPORARILY_UNAVAILABLE)


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


def _base64_length(item: Any) -> int:
    # Raw bytes (binary columns, in-process calls) count as the base64 that would carry them.
    return 4 * -(-len(item) // 3) if isinstance(item, (bytes, bytearray)) else len(item) if isinstance(item, str) else 0


def check_size(items: list, first: int = 0, limit: int = MAX_REQUEST_CHARS) -> None:
    """RequestError when the images together exceed the request limit (before decoding any)."""
    total = sum(_base64_length(item) for item in items)
    if total > limit:
        largest = max(range(len(items)), key=lambda i: _base64_length(items[i]))
        raise RequestError(f"the images of this request are {total:,} base64 characters together (image "
                           f"{first + largest} alone {_base64_length(items[largest]):,}), above the limit of "
                           f"{limit:,} per request: split the request or send smaller files")


def request_items(model_input: Any, max_images: int | None = MAX_IMAGES_PER_REQUEST) -> list:
    """The base64 strings of a request, checked for count (no limit when max_images is None)."""
    items = _as_strings(model_input)
    if not items:
        raise RequestError("the request holds no images (empty list)")
    if max_images is not None and len(items) > max_images:
        raise RequestError(f"{len(items)} images in one request; the limit is {max_images}: split the request")
    return items


def _is_null(item: Any) -> bool:
    # MLflow's scoring server turns a JSON null of a string input into the string "None" (numpy's str of it):
    # as base64 those 4 characters are 3 bytes that no image format starts with, so nothing is lost.
    return item is None or item == "None" or (isinstance(item, float) and np.isnan(item)) or item is pd.NA


def decode_item(i: int, item: Any) -> np.ndarray:
    """One base64 image file -> RGB uint8 array; RequestError names the item."""
    if _is_null(item):
        raise RequestError(f"image {i}: the entry is null, not a base64 image file")
    if isinstance(item, (bytes, bytearray)):
        data = bytes(item)  # already decoded (binary columns, in-process calls)
    elif isinstance(item, str):
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
    items = request_items(model_input, max_images)
    check_size(items)
    return [decode_item(i, item) for i, item in enumerate(items)]


def in_scoring_server() -> bool:
    # Set by MLflow's scoring server: the per-request limit protects a server, not an in-process caller
    # (mlflow.models.evaluate, batch scoring), which is processed in chunks of the same size instead.
    return os.environ.get("_MLFLOW_IS_IN_SERVING_ENVIRONMENT", "").lower() == "true"


def encode_file(path: str | Path) -> str:
    """Base64 of an image file, as the scoring endpoint expects it."""
    return base64.b64encode(Path(path).read_bytes()).decode("ascii")


def model_decision(predictions: pd.DataFrame) -> pd.Series:
    """The model's label per image: model_label, or label for models logged before screening existed."""
    return predictions["model_label" if "model_label" in predictions else "label"]
