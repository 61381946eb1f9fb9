"""The `tune` entry point's settings and the choices they allow (a settings module: nothing heavy imported)."""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

from histoflow.config import FOLDER_OFF, USER_CACHE, cache_root, require, setting, typed_params
from histoflow.errors import ConfigError
from histoflow.modeling.variants import BACKBONE_VARIANTS, TrainConfig, make_train_config
from histoflow.tuning.search_space import DEFAULT_SEARCH_SPACE, SearchSpace, load_search_space

SAMPLERS = ("tpe", "random")
PRUNERS = ("median", "none")
# Keras' names for the per-epoch validation metrics of compile_model, and which way is better.
METRICS = {"val_auc": "maximize", "val_accuracy": "maximize", "val_loss": "minimize"}
# The widest head a trial can have: HeadTrainer's largest bucket.
MAX_FUSION_WIDTH = 256


@dataclass(frozen=True)
class TuneConfig:
    """The `tune` entry point: the variant's training settings (with the search space's fixed values), the
    search space, and the study's own settings."""

    train: TrainConfig
    space: SearchSpace
    n_trials: int = setting(20, "the study's trials in all: a study run again adds only those still missing")
    timeout: float = setting(0.0, "stop starting trials after this many seconds (0: no limit)")
    study_name: str = setting("", "the Optuna study (default: <variant>-<backbone>-<hash of the features and the "
                                  "search space>, so the same data and space resume the same study)")
    storage: str = setting(USER_CACHE, "the study's database: a SQLAlchemy URL (PostgreSQL for workers on several "
                                       "machines; default: sqlite:///<cache>/optuna.db)")
    sampler: str = setting("tpe", f"Optuna's sampler: {', '.join(SAMPLERS)}")
    pruner: str = setting("median", f"Optuna's pruner: {', '.join(PRUNERS)}")
    metric: str = setting("val_auc", f"what trials are ranked by: {', '.join(METRICS)}")
    trial_epochs: int = setting(20, "epochs of each trial (the head alone, on cached features)")
    folds: int = setting(1, "1: trials are scored on the run's validation split and the best trained as one run; "
                            "2..20: on the inner validation splits of the cv entry point's patient folds (the "
                            "mean), and the best cross-validated on those folds")
    cache_dir: str = setting(USER_CACHE, "where the backbone's features are kept (default: <cache>/features)")
    heartbeat_interval: int = setting(60, "seconds between a running trial's heartbeats (0: none)")
    grace_period: int = setting(0, "seconds without a heartbeat before a trial's worker counts as dead (0: twice "
                                   "heartbeat_interval)")
    search_space: str = setting(DEFAULT_SEARCH_SPACE, "the YAML file of the searched and the fixed settings")
    final: bool = setting(True, "train the best parameters in full once the study's trials are done (one worker "
                                "of a shared study does); false: trials only")

    def validate(self) -> None:
        widest = self.space.searched.get("fusion_width")
        checks = [
            (self.n_trials >= 1, f"n_trials must be >= 1; got {self.n_trials}"),
            (self.timeout >= 0, "timeout must be >= 0 seconds (0 = no limit)"),
            (self.sampler in SAMPLERS, f"sampler must be one of {', '.join(SAMPLERS)}; got {self.sampler!r}"),
            (self.pruner in PRUNERS, f"pruner must be one of {', '.join(PRUNERS)}; got {self.pruner!r}"),
            (self.metric in METRICS, f"metric must be one of {', '.join(METRICS)}; got {self.metric!r}"),
            (self.trial_epochs >= 1, "trial_epochs must be >= 1"),
            (self.folds == 1 or 2 <= self.folds <= 20, f"folds must be 1 (one split) or in 2..20; got {self.folds}"),
            (self.folds == 1 or self.train.split == "patient",
             "tune with folds cross-validates by patient: split must be patient"),
            (self.folds == 1 or not self.train.split_table, "tune with folds makes its own folds: no split_table"),
            (self.cache_dir.strip().lower() != FOLDER_OFF,
             "cache_dir must be a folder: trials train on cached features"),
            (self.heartbeat_interval >= 0, "heartbeat_interval must be >= 0 seconds (0 = no heartbeats)"),
            # A grace not longer than the interval would fail trials that are alive between two beats.
            (self.grace_period == 0 or self.grace_period > self.heartbeat_interval,
             "grace_period must be longer than heartbeat_interval (0 = twice heartbeat_interval)"),
            (max(getattr(widest, "high", 0), self.train.fusion_width) <= MAX_FUSION_WIDTH,
             f"fusion_width can be at most {MAX_FUSION_WIDTH} in a study"),
        ]
        require(checks)


# Settings of `tune` itself (the rest are the variant's training settings).
STUDY_FIELDS = tuple(f.name for f in fields(TuneConfig) if f.name not in ("train", "space"))


def default_storage() -> str:
    """The study database when none is given: in the cache root, never the working folder (`mlflow run .` runs
    in the project itself). Every trial is an MLflow run as well; the database is what a study resumes from."""
    return f"sqlite:///{cache_root() / 'optuna.db'}"


def make_tune_config(variant: str, **params: Any) -> TuneConfig:
    """Validated settings from (possibly string) parameters: the study's here, the training run's via
    make_train_config; the search space's fixed values apply unless given, its searched ones cannot be."""
    if variant not in BACKBONE_VARIANTS:
        raise ConfigError(f"tune applies to the variants {', '.join(BACKBONE_VARIANTS)} (a frozen backbone whose "
                          f"features can be cached); got {variant!r}")
    settings = typed_params(TuneConfig, {k: v for k, v in params.items() if k in STUDY_FIELDS})
    if not str(settings.get("storage", USER_CACHE)).strip():
        settings["storage"] = default_storage()
    space = load_search_space(settings.get("search_space", DEFAULT_SEARCH_SPACE))
    given = {k: v for k, v in params.items() if k not in STUDY_FIELDS and v not in (None, "")}
    searched = sorted(set(given) & set(space.searched))
    if searched:
        raise ConfigError(f"{', '.join(searched)}: searched by the study ({space.source}); fix "
                          f"{'it' if len(searched) == 1 else 'them'} there to set a value")
    train = make_train_config(variant, **{**space.fixed, **given})
    config = TuneConfig(train, space, **settings)
    config.validate()
    return config
