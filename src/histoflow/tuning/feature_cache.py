"""Backbone features computed once and cached on disk, for tuning the fusion head on them.

With a frozen backbone the fusion head only ever sees the three pooled tap vectors
(``fusion{i}_gap``), so tuning computes them once per data/backbone setting and trains the head
alone on the cached vectors (histoflow.tuning.head_trainer) instead of passing every image through
the backbone every epoch.

Augmentation: ``augment=seed`` caches the three fixed copies of each training image (original,
rot90+flip, rot180+flip), as training sees them. ``augment=random`` and ``hed`` draw a new transform
every epoch, which no finite cache can hold, so they are cached with the ``seed`` scheme too (three
dihedral copies, no colour jitter); the full run trains with them as configured. Stain normalisation is
part of the images, so it is part of the cache key (its reference follows from the training split).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf

from histoflow.config import local_folder
from histoflow.data.pipeline import make_dataset
from histoflow.data.splits import SPLITS
from histoflow.data.step import PreparedData
from histoflow.modeling import inference
from histoflow.modeling.architectures import build_fusion
from histoflow.modeling.catalog import BACKBONES
from histoflow.modeling.training_run import stain_normalizer
from histoflow.modeling.variants import TrainConfig
from histoflow.progress import progress

log = logging.getLogger(__name__)

FORMAT_VERSION = 1  # bump when what is stored (or how it is computed) changes: old files stop matching
CACHED_AUGMENT = {"none": "none", "seed": "seed", "random": "seed", "hed": "seed"}


@dataclass(frozen=True)
class SplitFeatures:
    taps: tuple[np.ndarray, ...]  # one (images, channels) float32 array per tap, finest first
    labels: np.ndarray  # integer class per row

    def __len__(self) -> int:
        return len(self.labels)


@dataclass(frozen=True)
class CachedFeatures:
    path: Path
    key: str
    hit: bool
    splits: dict[str, SplitFeatures]
    seconds: float  # spent extracting (miss) or loading (hit)

    @property
    def widths(self) -> tuple[int, ...]:
        return tuple(t.shape[1] for t in self.splits["train"].taps)


def _weights_identity(weights: str) -> str:
    """What the weights are, not only what they are called: a weights file is identified by its content."""
    path = Path(weights).expanduser()
    if weights in ("imagenet", "none", "None", "") or not path.is_file():
        return weights
    sha = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            sha.update(block)
    return "sha256:" + sha.hexdigest()


def cache_fields(config: TrainConfig, digest: str) -> dict[str, object]:
    """Everything the cached vectors depend on; the cache key is their hash."""
    return {
        "format": FORMAT_VERSION,
        "keras": keras.__version__,
        "dataset_digest": digest,
        "backbone": config.backbone,
        "taps": list(BACKBONES[config.backbone].taps),
        "weights": _weights_identity(config.weights),
        "alpha": config.alpha,
        "image_size": config.image_size,
        "augment": CACHED_AUGMENT[config.augment],
        "stain_norm": config.stain_norm,  # its reference is fitted on the training split, seeded below
        # The split assignment and the shuffled order of the training copies.
        "split": config.split,
        "val_fraction": config.val_fraction,
        "test_fraction": config.test_fraction,
        "seed": config.seed,
    }


def cache_key(config: TrainConfig, digest: str) -> str:
    text = json.dumps(cache_fields(config, digest), sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:24]


def extractor(config: TrainConfig) -> keras.Model:
    """The frozen fusion model cut at its pooled taps: the exact inputs the full model's head gets."""
    model = build_fusion(config.backbone, config.image_size, config.weights, fusion_width=1, dropout=0.0,
                         alpha=config.alpha, unfrozen_blocks=0)
    taps = [model.get_layer(f"fusion{i}_gap").output for i in range(1, len(BACKBONES[config.backbone].taps) + 1)]
    return keras.Model(model.input, taps, name=f"{config.backbone}_taps")


def _extract(model: keras.Model, dataset: tf.data.Dataset, split: str) -> SplitFeatures:
    # Labels travel with the images: the training copies are shuffled, so order alone cannot pair them.
    taps: list[list[np.ndarray]] = []
    labels = []
    batches = int(dataset.cardinality())
    step = inference.forward(model)  # one graph for every batch, the last, smaller one too
    for images, onehot in progress(dataset, total=batches, desc=f"{split} features", unit="batch"):
        outputs = step(images)
        taps.append([np.asarray(o, dtype="float32") for o in outputs])
        labels.append(np.argmax(onehot.numpy(), axis=1))
    return SplitFeatures(tuple(np.concatenate(t) for t in zip(*taps, strict=True)),
                         np.concatenate(labels).astype("int32"))


def extract(config: TrainConfig, prepared: PreparedData) -> dict[str, SplitFeatures]:
    """Pooled tap vectors of each split; the training split as its cached augmentation copies."""
    model = extractor(config)
    stain = stain_normalizer(config, prepared)
    features = {}
    for split in SPLITS:
        rows = prepared.rows(split)
        training = split == "train"
        dataset = make_dataset(rows["path"], rows["label"], config.image_size, config.batch_size,
                               training=training, augment=CACHED_AUGMENT[config.augment] if training else "none",
                               seed=config.seed, stain=stain)
        features[split] = _extract(model, dataset, split)
    return features


def _save(path: Path, features: dict[str, SplitFeatures], fields: dict[str, object]) -> None:
    arrays = {"fields": np.array(json.dumps(fields, sort_keys=True))}
    for split, part in features.items():
        arrays[f"{split}_labels"] = part.labels
        arrays.update({f"{split}_tap{i}": tap for i, tap in enumerate(part.taps, start=1)})
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


def _load(path: Path) -> dict[str, SplitFeatures]:
    with np.load(path, allow_pickle=False) as data:
        n_taps = sum(1 for name in data.files if name.startswith("train_tap"))
        return {split: SplitFeatures(tuple(data[f"{split}_tap{i}"] for i in range(1, n_taps + 1)),
                                     data[f"{split}_labels"]) for split in SPLITS}


def load_or_extract(config: TrainConfig, prepared: PreparedData, cache_dir: str | os.PathLike) -> CachedFeatures:
    """The cached features of this setting, extracting and storing them first when absent."""
    digest = prepared.dataset.digest
    fields = cache_fields(config, digest)
    key = cache_key(config, digest)
    path = local_folder(str(cache_dir), "features") / f"{config.backbone}-{key}.npz"
    start = time.perf_counter()
    hit = path.is_file()
    if hit:
        splits = _load(path)
    else:
        log.info("extracting %s features into %s", config.backbone, path)
        splits = extract(config, prepared)
        _save(path, splits, fields)
    return CachedFeatures(path, key, hit, splits, time.perf_counter() - start)


