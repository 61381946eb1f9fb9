"""tf.data input pipeline: decode -> RGB -> stain normalisation -> resize -> scale, cache, augment (train
only), batch, prefetch."""

from __future__ import annotations

import numpy as np
import tensorflow as tf

from histoflow.errors import ConfigError
from histoflow.data.images import read_image, resize_and_scale
from histoflow.data.stain import StainNormalizer, hed_jitter

# seed: the reports' fixed tripling; random: dihedral + mild colour; hed: dihedral + HED-light stain jitter.
AUGMENTATIONS = ("none", "seed", "random", "hed")
SEED_TRIPLING = 3  # the reports' scheme: original, rot90+flip, rot180+flip


def _reader(stain: StainNormalizer | None):
    if stain is None:
        return lambda p: read_image(p.decode())
    return lambda p: stain.normalize(read_image(p.decode()), p.decode())[0]


def _load(path: tf.Tensor, stain: StainNormalizer | None = None) -> tf.Tensor:
    image = tf.numpy_function(_reader(stain), [path], tf.uint8, stateful=False)
    image.set_shape([None, None, 3])
    return image


def _seed_copies(image: tf.Tensor, label: tf.Tensor) -> tf.data.Dataset:
    copies = tf.stack([
        image,
        tf.image.flip_left_right(tf.image.rot90(image, k=1)),
        tf.image.flip_left_right(tf.image.rot90(image, k=2)),
    ])
    return tf.data.Dataset.from_tensor_slices((copies, tf.stack([label] * SEED_TRIPLING)))


def _dihedral(image: tf.Tensor) -> tf.Tensor:
    # Histology has no canonical orientation: the 8 dihedral transforms are label-preserving.
    image = tf.image.random_flip_left_right(image)
    return tf.image.rot90(image, k=tf.random.uniform([], 0, 4, dtype=tf.int32))


def _random_augment(image: tf.Tensor, label: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
    image = _dihedral(image)
    # Mild stain/scanner variation only; strong hue shifts would change the H&E appearance.
    image = tf.image.random_brightness(image, 0.05)
    image = tf.image.random_contrast(image, 0.9, 1.1)
    image = tf.image.random_saturation(image, 0.9, 1.1)
    image = tf.image.random_hue(image, 0.02)
    return tf.clip_by_value(image, 0.0, 1.0), label


def _hed_augment(image: tf.Tensor, label: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
    return hed_jitter(_dihedral(image)), label


def make_dataset(
    paths: list[str] | np.ndarray,
    labels: list[int] | np.ndarray,
    image_size: int,
    batch_size: int,
    training: bool = False,
    augment: str = "none",
    seed: int = 42,
    num_classes: int = 2,
    stain: StainNormalizer | None = None,
) -> tf.data.Dataset:
    """Batches of (float32 images in [0, 1], one-hot labels); order is kept unless training. `stain`
    normalises each decoded image to a fitted reference (training, evaluation and serving alike)."""
    if augment not in AUGMENTATIONS:
        raise ConfigError(f"augment must be one of {', '.join(AUGMENTATIONS)}; got {augment!r}")
    paths = np.asarray(paths, dtype=str)
    onehot = tf.one_hot(np.asarray(labels, dtype=np.int32), num_classes)
    ds = tf.data.Dataset.from_tensor_slices((paths, onehot))
    ds = ds.map(lambda p, y: (resize_and_scale(_load(p, stain), image_size), y),
                num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    ds = ds.cache()
    if training:
        n = augmented_size(len(paths), augment)
        if augment == "seed":
            # flat_map hides the size; Keras needs it to count steps without running dry.
            ds = ds.flat_map(_seed_copies).apply(tf.data.experimental.assert_cardinality(n))
        ds = ds.shuffle(n, seed=seed, reshuffle_each_iteration=True)
        if augment in ("random", "hed"):
            ds = ds.map(_random_augment if augment == "random" else _hed_augment, num_parallel_calls=tf.data.AUTOTUNE)
    return ds.batch(batch_size).prefetch(tf.data.AUTOTUNE)


def augmented_size(n_images: int, augment: str) -> int:
    return n_images * (SEED_TRIPLING if augment == "seed" else 1)
