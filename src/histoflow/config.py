"""Experiment configuration: one dataclass for every variant, with the reports' defaults per variant."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields, replace
from typing import Any

from histoflow.datasets import LAYOUTS, MAGNIFICATIONS
from histoflow.errors import ConfigError
from histoflow.models import BACKBONES
from histoflow.pipeline import AUGMENTATIONS
from histoflow.splits import SPLIT_MODES

VARIANTS = ("baseline", "augmented", "densenet", "transfer")
DEFAULT_DATA_DIR = "data/breakhis"


@dataclass(frozen=True)
class TrainConfig:
    variant: str = "densenet"
    data_dir: str = DEFAULT_DATA_DIR
    layout: str = "auto"
    magnification: str = "all"
    max_images: int = 0
    split: str = "patient"
    val_fraction: float = 0.2
    test_fraction: float = 0.2
    image_size: int = 128
    augment: str = "none"
    backbone: str = "densenet121"
    weights: str = "imagenet"
    alpha: float = 1.0
    freeze_backbone: bool = False
    fusion_width: int = 64
    dropout: float = 0.45
    learning_rate: float = 1e-5
    batch_size: int = 64
    epochs: int = 50
    patience: int = 10
    lr_patience: int = 5
    class_weight: str = "none"
    seed: int = 42
    mixed_precision: bool = False  # float16 compute, float32 weights and softmax: for GPUs
    experiment: str = ""  # "" = MLflow's choice: the `mlflow run` run's, MLFLOW_EXPERIMENT_NAME, or Default
    run_name: str = ""
    gradcam_per_class: int = 3

    @property
    def uses_backbone(self) -> bool:
        return self.variant in ("densenet", "transfer")

    @property
    def model_name(self) -> str:
        return f"{self.backbone}_fusion" if self.uses_backbone else "baseline_cnn"

    def to_params(self) -> dict[str, Any]:
        """Parameters as logged to MLflow (backbone fields only where they apply)."""
        params = asdict(self)
        for key in ("experiment", "run_name"):  # where the run goes, not how the model was made
            params.pop(key)
        if not self.uses_backbone:
            for key in ("backbone", "weights", "alpha", "freeze_backbone", "fusion_width"):
                params.pop(key)
        params["model"] = self.model_name
        return params


VARIANT_DEFAULTS: dict[str, dict[str, Any]] = {
    # The reports' CNN: Adam 1e-3, Dropout 0.5, no augmentation.
    "baseline": {"augment": "none", "learning_rate": 1e-3, "dropout": 0.5},
    "augmented": {"augment": "seed", "learning_rate": 1e-3, "dropout": 0.5},
    # DenseNet121 fine-tuned with Adam 1e-5 and the 0.45 dropout of the fusion report.
    "densenet": {"backbone": "densenet121", "augment": "random", "learning_rate": 1e-5, "dropout": 0.45},
    "transfer": {"backbone": "mobilenet", "alpha": 0.75, "augment": "random", "learning_rate": 1e-4,
                 "dropout": 0.45},
}

_TRUE = {"true", "1", "yes", "on"}
_FALSE = {"false", "0", "no", "off"}


_KINDS = {"int": int, "float": float, "bool": bool, "str": str}
_KIND_NAMES = {int: "an integer", float: "a number", bool: "true or false", str: "a string"}


def coerce(name: str, value: Any, kind: type) -> Any:
    if value is None or isinstance(value, kind) and not (kind is int and isinstance(value, bool)):
        return value
    text = str(value).strip()
    try:
        if kind is bool:
            if text.lower() in _TRUE | _FALSE:
                return text.lower() in _TRUE
            raise ValueError
        if kind is int:
            return int(float(text)) if float(text).is_integer() else int(text)
        return kind(text)
    except ValueError:
        raise ConfigError(f"parameter {name} must be {_KIND_NAMES[kind]}; got {value!r}") from None


def coerce_fields(cls: type, params: dict[str, Any], exclude: tuple[str, ...] = (), strict: bool = True
                  ) -> dict[str, Any]:
    """A dataclass's fields from (possibly string) parameters, e.g. MLproject's; None or "" = its default.

    strict: an unknown parameter is an error; otherwise it is left for another config to take.
    """
    kinds = {f.name: _KINDS[f.type] for f in fields(cls) if f.name not in exclude}
    unknown = sorted(set(params) - set(kinds))
    if strict and unknown:
        raise ConfigError(f"unknown parameter {unknown[0]!r}; known: {', '.join(sorted(kinds))}")
    return {k: coerce(k, v, kinds[k]) for k, v in params.items() if k in kinds and v is not None and v != ""}


def make_config(variant: str, **overrides: Any) -> TrainConfig:
    """The variant's defaults, overridden by the given (possibly string) parameters, validated."""
    if variant not in VARIANTS:
        raise ConfigError(f"variant must be one of {', '.join(VARIANTS)}; got {variant!r}")
    values = {**VARIANT_DEFAULTS[variant], **coerce_fields(TrainConfig, overrides, exclude=("variant",))}
    config = replace(TrainConfig(), variant=variant, **values)
    validate(config)
    return config


def validate(c: TrainConfig) -> None:
    checks = [
        (c.layout in LAYOUTS, f"layout must be one of {LAYOUTS}"),
        (str(c.magnification).lower().rstrip("x") in MAGNIFICATIONS, f"magnification must be one of {MAGNIFICATIONS}"),
        (c.split in SPLIT_MODES, f"split must be one of {SPLIT_MODES}"),
        (c.augment in AUGMENTATIONS, f"augment must be one of {AUGMENTATIONS}"),
        (c.backbone in BACKBONES, f"backbone must be one of {tuple(BACKBONES)}"),
        (c.class_weight in ("none", "balanced"), "class_weight must be none or balanced"),
        (16 <= c.image_size <= 1024, "image_size must be in 16..1024"),
        (0.0 <= c.dropout < 1.0, "dropout must be in [0, 1)"),
        (0.0 < c.learning_rate < 1.0, "learning_rate must be in (0, 1)"),
        (1 <= c.fusion_width <= 4096, "fusion_width must be in 1..4096"),
        (1 <= c.batch_size <= 4096, "batch_size must be in 1..4096"),
        (c.epochs >= 1, "epochs must be >= 1"),
        (c.max_images >= 0, "max_images must be >= 0 (0 = all)"),
        (c.patience >= 1 and c.lr_patience >= 1, "patience and lr_patience must be >= 1"),
        (0.0 < c.val_fraction < 0.5 and 0.0 < c.test_fraction < 0.5, "val_fraction and test_fraction must be in (0, 0.5)"),
        (c.gradcam_per_class >= 0, "gradcam_per_class must be >= 0"),
    ]
    if c.variant == "densenet" and c.backbone != "densenet121":
        checks.append((False, "the densenet variant uses backbone densenet121; use -e transfer for others"))
    for ok, message in checks:
        if not ok:
            raise ConfigError(message)
