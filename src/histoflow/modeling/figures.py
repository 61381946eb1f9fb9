"""Figures logged with every run: confusion matrix, ROC curve, training curves, Grad-CAM overlays."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from sklearn.calibration import CalibrationDisplay  # noqa: E402
from sklearn.metrics import ConfusionMatrixDisplay, RocCurveDisplay  # noqa: E402

from histoflow.modeling.overlay import overlay  # noqa: E402


def confusion_figure(matrix: np.ndarray, class_names: list[str], title: str) -> plt.Figure:
    fig, ax = plt.subplots(figsize=(4.5, 4))
    ConfusionMatrixDisplay(matrix, display_labels=class_names).plot(ax=ax, cmap="Blues", colorbar=False)
    ax.set_title(title)
    fig.tight_layout()
    return fig


def roc_figure(y_true: np.ndarray, positive_probability: np.ndarray, title: str) -> plt.Figure:
    fig, ax = plt.subplots(figsize=(4.5, 4))
    RocCurveDisplay.from_predictions(y_true, positive_probability, ax=ax, name="test")
    ax.plot([0, 1], [0, 1], "k--", lw=0.8)
    ax.set_title(title)
    fig.tight_layout()
    return fig


def reliability_figure(y_true: np.ndarray, curves: dict[str, np.ndarray], title: str, bins: int = 10) -> plt.Figure:
    """Reliability diagram: the share of malignant images against the predicted probability, one curve each."""
    fig, ax = plt.subplots(figsize=(4.5, 4))
    for name, positive_probability in curves.items():
        CalibrationDisplay.from_predictions(y_true, positive_probability, n_bins=bins, strategy="uniform", ax=ax,
                                            name=name)
    ax.set_title(title)
    fig.tight_layout()
    return fig


def history_figure(history: dict[str, list[float]], title: str) -> plt.Figure:
    names = [m for m in ("loss", "accuracy", "auc") if m in history]
    fig, axes = plt.subplots(1, len(names), figsize=(4 * len(names), 3.2))
    for ax, name in zip(np.atleast_1d(axes), names, strict=True):
        epochs = np.arange(1, len(history[name]) + 1)
        ax.plot(epochs, history[name], label="train")
        if f"val_{name}" in history:
            ax.plot(epochs, history[f"val_{name}"], label="validation")
        ax.set_xlabel("epoch")
        ax.set_title(name)
        ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def gradcam_figure(images: np.ndarray, heatmaps: np.ndarray, captions: list[str]) -> plt.Figure:
    n = len(images)
    fig, axes = plt.subplots(2, n, figsize=(2.2 * n, 4.6), squeeze=False)
    for i in range(n):
        axes[0, i].imshow(images[i])
        axes[0, i].set_title(captions[i], fontsize=7)
        axes[1, i].imshow(overlay(images[i], heatmaps[i]))
        for ax in axes[:, i]:
            ax.axis("off")
    fig.suptitle("Grad-CAM (bottom: predicted-class activation)")
    fig.tight_layout()
    return fig
