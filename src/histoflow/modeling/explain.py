"""Grad-CAM class activation maps (Selvaraju et al. 2017) for a few test images."""

from __future__ import annotations

import keras
import numpy as np
import tensorflow as tf


def gradcam(model: keras.Model, images: np.ndarray, layer_name: str, class_index: int) -> np.ndarray:
    """Heatmaps in [0, 1] of shape (n, h, w) at the input resolution, for the given class."""
    grad_model = keras.Model(model.inputs, [model.get_layer(layer_name).output, model.outputs[0]])
    inputs = tf.convert_to_tensor(images, dtype=tf.float32)
    with tf.GradientTape() as tape:
        features, predictions = grad_model(inputs, training=False)
        score = predictions[:, class_index]
    grads = tape.gradient(score, features)
    weights = tf.reduce_mean(grads, axis=(1, 2), keepdims=True)
    cam = tf.nn.relu(tf.reduce_sum(weights * features, axis=-1))
    cam = cam / (tf.reduce_max(cam, axis=(1, 2), keepdims=True) + 1e-8)
    cam = tf.image.resize(cam[..., None], images.shape[1:3], method="bilinear")[..., 0]
    return cam.numpy()


def pick_examples(labels: np.ndarray, per_class: int, seed: int) -> np.ndarray:
    """Indices of up to per_class images of each class, reproducibly chosen."""
    rng = np.random.default_rng(seed)
    chosen = []
    for label in np.unique(labels):
        idx = np.flatnonzero(labels == label)
        chosen.extend(rng.choice(idx, size=min(per_class, len(idx)), replace=False).tolist())
    return np.asarray(sorted(chosen), dtype=int)
