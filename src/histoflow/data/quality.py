"""Image quality measures the served model checks before its answer is trusted: tissue and focus.

Tissue fraction: the share of pixels that are stained, i.e. coloured (HSV saturation above
TISSUE_SATURATION) and not black. Glass and background are white or grey (no saturation), an empty or
transparent upload is uniform, a scanner's black border is dark: none of them is tissue. Pathology tools
threshold saturation for the same reason (Otsu on saturation in slideflow and histolab).

Focus: the variance of the Laplacian of the grey image (the classic autofocus measure, Pech-Pacheco et
al. 2000) divided by the grey image's variance, so that pale and contrasted stains compare; measured at
the model's input size or the image's own size when smaller (an upsampled image is soft for reasons
that are not the slide's). A blurred image has lost its high frequencies: the ratio falls by 10-100x.

Colour: the share of pixels in each of COLOUR_BINS^3 RGB cells, square-rooted (so that a distance between
two histograms is the Hellinger distance). H&E images fill a few pink, purple and white cells; a
photograph, a fluorescence image or another stain fills others.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
from PIL import Image
from scipy import ndimage

from histoflow.data.images import read_image
from histoflow.progress import progress

TISSUE_SATURATION = 0.07
BLACK_LEVEL = 0.3  # max RGB in [0, 1] below which a pixel is dark (border, dust, no light), not stain
GREY_WEIGHTS = np.array([0.299, 0.587, 0.114], dtype=np.float32)  # ITU-R 601 luma, as Pillow's "L"
COLOUR_BINS = 4
TISSUE, FOCUS, COLOUR = 0, 1, slice(2, None)  # the columns of measure()'s rows


def _stained_table() -> np.ndarray:
    """[brightest, darkest] channel of a pixel (0..255) -> stained: HSV saturation over TISSUE_SATURATION and
    brightest over BLACK_LEVEL, computed in float once for every pair."""
    brightest = np.arange(256, dtype=np.float32)[:, None] / 255.0
    darkest = np.arange(256, dtype=np.float32)[None, :] / 255.0
    saturation = (brightest - darkest) / np.maximum(brightest, 1e-6)
    return (saturation > TISSUE_SATURATION) & (brightest > BLACK_LEVEL)


STAINED = _stained_table()
STAINED_FLAT = STAINED.ravel()  # index: brightest * 256 + darkest


def tissue_fraction(image: np.ndarray) -> float:
    """Share of stained pixels of an RGB uint8 image, in [0, 1]."""
    # A lookup of the channels' extremes in the flat table (one index: 2.5x faster than indexing it by the pair,
    # 25x faster than the float arithmetic per pixel), the same answer.
    image = np.asarray(image, dtype=np.uint8)
    red, green, blue = image[..., 0], image[..., 1], image[..., 2]
    brightest = np.maximum(np.maximum(red, green), blue)
    darkest = np.minimum(np.minimum(red, green), blue)
    stained = STAINED_FLAT.take((brightest.astype(np.uint16) << 8) | darkest)
    return float(np.count_nonzero(stained)) / max(stained.size, 1)


def focus(image: np.ndarray, size: int) -> float:
    """Laplacian variance / grey variance of an RGB uint8 image, at most `size` pixels wide and high."""
    height, width = image.shape[:2]
    if height > size or width > size:
        image = np.asarray(Image.fromarray(image).resize((min(width, size), min(height, size)), Image.BILINEAR))
    grey = np.asarray(image, dtype=np.float32) / 255.0 @ GREY_WEIGHTS
    if min(grey.shape) < 3:
        return 0.0  # a strip of pixels has no focus to measure
    return float(ndimage.laplace(grey).var() / (grey.var() + 1e-4))


def colour_histogram(image: np.ndarray) -> np.ndarray:
    """sqrt of the share of pixels in each RGB cell: COLOUR_BINS^3 values whose squares sum to 1."""
    cells = (np.asarray(image, dtype=np.uint16) * COLOUR_BINS) >> 8  # 0..COLOUR_BINS-1 per channel
    index = (cells[..., 0] * COLOUR_BINS + cells[..., 1]) * COLOUR_BINS + cells[..., 2]
    counts = np.bincount(index.ravel(), minlength=COLOUR_BINS ** 3)
    return np.sqrt(counts / counts.sum())


def measure(images: Iterable[np.ndarray], size: int) -> np.ndarray:
    """(n, 2 + COLOUR_BINS^3): tissue fraction, focus, then the colour histogram of each image (an iterable:
    a generator of images is measured one at a time, never all in memory)."""
    rows = [np.concatenate([[tissue_fraction(image), focus(image, size)], colour_histogram(image)])
            for image in images]
    return np.array(rows, dtype=np.float64).reshape(-1, 2 + COLOUR_BINS ** 3)


def measure_files(paths: list[str], size: int) -> np.ndarray:
    """measure() of image files, read one at a time."""
    return measure((read_image(path) for path in progress(paths, desc="measuring image quality", unit="image")),
                   size)
