"""The model variants of the published reports, and the settings of a training run.

One dataclass holds every setting of a training run; each variant overrides the defaults the reports
used. The data settings are the data step's own (``DataConfig``), inherited, not repeated.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields, replace
from typing import Any

from histoflow.config import USER_CACHE, require, typed_params
from histoflow.data.pipeline import AUGMENTATIONS
from histoflow.data.settings import DataConfig
from histoflow.data.stain import STAIN_METHODS
from histoflow.errors import ConfigError
from histoflow.modeling.architectures import ALPHA_BACKBONES, BACKBONE_BLOCKS, BACKBONES, OPTIMIZERS
from histoflow.modeling.calibration import CALIBRATIONS, parse_threshold_policy
from histoflow.modeling.inference import TTA_MODES
from histoflow.tracking import RUN_TARGET_FIELDS, RunTarget

VARIANTS = ("baseline", "augmented", "cnn_lstm", "densenet", "transfer")
# The variants built on a pretrained backbone: they have the fusion head, and features to cache for tuning.
BACKBONE_VARIANTS = ("densenet", "transfer")
CLASS_WEIGHTS = ("none", "balanced")
# Where this machine keeps a run's files, not what the run does: neither logged nor compared on resume.
LOCAL_FIELDS = ("image_cache", "checkpoint_dir", "resume")


@dataclass(frozen=True)
class TrainConfig(DataConfig, RunTarget):
    split_table: str = ""  # a data step's split table (runs:/<id>/data/split.csv) instead of discovering again
    variant: str = "densenet"
    image_size: int = 128
    augment: str = "none"
    stain_norm: str = "none"  # none, macenko or reinhard: reference fitted on the training images
    backbone: str = "densenet121"
    weights: str = "imagenet"
    alpha: float = 1.0
    unfrozen_blocks: int = BACKBONE_BLOCKS  # backbone stages trained, from the top: 0 = frozen, 3 = all
    # Epochs that train the head alone (backbone frozen, at warmup_learning_rate) before the unfrozen
    # stages are fine-tuned with it at learning_rate for up to `epochs` more: a random head's first
    # gradients would otherwise flow into the pretrained filters.
    warmup_epochs: int = 0
    warmup_learning_rate: float = 1e-3
    fusion_width: int = 64
    head_batchnorm: bool = True
    dropout: float = 0.45
    optimizer: str = "adam"
    learning_rate: float = 1e-5
    batch_size: int = 64
    epochs: int = 50
    patience: int = 10
    lr_patience: int = 5
    class_weight: str = "none"
    mixed_precision: bool = False  # float16 compute, float32 weights and softmax: for GPUs
    calibration: str = "temperature"  # fitted on validation: temperature or none
    threshold_policy: str = "argmax"  # chosen on validation: argmax, youden, sensitivity:<x>, specificity:<x>
    bootstrap: int = 1000  # resamples of patients for the test metrics' 95 % intervals; 0 = none
    tta: str = "none"  # test-time augmentation of evaluation and of the served model: none or dihedral8
    gradcam_per_class: int = 3
    # Decoded training and validation images, uint8 on disk (none: decode them every epoch instead; "": the
    # images folder of the user's cache, histoflow.config.cache_root).
    image_cache: str = USER_CACHE
    # Every epoch saved under <checkpoint_dir>/<run id> until the run ends (none: no checkpoints; "": the
    # checkpoints folder of the user's cache).
    checkpoint_dir: str = USER_CACHE
    resume: str = ""  # the id of a killed training run to continue from its last saved epoch

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
            (1 <= self.fusion_width <= 4096, "fusion_width must be in 1..4096"),
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
                   "fusion_width", "head_batchnorm")
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
