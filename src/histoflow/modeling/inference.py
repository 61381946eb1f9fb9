"""Predictions of a trained model, optionally averaged over test-time augmentation.

`dihedral8`: histology has no canonical orientation, so the 4 rotations of an image and of its mirror
image are equally valid views; the model's probabilities for the 8 views are averaged. The views go
through the model as one batch (8 x the images), the same function evaluation and the served model use.
"""

from __future__ import annotations

import weakref

import keras
import numpy as np
import tensorflow as tf

from histoflow.modeling.variants import TTA_MODES

DIHEDRAL_VIEWS = 8
FEATURE_LAYER = "probabilities"  # the softmax layer of every histoflow network: its input is the feature


def dihedral_views(images: tf.Tensor) -> tf.Tensor:
    """(n, h, w, c) square images -> (8n, h, w, c): the 4 rotations of the images, then of their mirrors.

    Each quarter turn (counter-clockwise, as tf.image.rot90's) is a transpose of the height and width axes
    and a flip of the rows: rot90 switches on its k at run time, a graph of conditionals and assertions that
    took ~0.5 s to trace for each served model and ran slower than these reversals."""
    views = []
    for start in (images, tf.reverse(images, axis=[2])):
        base = start
        for _ in range(4):
            views.append(base)
            base = tf.reverse(tf.transpose(base, [0, 2, 1, 3]), axis=[1])
    return tf.concat(views, axis=0)


def average_views(probabilities: tf.Tensor | np.ndarray, views: int = DIHEDRAL_VIEWS) -> tf.Tensor:
    """(views * n, classes) in the order of dihedral_views -> (n, classes), the mean over each image's views."""
    probabilities = tf.convert_to_tensor(probabilities)
    return tf.reduce_mean(tf.reshape(probabilities, (views, -1, probabilities.shape[-1])), axis=0)


_EXTRACTORS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def feature_model(model: keras.Model) -> keras.Model:
    """The network with a second output: (probabilities, penultimate features). One per network, so that its
    traced inference graph (inference.forward) serves the validation of every epoch and the evaluation."""
    if model not in _EXTRACTORS:
        names = {layer.name for layer in model.layers}
        head = model.get_layer(FEATURE_LAYER) if FEATURE_LAYER in names else model.layers[-1]
        _EXTRACTORS[model] = keras.Model(model.inputs, [model.outputs[0], head.input])
    return _EXTRACTORS[model]


_FORWARD: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def forward(model: keras.Model):
    """The model's inference pass as one graph for any batch size, traced once per model. Keras's predict
    traces its step for the first batch's exact shape and again for the next shape it meets (a split's last,
    smaller batch): seconds per trace for a DenseNet121."""
    if model not in _FORWARD:
        spec = tf.TensorSpec((None, *model.input_shape[1:]), tf.float32)
        network = weakref.ref(model)  # held weakly: the cache must not keep a model and its weights alive
        _FORWARD[model] = tf.function(lambda images: network()(images, training=False), input_signature=[spec],
                                      autograph=False)
    return _FORWARD[model]


def _concatenate(batches: list) -> np.ndarray | list[np.ndarray]:
    if batches and isinstance(batches[0], (list, tuple)):  # a model with several outputs: each concatenated
        return [np.concatenate([np.asarray(b[k]) for b in batches]) for k in range(len(batches[0]))]
    return np.concatenate([np.asarray(b) for b in batches])


def predict(model: keras.Model, dataset: tf.data.Dataset, tta: str = "none") -> np.ndarray | list[np.ndarray]:
    """The outputs (class probabilities) for every image of a (batched, unshuffled) dataset, in its order;
    each output of a model with several."""
    if tta not in TTA_MODES:
        raise ValueError(f"tta must be one of {', '.join(TTA_MODES)}; got {tta!r}")
    step = forward(model)
    if tta == "none":
        return _concatenate([step(images) for images, _ in dataset])
    return np.concatenate([average_views(step(dihedral_views(images))).numpy() for images, _ in dataset])
