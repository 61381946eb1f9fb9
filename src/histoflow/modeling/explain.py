"""Grad-CAM class activation maps (Selvaraju et al. 2017) and their overlay on the image.

One implementation for the training run's figure and the scoring endpoint's `explain` answer.
"""

from __future__ import annotations

import keras
import numpy as np
import tensorflow as tf


class GradCam:
    """Heatmaps of one network at one convolutional layer, compiled once (a graph, not eager ops per call)."""

    def __init__(self, model: keras.Model, layer_name: str) -> None:
        self._model = keras.Model(model.inputs, [model.get_layer(layer_name).output, model.outputs[0]])
        self._heatmaps = tf.function(self._compute, autograph=False, reduce_retracing=True)

    def _compute(self, images: tf.Tensor, classes: tf.Tensor) -> tf.Tensor:
        with tf.GradientTape() as tape:
            features, predictions = self._model(images, training=False)
            # Images are independent at inference: the gradient of the sum is each image's own gradient.
            score = tf.reduce_sum(tf.gather(predictions, classes, axis=1, batch_dims=1))
        grads = tape.gradient(score, features)
        weights = tf.reduce_mean(grads, axis=(1, 2), keepdims=True)
        cam = tf.nn.relu(tf.reduce_sum(tf.cast(weights * features, tf.float32), axis=-1))
        cam = cam / (tf.reduce_max(cam, axis=(1, 2), keepdims=True) + 1e-8)
        return tf.image.resize(cam[..., None], tf.shape(images)[1:3], method="bilinear")[..., 0]

    def __call__(self, images: np.ndarray | tf.Tensor, classes: np.ndarray) -> np.ndarray:
        """(n, h, w) heatmaps in [0, 1] at the input resolution, each for its image's class index."""
        return self._heatmaps(tf.convert_to_tensor(images, tf.float32),
                              tf.convert_to_tensor(np.asarray(classes, dtype=np.int32))).numpy()


def pick_examples(labels: np.ndarray, per_class: int, seed: int) -> np.ndarray:
    """Indices of up to per_class images of each class, reproducibly chosen."""
    rng = np.random.default_rng(seed)
    chosen = []
    for label in np.unique(labels):
        idx = np.flatnonzero(labels == label)
        chosen.extend(rng.choice(idx, size=min(per_class, len(idx)), replace=False).tolist())
    return np.asarray(sorted(chosen), dtype=int)
