"""Every entry point from one definition: its settings class, its `histoflow` command and its MLproject entry.

The MLproject file is rendered from the settings dataclasses (``histoflow mlproject``), so a default
lives in one place, the code, and the MLproject cannot disagree with it. A setting whose default is
derived when it is not given ("" or None: the variant's backbone in `tune`, a split table, a promotion
threshold from the policy file) is not declared in the MLproject, where `mlflow run` would log its
placeholder as the value used; it is still accepted with -P, and the run logs the value it used.
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Callable
from dataclasses import dataclass, fields
from typing import Any

from histoflow.config import RUN_TARGET_FIELDS, RunTarget, field_kinds
from histoflow.data.settings import DataStepConfig, DownloadConfig
from histoflow.modeling.variants import (
    BACKBONE_VARIANTS,
    CV_FIELDS,
    VARIANTS,
    CVConfig,
    TrainConfig,
    make_train_config,
    variant_fields,
)
from histoflow.registry.settings import CompareConfig, PromoteConfig, RegisterConfig, RollbackConfig
from histoflow.serving.settings import AppConfig, PredictConfig, SlideConfig
from histoflow.tuning.search_space import FINAL_RUN_ONLY, SEARCHABLE
from histoflow.tuning.settings import STUDY_FIELDS, TuneConfig
from histoflow.workflow import WorkflowConfig

MLPROJECT_TYPES = {int: "float", float: "float", bool: "string", str: "string"}  # MLflow checks numbers only
# The commands other than train and tune (which take a variant): their settings class and what they run, as
# "module:function", imported only when the command runs (those modules load TensorFlow or MLflow).
COMMANDS: dict[str, tuple[type, str]] = {
    "data": (DataStepConfig, "histoflow.data.step:run"), "main": (WorkflowConfig, "histoflow.workflow:run"),
    "download": (DownloadConfig, "histoflow.data.download:run"),
    "compare": (CompareConfig, "histoflow.registry.comparison:run"),
    "register": (RegisterConfig, "histoflow.registry.aliases:run_register"),
    "promote": (PromoteConfig, "histoflow.registry.promotion:run"),
    "rollback": (RollbackConfig, "histoflow.registry.aliases:run_rollback"),
    "predict": (PredictConfig, "histoflow.serving.batch_predict:run"),
    "predict-slide": (SlideConfig, "histoflow.serving.slide_predict:run"),
    "app": (AppConfig, "histoflow.serving.web_app:run"),
}


def runner(target: str) -> Callable[[Any], Any]:
    """The function a command runs ("module:function"), imported now."""
    module, _, name = target.partition(":")
    return getattr(importlib.import_module(module), name)


COMMENTS = {
    "cv": "Patient-level cross-validation of a training variant: each fold a nested training run, the parent "
          "holds mean, std and 95 % interval of every metric and the pooled out-of-fold predictions.",
    "tune": "Optuna study of the fusion head on cached backbone features (tuning/README.md), then the best "
            "parameters as a full run; what is searched or fixed is in the search_space file.",
    "data": "The data step alone: discover, split, log the data report and the split table.",
    "main": "The whole study (docs/workflow.md): data -> variants -> tune -> register -> promote -> comparison, "
            "each step an `mlflow run` of the entries here, reused when already done.",
    "download": "Fetch, verify and extract a public dataset.",
    "compare": "The reports' summary table of the experiment's training runs.",
    "register": "The best run by a validation metric, registered as @challenger (registry/README.md).",
    "promote": "@challenger against @champion on the same images; @champion moves when the gate of the policy "
               "file (registry/gate.yaml) passes.",
    "rollback": "@champion back to @previous.",
    "predict": "Score a folder of images with a registered model.",
    "predict-slide": "Score whole-slide images tile by tile with a registered model: per-tile table, heatmap, "
                     "GeoJSON for QuPath and a slide summary, a folder per slide.",
    "app": "The pathologist's web page (Gradio): upload images, see calls, flags and Grad-CAM overlays, "
           "download CSV; scores with model_uri in-process or through scoring_url.",
}


@dataclass(frozen=True)
class Parameter:
    name: str
    kind: type
    default: Any  # dataclasses.MISSING: required
    help: str = ""  # what the setting means (its field's)

    @property
    def optional(self) -> bool:
        """Derived when not given: accepted, but not declared in the MLproject."""
        return self.default is None or self.default == ""


@dataclass(frozen=True)
class EntryPoint:
    name: str
    command: str  # the `histoflow` command line before the parameters
    parameters: list[Parameter]
    comment: str


def parameters(cls: type, names: list[str] | None = None, defaults: dict[str, Any] | None = None) -> list[Parameter]:
    """Parameters of a settings class (default: every field), with its defaults or the given ones."""
    kinds, by_name = field_kinds(cls), {f.name: f for f in fields(cls)}
    out = []
    for name in names if names is not None else list(by_name):
        f = by_name[name]
        default = dataclasses.MISSING if f.metadata.get("required") else (defaults or {}).get(name, f.default)
        out.append(Parameter(name, kinds[name], default, f.metadata.get("help", "")))
    return out


def run_cv(config: CVConfig) -> str:
    """The `cv` command: the cross-validation, then (ensemble=true) its fold ensemble logged as its model."""
    import mlflow

    from histoflow.modeling import cross_validation
    from histoflow.registry.selection import classifier_uri

    run_id = cross_validation.run(config)
    if config.ensemble:
        print(f"fold ensemble: {classifier_uri(mlflow.get_run(run_id))}")
    return run_id


# The commands that run a variant given as --variant: the variants they take, and their own settings.
VARIANT_COMMANDS: dict[str, tuple[tuple[str, ...], type, tuple[str, ...]]] = {
    "tune": (BACKBONE_VARIANTS, TuneConfig, STUDY_FIELDS),
    "cv": (VARIANTS, CVConfig, CV_FIELDS),
}


def cli_parameters(command: str) -> list[Parameter]:
    """What a `histoflow` command takes (besides --variant for train, tune and cv)."""
    train = parameters(TrainConfig, [f.name for f in fields(TrainConfig) if f.name != "variant"])
    if command == "train":
        return train
    if command in VARIANT_COMMANDS:
        _, cls, own = VARIANT_COMMANDS[command]
        return train + parameters(cls, list(own))
    return parameters(COMMANDS[command][0])


def _variant_command(command: str, default_variant: str, decided_elsewhere: tuple[str, ...] = ()) -> EntryPoint:
    """An entry point over several variants: a training setting is declared when every one of them takes it
    with the same default, and optional otherwise (the variant decides it), as are `decided_elsewhere`."""
    variants, cls, own = VARIANT_COMMANDS[command]
    defaults = [dataclasses.asdict(make_train_config(v)) for v in variants]
    shared = [n for n in variant_fields(variants[0])
              if n != "variant" and all(n in variant_fields(v) for v in variants)]
    common = {n: defaults[0][n] if all(d[n] == defaults[0][n] for d in defaults) and n not in decided_elsewhere
              else "" for n in shared}
    optional = [n for n in variant_fields(BACKBONE_VARIANTS[0]) if n != "variant" and n not in shared]
    return EntryPoint(command, f"histoflow {command}",
                      [Parameter("variant", str, default_variant), *parameters(TrainConfig, shared, common),
                       *parameters(TrainConfig, optional, {n: "" for n in optional}), *parameters(cls, list(own))],
                      COMMENTS[command])


def entry_points() -> list[EntryPoint]:
    points = []
    for variant in VARIANTS:
        names = [n for n in variant_fields(variant) if n != "variant"]
        points.append(EntryPoint(variant, f"histoflow train --variant {variant}",
                                 parameters(TrainConfig, names, dataclasses.asdict(make_train_config(variant))),
                                 f"Train and evaluate the {variant} variant as one run."))
    points.append(_variant_command("tune", "transfer", SEARCHABLE + FINAL_RUN_ONLY))
    points.append(_variant_command("cv", "densenet"))
    for name, (cls, _) in COMMANDS.items():
        # `mlflow run` places the run itself (--experiment-name, --run-name).
        names = [f.name for f in fields(cls) if not (issubclass(cls, RunTarget) and f.name in RUN_TARGET_FIELDS)]
        points.append(EntryPoint(name, f"histoflow {name}", parameters(cls, names), COMMENTS[name]))
    return points


def _spec(param: Parameter) -> str:
    """`{type: ..., default: ...}` as YAML's flow style writes it (quoting what a flow mapping needs quoted)."""
    import yaml

    spec: dict[str, Any] = {"type": MLPROJECT_TYPES[param.kind]}
    if param.default is not dataclasses.MISSING:
        # MLflow passes strings; the command line reads true/false.
        spec["default"] = str(param.default).lower() if isinstance(param.default, bool) else param.default
    return yaml.safe_dump(spec, default_flow_style=True, sort_keys=False, width=10**6).strip()


def _wrap(words: list[str], width: int, indent: str) -> list[str]:
    """Words (or units of words) in lines of at most `width` characters after `indent`."""
    lines, line = [], ""
    for word in words:
        if line and len(indent) + len(line) + 1 + len(word) > width:
            lines.append(indent + line)
            line = word
        else:
            line = f"{line} {word}" if line else word
    return lines + [indent + line] if line else lines


def render_mlproject(width: int = 110) -> str:
    """The MLproject file's text."""
    out = [
        "# histoflow: `mlflow run . -e <entry point> --env-manager local -P key=value ...`",
        "# Rendered by `histoflow mlproject` from the settings classes (src/histoflow/entrypoints.py): defaults",
        "# live there. tests/test_entrypoints.py fails while this file is out of date. `optional` settings are",
        "# derived when not given (the variant's, the policy file's, ...); pass them with -P like the others.",
        "name: histoflow",
        "",
        "conda_env: conda.yaml",
        "",
        "entry_points:",
    ]
    for point in entry_points():
        declared = [p for p in point.parameters if not p.optional]
        optional = [p.name for p in point.parameters if p.optional]
        out += _wrap(point.comment.split(), width, "  # ")
        if optional:
            out += _wrap(["optional:", *optional], width, "  # ")
        out += [f"  {point.name}:", "    parameters:"]
        out += [f"      {p.name}: {_spec(p)}" for p in declared]
        out.append("    command: >-")
        out += _wrap([point.command] + [f"--{p.name} {{{p.name}}}" for p in declared], width, "      ")
        out.append("")
    return "\n".join(out).rstrip() + "\n"
