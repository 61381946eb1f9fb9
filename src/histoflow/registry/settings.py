"""The registry entry points' settings (`register`, `promote`, `rollback`, `compare`) and how a model may be
chosen; a settings module: nothing heavy imported."""

from __future__ import annotations

from dataclasses import dataclass

from histoflow.config import setting
from histoflow.errors import ConfigError
from histoflow.serving.settings import DEFAULT_RUNTIME, check_runtime

DEFAULT_NAME = "histoflow"
DEFAULT_METRIC = "validation_roc_auc"
DEFAULT_POLICY = "registry/gate.yaml"


def check_selection_metric(metric: str) -> None:
    """Choose on validation: a run's validation_* metric, or a cross-validation's mean of one."""
    if not (metric.startswith("validation_") or (metric.startswith("cv_validation_") and metric.endswith("_mean"))):
        raise ConfigError(f"select by a validation metric (validation_*, or cv_validation_*_mean of a "
                          f"cross-validation), not {metric!r}: test metrics are for reporting, not for choosing")


@dataclass(frozen=True)
class RegisterConfig:
    experiment: str = setting("", "the experiment whose runs are candidates (default: the `mlflow run` run's)")
    metric: str = setting(DEFAULT_METRIC, "the validation metric the best run has most of (validation_*, or "
                                          "cv_validation_*_mean among cross-validations); test metrics are for "
                                          "reporting")
    name: str = setting(DEFAULT_NAME, "the registered model")
    include_leaky: bool = setting(False, "let runs on the leaky image-level split be candidates")
    policy: str = setting(DEFAULT_POLICY, "the promotion policy file the alias names come from")
    runtime: str = setting(DEFAULT_RUNTIME, "the served model's runtime: onnx (ONNX Runtime: no TensorFlow where it "
                                            "is served) or tensorflow")

    def validate(self) -> None:
        check_selection_metric(self.metric)
        check_runtime(self.runtime)


@dataclass(frozen=True)
class RollbackConfig:
    name: str = setting(DEFAULT_NAME, "the registered model")
    policy: str = setting(DEFAULT_POLICY, "the promotion policy file the alias names come from")


@dataclass(frozen=True)
class PromoteConfig:
    name: str = setting(DEFAULT_NAME, "the registered model")
    data_dir: str = setting("", "the images both models are evaluated on (default: the challenger's test split)")
    layout: str = setting("auto", "data_dir's layout: auto, breakhis, idc or folders")
    max_images: int = setting(0, "evaluate on a subset of this many images (0: all)")
    policy: str = setting(DEFAULT_POLICY, "the promotion policy file: the gate's thresholds and the alias names")
    # Thresholds in place of the policy file's (None = the file's).
    min_balanced_accuracy: float | None = setting(None, "the challenger's least balanced accuracy (default: the "
                                                        "policy file's)")
    min_recall: float | None = setting(None, "the challenger's least recall of the malignant class (default: the "
                                             "policy file's)")
    min_balanced_accuracy_gain: float | None = setting(None, "how much the challenger must beat the champion's "
                                                             "balanced accuracy by (default: the policy file's)")
    max_recall_drop: float | None = setting(None, "how much recall the challenger may lose against the champion "
                                                  "(default: the policy file's)")


@dataclass(frozen=True)
class CompareConfig:
    experiment: str = setting("", "the experiment to tabulate (default: the `mlflow run` run's)")
    dataset: str = setting("", "only runs on this dataset (default: every dataset)")
    output_dir: str = setting("outputs", "where comparison.csv and comparison.md are written")
