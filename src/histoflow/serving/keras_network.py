"""A member network on TensorFlow: the served model's runtime for networks that have no ONNX graph (logged with
runtime=tensorflow, logged before the ONNX graphs existed, or not convertible), and Grad-CAM (`explain`) for
every model: gradients need TensorFlow. Loaded by name (histoflow.serving.classifier.NETWORK_CLASSES) on first use, so
a served model that never needs it never imports TensorFlow.
"""

from __future__ import annotations

import numpy as np

from histoflow.modeling.screening import Screening


class KerasNetwork:
    """One member network, compiled: probabilities (plain or over the 8 dihedral views) with the penultimate
    features of the plain view in the same forward pass; its temperature and screening; Grad-CAM on demand."""

    def __init__(self, path: str, temperature: float, screening: Screening) -> None:
        import keras
        import tensorflow as tf

        from histoflow.modeling.inference import average_views, dihedral_views, feature_model

        self.model = keras.saving.load_model(path, compile=False)
        both = feature_model(self.model)
        batch_spec = tf.TensorSpec([None, *self.model.input_shape[1:]], tf.float32)

        def plain(x):
            return both(x, training=False)

        def views(x):
            # The first of the 8 views is the image itself: its features come with the same batch.
            probabilities, features = both(dihedral_views(x), training=False)
            return average_views(probabilities), features[:tf.shape(x)[0]]

        self._infer = {mode: tf.function(f, input_signature=[batch_spec], autograph=False)
                       for mode, f in (("none", plain), ("dihedral8", views))}
        self.temperature, self.screening = temperature, screening
        self._gradcam = None

    def infer(self, tta: str, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        probabilities, features = self._infer[tta](batch)
        return probabilities.numpy(), features.numpy()

    def gradcam(self, batch: np.ndarray, classes: np.ndarray) -> np.ndarray:
        if self._gradcam is None:  # built on the first explain request: plain requests never pay for it
            from histoflow.modeling.architectures import gradcam_layer
            from histoflow.modeling.explain import GradCam

            self._gradcam = GradCam(self.model, gradcam_layer(self.model))
        return self._gradcam(batch, classes)


def overlays(groups: list[tuple[np.ndarray, list[KerasNetwork]]], classes: np.ndarray) -> list[np.ndarray]:
    """Each image's Grad-CAM of its class, averaged over every group's networks (each on its group's batch:
    its stain reference), in colour over the image as the first group's networks saw it (RGB uint8)."""
    from histoflow.modeling.overlay import overlay

    heatmaps = np.mean([network.gradcam(batch, classes) for batch, networks in groups for network in networks], axis=0)
    return [overlay(image, heatmap) for image, heatmap in zip(groups[0][0], heatmaps, strict=True)]
