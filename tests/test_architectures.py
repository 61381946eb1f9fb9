import h5py
import keras
import numpy as np
import pytest

from histoflow.errors import ConfigError, WeightsError
from histoflow.modeling.architectures import (
    BACKBONES,
    HEAD_LAYERS,
    build_baseline,
    build_cnn_lstm,
    build_fusion,
    compile_model,
    head_only,
    imagenet_weights_file,
)


def test_baseline_is_the_reports_cnn():
    model = build_baseline(128)
    convs = [layer for layer in model.layers if isinstance(layer, keras.layers.Conv2D)]
    assert [c.filters for c in convs] == [32, 64, 128]
    assert all(c.kernel_size == (3, 3) and c.activation.__name__ == "relu" for c in convs)
    assert sum(isinstance(layer, keras.layers.MaxPooling2D) for layer in model.layers) == 3
    assert model.get_layer("dense").units == 128 and model.get_layer("dropout").rate == 0.5
    assert model.output.shape[-1] == 2 and model.get_layer("probabilities").activation.__name__ == "softmax"


def test_cnn_lstm_reads_the_feature_map_rows_as_a_sequence():
    model = build_cnn_lstm(128, dropout=0.3)
    assert [layer.filters for layer in model.layers if isinstance(layer, keras.layers.Conv2D)] == [32, 64, 128]
    # 128 -> conv 126 -> pool 63 -> 61 -> 30 -> 28 -> 14: 14 rows of 14 x 128 features, top to bottom.
    assert tuple(model.get_layer("rows_as_sequence").output.shape[1:]) == (14, 14 * 128)
    assert isinstance(model.get_layer("lstm"), keras.layers.LSTM) and model.get_layer("dropout").rate == 0.3
    images = np.random.default_rng(0).random((3, 128, 128, 3)).astype("float32")
    np.testing.assert_allclose(model.predict(images, verbose=0).sum(axis=1), 1.0, rtol=1e-5)
    # Reading rows as a sequence: the answer depends on the order of the rows (unlike global pooling).
    flipped = images[:, ::-1]
    assert not np.allclose(model.predict(images, verbose=0), model.predict(flipped, verbose=0), atol=1e-7)


def test_densenet_fusion_head_structure():
    model = build_fusion("densenet121", 64, weights="none", fusion_width=48, dropout=0.3)
    for i, tap in enumerate(BACKBONES["densenet121"].taps, start=1):
        gap = model.get_layer(f"fusion{i}_gap")
        assert gap.input is model.get_layer(tap).output or gap._inbound_nodes[0].parent_nodes[0].operation.name == tap
        assert model.get_layer(f"fusion{i}_dense").units == 48
        assert isinstance(model.get_layer(f"fusion{i}_bn"), keras.layers.BatchNormalization)
    assert model.get_layer("head_dense").units == 16
    assert model.get_layer("head_dropout").rate == 0.3
    # Called eagerly: a graph of DenseNet121 would take longer to trace than two images take to run.
    probabilities = np.asarray(model(np.random.rand(2, 64, 64, 3).astype("float32"), training=False))
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, rtol=1e-5)


def test_the_fusion_ablation_keeps_the_last_tap_alone_under_its_own_name():
    model = build_fusion("mobilenet", 64, weights="none", alpha=0.5, fusion_width=8, taps="last")
    names = {layer.name for layer in model.layers}
    assert {"fusion3_gap", "fusion3_dense", "fusion3_bn"} <= names
    assert not {n for n in names if n.startswith(("fusion1", "fusion2"))}
    assert model.get_layer("fusion3_gap")._inbound_nodes[0].parent_nodes[0].operation.name == \
        BACKBONES["mobilenet"].taps[-1]
    assert model.get_layer("head_dense").input.shape[-1] == 8  # one tap's branch feeds the head
    with pytest.raises(ConfigError, match="fusion_taps must be one of all, last"):
        build_fusion("mobilenet", 64, weights="none", alpha=0.5, taps="first")


@pytest.mark.parametrize("name", sorted(BACKBONES))
def test_every_backbone_has_its_three_taps(name):
    size = max(BACKBONES[name].min_size, 96)
    model = build_fusion(name, size, weights="none", alpha=0.75 if name == "mobilenet" else 1.0)
    widths = [model.get_layer(t).output.shape[1] for t in BACKBONES[name].taps]
    assert widths[0] > widths[-1]  # three scales, finest first


def _trainable_layers(model) -> set[str]:
    return {w.path.split("/")[0] for w in model.trainable_weights}


def test_unfrozen_blocks_trains_the_backbone_from_the_top():
    frozen = build_fusion("mobilenet", 64, weights="none", alpha=0.5, unfrozen_blocks=0)
    assert _trainable_layers(frozen) and all(n.startswith(HEAD_LAYERS) for n in _trainable_layers(frozen))
    # MobileNet's taps: conv_pw_5_relu (stride 8), conv_pw_11_relu (16), conv_pw_13_relu (32).
    last = _trainable_layers(build_fusion("mobilenet", 64, weights="none", alpha=0.5, unfrozen_blocks=1)) - \
        _trainable_layers(frozen)
    assert last == {"conv_dw_12", "conv_dw_12_bn", "conv_pw_12", "conv_pw_12_bn",
                    "conv_dw_13", "conv_dw_13_bn", "conv_pw_13", "conv_pw_13_bn"}
    two = _trainable_layers(build_fusion("mobilenet", 64, weights="none", alpha=0.5, unfrozen_blocks=2))
    assert "conv_pw_6" in two and "conv_pw_11_bn" in two and "conv_pw_5" not in two
    everything = build_fusion("mobilenet", 64, weights="none", alpha=0.5, unfrozen_blocks=3)
    assert {"conv1", "conv_pw_1", "conv_pw_5"} <= _trainable_layers(everything)
    assert len(everything.trainable_weights) > len(frozen.trainable_weights)
    with pytest.raises(ConfigError, match="unfrozen_blocks must be in 0..3"):
        build_fusion("mobilenet", 64, weights="none", alpha=0.5, unfrozen_blocks=5)


def test_head_without_batchnorm_and_each_optimizer():
    model = build_fusion("mobilenet", 64, weights="none", alpha=0.5, unfrozen_blocks=0, head_batchnorm=False)
    names = {layer.name for layer in model.layers}
    assert "fusion1_dense" in names and not any(n.endswith("_bn") and n.startswith(HEAD_LAYERS) for n in names)
    for name, cls in {"adam": keras.optimizers.Adam, "adamw": keras.optimizers.AdamW,
                      "sgd": keras.optimizers.SGD, "rmsprop": keras.optimizers.RMSprop}.items():
        compiled = compile_model(build_baseline(32), 3e-4, name)
        assert isinstance(compiled.optimizer, cls) and float(compiled.optimizer.learning_rate) == pytest.approx(3e-4)
    with pytest.raises(ConfigError, match="optimizer must be one of"):
        compile_model(build_baseline(32), 1e-3, "lbfgs")


def test_imagenet_weights_from_the_seeded_keras_cache(keras_home):
    model = build_fusion("mobilenet", 128, weights="imagenet", alpha=0.75)
    with h5py.File(keras_home / "models" / "mobilenet_7_5_224_tf_no_top.h5") as h5:
        stored = np.asarray(h5["conv1"]["conv1"]["kernel"])
    np.testing.assert_array_equal(model.get_layer("conv1").get_weights()[0], stored)


def test_weights_file_path_loads_at_any_size(keras_home):
    path = keras_home / "models" / "mobilenet_7_5_224_tf_no_top.h5"
    model = build_fusion("mobilenet", 128, weights=str(path), alpha=0.75)
    with h5py.File(path) as h5:
        stored = np.asarray(h5["conv_pw_13"]["conv_pw_13"]["kernel"])
    np.testing.assert_array_equal(model.get_layer("conv_pw_13").get_weights()[0], stored)


def test_missing_imagenet_weights_name_the_file_and_cache(keras_home):
    with pytest.raises(WeightsError) as err:
        build_fusion("densenet121", 64, weights="imagenet")
    message = str(err.value)
    assert "densenet121_weights_tf_dim_ordering_tf_kernels_notop.h5" in message
    assert str(keras_home / "models") in message and "could not download" in message
    assert err.value.__cause__ is not None  # Keras's own error, for the traceback
    assert imagenet_weights_file("mobilenet", 128, 0.75) == "mobilenet_7_5_224_tf_no_top.h5"


def test_a_damaged_cached_weights_file_is_not_called_a_failed_download(keras_home):
    """A file in Keras's cache that does not load (cut short, another model's) is named as such, with its cause;
    it is not reported as a download that failed."""
    damaged = keras_home / "models" / imagenet_weights_file("mobilenet", 64, 0.5)
    damaged.write_bytes(b"\x89HDF\r\n\x1a\n cut short")
    try:
        with pytest.raises(WeightsError) as err:
            build_fusion("mobilenet", 64, weights="imagenet", alpha=0.5)
    finally:
        damaged.unlink()
    message = str(err.value)
    assert f"cached file {damaged}" in message and "damaged" in message and "download it" not in message.split("(")[0]
    assert "could not download" not in message and err.value.__cause__ is not None


def test_a_weights_file_that_is_not_the_backbone_s_is_refused_naming_it(keras_home, tmp_path):
    """A weights file cut short, of another format or of another network fails when the model is built (before
    any training), naming the file and what was expected, with the cause kept."""
    mobilenet = keras_home / "models" / "mobilenet_7_5_224_tf_no_top.h5"
    cut = tmp_path / "cut.h5"
    cut.write_bytes(mobilenet.read_bytes()[:100_000])
    text = tmp_path / "notes.h5"
    text.write_text("not weights")
    empty = tmp_path / "empty.h5"
    with h5py.File(empty, "w") as h5:
        h5.create_dataset("x", data=np.zeros(3))
    expected = "keras.applications.MobileNet(include_top=False, alpha=0.75), as in Keras's own " \
               "mobilenet_7_5_224_tf_no_top.h5"
    for path, problem in ((cut, "cannot be read as HDF5"), (text, "cannot be read as HDF5"),
                          (empty, "is HDF5 but holds no Keras layer weights")):
        with pytest.raises(WeightsError) as err:
            build_fusion("mobilenet", 32, weights=str(path), alpha=0.75)
        assert f"weights file {path} {problem}" in str(err.value) and expected in str(err.value)
    # Readable Keras weights of another network: MobileNet's file for alpha 0.5 (other shapes), Keras's layer
    # count for another architecture.
    with pytest.raises(WeightsError) as err:
        build_fusion("mobilenet", 32, weights=str(mobilenet), alpha=0.5)
    assert f"weights file {mobilenet} does not fit mobilenet" in str(err.value)
    assert "MobileNet(include_top=False, alpha=0.5)" in str(err.value)
    assert isinstance(err.value.__cause__, ValueError)


def test_bad_backbone_parameters():
    with pytest.raises(ConfigError, match="backbone must be"):
        build_fusion("alexnet", 128)
    with pytest.raises(ConfigError, match="image_size"):
        build_fusion("inception_v3", 64, weights="none")
    with pytest.raises(ConfigError, match="alpha"):
        build_fusion("mobilenet", 128, weights="none", alpha=0.6)
    with pytest.raises(WeightsError, match="does not exist"):
        build_fusion("mobilenet", 128, weights="/nonexistent/weights.h5")


def test_fine_tuning_keeps_the_pretrained_batchnorm_statistics(keras_home):
    model = compile_model(build_fusion("mobilenet", 64, weights="imagenet", alpha=0.75, unfrozen_blocks=3), 1e-2,
                          "adam")
    bn, conv = model.get_layer("conv_pw_13_bn"), model.get_layer("conv_pw_13")
    moving_mean, kernel = bn.moving_mean.numpy().copy(), conv.kernel.numpy().copy()
    images = np.random.default_rng(0).uniform(0, 1, (8, 64, 64, 3)).astype("float32")
    model.run_eagerly = True  # one step: Keras's own train step, run without tracing it first
    model.train_on_batch(images, keras.utils.to_categorical([0, 1] * 4, 2))
    np.testing.assert_array_equal(bn.moving_mean.numpy(), moving_mean)  # inference mode: ImageNet statistics
    assert not np.allclose(conv.kernel.numpy(), kernel)
    assert not bn.trainable and conv.trainable
    # from scratch there are no statistics to keep: the backbone's BatchNormalization layers learn
    scratch = build_fusion("mobilenet", 64, weights="none", alpha=0.5, unfrozen_blocks=3)
    assert scratch.get_layer("conv_pw_13_bn").trainable


def test_head_only_freezes_the_backbone_and_restores_every_flag():
    model = build_fusion("mobilenet", 64, weights="none", alpha=0.5, unfrozen_blocks=1)
    before = {layer.name: layer.trainable for layer in model.layers}
    with head_only(model):
        assert _trainable_layers(model) and all(n.startswith(HEAD_LAYERS) for n in _trainable_layers(model))
    assert {layer.name: layer.trainable for layer in model.layers} == before
    assert model.get_layer("conv_pw_13").trainable and not model.get_layer("conv_pw_1").trainable
