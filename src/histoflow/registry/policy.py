"""The promotion policy: thresholds of the gate and the alias names, read from registry/gate.yaml.

Thresholds follow fmind/mlops-python-package: absolute floors always, and against a champion a
minimum gain in balanced accuracy and a maximum drop in malignant recall, checked by
`mlflow.validate_evaluation_results`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields, replace
from typing import Any

from mlflow.models import MetricThreshold

from histoflow.config import coerce, field_kinds, find_file, read_yaml
from histoflow.errors import ConfigError
from histoflow.registry.settings import DEFAULT_POLICY


@dataclass(frozen=True)
class Gate:
    """Against a champion: balanced accuracy must improve by `min_balanced_accuracy_gain` (0: must not
    drop) and malignant recall must not drop by more than `max_recall_drop`; always: absolute floors."""

    min_balanced_accuracy: float
    min_recall: float
    min_balanced_accuracy_gain: float
    max_recall_drop: float

    def __post_init__(self) -> None:
        for name, value in asdict(self).items():
            if not 0.0 <= value <= 1.0:
                raise ConfigError(f"{name} must be in 0..1; got {value}")

    def thresholds(self, champion: dict[str, float] | None) -> dict[str, MetricThreshold]:
        bal, rec = self.min_balanced_accuracy, self.min_recall
        gain = {}
        if champion is not None:
            rec = max(rec, champion["recall_score"] - self.max_recall_drop)
            if self.min_balanced_accuracy_gain > 0:
                gain = {"min_absolute_change": self.min_balanced_accuracy_gain}
            else:
                bal = max(bal, champion["balanced_accuracy"])
        return {
            "balanced_accuracy": MetricThreshold(threshold=bal, greater_is_better=True, **gain),
            "recall_score": MetricThreshold(threshold=rec, greater_is_better=True),
        }


@dataclass(frozen=True)
class Aliases:
    challenger: str
    champion: str
    previous: str


@dataclass(frozen=True)
class Policy:
    gate: Gate
    aliases: Aliases
    source: str = ""


def _section(content: dict, name: str, cls: type, where: str) -> Any:
    section = content.get(name)
    expected = [f.name for f in fields(cls)]
    if not isinstance(section, dict) or sorted(section) != sorted(expected):
        raise ConfigError(f"{where}: {name} must set exactly {', '.join(expected)}; got "
                          f"{sorted(section) if isinstance(section, dict) else section!r}")
    kinds = field_kinds(cls)
    return cls(**{k: coerce(f"{name}.{k}", v, kinds[k]) for k, v in section.items()})


def load_policy(path: str = DEFAULT_POLICY, **overrides: Any) -> Policy:
    """The policy in `path`, with thresholds given as parameters (None or "" = the file's) in their place."""
    found = find_file(path, "promotion policy")
    content = read_yaml(found, "promotion policy")
    unknown = sorted(set(content) - {"thresholds", "aliases"})
    if unknown:
        raise ConfigError(f"promotion policy {found}: unknown section {unknown[0]!r}; known: thresholds, aliases")
    gate = _section(content, "thresholds", Gate, f"promotion policy {found}")
    kinds = field_kinds(Gate)
    if set(overrides) - set(kinds):
        raise ConfigError(f"unknown threshold {sorted(set(overrides) - set(kinds))[0]!r}; known: {', '.join(kinds)}")
    given = {k: coerce(k, v, kinds[k]) for k, v in overrides.items() if v not in (None, "")}
    return Policy(replace(gate, **given), _section(content, "aliases", Aliases, f"promotion policy {found}"),
                  str(found))
