"""A member network on ONNX Runtime: the served model's default runtime, without TensorFlow.

The graph is the network's inference graph exported when the model was logged (histoflow.modeling.onnx_export):
images in, (probabilities, penultimate features) out, any batch size. Dihedral test-time augmentation is done
here on the batch, in the order of histoflow.modeling.inference.dihedral_views (TensorFlow's, for evaluation;
a test holds the two equal), so one graph serves both modes.
"""

from __future__ import annotations

import os

import numpy as np
import onnxruntime as ort

from histoflow.modeling.screening import Screening

THREADS_ENV = "HISTOFLOW_ONNX_THREADS"  # intra-op threads per network (0 or unset: ONNX Runtime's default, a core each)
DIHEDRAL_VIEWS = 8


def dihedral_views(images: np.ndarray) -> np.ndarray:
    """(n, h, w, c) square images -> (8n, h, w, c): the 4 quarter turns (counter-clockwise) of the images, then
    of their mirror images (each turn a transpose of height and width and a flip of the rows)."""
    views = []
    for start in (images, images[:, :, ::-1]):
        base = start
        for _ in range(4):
            views.append(base)
            base = np.transpose(base, (0, 2, 1, 3))[:, ::-1]
    return np.ascontiguousarray(np.concatenate(views), dtype=np.float32)


def session_options() -> ort.SessionOptions:
    options = ort.SessionOptions()
    options.intra_op_num_threads = int(os.environ.get(THREADS_ENV, "0") or 0)
    # Idle pool threads spinning between requests take the cores that decode the next requests' images.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.log_severity_level = 3  # errors only: its warnings about unused initializers are not the user's
    return options


class OnnxNetwork:
    """One member network: probabilities (plain or averaged over the 8 dihedral views) and the plain view's
    features, in one run of its graph; its temperature and screening."""

    def __init__(self, path: str, temperature: float, screening: Screening) -> None:
        self.session = ort.InferenceSession(path, session_options(), providers=["CPUExecutionProvider"])
        self.input = self.session.get_inputs()[0].name
        self.temperature, self.screening = temperature, screening

    def infer(self, tta: str, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        n = len(batch)
        images = dihedral_views(batch) if tta == "dihedral8" else np.ascontiguousarray(batch, dtype=np.float32)
        probabilities, features = self.session.run(["probabilities", "features"], {self.input: images})
        if tta == "dihedral8":  # the first of the 8 views is the image itself: its features come with the batch
            probabilities = probabilities.reshape(DIHEDRAL_VIEWS, n, -1).mean(axis=0)
        return probabilities, features[:n]
