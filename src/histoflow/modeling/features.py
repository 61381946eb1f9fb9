"""A frozen backbone's pooled tap vectors, computed once per image and cached on disk, and the fusion head
trained on them.

With a frozen backbone the fusion head only ever sees the pooled tap vectors (``fusion{i}_gap``), so a
run that trains the head alone (``unfrozen_blocks=0``, a head warm-up) and every Optuna trial can train on
the cached vectors instead of passing every image through the backbone every epoch: seconds instead of
minutes per epoch for a DenseNet121 on a CPU. The head trained on them is the full model's head: its layers
carry the full model's names and its weights move there by name.

What is stored is one entry per image of the dataset, whatever the split: the cross-validation folds, the
tuning study and single runs on the same images share one extraction. Its key is what the vectors depend
on: the dataset's digest, the backbone and its weights (by content), the image size, the copies kept and the
stain reference (fitted on a training split, so a stain-normalised run has its own entry per split).

Augmentation: ``augment=seed`` keeps the reports' three fixed copies of each image (original, rot90+flip,
rot180+flip), which is what training on images sees. ``augment=random`` and ``hed`` draw a new transform
every epoch, which no finite cache can hold: they are cached as the same three dihedral copies, without
colour jitter (CACHED_AUGMENT), and a run trained on them says so (histoflow.modeling.training_run).
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import keras
import numpy as np
import pandas as pd
import tensorflow as tf

from histoflow.data.pipeline import SEED_TRIPLING, make_dataset, seed_view
from histoflow.data.splits import SPLITS
from histoflow.data.stain import StainNormalizer
from histoflow.data.step import PreparedData
from histoflow.modeling import inference
from histoflow.modeling.architectures import build_fusion, fusion_head, tap_numbers
from histoflow.modeling.catalog import BACKBONES
from histoflow.modeling.variants import TrainConfig
from histoflow.progress import progress

log = logging.getLogger(__name__)

FORMAT_VERSION = 3  # bump when what is stored (or how it is computed) changes: old files stop matching
CACHED_AUGMENT = {"none": "none", "seed": "seed", "random": "seed", "hed": "seed"}


def cached_views(augment: str) -> int:
    """Copies of each training image the cache holds for an augmentation."""
    return SEED_TRIPLING if CACHED_AUGMENT[augment] == "seed" else 1


def exact(augment: str) -> bool:
    """Whether training on the cached copies is what training on images with `augment` does."""
    return CACHED_AUGMENT[augment] == augment


@dataclass(frozen=True)
class SplitFeatures:
    taps: tuple[np.ndarray, ...]  # one (images, channels) float32 array per tap the head fuses, finest first
    labels: np.ndarray  # integer class per row
    numbers: tuple[int, ...]  # the taps' numbers in the backbone (1 = finest): what their head layers are named

    def __len__(self) -> int:
        return len(self.labels)


@dataclass(frozen=True)
class CachedFeatures:
    path: Path | None  # None: computed without a cache folder (image_cache=none)
    key: str  # the features' identity for this split (cache_key)
    hit: bool
    splits: dict[str, SplitFeatures]
    seconds: float  # spent extracting (miss) or loading (hit)
    store: _Store

    @property
    def widths(self) -> tuple[int, ...]:
        return tuple(t.shape[1] for t in self.splits["train"].taps)

    @property
    def numbers(self) -> tuple[int, ...]:
        return self.splits["train"].numbers

    @property
    def fallbacks(self) -> int:
        """Images of the dataset the stain normaliser left unchanged when their features were extracted."""
        return self.store.fallbacks

    def of(self, rows: pd.DataFrame) -> SplitFeatures:
        """The features of `rows` as the images themselves (no cached copy), in the rows' order."""
        return self.store.split(rows, False, self.numbers)


def _weights_identity(weights: str) -> str:
    """What the weights are, not only what they are called: a weights file is identified by its content."""
    path = Path(weights).expanduser()
    if weights in ("imagenet", "none", "None", "") or not path.is_file():
        return weights
    stat = path.stat()
    return _file_sha256(str(path.resolve()), stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=8)
def _file_sha256(path: str, size: int, mtime_ns: int) -> str:
    """Once per file and version in a process: a store lookup and a study's key both need it (29 MB for DenseNet)."""
    sha = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            sha.update(block)
    return "sha256:" + sha.hexdigest()


def _store_fields(config: TrainConfig, digest: str, stain: StainNormalizer) -> dict[str, object]:
    """Everything the stored vectors depend on; the store's file name is their hash."""
    return {
        "format": FORMAT_VERSION,
        "keras": keras.__version__,
        "dataset_digest": digest,
        "backbone": config.backbone,
        "taps": list(BACKBONES[config.backbone].taps),
        "weights": _weights_identity(config.weights),
        "alpha": config.alpha,
        "image_size": config.image_size,
        "views": cached_views(config.augment),
        "stain": stain.reference if stain.method != "none" else "none",
    }


def _hash(fields: object) -> str:
    return hashlib.sha256(json.dumps(fields, sort_keys=True, default=str).encode()).hexdigest()[:24]


def cache_key(config: TrainConfig, prepared: PreparedData) -> str:
    """The identity of a split's features (a tuning study is tied to it): what the store's entry depends on that
    is known before the stain reference is fitted, and the split assignment itself."""
    return _hash({"format": FORMAT_VERSION, "dataset_digest": prepared.dataset.digest, "backbone": config.backbone,
                  "weights": _weights_identity(config.weights), "alpha": config.alpha,
                  "image_size": config.image_size, "augment": CACHED_AUGMENT[config.augment],
                  "stain_norm": config.stain_norm,
                  # the taps only when not all: the keys of the studies and runs before the setting stay valid
                  **({} if config.fusion_taps == "all" else {"taps": config.fusion_taps}),
                  "assignment": prepared.frame[["relpath", "split"]].to_numpy().tolist()})


def extractor(config: TrainConfig, model: keras.Model | None = None) -> keras.Model:
    """The fusion model (`model`, or a new one of `config`) cut at every one of its backbone's taps, pooled:
    the exact inputs a head gets, whichever taps it fuses (pooling has no weights, so the store holds them all
    and any head reads its own). A run's own model saves building the backbone twice; its backbone must still
    hold `config.weights`."""
    model = model or build_fusion(config.backbone, config.image_size, config.weights, fusion_width=1, dropout=0.0,
                                  alpha=config.alpha, unfrozen_blocks=0)
    taps = [keras.layers.GlobalAveragePooling2D(name=f"tap{i}_gap")(model.get_layer(tap).output)
            for i, tap in enumerate(BACKBONES[config.backbone].taps, start=1)]
    return keras.Model(model.input, taps, name=f"{config.backbone}_taps")


@dataclass(frozen=True)
class _Store:
    """Every image's tap vectors, (views, images, channels) per tap, in the order of `relpaths`."""

    relpaths: np.ndarray
    taps: tuple[np.ndarray, ...]
    fallbacks: int  # images the stain normaliser left unchanged (too little tissue) during the extraction

    def split(self, rows: pd.DataFrame, training: bool, numbers: tuple[int, ...]) -> SplitFeatures:
        """The split's rows, of the taps `numbers`; a training split as each of its copies, in make_dataset's
        order (row k is copy k % views of image k // views), so that the same shuffle visits the same copies
        in the same order."""
        position = pd.Index(self.relpaths).get_indexer(rows["relpath"])
        if (position < 0).any():
            raise KeyError(f"{int((position < 0).sum())} images are not in the feature store")
        views = self.taps[0].shape[0] if training else 1
        labels = np.repeat(rows["label"].to_numpy(dtype="int32"), views)
        return SplitFeatures(tuple(t[:views, position].transpose(1, 0, 2).reshape(-1, t.shape[-1])
                                   for t in (self.taps[i - 1] for i in numbers)), labels, numbers)


def extract(config: TrainConfig, frame: pd.DataFrame, stain: StainNormalizer,
            network: keras.Model | None = None) -> _Store:
    """The pooled tap vectors of every image of `frame`, each of its cached copies (extractor's `model`)."""
    # forward() holds its model weakly: this name keeps the extractor alive while the loop runs (a garbage
    # collection in the loop freed it otherwise; the CLI's gc thresholds had hidden that).
    model = extractor(config, network)
    step = inference.forward(model)  # one graph for every batch, the last, smaller one too
    dataset = make_dataset(frame["path"], frame["label"], config.image_size, config.batch_size, stain=stain)
    views = cached_views(config.augment)
    fallbacks_before = stain.fallbacks
    batches: list[list[list[np.ndarray]]] = []  # batch -> view -> tap
    for images, _ in progress(dataset, total=int(dataset.cardinality()), desc="backbone features", unit="batch"):
        batches.append([[np.asarray(t, dtype="float32") for t in step(seed_view(images, v))] for v in range(views)])
    taps = tuple(np.stack([np.concatenate([b[v][i] for b in batches]) for v in range(views)])
                 for i in range(len(batches[0][0])))
    return _Store(frame["relpath"].to_numpy(dtype=str), taps, stain.fallbacks - fallbacks_before)


def _save(path: Path, store: _Store, fields: dict[str, object]) -> None:
    arrays = {"fields": np.array(json.dumps(fields, sort_keys=True, default=str)), "relpaths": store.relpaths,
              "fallbacks": np.array(store.fallbacks)}
    arrays.update({f"tap{i}": tap for i, tap in enumerate(store.taps, start=1)})
    path.parent.mkdir(parents=True, exist_ok=True)
    # Write then rename: a concurrent worker never reads a half-written file.
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".npz.tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **arrays)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _load(path: Path) -> _Store:
    with np.load(path, allow_pickle=False) as data:
        n_taps = sum(1 for name in data.files if name.startswith("tap"))
        return _Store(data["relpaths"], tuple(data[f"tap{i}"] for i in range(1, n_taps + 1)), int(data["fallbacks"]))


def load_or_extract(config: TrainConfig, prepared: PreparedData, cache_dir: Path | None,
                    stain: StainNormalizer, network: keras.Model | None = None) -> CachedFeatures:
    """The split's tap vectors from the store in `cache_dir` (a folder; None: computed, not kept), extracting
    the dataset's images into it first (through `network`, see extractor) when they are not there."""
    digest = prepared.dataset.digest
    fields = _store_fields(config, digest, stain)
    path = None if cache_dir is None else Path(cache_dir) / f"{config.backbone}-{_hash(fields)}.npz"
    start = time.perf_counter()
    hit = path is not None and path.is_file()
    if hit:
        store = _load(path)
    else:
        log.info("extracting %s features of %d images%s", config.backbone, len(prepared.frame),
                 f" into {path}" if path else "")
        store = extract(config, prepared.frame, stain, network)
        if path is not None:
            _save(path, store, fields)
    numbers = tap_numbers(config.fusion_taps, len(store.taps))
    splits = {s: store.split(prepared.rows(s), s == "train", numbers) for s in SPLITS}
    return CachedFeatures(path, cache_key(config, prepared), hit, splits, time.perf_counter() - start, store)


def head_model(widths: Sequence[int], fusion_width: int, dropout: float, num_classes: int = 2,
               dropout_layer: Callable[..., keras.layers.Layer] = keras.layers.Dropout,
               batchnorm: bool = True, numbers: Sequence[int] | None = None) -> keras.Model:
    """The fusion head alone, on pooled tap vectors (of the taps `numbers`, default 1, 2, ...).

    Its inputs carry the names of the full model's pooling layers, so every layer name matches
    build_fusion's and weights move between the two by name (copy_head).
    """
    numbers = tuple(numbers or range(1, len(widths) + 1))
    inputs = [keras.Input((width,), name=f"fusion{i}_gap") for i, width in zip(numbers, widths, strict=True)]
    return keras.Model(inputs, fusion_head(inputs, fusion_width, dropout, num_classes, dropout_layer, batchnorm,
                                           numbers), name="fusion_head")


def run_head(config: TrainConfig, widths: Sequence[int], numbers: Sequence[int]) -> keras.Model:
    """The fusion head of `config` (its width, dropout and BatchNorm setting) alone, on the taps `numbers`."""
    return head_model(widths, config.fusion_width, config.dropout, batchnorm=config.head_batchnorm, numbers=numbers)


def copy_head(source: keras.Model, target: keras.Model) -> None:
    """The head's weights (BatchNorm statistics included) from one model to the other, layer by name."""
    names = {layer.name for layer in target.layers}
    for layer in source.layers:
        if layer.weights and layer.name in names:
            target.get_layer(layer.name).set_weights(layer.get_weights())


def head_dataset(part: SplitFeatures, batch_size: int, training: bool, seed: int,
                 num_classes: int = 2) -> tf.data.Dataset:
    """Batches of (tap vectors, one-hot labels); shuffled every epoch when training, as the image pipeline."""
    ds = tf.data.Dataset.from_tensor_slices((part.taps, tf.one_hot(part.labels, num_classes)))
    if training:
        ds = ds.shuffle(len(part), seed=seed, reshuffle_each_iteration=True)
    return ds.batch(batch_size).prefetch(tf.data.AUTOTUNE)
