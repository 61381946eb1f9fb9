"""The whole study in one command (`mlflow run . -e main`): each step an MLflow Projects run.

    data -> training variants -> tune -> register -> promote -> compare

Like MLflow's multistep workflow example, a step whose finished run already exists, with the same
parameters, the same code and the same data, is reused instead of being run again; so a `main` run
that failed at `promote` resumes there, and adding a variant trains only that variant. Register and
promote depend on everything before them: they are reused only when nothing before them ran anew.
The comparison table ends every `main` run.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import mlflow
import pandas as pd
from mlflow.tracking import MlflowClient

from histoflow import tracking
from histoflow.config import VARIANTS, coerce_fields, make_config
from histoflow.errors import ConfigError, HistoflowError

STEP_TAG = "histoflow.workflow.step"
CODE_TAG = "histoflow.code_digest"
DATA_TAG = "histoflow.workflow.data_digest"
PARENT_TAG = "mlflow.parentRunId"
TUNABLE = ("densenet", "transfer")


@dataclass(frozen=True)
class WorkflowConfig:
    data_dir: str = "data/breakhis"
    layout: str = "auto"
    magnification: str = "all"
    max_images: int = 0
    split: str = "patient"
    image_size: int = 128
    batch_size: int = 64
    epochs: int = 50
    seed: int = 42
    variants: str = "baseline,augmented,densenet"  # training steps, in order
    backbone: str = "mobilenet"  # for transfer (and tuning it)
    alpha: float = 0.75
    weights: str = "imagenet"
    tune_variant: str = "densenet"  # "none" skips tuning
    n_trials: int = 20
    trial_epochs: int = 20
    storage: str = "sqlite:///optuna.db"
    model_name: str = "histoflow"
    metric: str = "validation_roc_auc"
    output_dir: str = "outputs/comparison"
    reuse: bool = True

    @property
    def variant_list(self) -> list[str]:
        return [v.strip() for v in self.variants.split(",") if v.strip()]


def make_workflow_config(**params: Any) -> WorkflowConfig:
    """Validated settings from (possibly string) parameters; data settings are checked by make_config."""
    values = coerce_fields(WorkflowConfig, params)
    config = replace(WorkflowConfig(), **values)
    unknown = [v for v in config.variant_list if v not in VARIANTS]
    if not config.variant_list or unknown:
        raise ConfigError(f"variants must be a comma-separated list of {', '.join(VARIANTS)}; got {config.variants!r}")
    if config.tune_variant not in (*TUNABLE, "none"):
        raise ConfigError(f"tune_variant must be one of {', '.join(TUNABLE)} or none; got {config.tune_variant!r}")
    if not config.metric.startswith("validation_"):
        raise ConfigError(f"metric must be a validation metric (validation_*); got {config.metric!r}")
    for variant in {*config.variant_list, *([config.tune_variant] if config.tune_variant != "none" else [])}:
        make_config(variant, **_variant_params(config, variant))  # bad data or model settings fail here
    return config


@dataclass
class Step:
    name: str
    entry_point: str
    parameters: dict[str, str]
    depends_on_all: bool = False  # on every earlier step's result, not only on the data
    run_id: str = ""
    reused: bool = False
    seconds: float = 0.0
    extra: dict[str, str] = field(default_factory=dict)


def _data_params(config: WorkflowConfig) -> dict[str, Any]:
    return {"data_dir": config.data_dir, "layout": config.layout, "magnification": config.magnification,
            "max_images": config.max_images, "split": config.split, "seed": config.seed}


def _variant_params(config: WorkflowConfig, variant: str) -> dict[str, Any]:
    params = {**_data_params(config), "image_size": config.image_size, "batch_size": config.batch_size,
              "epochs": config.epochs}
    if variant == "transfer":
        params.update(backbone=config.backbone, alpha=config.alpha, weights=config.weights)
    elif variant == "densenet":
        params.update(weights=config.weights)
    return params


def plan(config: WorkflowConfig, experiment: str) -> list[Step]:
    def strings(params: dict[str, Any]) -> dict[str, str]:
        return {k: str(v) for k, v in params.items()}

    steps = [Step("data", "data", strings(_data_params(config)))]
    steps += [Step(v, v, strings(_variant_params(config, v))) for v in config.variant_list]
    if config.tune_variant != "none":
        tune = {**_variant_params(config, config.tune_variant), "variant": config.tune_variant,
                "n_trials": config.n_trials, "trial_epochs": config.trial_epochs, "storage": config.storage}
        if config.tune_variant == "densenet":
            tune.pop("backbone", None)
        steps.append(Step("tune", "tune", strings(tune)))
    steps.append(Step("register", "register", strings({"experiment": experiment, "metric": config.metric,
                                                         "name": config.model_name}), depends_on_all=True))
    steps.append(Step("promote", "promote", strings({"name": config.model_name}), depends_on_all=True))
    return steps


def code_digest() -> str:
    """Of the package's source and the MLproject: a step run with other code is not reused."""
    import hashlib

    import histoflow

    package = Path(histoflow.__file__).parent
    files = sorted(package.rglob("*.py"))
    project = package.parents[1] / "MLproject"
    if project.is_file():
        files.append(project)
    digest = hashlib.sha256()
    for path in files:
        digest.update(str(path.relative_to(package.parents[1] if path == project else package)).encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


def find_finished(experiment_id: str, step: Step, code: str, data: str) -> str | None:
    """A finished run of this step with the same parameters, code and data, or None."""
    query = (f"tags.`{STEP_TAG}` = '{step.name}' and tags.`{CODE_TAG}` = '{code}' and "
             f"attributes.status = 'FINISHED'")
    if data:
        query += f" and tags.`{DATA_TAG}` = '{data}'"
    for run in mlflow.search_runs([experiment_id], query, order_by=["attributes.start_time DESC"],
                                  output_format="list"):
        if all(run.data.params.get(k) == v for k, v in step.parameters.items()):
            return run.info.run_id
    return None


def _execute(step: Step, experiment_id: str) -> str:
    submitted = mlflow.projects.run(str(project_root()), entry_point=step.entry_point, parameters=step.parameters,
                                    experiment_id=experiment_id, env_manager="local", synchronous=False)
    if not submitted.wait():
        raise HistoflowError(f"workflow step {step.name!r} ({step.entry_point}) failed: see run "
                             f"{submitted.run_id} in the MLflow UI; re-run main to resume from this step")
    return submitted.run_id


def project_root() -> Path:
    import histoflow

    root = Path(histoflow.__file__).resolve().parents[2]
    if not (root / "MLproject").is_file():
        raise ConfigError(f"the workflow runs the MLproject's entry points; none found at {root} (install histoflow "
                          "from its repository with `pip install -e .`)")
    return root


def run(config: WorkflowConfig) -> dict:
    """Run (or resume) the workflow as a parent run; returns the step table and the comparison."""
    tracking.configure()
    client = MlflowClient()
    code = code_digest()
    with mlflow.start_run(run_name="main") as parent:
        experiment_id = parent.info.experiment_id
        experiment = mlflow.get_experiment(experiment_id).name
        logged = mlflow.get_run(parent.info.run_id).data.params
        mlflow.log_params({k: v for k, v in asdict(config).items() if k not in logged})
        mlflow.set_tags({"histoflow.step": "workflow", CODE_TAG: code})
        tracking.log_environment()
        steps, data, anything_new = plan(config, experiment), "", False
        for step in steps:
            start = time.monotonic()
            reusable = config.reuse and not (step.depends_on_all and anything_new)
            step.run_id = (find_finished(experiment_id, step, code, data) if reusable else None) or ""
            step.reused = bool(step.run_id)
            if not step.reused:
                print(f"workflow: running {step.name} ({step.entry_point})")
                step.run_id = _execute(step, experiment_id)
                client.set_tag(step.run_id, PARENT_TAG, parent.info.run_id)  # nested under main in the UI
                client.set_tag(step.run_id, STEP_TAG, step.name)
                client.set_tag(step.run_id, CODE_TAG, code)
                anything_new = True
            else:
                print(f"workflow: reusing {step.name}: run {step.run_id} (same parameters, code and data)")
            if step.name == "data":
                data = client.get_run(step.run_id).data.tags["dataset.digest"]
            if not step.reused:
                client.set_tag(step.run_id, DATA_TAG, data)
            step.seconds = time.monotonic() - start
            mlflow.set_tag(f"step.{step.name}", step.run_id)
        table = _compare(experiment, config.output_dir)
        result = {"steps": [{"name": s.name, "entry_point": s.entry_point, "run_id": s.run_id, "reused": s.reused,
                             "seconds": round(s.seconds, 1), "parameters": s.parameters} for s in steps],
                  "champion": _champion(config.model_name, client)}
        tracking.log_json(result, "workflow/steps.json")
        print(pd.DataFrame(result["steps"])[["name", "run_id", "reused", "seconds"]].to_markdown(index=False))
        print(f"\n{table}\nchampion: {result['champion']}")
        result["comparison"] = table
        result["run_id"] = parent.info.run_id
        return result


def _compare(experiment: str, output_dir: str) -> str:
    """The comparison table of the experiment's training runs, saved and logged into the main run."""
    from histoflow import compare

    markdown, files = compare.write(compare.summary(experiment), output_dir)
    for path in files:
        mlflow.log_artifact(str(path), "workflow")
    return markdown


def _champion(name: str, client: MlflowClient) -> dict | None:
    try:
        version = client.get_model_version_by_alias(name, "champion")
    except mlflow.exceptions.MlflowException:
        return None
    return {"name": name, "version": version.version, "run_id": version.run_id}
