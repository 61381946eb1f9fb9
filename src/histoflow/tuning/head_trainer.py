"""The fusion head trained alone on cached feature vectors, with traced heads shared by every trial.

What is left of a trial on cached features is mostly tracing a new head's training step (~2 s on a
CPU, twice the training), so trials share traced heads (HeadTrainer) and one costs about a second.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from histoflow.modeling.architectures import compile_model
from histoflow.modeling.features import head_model
from histoflow.modeling.fitting import set_seeds

# Head steps take a few milliseconds, so the Python round trip of one step per call is a tenth of a
# trial; 32 steps per call cut it (the arithmetic and the results are the same).
HEAD_STEPS_PER_EXECUTION = 32


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
    The optimizer and BatchNorm in the head change the traced step: each pair has its own buckets.
    """

    def __init__(self, widths: Sequence[int], max_width: int, num_classes: int = 2,
                 numbers: Sequence[int] | None = None) -> None:
        self.widths, self.max_width, self.num_classes = tuple(widths), max_width, num_classes
        self.numbers = tuple(numbers or range(1, len(self.widths) + 1))  # the taps' numbers: their layers' names
        self.models: dict[tuple[int, str, bool], keras.Model] = {}

    def bucket(self, fusion_width: int) -> int:
        if not 1 <= fusion_width <= self.max_width:
            raise ValueError(f"fusion_width must be in 1..{self.max_width}; got {fusion_width}")
        return min(self.max_width, 1 << (fusion_width - 1).bit_length())

    def start(self, fusion_width: int, dropout: float, learning_rate: float, seed: int, optimizer: str = "adam",
              batchnorm: bool = True) -> keras.Model:
        """A compiled head set to a fresh head of `fusion_width`, drawn as head_model's after set_seeds(seed)."""
        key = (self.bucket(fusion_width), optimizer, batchnorm)
        if key not in self.models:
            self.models[key] = compile_model(
                head_model(self.widths, key[0], 0.0, self.num_classes, VariableRateDropout, batchnorm, self.numbers),
                learning_rate,
                optimizer, steps_per_execution=HEAD_STEPS_PER_EXECUTION)
        model = self.models[key]
        set_seeds(seed)  # after any new bucket: its construction must not shift the trial's random draws
        narrow = head_model(self.widths, fusion_width, dropout, self.num_classes, batchnorm=batchnorm,
                            numbers=self.numbers)
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
                               for w, v, fill in zip(weights, layer.weights, fills[:len(weights)], strict=True)])
        _reset_optimizer(model.optimizer, learning_rate)
        return model


def _reset_optimizer(optimizer: keras.optimizers.Optimizer, learning_rate: float) -> None:
    for variable in optimizer.variables:  # step count, moments, momentum; none before the first fit
        variable.assign(np.zeros(variable.shape, dtype=variable.dtype))
    optimizer.learning_rate = learning_rate  # assigned into the existing variable: the trace stays valid
