"""Predictions of a trained model, optionally averaged over test-time augmentation.

`dihedral8`: histology has no canonical orientation, so the 4 rotations of an image and of its mirror
image are equally valid views; the model's probabilities for the 8 views are averaged. The views go
through the model as one batch (8 x the images), the same function evaluation and the served model use.
"""

from __future__ import annotations

import keras
import numpy as np
import tensorflow as tf

from histoflow.modeling.variants import TTA_MODES

DIHEDRAL_VIEWS = 8


def dihedral_views(images: tf.Tensor) -> tf.Tensor:
    """(n, h, w, c) square images -> (8n, h, w, c): the 4 rotations of the images, then of their mirrors."""
    mirrored = tf.image.flip_left_right(images)
    return tf.concat([tf.image.rot90(base, k=k) for base in (images, mirrored) for k in range(4)], axis=0)


def average_views(probabilities: tf.Tensor | np.ndarray, views: int = DIHEDRAL_VIEWS) -> tf.Tensor:
    """(views * n, classes) in the order of dihedral_views -> (n, classes), the mean over each image's views."""
    probabilities = tf.convert_to_tensor(probabilities)
    return tf.reduce_mean(tf.reshape(probabilities, (views, -1, probabilities.shape[-1])), axis=0)


def predict(model: keras.Model, dataset: tf.data.Dataset, tta: str = "none") -> np.ndarray:
    """Class probabilities of every image of a (batched, unshuffled) dataset, in its order."""
    if tta not in TTA_MODES:
        raise ValueError(f"tta must be one of {', '.join(TTA_MODES)}; got {tta!r}")
    if tta == "none":
        return model.predict(dataset, verbose=0)
    # predict_on_batch: Keras's compiled predict step (a second trace at most, for the last, smaller batch).
    return np.concatenate([average_views(model.predict_on_batch(dihedral_views(images))).numpy()
                           for images, _ in dataset])
