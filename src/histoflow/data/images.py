"""The one image preprocessing used by training, evaluation and serving.

Decoding and resizing go through Pillow (PNG, JPEG, TIFF, BMP, any size or mode), in both the tf.data pipeline
and the served model, so there is no training/serving skew; nothing here imports TensorFlow (the served model
runs without it).
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image, UnidentifiedImageError

from histoflow.errors import ImageDecodeError

IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp"})
# Whole-slide tiles above this are refused before decoding (decompression-bomb guard); BreakHis
# originals are 0.32 MP, a 4k x 4k tile is 16 MP.
MAX_PIXELS = 40_000_000


def decode_image(data: bytes, max_pixels: int = MAX_PIXELS) -> np.ndarray:
    """Decode image bytes to an RGB uint8 array of shape (height, width, 3)."""
    if not data:
        raise ImageDecodeError("empty file (0 bytes)")
    try:
        with Image.open(io.BytesIO(data)) as im:
            width, height = im.size
            if width * height > max_pixels:
                raise ImageDecodeError(
                    f"image is {width}x{height} = {width * height:,} pixels, above the limit of "
                    f"{max_pixels:,} pixels"
                )
            im.load()
            rgb = _eight_bit(im).convert("RGB")
    except ImageDecodeError:
        raise
    except UnidentifiedImageError:
        raise ImageDecodeError("not an image (Pillow cannot identify the format)") from None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise ImageDecodeError(f"corrupt or truncated image: {exc}") from None
    array = np.asarray(rgb, dtype=np.uint8)
    if array.ndim != 3 or array.shape[0] == 0 or array.shape[1] == 0:
        raise ImageDecodeError(f"image has no pixels (shape {array.shape})")
    return array


# Bit depths microscopy cameras write into 16-bit files: the smallest that holds a file's maximum is its scale.
SIGNIFICANT_BITS = (8, 10, 12, 14, 16)


def _eight_bit(im: Image.Image) -> Image.Image:
    """One-channel 16-bit, 32-bit and float images (microscopy exports) on the 8-bit scale: Pillow's
    convert("RGB") clips their values at 255, which turns a 16-bit tile white. Integers are read on the scale of
    the smallest of 8, 10, 12, 14 or 16 bits that holds the image's maximum (a 12-bit camera's file: 4,095 ->
    255), floats on [0, 1]; values beyond either, on the image's own maximum. 16-bit RGB files need nothing:
    Pillow keeps their high bytes."""
    if not (im.mode.startswith("I") or im.mode == "F"):
        return im
    values = np.nan_to_num(np.asarray(im, dtype=np.float64), nan=0.0, posinf=0.0, neginf=0.0)
    peak = float(values.max()) if values.size else 0.0
    scales = [1.0] if im.mode == "F" else [2.0**bits - 1 for bits in SIGNIFICANT_BITS]
    full = next((s for s in scales if peak <= s), peak)
    return Image.fromarray(np.clip(np.round(values * (255.0 / full)), 0, 255).astype(np.uint8), mode="L")


def read_image(path: str) -> np.ndarray:
    with open(path, "rb") as fh:
        return decode_image(fh.read())


def resize(image: np.ndarray, image_size: int) -> np.ndarray:
    """Resize an RGB uint8 image to image_size x image_size, as uint8.

    Bilinear with antialiasing (the triangle filter widened by the reduction factor: every source pixel counts),
    computed per channel in floating point (Pillow's "F" mode; its 8-bit mode rounds between the two passes) and
    rounded once. This is what tf.image.resize(method="bilinear", antialias=True) computes, which this replaced
    (within one grey level on 0.02 % of values). The aspect ratio is not kept: BreakHis' own 224x224 copies are
    squeezed the same way, and histology has no canonical orientation. The result is uint8 so that an image
    cached on disk after this step is bit for bit what a served image goes through.
    """
    if image.shape[:2] == (image_size, image_size):
        return np.ascontiguousarray(image, dtype=np.uint8)
    channels = [np.asarray(Image.fromarray(np.ascontiguousarray(image[..., k], dtype=np.float32), mode="F")
                           .resize((image_size, image_size), Image.Resampling.BILINEAR))
                for k in range(image.shape[-1])]
    return np.clip(np.rint(np.stack(channels, axis=-1)), 0, 255).astype(np.uint8)


PIXEL_MAX = 255.0  # uint8 -> [0, 1]: the models' input scale (the tf.data pipeline divides by the same)


def scale(image: np.ndarray) -> np.ndarray:
    """uint8 RGB -> float32 in [0, 1], the models' input."""
    return np.asarray(image, dtype=np.float32) / np.float32(PIXEL_MAX)


def resize_and_scale(image: np.ndarray, image_size: int) -> np.ndarray:
    """Resize an RGB uint8 image to image_size x image_size and scale to [0, 1] float32."""
    return scale(resize(image, image_size))


def preprocess_bytes(data: bytes, image_size: int) -> np.ndarray:
    """Bytes of one image file -> float32 array (image_size, image_size, 3) in [0, 1]."""
    return resize_and_scale(decode_image(data), image_size)
