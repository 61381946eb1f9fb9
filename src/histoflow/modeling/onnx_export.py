"""A trained network as an ONNX graph for the served model: the same two outputs as its inference graph
(probabilities, penultimate features), any batch size, checked against Keras before it is used.

The served model runs these graphs with ONNX Runtime, which imports in a fraction of a second and installs in
tens of megabytes where TensorFlow takes seconds and ~1.3 GB. A network that does not convert, or converts
with outputs further from Keras' than the tolerance, is not exported (the caller keeps TensorFlow for it).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf

from histoflow.modeling.inference import feature_model

OPSET = 17  # ONNX Runtime 1.17+ runs it; tf2onnx 1.17's tested default
# Largest difference from Keras accepted: probabilities absolute; features relative to their largest magnitude
# (they feed the out-of-distribution distance, not the decision). Measured: 1e-7 .. 4e-7 on every variant.
TOLERANCE = 1e-5
CHECK_IMAGES = 4  # random images the graph is checked on (a batch, so batch-dependent errors show)
INPUT_NAME, OUTPUT_NAMES = "image", ("probabilities", "features")


@dataclass(frozen=True)
class Export:
    """What became of one network: the graph's path, or why there is none; the largest difference measured."""

    path: Path | None
    max_difference: float
    reason: str = ""


def export_onnx(keras_path: str | Path, onnx_path: str | Path, seed: int = 0) -> Export:
    """Convert the .keras file's network (with its features output) to `onnx_path` and check it on
    CHECK_IMAGES random images; a failure of either is returned, not raised."""
    import onnxruntime as ort
    import tf2onnx

    logging.getLogger("tf2onnx").setLevel(logging.WARNING)  # a line per rewrite pass otherwise
    model = keras.saving.load_model(keras_path, compile=False)
    both = feature_model(model)
    spec = (tf.TensorSpec((None, *model.input_shape[1:]), tf.float32, name=INPUT_NAME),)
    try:
        # from_keras, not from_function: it freezes the constants a layer captures (a Normalization layer's mean
        # and variance), which from_function leaves as inputs of the graph.
        proto, _ = tf2onnx.convert.from_keras(both, input_signature=spec, opset=OPSET)
        _name_outputs(proto.graph)
        graph = proto.SerializeToString()
        session = ort.InferenceSession(graph, providers=["CPUExecutionProvider"])
    except Exception as exc:  # noqa: BLE001 - tf2onnx raises whatever its op handlers raise: not convertible
        return Export(None, float("nan"), f"{type(exc).__name__}: {str(exc)[:300]}")
    images = np.random.default_rng(seed).random((CHECK_IMAGES, *model.input_shape[1:]), dtype=np.float32)
    expected = [np.asarray(x) for x in both(images, training=False)]
    got = session.run(list(OUTPUT_NAMES), {INPUT_NAME: images})
    difference = max(float(np.max(np.abs(got[0] - expected[0]))),
                     float(np.max(np.abs(got[1] - expected[1])) / max(1.0, float(np.max(np.abs(expected[1]))))))
    if not difference <= TOLERANCE:  # NaN too
        return Export(None, difference, f"outputs differ from Keras' by {difference:.2e} (tolerance {TOLERANCE:g})")
    Path(onnx_path).write_bytes(graph)
    return Export(Path(onnx_path), difference)


def _name_outputs(graph) -> None:
    """The graph's outputs named OUTPUT_NAMES (tf2onnx names them after the layers that make them)."""
    renamed = {output.name: name for output, name in zip(graph.output, OUTPUT_NAMES, strict=True)}
    for node in graph.node:
        node.input[:] = [renamed.get(name, name) for name in node.input]
        node.output[:] = [renamed.get(name, name) for name in node.output]
    for output in graph.output:
        output.name = renamed[output.name]
