"""The variants' settings: the reports' defaults, string parameters as MLflow Projects passes them, bad values."""

import pytest

from histoflow.errors import ConfigError
from histoflow.modeling.variants import VARIANTS, make_train_config, variant_fields


def test_variant_defaults_follow_the_reports():
    baseline = make_train_config("baseline")
    assert (baseline.learning_rate, baseline.dropout, baseline.augment) == (1e-3, 0.5, "none")
    assert make_train_config("augmented").augment == "seed"
    densenet = make_train_config("densenet")
    assert (densenet.backbone, densenet.learning_rate, densenet.dropout, densenet.fusion_width) == (
        "densenet121", 1e-5, 0.45, 64)
    assert densenet.weights == "imagenet" and densenet.image_size == 128 and densenet.batch_size == 64
    assert densenet.unfrozen_blocks == 3 and densenet.optimizer == "adam" and densenet.head_batchnorm
    assert (make_train_config("transfer").backbone, make_train_config("transfer").alpha) == ("mobilenet", 0.75)


def test_string_parameters_are_coerced():
    config = make_train_config("densenet", epochs="3.0", head_batchnorm="off", learning_rate="1e-4",
                               max_images="100", unfrozen_blocks="1", magnification="200X")
    assert (config.epochs, config.head_batchnorm, config.learning_rate, config.max_images, config.unfrozen_blocks) == (
        3, False, 1e-4, 100, 1)


@pytest.mark.parametrize("overrides,message", [
    ({"dropout": "1.5"}, "dropout"),
    ({"learning_rate": "0"}, "learning_rate"),
    ({"epochs": "many"}, "epochs must be an integer"),
    ({"epochs": "2.5"}, "epochs must be an integer"),
    ({"split": "random"}, "split must be"),
    ({"augment": "mixup"}, "augment must be"),
    ({"class_weight": "auto"}, "class_weight"),
    ({"backbone": "vgg16"}, "densenet variant"),
    ({"colour": "blue"}, "unknown parameter"),
    ({"head_batchnorm": "maybe"}, "head_batchnorm must be true or false"),
    ({"optimizer": "lbfgs"}, "optimizer must be one of adam, adamw, sgd, rmsprop"),
    ({"unfrozen_blocks": "4"}, "unfrozen_blocks must be in 0..3"),
    ({"magnification": "25"}, "magnification must be one of"),
    ({"val_fraction": "0.6"}, "val_fraction and test_fraction"),
    ({"threshold_policy": "median"}, "threshold_policy must be one of argmax, youden"),
    ({"threshold_policy": "sensitivity:1.5"}, "the target must be in"),
    ({"calibration": "platt"}, "calibration must be one of temperature, none"),
    ({"bootstrap": "10"}, "bootstrap must be 0"),
    ({"tta": "flip"}, "tta must be one of none, dihedral8"),
    ({"warmup_epochs": "-1"}, "warmup_epochs must be >= 0"),
    ({"warmup_epochs": "2", "unfrozen_blocks": "0"}, "warmup_epochs needs unfrozen_blocks > 0"),
    ({"warmup_learning_rate": "0"}, "warmup_learning_rate must be in"),
])
def test_bad_parameters_are_rejected_with_a_message(overrides, message):
    with pytest.raises(ConfigError, match=message):
        make_train_config("densenet", **overrides)


def test_the_cnn_variants_take_no_backbone_settings():
    assert "fusion_width" not in variant_fields("baseline") and "fusion_width" in variant_fields("densenet")
    with pytest.raises(ConfigError, match="weights, fusion_width: the baseline variant has no backbone"):
        make_train_config("baseline", weights="none", fusion_width="32")
    with pytest.raises(ConfigError, match="warmup_epochs: the cnn_lstm variant has no backbone"):
        make_train_config("cnn_lstm", warmup_epochs="2")
    assert "backbone" not in make_train_config("augmented").to_params()
    assert make_train_config("transfer").to_params()["model"] == "mobilenet_fusion"
    with pytest.raises(ConfigError, match="variant must be one of"):
        make_train_config("resnet")
    assert set(VARIANTS) == {"baseline", "augmented", "cnn_lstm", "densenet", "transfer"}
    lstm = make_train_config("cnn_lstm")
    assert (lstm.model_name, lstm.learning_rate, lstm.dropout, lstm.augment) == ("cnn_lstm", 1e-3, 0.5, "none")
