"""A Grad-CAM heatmap drawn in colour over its image: the training run's figures, the served `explain` answer and
the page's colour key share it (numpy and matplotlib only: the page imports it without TensorFlow)."""

from __future__ import annotations

import matplotlib
import numpy as np

OVERLAY_ALPHA = 0.45
OVERLAY_COLORMAP = "jet"


def overlay(image: np.ndarray, heatmap: np.ndarray) -> np.ndarray:
    """The heatmap in colour over the image (float in [0, 1], (h, w, 3)) -> RGB uint8."""
    colours = matplotlib.colormaps[OVERLAY_COLORMAP](np.clip(heatmap, 0.0, 1.0))[..., :3]
    blended = (1.0 - OVERLAY_ALPHA) * np.asarray(image, dtype=np.float64) + OVERLAY_ALPHA * colours
    return np.clip(np.rint(blended * 255.0), 0, 255).astype(np.uint8)
