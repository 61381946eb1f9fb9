"""Stain handling: H&E colour normalisation to a reference fitted on training images, and HED jitter.

Normalisation (Macenko et al. 2009, Reinhard et al. 2001) uses torchstain's numpy backend on the decoded
uint8 image, inside the one preprocessing of training, evaluation and serving (a ``tf.numpy_function`` in
the input pipeline, a plain call in the served model). The reference is fitted on a seeded sample of the
run's training images only and travels with the run (a JSON artifact) and the served model (its config).

A tile without enough stained tissue (blank, white, one flat colour) has no stain vectors to estimate:
it passes through unchanged, with a warning, and is counted (the run's ``stain_fallback_images``, the
response's ``flags``) instead of becoming NaN.

HED jitter (Tellez et al. 2018, "HED-light") is a training augmentation in TensorFlow: each image's
haematoxylin, eosin and DAB concentrations (Ruifrok & Johnston's colour deconvolution) are scaled and
shifted by small random amounts.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from histoflow.data.settings import STAIN_METHODS
from histoflow.errors import ConfigError

log = logging.getLogger(__name__)

REFERENCE_IMAGES = 64  # training images sampled (seeded) for the reference
REFERENCE_PIXELS_PER_IMAGE = 20_000  # so that a few large tiles do not dominate the reference
# Macenko's transparency threshold: a pixel is tissue when its optical density is >= BETA in every channel.
BETA = 0.15
LIGHT = 240  # Macenko's transmitted-light intensity Io
MIN_TISSUE_FRACTION = 0.01
MIN_TISSUE_PIXELS = 16
WARNINGS_SHOWN = 10  # per normaliser; the rest are counted only
FALLBACK_FLAG = "stain_fallback"

# Ruifrok & Johnston (2001) stain vectors (rows: haematoxylin, eosin, DAB) in optical density, as in
# scikit-image's rgb_from_hed; each row has unit length.
RGB_FROM_HED = np.array([[0.65, 0.70, 0.29], [0.07, 0.99, 0.11], [0.27, 0.57, 0.78]])
RGB_FROM_HED = RGB_FROM_HED / np.linalg.norm(RGB_FROM_HED, axis=1, keepdims=True)
HED_FROM_RGB = np.linalg.inv(RGB_FROM_HED)
HED_SIGMA = 0.05  # HED-light: alpha in [1 - s, 1 + s], beta in [-s, s] (optical density units)
# A fitted torchstain normaliser's state: its class, reference key -> attribute, and the attributes' dtype.
_STATE = {
    "macenko": ("NumpyMacenkoNormalizer", {"stain_matrix": "HERef", "max_concentrations": "maxCRef"}, np.float64),
    "reinhard": ("NumpyReinhardNormalizer", {"lab_means": "target_means", "lab_stds": "target_stds"}, np.float32),
}


def check_method(method: str) -> None:
    if method not in STAIN_METHODS:
        raise ConfigError(f"stain_norm must be one of {', '.join(STAIN_METHODS)}; got {method!r}")


def _optical_density(pixels: np.ndarray) -> np.ndarray:
    return -np.log((pixels.reshape(-1, 3).astype(np.float64) + 1.0) / LIGHT)


def tissue_problem(image: np.ndarray) -> str:
    """Why stain vectors cannot be estimated on this image ("" when they can)."""
    od = _optical_density(image)
    tissue = od[(od >= BETA).all(axis=1)]
    if len(tissue) < max(MIN_TISSUE_PIXELS, MIN_TISSUE_FRACTION * len(od)):
        return f"{len(tissue)} of {len(od)} pixels are stained tissue (blank or background tile)"
    spread = np.linalg.eigvalsh(np.cov(tissue.T))
    if spread[-2] < 1e-8:  # one colour only: the two stains cannot be told apart
        return "the tissue pixels have a single colour"
    return ""


@dataclass
class StainNormalizer:
    """A fitted reference (``reference``: method and its statistics) applied to uint8 RGB images."""

    reference: dict[str, Any]
    fallbacks: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def __post_init__(self) -> None:
        check_method(self.method)
        self._impl = _restore(self.reference)

    @property
    def method(self) -> str:
        return self.reference.get("method", "none")

    def normalize(self, image: np.ndarray, name: str = "") -> tuple[np.ndarray, bool]:
        """The image in the reference's stain colours, and whether it fell back to the unchanged image."""
        if self._impl is None:
            return image, False
        problem = tissue_problem(image)
        if not problem:
            try:
                with np.errstate(all="ignore"):
                    out = self._transform(image)
                if out.shape == image.shape and np.isfinite(out).all():
                    return out, False
                problem = "the normalised image is not finite"
            except (np.linalg.LinAlgError, ValueError, IndexError) as exc:
                problem = f"{type(exc).__name__}: {exc}"
        with self._lock:
            self.fallbacks += 1
            shown = self.fallbacks <= WARNINGS_SHOWN
        if shown:
            log.warning("%s stain normalisation skipped for %s: %s; the image is used unchanged%s", self.method,
                        name or "an image", problem, " (further cases are counted only)"
                        if self.fallbacks == WARNINGS_SHOWN else "")
        return image, True

    def _transform(self, image: np.ndarray) -> np.ndarray:
        if self.method == "macenko":
            normalized, _, _ = self._impl.normalize(image, Io=LIGHT, beta=BETA, stains=False)
            return normalized
        return self._impl.normalize(image)


def _torchstain(method: str):
    """A fresh torchstain (numpy backend) normaliser of this method."""
    from torchstain.numpy import normalizers

    return getattr(normalizers, _STATE[method][0])()


def _restore(reference: dict[str, Any]):
    method = reference.get("method", "none")
    if method == "none":
        return None
    impl = _torchstain(method)
    _, attributes, dtype = _STATE[method]
    for key, attribute in attributes.items():
        setattr(impl, attribute, np.asarray(reference[key], dtype=dtype))
    return impl


NO_STAIN_NORMALIZATION: dict[str, Any] = {"method": "none"}


def fit_reference(method: str, paths: list[str], seed: int) -> dict[str, Any]:
    """The reference of `method` fitted on a seeded sample of these (training) images: pixels of the
    images with enough stained tissue, at most REFERENCE_PIXELS_PER_IMAGE of each."""
    check_method(method)
    if method == "none":
        return dict(NO_STAIN_NORMALIZATION)
    from histoflow.data.images import read_image

    rng = np.random.default_rng(seed)
    order = rng.permutation(len(paths))
    chosen, pixels = [], []
    for i in order:
        if len(chosen) == REFERENCE_IMAGES:
            break
        image = read_image(str(paths[i]))
        if tissue_problem(image):
            continue
        flat = image.reshape(-1, 3)
        take = rng.choice(len(flat), min(len(flat), REFERENCE_PIXELS_PER_IMAGE), replace=False)
        pixels.append(flat[np.sort(take)])
        chosen.append(str(paths[i]))
    if not chosen:
        raise ConfigError(f"none of {len(paths)} training images has enough stained tissue to fit a "
                          f"{method} stain reference (blank or background tiles?)")
    mosaic = np.concatenate(pixels)[None]  # one 1 x N image: both methods use pixel statistics only
    impl = _torchstain(method)
    impl.fit(mosaic, **({"Io": LIGHT, "beta": BETA} if method == "macenko" else {}))
    reference = {key: np.asarray(getattr(impl, attribute), dtype=float).tolist()
                 for key, attribute in _STATE[method][1].items()}
    if not all(np.isfinite(v).all() for v in map(np.asarray, reference.values())):
        raise ConfigError(f"the {method} stain reference fitted on {len(chosen)} training images is not finite")
    return {"method": method, **reference, "images": len(chosen), "seed": seed}
