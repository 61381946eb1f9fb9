"""Backbone features computed once and cached on disk, and the fusion head trained on them.

With a frozen backbone the fusion head only ever sees the three pooled tap vectors
(``fusion{i}_gap``), so tuning computes them once per data/backbone setting and trains the head
alone on the cached vectors instead of passing every image through the backbone every epoch. What
is then left of a trial is mostly tracing a new head's training step (~2 s on a CPU, twice the
training), so trials share traced heads (HeadTrainer) and one costs about a second.

Augmentation: ``augment=seed`` caches the three fixed copies of each training image (original,
rot90+flip, rot180+flip), as training sees them. ``augment=random`` draws a new transform every
epoch, which no finite cache can hold, so it is cached with the ``seed`` scheme too (three
dihedral copies, no colour jitter); the full run trains with ``random`` as configured.
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
from typing import Any, Callable, Sequence

import keras
import numpy as np
import pandas as pd
import tensorflow as tf

from histoflow.config import TrainConfig
from histoflow.models import BACKBONES, build_fusion, compile_model, fusion_head
from histoflow.pipeline import make_dataset
from histoflow.training import set_seeds

log = logging.getLogger(__name__)

FORMAT_VERSION = 1  # bump when what is stored (or how it is computed) changes: old files stop matching
SPLITS = ("train", "val", "test")
CACHED_AUGMENT = {"none": "none", "seed": "seed", "random": "seed"}
# Head steps take a few milliseconds, so the Python round trip of one step per call is a tenth of a
# trial; 32 steps per call cut it (the arithmetic and the results are the same).
HEAD_STEPS_PER_EXECUTION = 32


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
                         alpha=config.alpha, freeze_backbone=True)
    taps = [model.get_layer(f"fusion{i}_gap").output for i in range(1, len(BACKBONES[config.backbone].taps) + 1)]
    return keras.Model(model.input, taps, name=f"{config.backbone}_taps")


def _extract(model: keras.Model, dataset: tf.data.Dataset) -> SplitFeatures:
    # Labels travel with the images: the training copies are shuffled, so order alone cannot pair them.
    taps: list[list[np.ndarray]] = []
    labels = []
    for images, onehot in dataset:
        # A direct call, not predict_on_batch: each split's last, smaller batch would retrace a graph.
        outputs = model(images, training=False)
        taps.append([np.asarray(o, dtype="float32") for o in outputs])
        labels.append(np.argmax(onehot.numpy(), axis=1))
    return SplitFeatures(tuple(np.concatenate(t) for t in zip(*taps)), np.concatenate(labels).astype("int32"))


def extract(config: TrainConfig, frame: pd.DataFrame) -> dict[str, SplitFeatures]:
    """Pooled tap vectors of each split; the training split as its cached augmentation copies."""
    model = extractor(config)
    features = {}
    for split in SPLITS:
        rows = frame[frame["split"] == split]
        training = split == "train"
        dataset = make_dataset(rows["path"], rows["label"], config.image_size, config.batch_size,
                               training=training, augment=CACHED_AUGMENT[config.augment] if training else "none",
                               seed=config.seed)
        features[split] = _extract(model, dataset)
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


def load_or_extract(config: TrainConfig, digest: str, frame: pd.DataFrame, cache_dir: str | os.PathLike,
                    ) -> CachedFeatures:
    """The cached features of this setting, extracting and storing them first when absent."""
    fields = cache_fields(config, digest)
    key = cache_key(config, digest)
    path = Path(cache_dir).expanduser() / f"{config.backbone}-{key}.npz"
    start = time.perf_counter()
    hit = path.is_file()
    if hit:
        splits = _load(path)
    else:
        log.info("extracting %s features into %s", config.backbone, path)
        splits = extract(config, frame)
        _save(path, splits, fields)
    return CachedFeatures(path, key, hit, splits, time.perf_counter() - start)


def head_model(widths: Sequence[int], fusion_width: int, dropout: float, num_classes: int = 2,
               dropout_layer: Callable[..., keras.layers.Layer] = keras.layers.Dropout) -> keras.Model:
    """The fusion head alone, on pooled tap vectors.

    Its inputs carry the names of the full model's pooling layers, so every layer name matches
    build_fusion's and weights move between the two by name.
    """
    inputs = [keras.Input((width,), name=f"fusion{i}_gap") for i, width in enumerate(widths, start=1)]
    return keras.Model(inputs, fusion_head(inputs, fusion_width, dropout, num_classes, dropout_layer),
                       name="fusion_head")


def head_dataset(part: SplitFeatures, batch_size: int, training: bool, seed: int,
                 num_classes: int = 2) -> tf.data.Dataset:
    """Batches of (tap vectors, one-hot labels); shuffled every epoch when training, as the image pipeline."""
    ds = tf.data.Dataset.from_tensor_slices((part.taps, tf.one_hot(part.labels, num_classes)))
    if training:
        ds = ds.shuffle(len(part), seed=seed, reshuffle_each_iteration=True)
    return ds.batch(batch_size).prefetch(tf.data.AUTOTUNE)


class VariableRateDropout(keras.layers.Layer):
    """keras.layers.Dropout with its rate in a variable: one traced training step serves every rate.

    The same operation as Keras's TensorFlow dropout (stateless dropout seeded from the layer's
    SeedGenerator), so with the same generator state it drops the same units.
    """

    def __init__(self, rate: float, seed: int | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.seed_generator = keras.random.SeedGenerator(seed)
        self.rate = self.add_weight(shape=(), initializer=keras.initializers.Constant(rate), trainable=False,
                                    name="rate")

    def call(self, inputs: tf.Tensor, training: bool = False) -> tf.Tensor:
        if not training:
            return inputs
        seed = tf.cast(tf.math.floormod(self.seed_generator.next(), tf.int32.max - 1), "int32")
        return tf.nn.experimental.stateless_dropout(inputs, rate=tf.cast(self.rate, inputs.dtype), seed=seed)

    def compute_output_shape(self, input_shape: tuple) -> tuple:
        return input_shape


def _pad_to(narrow: np.ndarray, shape: tuple[int, ...], fill: float, blocks: int = 1) -> np.ndarray:
    """`narrow` in the leading corner of an array of `shape` (of its first axis, `blocks` equal parts each)."""
    wide = np.full(shape, fill, dtype=narrow.dtype)
    rows, wide_rows = narrow.shape[0] // blocks, shape[0] // blocks
    for b in range(blocks):
        target = (slice(b * wide_rows, b * wide_rows + rows),) + tuple(slice(0, n) for n in narrow.shape[1:])
        wide[target] = narrow[b * rows:(b + 1) * rows]
    return wide


class HeadTrainer:
    """Compiled fusion heads that train the head of every trial of a study, traced once per width bucket.

    Building and tracing a new head costs about 2 s on a CPU, more than training the head itself.
    A head of width w is trained as the head of the next power-of-two width (a bucket, at most
    `max_width`) whose units beyond w start at zero, BatchNorm scale included: such a unit outputs 0,
    gets a zero gradient, and Adam leaves it at 0, so it stays out of the function for the whole fit,
    while the first w units start from exactly the weights a plain head_model of width w draws. The
    dropout rate and the optimizer's learning rate are variables, so nothing a trial sets is baked
    into a traced step. Buckets, not one head of `max_width`: the zero units still cost compute (a
    256-wide head steps about 2.5x slower than a 16-wide one), so padding at most doubles the width.
    """

    def __init__(self, widths: Sequence[int], max_width: int, num_classes: int = 2) -> None:
        self.widths, self.max_width, self.num_classes = tuple(widths), max_width, num_classes
        self.models: dict[int, keras.Model] = {}

    def bucket(self, fusion_width: int) -> int:
        if not 1 <= fusion_width <= self.max_width:
            raise ValueError(f"fusion_width must be in 1..{self.max_width}; got {fusion_width}")
        return min(self.max_width, 1 << (fusion_width - 1).bit_length())

    def start(self, fusion_width: int, dropout: float, learning_rate: float, seed: int) -> keras.Model:
        """A compiled head set to a fresh head of `fusion_width`, its weights drawn as head_model's after set_seeds(seed)."""
        width = self.bucket(fusion_width)
        if width not in self.models:
            self.models[width] = compile_model(
                head_model(self.widths, width, 0.0, self.num_classes, VariableRateDropout), learning_rate,
                steps_per_execution=HEAD_STEPS_PER_EXECUTION)
        model = self.models[width]
        set_seeds(seed)  # after any new bucket: its construction must not shift the trial's random draws
        narrow = head_model(self.widths, fusion_width, dropout, self.num_classes)
        n_taps = len(self.widths)
        for layer in model.layers:
            if isinstance(layer, VariableRateDropout):
                layer.rate.assign(dropout)
                source = getattr(narrow.get_layer(layer.name), "seed_generator", None)  # none at rate 0
                if source is not None:
                    layer.seed_generator.state.assign(source.state.value)
                continue
            weights = narrow.get_layer(layer.name).get_weights()
            if not weights:
                continue
            # BatchNorm's (gamma, beta, moving mean, moving variance): padded units get gamma 0 and variance 1.
            fills = [0.0, 0.0, 0.0, 1.0] if isinstance(layer, keras.layers.BatchNormalization) else [0.0] * 4
            blocks = n_taps if layer.name == "head_dense" else 1  # its inputs: the taps' padded units, concatenated
            layer.set_weights([_pad_to(w, tuple(v.shape), fill, blocks if w.ndim == 2 else 1)
                               for w, v, fill in zip(weights, layer.weights, fills)])
        _reset_optimizer(model.optimizer, learning_rate)
        return model


def _reset_optimizer(optimizer: keras.optimizers.Optimizer, learning_rate: float) -> None:
    for variable in optimizer.variables:  # step count and Adam's moments; none before the first fit
        variable.assign(np.zeros(variable.shape, dtype=variable.dtype))
    optimizer.learning_rate = learning_rate  # assigned into the existing variable: the trace stays valid
