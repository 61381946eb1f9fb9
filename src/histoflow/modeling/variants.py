"""The model variants of the published reports, and the settings of a training run and of a cross-validation.

One dataclass holds every setting of a training run; each variant overrides the defaults the reports
used. The data settings are the data step's own (``DataConfig``), inherited, not repeated. Like every
settings module, this one imports nothing heavy (no Keras, no MLflow): the command line reads it.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, fields, replace
from typing import Any

from histoflow.config import RUN_TARGET_FIELDS, USER_CACHE, RunTarget, require, setting, typed_params
from histoflow.data.settings import AUGMENTATIONS, STAIN_METHODS, DataConfig
from histoflow.errors import ConfigError
from histoflow.modeling.catalog import ALPHA_BACKBONES, BACKBONE_BLOCKS, BACKBONES, FUSION_TAPS, OPTIMIZERS

VARIANTS = ("baseline", "augmented", "cnn_lstm", "densenet", "transfer")
# The variants built on a pretrained backbone: they have the fusion head, and features to cache for tuning.
BACKBONE_VARIANTS = ("densenet", "transfer")
CLASS_WEIGHTS = ("none", "balanced")
# Test-time augmentation of evaluation and of the served model (histoflow.modeling.inference).
TTA_MODES = ("none", "dihedral8")
# Where this machine keeps a run's files, not what the run does: neither logged nor compared on resume.
LOCAL_FIELDS = ("image_cache", "checkpoint_dir", "resume")
CALIBRATIONS = ("temperature", "none")
FEATURE_CACHE_MODES = ("auto", "on", "off")
THRESHOLD_POLICIES = ("argmax", "youden", "sensitivity:<0..1>", "specificity:<0..1>")
def parse_threshold_policy(policy: str) -> tuple[str, float | None]:
    """'youden' -> ('youden', None); 'sensitivity:0.95' -> ('sensitivity', 0.95); ConfigError otherwise."""
    match = re.fullmatch(r"(argmax|youden)|(sensitivity|specificity):([0-9.]+)", policy.strip().lower())
    if not match:
        raise ConfigError(f"threshold_policy must be one of {', '.join(THRESHOLD_POLICIES)}; got {policy!r}")
    if match[1]:
        return match[1], None
    target = float(match[3])
    if not 0.0 < target < 1.0:
        raise ConfigError(f"threshold_policy {policy!r}: the target must be in (0, 1)")
    return match[2], target


@dataclass(frozen=True)
class TrainConfig(DataConfig, RunTarget):
    split_table: str = setting("", "a data step's split table (runs:/<data run>/data/split.csv), read instead of "
                                   "discovering and splitting again")
    variant: str = setting("densenet", f"the model: {', '.join(VARIANTS)}")
    image_size: int = setting(128, "the images' side in pixels, as the network sees them")
    augment: str = setting("none", "training augmentation: none, seed (the reports' x3), random (flips, rotations, "
                                   "colour jitter) or hed (flips, rotations, stain jitter)")
    stain_norm: str = setting("none", "stain normalisation to a reference fitted on the training images: none, "
                                      "macenko or reinhard")
    backbone: str = setting("densenet121", f"the pretrained backbone: {', '.join(BACKBONES)}")
    weights: str = setting("imagenet", "the backbone's weights: imagenet (downloaded), none, or a .h5 file")
    alpha: float = setting(1.0, "MobileNets' width multiplier")
    unfrozen_blocks: int = setting(BACKBONE_BLOCKS, "backbone stages trained, from the top: 0 frozen, 3 all")
    warmup_epochs: int = setting(0, "epochs that train the head alone on the frozen backbone before the unfrozen "
                                    "stages are fine-tuned with it (a random head's first gradients would "
                                    "otherwise reach the pretrained filters)")
    warmup_learning_rate: float = setting(1e-3, "the head warm-up's learning rate")
    feature_cache: str = setting("auto", "train the head on the frozen backbone's features, computed once per image "
                                         "and cached: auto (the head warm-up; and a frozen backbone's whole fit "
                                         "when augment is none or seed, which the cache holds exactly), on (also "
                                         "random and hed, trained as the seed copies without colour jitter) or "
                                         "off (every epoch through the backbone)")
    fusion_width: int = setting(64, "units of each tap's dense layer in the fusion head")
    head_batchnorm: bool = setting(True, "BatchNormalization in the fusion head")
    fusion_taps: str = setting("all", "the backbone taps the head fuses: all (multi-scale fusion) or last (the "
                                      "deepest block alone, the fusion's ablation)")
    dropout: float = setting(0.45, "dropout before the classifier")
    optimizer: str = setting("adam", f"the optimizer: {', '.join(OPTIMIZERS)}")
    learning_rate: float = setting(1e-5, "the optimizer's learning rate")
    batch_size: int = setting(64, "images per batch")
    epochs: int = setting(50, "at most this many epochs (early stopping on validation loss)")
    patience: int = setting(10, "epochs without a lower validation loss before training stops (the best "
                                "epoch's weights kept)")
    lr_patience: int = setting(5, "epochs without a lower validation loss before the learning rate halves")
    class_weight: str = setting("none", "none, or balanced: classes weighted by inverse frequency")
    mixed_precision: bool = setting(False, "float16 compute with float32 weights and softmax (for GPUs)")
    calibration: str = setting("temperature", "temperature scaling of the probabilities, fitted on validation, "
                                              "or none")
    threshold_policy: str = setting("argmax", "the decision threshold, chosen on validation: argmax (0.5), "
                                              "youden, sensitivity:<target> or specificity:<target>")
    bootstrap: int = setting(1000, "resamples of the test patients for the test metrics' 95 % intervals (0: none)")
    tta: str = setting("none", "test-time augmentation of evaluation and of the served model: none or dihedral8 "
                               "(the mean over the 8 rotations and mirror images)")
    gradcam_per_class: int = setting(3, "test images per class in the Grad-CAM figure")
    image_cache: str = setting(USER_CACHE, "where the training and validation images are kept once decoded, and "
                                           "a frozen backbone's features (default: <cache>/images and "
                                           "<cache>/features, the user's cache folder or $HISTOFLOW_CACHE; none: "
                                           "decode them every epoch, features kept for the run only)")
    checkpoint_dir: str = setting(USER_CACHE, "where every epoch is saved until the run ends (default: "
                                              "<cache>/checkpoints; none: no checkpoints)")
    resume: str = setting("", "the id of a killed training run to continue from its last saved epoch")

    @property
    def uses_backbone(self) -> bool:
        return self.variant in BACKBONE_VARIANTS

    @property
    def model_name(self) -> str:
        return f"{self.backbone}_fusion" if self.uses_backbone else CNN_MODELS[self.variant]

    def to_params(self) -> dict[str, Any]:
        """Parameters as logged to MLflow: those of this variant, and the model's name."""
        params = {k: v for k, v in asdict(self).items()
                  if k in variant_fields(self.variant) and k not in LOCAL_FIELDS}
        if not self.split_table:
            params.pop("split_table")
        return {**params, "model": self.model_name}

    def validate(self) -> None:
        super().validate()
        checks = [
            (self.variant in VARIANTS, f"variant must be one of {', '.join(VARIANTS)}; got {self.variant!r}"),
            (self.augment in AUGMENTATIONS, f"augment must be one of {', '.join(AUGMENTATIONS)}; got {self.augment!r}"),
            (self.stain_norm in STAIN_METHODS,
             f"stain_norm must be one of {', '.join(STAIN_METHODS)}; got {self.stain_norm!r}"),
            (self.backbone in BACKBONES, f"backbone must be one of {', '.join(BACKBONES)}; got {self.backbone!r}"),
            (self.backbone not in ALPHA_BACKBONES or self.alpha in ALPHA_BACKBONES[self.backbone],
             f"{self.backbone} alpha must be one of {ALPHA_BACKBONES.get(self.backbone)}; got {self.alpha}"),
            (self.optimizer in OPTIMIZERS, f"optimizer must be one of {', '.join(OPTIMIZERS)}; got {self.optimizer!r}"),
            (self.class_weight in CLASS_WEIGHTS, f"class_weight must be one of {', '.join(CLASS_WEIGHTS)}"),
            (16 <= self.image_size <= 1024, "image_size must be in 16..1024"),
            (0 <= self.unfrozen_blocks <= BACKBONE_BLOCKS, f"unfrozen_blocks must be in 0..{BACKBONE_BLOCKS}"),
            (0.0 <= self.dropout < 1.0, "dropout must be in [0, 1)"),
            (0.0 < self.learning_rate < 1.0, "learning_rate must be in (0, 1)"),
            (self.warmup_epochs >= 0, "warmup_epochs must be >= 0"),
            (self.warmup_epochs == 0 or self.unfrozen_blocks > 0,
             "warmup_epochs needs unfrozen_blocks > 0: with a frozen backbone every epoch trains the head alone"),
            (0.0 < self.warmup_learning_rate < 1.0, "warmup_learning_rate must be in (0, 1)"),
            (self.feature_cache in FEATURE_CACHE_MODES,
             f"feature_cache must be one of {', '.join(FEATURE_CACHE_MODES)}; got {self.feature_cache!r}"),
            (1 <= self.fusion_width <= 4096, "fusion_width must be in 1..4096"),
            (self.fusion_taps in FUSION_TAPS, f"fusion_taps must be one of {', '.join(FUSION_TAPS)}"),
            (1 <= self.batch_size <= 4096, "batch_size must be in 1..4096"),
            (self.epochs >= 1, "epochs must be >= 1"),
            (self.patience >= 1 and self.lr_patience >= 1, "patience and lr_patience must be >= 1"),
            (self.gradcam_per_class >= 0, "gradcam_per_class must be >= 0"),
            (self.calibration in CALIBRATIONS, f"calibration must be one of {', '.join(CALIBRATIONS)}"),
            (self.tta in TTA_MODES, f"tta must be one of {', '.join(TTA_MODES)}; got {self.tta!r}"),
            (self.bootstrap == 0 or self.bootstrap >= 100, "bootstrap must be 0 (none) or >= 100 resamples"),
            (self.variant != "densenet" or self.backbone == "densenet121",
             "the densenet variant uses backbone densenet121; use -e transfer for others"),
        ]
        require(checks)
        parse_threshold_policy(self.threshold_policy)


# The models of the variants without a backbone.
CNN_MODELS = {"baseline": "baseline_cnn", "augmented": "baseline_cnn", "cnn_lstm": "cnn_lstm"}
# What only a model with a backbone has: the CNN variants neither take nor log these.
BACKBONE_FIELDS = ("backbone", "weights", "alpha", "unfrozen_blocks", "warmup_epochs", "warmup_learning_rate",
                   "feature_cache", "fusion_width", "head_batchnorm", "fusion_taps")
VARIANT_DEFAULTS: dict[str, dict[str, Any]] = {
    # The reports' CNN: Adam 1e-3, Dropout 0.5, no augmentation.
    "baseline": {"augment": "none", "learning_rate": 1e-3, "dropout": 0.5},
    "augmented": {"augment": "seed", "learning_rate": 1e-3, "dropout": 0.5},
    # The IDC report's CNN + LSTM hybrid, trained as its CNN was.
    "cnn_lstm": {"augment": "none", "learning_rate": 1e-3, "dropout": 0.5},
    # DenseNet121 fine-tuned with Adam 1e-5 and the 0.45 dropout of the fusion report.
    "densenet": {"backbone": "densenet121", "augment": "random", "learning_rate": 1e-5, "dropout": 0.45},
    "transfer": {"backbone": "mobilenet", "alpha": 0.75, "augment": "random", "learning_rate": 1e-4,
                 "dropout": 0.45},
}


def variant_fields(variant: str) -> list[str]:
    """The settings a variant takes, in order (where the run goes excluded)."""
    excluded = set(RUN_TARGET_FIELDS)
    if variant not in BACKBONE_VARIANTS:
        excluded |= set(BACKBONE_FIELDS)
    return [f.name for f in fields(TrainConfig) if f.name not in excluded]


def make_train_config(variant: str, **params: Any) -> TrainConfig:
    """The variant's defaults, overridden by the given (possibly string) parameters, validated."""
    if variant not in VARIANTS:
        raise ConfigError(f"variant must be one of {', '.join(VARIANTS)}; got {variant!r}")
    given = typed_params(TrainConfig, {k: v for k, v in params.items() if k != "variant"})
    foreign = [k for k in given if k not in variant_fields(variant) and k not in RUN_TARGET_FIELDS]
    if foreign:
        raise ConfigError(f"{', '.join(foreign)}: the {variant} variant has no backbone to apply "
                          f"{'it' if len(foreign) == 1 else 'them'} to")
    values = {**VARIANT_DEFAULTS[variant], **given}
    config = replace(TrainConfig(), variant=variant, **values)
    config.validate()
    return config


@dataclass(frozen=True)
class CVConfig:
    """The `cv` entry point: a variant's training settings, and the folds."""

    train: TrainConfig
    folds: int = setting(5, "folds: each patient group held out once per repeat")
    repeats: int = setting(1, "repeats of the folds, each shuffled differently")
    ensemble: bool = setting(False, "also log the fold models of the first repeat, averaged, as the run's serving "
                                    "model")

    def validate(self) -> None:
        self.train.validate()
        require([(2 <= self.folds <= 20, f"folds must be in 2..20; got {self.folds}"),
                 (1 <= self.repeats <= 20, f"repeats must be in 1..20; got {self.repeats}"),
                 (not self.train.split_table, "cv makes its own folds: it takes no split_table"),
                 (not self.train.resume, "cv cannot resume: resume one of its fold runs with train"),
                 (self.train.split == "patient", "cv splits by patient: split must be patient")])


CV_FIELDS = tuple(f.name for f in fields(CVConfig) if f.name != "train")


def make_cv_config(variant: str, **params: Any) -> CVConfig:
    settings = typed_params(CVConfig, {k: v for k, v in params.items() if k in CV_FIELDS})
    config = CVConfig(make_train_config(variant, **{k: v for k, v in params.items() if k not in CV_FIELDS}),
                      **settings)
    config.validate()
    return config
