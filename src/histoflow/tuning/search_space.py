"""The search space of `tune`, read from a YAML file the user edits (tuning/search_space.yaml).

Each entry names a training setting and either searches it, with a range (``{low, high}``, optional
``log`` and ``step``) or a list (``{choices: [...]}``), or fixes it to one value. Trials train the
fusion head on cached features of the frozen backbone, so only what the head's training depends on
can be searched; `unfrozen_blocks` shapes the final run only and takes one value.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Any

import optuna
from optuna.distributions import (
    BaseDistribution,
    CategoricalDistribution,
    FloatDistribution,
    IntDistribution,
    distribution_to_json,
)

from histoflow.config import coerce, field_kinds, find_file, read_yaml
from histoflow.errors import ConfigError
from histoflow.modeling.variants import TrainConfig

DEFAULT_SEARCH_SPACE = "tuning/search_space.yaml"
# What a trial on cached features can vary: the head, its optimizer and its batches.
SEARCHABLE = ("learning_rate", "dropout", "fusion_width", "optimizer", "batch_size", "head_batchnorm", "class_weight")
# What only the final run uses: the trials see the frozen backbone's features whatever it is.
FINAL_RUN_ONLY = ("unfrozen_blocks",)
RANGE_KEYS = {"low", "high", "log", "step"}


@dataclass(frozen=True)
class SearchSpace:
    searched: dict[str, BaseDistribution]  # knob -> Optuna distribution
    fixed: dict[str, Any]  # knob -> the value every trial and the final run take
    source: str = ""  # the file it was read from
    text: str = field(default="", repr=False)  # the file's content, logged with the study

    def suggest(self, trial: optuna.Trial) -> dict[str, Any]:
        """The trial's values of the searched knobs (Optuna's suggest_* API, so samplers see each space)."""
        values = {}
        for name, dist in self.searched.items():
            if isinstance(dist, FloatDistribution):
                values[name] = trial.suggest_float(name, dist.low, dist.high, log=dist.log, step=dist.step)
            elif isinstance(dist, IntDistribution):
                values[name] = trial.suggest_int(name, dist.low, dist.high, log=dist.log, step=dist.step)
            else:
                values[name] = trial.suggest_categorical(name, dist.choices)
        return values

    def digest(self) -> str:
        """Of what is searched and fixed (not of the file's layout or comments): a study's identity."""
        canonical = {"searched": {k: distribution_to_json(v) for k, v in sorted(self.searched.items())},
                     "fixed": dict(sorted(self.fixed.items()))}
        return hashlib.sha256(json.dumps(canonical, sort_keys=True).encode()).hexdigest()[:16]


def _distribution(name: str, spec: dict, kind: type, where: str) -> BaseDistribution:
    if "choices" in spec:
        if set(spec) != {"choices"} or not isinstance(spec["choices"], list) or not spec["choices"]:
            raise ConfigError(f"{where}: {name}: choices must be a non-empty list, alone")
        return CategoricalDistribution([coerce(name, c, kind) for c in spec["choices"]])
    if not {"low", "high"} <= set(spec) <= RANGE_KEYS:
        raise ConfigError(f"{where}: {name} must be one value, {{choices: [...]}} or {{low, high[, log, step]}}; "
                          f"got {spec}")
    if kind not in (int, float):
        raise ConfigError(f"{where}: {name} is not a number: give {{choices: [...]}}")
    low, high = coerce(name, spec["low"], kind), coerce(name, spec["high"], kind)
    log = bool(spec.get("log", False))
    step = coerce(name, spec["step"], kind) if "step" in spec else None
    try:
        if kind is int:
            return IntDistribution(low, high, log=log, step=step or 1)
        return FloatDistribution(low, high, log=log, step=step)
    except ValueError as exc:
        raise ConfigError(f"{where}: {name}: {exc}") from None


def _check_values(space: SearchSpace, where: str) -> None:
    """Every value the space can give must make a valid training run (e.g. dropout < 1)."""
    def candidates(dist: BaseDistribution) -> list:
        return list(dist.choices) if isinstance(dist, CategoricalDistribution) else [dist.low, dist.high]

    for name, dist in space.searched.items():
        for value in candidates(dist):
            try:
                TrainConfig(**{**space.fixed, name: value}).validate()
            except ConfigError as exc:
                raise ConfigError(f"{where}: {name} can take {value!r}: {exc}") from None
    try:
        TrainConfig(**space.fixed).validate()
    except ConfigError as exc:
        raise ConfigError(f"{where}: {exc}") from None


def load_search_space(path: str = DEFAULT_SEARCH_SPACE) -> SearchSpace:
    found = find_file(path, "search space")
    content = read_yaml(found, "search space")
    kinds = field_kinds(TrainConfig)
    searched, fixed = {}, {}
    for name, spec in content.items():
        if name not in SEARCHABLE + FINAL_RUN_ONLY:
            raise ConfigError(f"search space {path}: {name!r} is not a setting tune can vary; known: "
                              f"{', '.join(SEARCHABLE + FINAL_RUN_ONLY)}")
        if isinstance(spec, dict):
            if name in FINAL_RUN_ONLY:
                raise ConfigError(f"search space {path}: {name} shapes the final run only (trials train the head "
                                  "on the frozen backbone's features): give it one value")
            searched[name] = _distribution(name, spec, kinds[name], f"search space {path}")
        else:
            fixed[name] = coerce(name, spec, kinds[name])
    space = SearchSpace(searched, fixed, source=str(found), text=found.read_text())
    _check_values(space, f"search space {path}")
    return space
