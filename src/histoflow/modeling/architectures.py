"""Model variants: the reports' baseline CNN and the multi-scale fusion head on keras.applications backbones.

Models take float32 images in [0, 1] (the output of ``histoflow.data.images.resize_and_scale``); each backbone's
own ImageNet normalisation is a built-in layer inside the model, so the saved ``.keras`` file and the
served model need no custom code.
"""

from __future__ import annotations

import contextlib
import os
import re
import urllib.error
import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import keras
import numpy as np

from histoflow.errors import ConfigError, WeightsError
from histoflow.modeling.catalog import ALPHA_BACKBONES, BACKBONE_BLOCKS, BACKBONES, FUSION_TAPS, OPTIMIZERS

IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], dtype="float32")
IMAGENET_STD = np.array([0.229, 0.224, 0.225], dtype="float32")
CAFFE_MEAN_BGR = np.array([103.939, 116.779, 123.68], dtype="float32")


GRADCAM_LAYER_BASELINE = "conv3"


def keras_cache_dir() -> Path:
    """Where Keras caches downloaded weights: $KERAS_HOME/models (read by Keras at import), else ~/.keras/models."""
    try:
        from keras.src.backend.config import keras_home
        home = keras_home()
    except ImportError:
        home = os.environ.get("KERAS_HOME") or os.path.join(os.path.expanduser("~"), ".keras")
    return Path(home) / "models"


def imagenet_weights_file(backbone: str, image_size: int, alpha: float = 1.0) -> str:
    """The file name Keras looks for in its cache when weights='imagenet'."""
    spec = BACKBONES[backbone]
    if backbone == "mobilenet":
        # Built on an input tensor, MobileNet v1 always takes the 224 file (it loads at any size).
        rows = 224
        alpha_text = {0.25: "2_5", 0.5: "5_0", 0.75: "7_5", 1.0: "1_0"}[alpha]
        return spec.weights_file.format(alpha=alpha_text, rows=rows)
    if backbone == "mobilenet_v2":
        rows = image_size if image_size in (96, 128, 160, 192, 224) else 224
        return spec.weights_file.format(alpha=f"{alpha:g}" if alpha != 1 else "1.0", rows=rows)
    return spec.weights_file


def _resolve_weights(weights: str) -> str | None:
    if weights in ("none", "None", "", None):
        return None
    if weights == "imagenet":
        return "imagenet"
    path = Path(weights).expanduser()
    if not path.is_file():
        raise WeightsError(f"weights file {path} does not exist (weights must be imagenet, none or a path)")
    return str(path)


def _expected_weights(backbone: str, image_size: int, alpha: float) -> str:
    spec = BACKBONES[backbone]
    shape = f", alpha={alpha:g}" if backbone in ALPHA_BACKBONES else ""
    return (f"the Keras HDF5 weights of keras.applications.{spec.application}(include_top=False{shape}), "
            f"as in Keras's own {imagenet_weights_file(backbone, image_size, alpha)}")


def check_weights_file(path: str, backbone: str, image_size: int, alpha: float = 1.0) -> None:
    """Refuse a weights file that is not Keras's HDF5 weights layout (cut short, another format), naming the
    file and what was expected: found before a model is built, not as h5py's error in the middle of it."""
    import h5py

    try:
        with h5py.File(path, "r") as h5:
            layers = h5.attrs.get("layer_names")
    except OSError as exc:
        raise WeightsError(f"weights file {path} cannot be read as HDF5 ({exc}): it is damaged, cut short or not "
                           f"a weights file; expected {_expected_weights(backbone, image_size, alpha)}") from exc
    if layers is None:
        raise WeightsError(f"weights file {path} is HDF5 but holds no Keras layer weights (no layer_names); "
                           f"expected {_expected_weights(backbone, image_size, alpha)}")


def _explain_imagenet_failure(exc: Exception, backbone: str, image_size: int, alpha: float) -> None:
    """Raise a WeightsError saying what to do (the cause kept) when building with weights="imagenet" failed
    because Keras could not download the weights, or could not read its cached file; return otherwise (the
    failure is another one, raised as it is)."""
    fetched = re.search(r"/([^/\s]+\.h5)\b", str(exc))
    name = fetched.group(1) if fetched else imagenet_weights_file(backbone, image_size, alpha)
    cached = keras_cache_dir() / name
    if "URL fetch failure" in str(exc) or isinstance(exc, urllib.error.URLError):
        raise WeightsError(
            f"could not load ImageNet weights for {backbone}: Keras needs the file {name} in "
            f"{keras_cache_dir()} and could not download it ({type(exc).__name__}: {exc}). Copy the "
            "file there, pass weights=/path/to/weights.h5, or use weights=none") from exc
    if cached.is_file():
        raise WeightsError(
            f"could not load ImageNet weights for {backbone} from Keras's cached file {cached} "
            f"({type(exc).__name__}: {exc}): it is damaged or not this model's; delete it (Keras downloads it "
            "again), or pass weights=/path/to/weights.h5") from exc


def _scaling_layers(scaling: str, x):
    """Map [0, 1] inputs to what the backbone was pretrained on, with serialisable built-in layers."""
    if scaling == "torch":
        return keras.layers.Normalization(mean=IMAGENET_MEAN, variance=IMAGENET_STD**2,
                                          name="imagenet_normalize")(x)
    if scaling == "tf":
        return keras.layers.Rescaling(2.0, offset=-1.0, name="scale_to_pm1")(x)
    if scaling == "raw255":
        return keras.layers.Rescaling(255.0, name="scale_to_255")(x)
    if scaling == "caffe":
        x = keras.layers.Rescaling(255.0, name="scale_to_255")(x)
        # RGB -> BGR and mean subtraction as a fixed 1x1 convolution (no Lambda: .keras stays portable).
        rgb_to_bgr = keras.layers.Conv2D(3, 1, name="rgb_to_bgr", trainable=False)
        x = rgb_to_bgr(x)
        rgb_to_bgr.set_weights([np.eye(3, dtype="float32")[::-1].reshape(1, 1, 3, 3), -CAFFE_MEAN_BGR])
        return x
    raise ConfigError(f"unknown scaling {scaling}")


def build_baseline(image_size: int = 128, dropout: float = 0.5, num_classes: int = 2) -> keras.Model:
    """The reports' CNN: Conv 32/64/128 (3x3 ReLU) + MaxPool 2x2 each, Dense 128, Dropout, softmax."""
    inputs = keras.Input((image_size, image_size, 3), name="image")
    x = inputs
    for i, filters in enumerate((32, 64, 128), start=1):
        x = keras.layers.Conv2D(filters, 3, activation="relu", name=f"conv{i}")(x)
        x = keras.layers.MaxPooling2D(2, name=f"pool{i}")(x)
    x = keras.layers.Flatten(name="flatten")(x)
    x = keras.layers.Dense(128, activation="relu", name="dense")(x)
    x = keras.layers.Dropout(dropout, name="dropout")(x)
    outputs = keras.layers.Dense(num_classes, activation="softmax", name="probabilities", dtype="float32")(x)
    return keras.Model(inputs, outputs, name="baseline_cnn")


def build_cnn_lstm(image_size: int = 128, dropout: float = 0.5, num_classes: int = 2, lstm_units: int = 64
                   ) -> keras.Model:
    """The IDC report's hybrid: the reports' CNN (Conv 32/64/128 + MaxPool), whose last feature map is read
    row by row, top to bottom, as a sequence by an LSTM; Dropout; softmax."""
    inputs = keras.Input((image_size, image_size, 3), name="image")
    x = inputs
    for i, filters in enumerate((32, 64, 128), start=1):
        x = keras.layers.Conv2D(filters, 3, activation="relu", name=f"conv{i}")(x)
        x = keras.layers.MaxPooling2D(2, name=f"pool{i}")(x)
    rows, columns, channels = x.shape[1:]
    x = keras.layers.Reshape((rows, columns * channels), name="rows_as_sequence")(x)
    x = keras.layers.LSTM(lstm_units, name="lstm")(x)
    x = keras.layers.Dropout(dropout, name="dropout")(x)
    outputs = keras.layers.Dense(num_classes, activation="softmax", name="probabilities", dtype="float32")(x)
    return keras.Model(inputs, outputs, name="cnn_lstm")


def build_fusion(
    backbone: str = "densenet121",
    image_size: int = 128,
    weights: str = "imagenet",
    fusion_width: int = 64,
    dropout: float = 0.45,
    alpha: float = 1.0,
    unfrozen_blocks: int = BACKBONE_BLOCKS,
    head_batchnorm: bool = True,
    num_classes: int = 2,
    taps: str = "all",
) -> keras.Model:
    """Backbone taps -> (GAP -> Dense(fusion_width) -> BN) each, concat -> Dense 16 -> BN -> Dropout -> softmax.

    taps: which taps the head fuses (FUSION_TAPS): all of them, the seeds' multi-scale fusion, or the last
    block's alone (the ablation); a tap's layers keep its number, fusion3_* being the deepest's either way.

    unfrozen_blocks: how many of the backbone's stages are trained, counted from the top; the stages
    end at the taps (strides 8, 16, 32): 0 freezes the backbone, 1 trains what follows the second tap,
    2 what follows the first, 3 (BACKBONE_BLOCKS) the whole backbone. A pretrained backbone's
    BatchNormalization layers stay frozen, in inference mode, when its stages are fine-tuned.
    """
    if backbone not in BACKBONES:
        raise ConfigError(f"backbone must be one of {', '.join(BACKBONES)}; got {backbone!r}")
    spec = BACKBONES[backbone]
    if image_size < spec.min_size:
        raise ConfigError(f"{backbone} needs image_size >= {spec.min_size}; got {image_size}")
    kwargs = {}
    if backbone in ALPHA_BACKBONES:
        if alpha not in ALPHA_BACKBONES[backbone]:
            raise ConfigError(f"{backbone} alpha must be one of {ALPHA_BACKBONES[backbone]}; got {alpha}")
        kwargs["alpha"] = alpha
    inputs = keras.Input((image_size, image_size, 3), name="image")
    scaled = _scaling_layers(spec.scaling, inputs)
    resolved = _resolve_weights(weights)
    if resolved not in (None, "imagenet"):
        check_weights_file(resolved, backbone, image_size, alpha)
    try:
        # input_tensor puts the backbone's layers in this model's own graph, so the taps (and
        # Grad-CAM's target layer) are reachable by name in the saved model.
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*will be loaded as the default")
            constructor = getattr(keras.applications, spec.application)
            base = constructor(include_top=False, weights=resolved, input_tensor=scaled, **kwargs)
    except Exception as exc:
        if resolved is None:
            raise
        if resolved != "imagenet":  # a file that reads but is another network's (layer count or shapes)
            raise WeightsError(f"weights file {resolved} does not fit {backbone} ({type(exc).__name__}: {exc}); "
                               f"expected {_expected_weights(backbone, image_size, alpha)}") from exc
        _explain_imagenet_failure(exc, backbone, image_size, alpha)
        raise
    _unfreeze(base, spec.taps, unfrozen_blocks, pretrained=resolved is not None)
    numbers = tap_numbers(taps, len(spec.taps))
    pooled = [keras.layers.GlobalAveragePooling2D(name=f"fusion{i}_gap")(base.get_layer(spec.taps[i - 1]).output)
              for i in numbers]
    return keras.Model(inputs, fusion_head(pooled, fusion_width, dropout, num_classes, batchnorm=head_batchnorm,
                                           numbers=numbers), name=f"{backbone}_fusion")


def _upstream(model: keras.Model, name: str) -> set[str]:
    """The layer `name` and every layer whose output reaches it."""
    seen: set[str] = set()
    stack = [model.get_layer(name)]
    while stack:
        layer = stack.pop()
        if layer.name not in seen:
            seen.add(layer.name)
            stack += [parent.operation for node in layer._inbound_nodes for parent in node.parent_nodes]
    return seen


def _unfreeze(base: keras.Model, taps: Sequence[str], unfrozen_blocks: int, pretrained: bool) -> None:
    if not 0 <= unfrozen_blocks <= BACKBONE_BLOCKS:
        raise ConfigError(f"unfrozen_blocks must be in 0..{BACKBONE_BLOCKS}; got {unfrozen_blocks}")
    base.trainable = unfrozen_blocks > 0
    frozen = _upstream(base, taps[BACKBONE_BLOCKS - 1 - unfrozen_blocks]) if 0 < unfrozen_blocks < BACKBONE_BLOCKS \
        else set()
    for layer in base.layers:
        # Batch statistics of 64 small patches would overwrite ImageNet's moving averages in the first
        # epochs of fine-tuning and shift every feature the pretrained filters compute (Keras's
        # transfer-learning guide); a non-trainable Keras 3 BatchNormalization runs in inference mode.
        keep_imagenet_statistics = pretrained and isinstance(layer, keras.layers.BatchNormalization)
        if layer.name in frozen or keep_imagenet_statistics:
            layer.trainable = False


# Name prefixes of fusion_head's layers: what a warm-up trains while the backbone stays frozen.
HEAD_LAYERS = ("fusion", "head_", "probabilities")


@contextlib.contextmanager
def head_only(model: keras.Model) -> Iterator[keras.Model]:
    """Inside, only the fusion head is trainable (compile the model inside for that to take effect); every
    layer's trainable flag is restored when it ends, so a compile after it trains the configured stages."""
    flags = {layer.name: layer.trainable for layer in model.layers}
    for layer in model.layers:
        if not layer.name.startswith(HEAD_LAYERS):
            layer.trainable = False
    try:
        yield model
    finally:
        for layer in model.layers:
            layer.trainable = flags[layer.name]


def tap_numbers(taps: str, n_taps: int) -> tuple[int, ...]:
    """The numbers (1 = finest) of the taps a head fuses: `all` of a backbone's `n_taps`, or the `last` alone."""
    if taps not in FUSION_TAPS:
        raise ConfigError(f"fusion_taps must be one of {', '.join(FUSION_TAPS)}; got {taps!r}")
    return tuple(range(1, n_taps + 1)) if taps == "all" else (n_taps,)


def fusion_head(pooled: Sequence[keras.KerasTensor], fusion_width: int, dropout: float,
                num_classes: int = 2, dropout_layer: Callable[..., keras.layers.Layer] = keras.layers.Dropout,
                batchnorm: bool = True, numbers: Sequence[int] | None = None) -> keras.KerasTensor:
    """(Dense(fusion_width) [-> BN]) per pooled tap, concat -> Dense 16 [-> BN] -> Dropout -> softmax.

    The one definition of the head: build_fusion puts it on the backbone's pooled taps, tuning on
    cached pooled vectors (histoflow.tuning.head_trainer), so a tuned head is the head the full model
    trains. Tuning swaps in a dropout whose rate is a variable (``dropout_layer``), the same operation.
    ``numbers``: the taps' numbers, which name their layers (default 1, 2, ...).
    """
    def normalised(x: keras.KerasTensor, name: str) -> keras.KerasTensor:
        return keras.layers.BatchNormalization(name=name)(x) if batchnorm else x

    branches = [normalised(keras.layers.Dense(fusion_width, activation="relu", name=f"fusion{i}_dense")(x),
                           f"fusion{i}_bn") for i, x in zip(numbers or range(1, len(pooled) + 1), pooled, strict=True)]
    x = keras.layers.Concatenate(name="fusion_concat")(branches)
    x = normalised(keras.layers.Dense(16, activation="relu", name="head_dense")(x), "head_bn")
    x = dropout_layer(dropout, name="head_dropout")(x)
    # float32 softmax even under mixed precision: float16 probabilities round to 0/1 and break the loss.
    return keras.layers.Dense(num_classes, activation="softmax", name="probabilities", dtype="float32")(x)


def gradcam_layer(model: keras.Model) -> str:
    """The convolutional layer Grad-CAM explains: the CNNs' last conv, a backbone's deepest tap, else the
    last layer with a spatial (4-D) output. Found on the model itself, so a loaded model needs no settings."""
    names = [layer.name for layer in model.layers]
    for name in (GRADCAM_LAYER_BASELINE, *(spec.taps[-1] for spec in BACKBONES.values())):
        if name in names:
            return name
    spatial = [layer.name for layer in model.layers if len(getattr(layer.output, "shape", ())) == 4]
    if not spatial:
        raise ConfigError(f"model {model.name} has no convolutional layer for Grad-CAM")
    return spatial[-1]


def _optimizer(name: str, learning_rate: float) -> keras.optimizers.Optimizer:
    if name == "adam":
        return keras.optimizers.Adam(learning_rate=learning_rate)
    if name == "adamw":
        return keras.optimizers.AdamW(learning_rate=learning_rate)
    if name == "sgd":
        return keras.optimizers.SGD(learning_rate=learning_rate, momentum=0.9, nesterov=True)
    if name == "rmsprop":
        return keras.optimizers.RMSprop(learning_rate=learning_rate)
    raise ConfigError(f"optimizer must be one of {', '.join(OPTIMIZERS)}; got {name!r}")


def compile_model(model: keras.Model, learning_rate: float, optimizer: str = "adam",
                  steps_per_execution: int = 1) -> keras.Model:
    model.compile(
        optimizer=_optimizer(optimizer, learning_rate),
        loss="categorical_crossentropy",
        metrics=["accuracy", keras.metrics.AUC(name="auc")],
        steps_per_execution=steps_per_execution,
    )
    return model


