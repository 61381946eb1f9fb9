"""tf.data input pipeline: decode -> RGB -> stain normalisation -> resize (uint8), from disk or a disk
cache -> augment (train only) -> scale -> batch -> prefetch.

Nothing grows with the dataset: what is shuffled is image indices, not images, and a split read every
epoch comes from the uint8 disk cache of histoflow.data.image_cache rather than from memory.
"""

from __future__ import annotations

import os

import numpy as np
import tensorflow as tf

from histoflow.data.image_cache import CHUNK, CachedImages, ensure_cached
from histoflow.data.images import PIXEL_MAX, read_image, resize
from histoflow.data.settings import AUGMENTATIONS
from histoflow.data.stain import HED_FROM_RGB, HED_SIGMA, RGB_FROM_HED, StainNormalizer
from histoflow.errors import ConfigError

# seed: the reports' fixed tripling; random: dihedral + mild colour; hed: dihedral + HED-light stain jitter.
SEED_TRIPLING = 3  # the reports' scheme: original, rot90+flip, rot180+flip


def _reader(stain: StainNormalizer | None, image_size: int):
    """path -> the uint8 image at image_size: decoded, stain-normalised, resized (numpy: the served model's
    own steps, histoflow.data.images)."""
    if stain is None or stain.method == "none":
        return lambda p: resize(read_image(p.decode()), image_size)
    return lambda p: resize(stain.normalize(read_image(p.decode()), p.decode())[0], image_size)


def _load(path: tf.Tensor, image_size: int, stain: StainNormalizer | None = None) -> tf.Tensor:
    image = tf.numpy_function(_reader(stain, image_size), [path], tf.uint8, stateful=False)
    image.set_shape([image_size, image_size, 3])
    return image


def _decoded(paths: np.ndarray, image_size: int, stain: StainNormalizer | None) -> tf.data.Dataset:
    """uint8 images at image_size, decoded from their files in order (in parallel)."""
    return tf.data.Dataset.from_tensor_slices(paths).map(
        lambda p: _load(p, image_size, stain), num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)


def cache_images(paths: list[str] | np.ndarray, image_size: int, cache_dir: str | os.PathLike,
                 stain: StainNormalizer | None = None) -> CachedImages:
    """The images decoded once into the disk cache (a hit when they are there already)."""
    paths = np.asarray(paths, dtype=str)
    reference = stain.reference if stain is not None else {"method": "none"}
    cached = ensure_cached(
        paths.tolist(), image_size, cache_dir,
        lambda ps: _decoded(np.asarray(ps, dtype=str), image_size, stain).batch(CHUNK).as_numpy_iterator(),
        reference, lambda: stain.fallbacks if stain is not None else 0)
    if cached.hit and stain is not None:  # the run still reports how many images its reference could not fit
        stain.fallbacks += cached.fallbacks
    return cached


def _read_by_index(cached: CachedImages | None, paths: np.ndarray, image_size: int,
                   stain: StainNormalizer | None):
    """index -> uint8 image: from the cache (a batch of indices per read) or by decoding the file."""
    if cached is None:
        return lambda ds: ds.map(lambda i, view, y: (_load(tf.gather(paths, i), image_size, stain), view, y),
                                 num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)

    def read(indices: tf.Tensor) -> tf.Tensor:
        images = tf.numpy_function(cached.read, [indices], tf.uint8, stateful=False)
        images.set_shape([None, image_size, image_size, 3])
        return images

    return lambda ds: ds.batch(CHUNK).map(lambda i, view, y: (read(i), view, y),
                                          num_parallel_calls=tf.data.AUTOTUNE, deterministic=True).unbatch()


def hed_jitter(image, seed=None, sigma: float = HED_SIGMA):
    """HED-light colour augmentation of one float32 RGB image in [0, 1] (TensorFlow, graph-safe)."""
    alpha = tf.random.uniform([3], 1.0 - sigma, 1.0 + sigma, seed=seed)
    beta = tf.random.uniform([3], -sigma, sigma, seed=seed)
    return hed_affine(image, alpha, beta)


def hed_affine(image, alpha, beta):
    """Each stain's concentration c -> alpha * c + beta (per stain), back to RGB in [0, 1]."""
    rgb_from_hed = tf.constant(RGB_FROM_HED, tf.float32)
    hed_from_rgb = tf.constant(HED_FROM_RGB, tf.float32)
    od = -tf.math.log(tf.maximum(image, 1e-6))
    concentrations = tf.tensordot(od, hed_from_rgb, axes=1)
    jittered = concentrations * tf.cast(alpha, tf.float32) + tf.cast(beta, tf.float32)
    return tf.clip_by_value(tf.exp(-tf.tensordot(jittered, rgb_from_hed, axes=1)), 0.0, 1.0)


def seed_view(image: tf.Tensor, view: tf.Tensor | int) -> tf.Tensor:
    """The reports' copy `view` of an image (or of a batch): 0 the original, 1 rot90+flip, 2 rot180+flip."""
    return tf.cond(view == 0, lambda: image, lambda: tf.image.flip_left_right(tf.image.rot90(image, k=view)))


def _dihedral(image: tf.Tensor) -> tf.Tensor:
    # Histology has no canonical orientation: the 8 dihedral transforms are label-preserving.
    image = tf.image.random_flip_left_right(image)
    return tf.image.rot90(image, k=tf.random.uniform([], 0, 4, dtype=tf.int32))


def _random_augment(image: tf.Tensor) -> tf.Tensor:
    image = _dihedral(image)
    # Mild stain/scanner variation only; strong hue shifts would change the H&E appearance.
    image = tf.image.random_brightness(image, 0.05)
    image = tf.image.random_contrast(image, 0.9, 1.1)
    image = tf.image.random_saturation(image, 0.9, 1.1)
    image = tf.image.random_hue(image, 0.02)
    return tf.clip_by_value(image, 0.0, 1.0)


def _hed_augment(image: tf.Tensor) -> tf.Tensor:
    return hed_jitter(_dihedral(image))


def make_dataset(
    paths: list[str] | np.ndarray,
    labels: list[int] | np.ndarray,
    image_size: int,
    batch_size: int,
    *,
    training: bool = False,
    augment: str = "none",
    seed: int = 42,
    num_classes: int = 2,
    stain: StainNormalizer | None = None,
    cache_dir: str | os.PathLike | None = None,
) -> tf.data.Dataset:
    """Batches of (float32 images in [0, 1], one-hot labels); order is kept unless training. `stain`
    normalises each decoded image to a fitted reference (training, evaluation and serving alike).

    With `cache_dir` (a split read every epoch) the images are decoded once into the disk cache there;
    without it they are decoded from their files on every pass (a split read once).
    """
    if augment not in AUGMENTATIONS:
        raise ConfigError(f"augment must be one of {', '.join(AUGMENTATIONS)}; got {augment!r}")
    paths = np.asarray(paths, dtype=str)
    cached = None if cache_dir is None else cache_images(paths, image_size, cache_dir, stain)
    views = SEED_TRIPLING if training and augment == "seed" else 1
    n = len(paths) * views
    # Element k is view k % views of image k // views: the seed scheme's copies are shuffled apart.
    onehot = tf.one_hot(np.repeat(np.asarray(labels, dtype=np.int32), views), num_classes)
    ds = tf.data.Dataset.from_tensor_slices((np.arange(n, dtype=np.int64) // views,
                                             np.arange(n, dtype=np.int32) % views, onehot))
    if training:
        ds = ds.shuffle(n, seed=seed, reshuffle_each_iteration=True)
    ds = _read_by_index(cached, paths, image_size, stain)(ds)
    ds = ds.apply(tf.data.experimental.assert_cardinality(n))  # unbatch hides the size; Keras counts steps
    augmenter = {"random": _random_augment, "hed": _hed_augment}.get(augment) if training else None

    def prepare(image, view, y):
        image = tf.cast(seed_view(image, view) if views > 1 else image, tf.float32) / PIXEL_MAX
        return (augmenter(image) if augmenter else image), y

    ds = ds.map(prepare, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    return ds.batch(batch_size).prefetch(tf.data.AUTOTUNE)


def augmented_size(n_images: int, augment: str) -> int:
    return n_images * (SEED_TRIPLING if augment == "seed" else 1)
