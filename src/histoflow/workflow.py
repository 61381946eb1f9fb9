"""The whole study in one command (`mlflow run . -e main`): each step an MLflow Projects run.

    data -> training variants -> tune -> register -> promote -> compare

As in MLflow's multistep workflow example, each step hands its output to the next: the data step's
split table (`runs:/<data run>/data/split.csv`) is the `split_table` of every training step and of the
study, which read it instead of discovering, hashing and splitting the data again. A step whose
finished run already exists, with the same parameters, the same code and the same data, is reused
instead of being run again; so a `main` run that failed at `promote` resumes there, and adding a
variant trains only that variant. Register and promote depend on everything before them: they are
reused only when nothing before them ran anew. The comparison table ends every `main` run.

MLflow and the steps' modules are imported where they are used: the command line reads WorkflowConfig
(`histoflow main --help`) without loading them.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from histoflow.artifacts import SPLIT_TABLE
from histoflow.config import from_params, help_of, project_root, setting
from histoflow.data.settings import DataConfig
from histoflow.errors import ConfigError, HistoflowError
from histoflow.modeling.variants import BACKBONE_VARIANTS, VARIANT_DEFAULTS, VARIANTS, TrainConfig, make_train_config
from histoflow.registry.settings import DEFAULT_METRIC, DEFAULT_NAME, DEFAULT_POLICY, check_selection_metric
from histoflow.tuning.search_space import load_search_space
from histoflow.tuning.settings import TuneConfig, make_tune_config

if TYPE_CHECKING:
    from mlflow.tracking import MlflowClient

STEP_TAG = "histoflow.workflow.step"
CODE_TAG = "histoflow.code_digest"
DATA_TAG = "histoflow.workflow.data_digest"
PARENT_TAG = "mlflow.parentRunId"
# What the code digest covers besides the package: the entry points and the files users edit.
PROJECT_FILES = ("MLproject", "tuning/*.yaml", "registry/*.yaml")


@dataclass(frozen=True)
class WorkflowConfig(DataConfig):
    # For every training step and the study's full run (defaults: the training run's).
    image_size: int = setting(TrainConfig.image_size, help_of(TrainConfig, "image_size"))
    batch_size: int = setting(TrainConfig.batch_size, help_of(TrainConfig, "batch_size"))
    epochs: int = setting(TrainConfig.epochs, help_of(TrainConfig, "epochs"))
    variants: str = setting("baseline,augmented,densenet", f"the training steps, in order: comma-separated "
                                                           f"{', '.join(VARIANTS)}")
    backbone: str = setting(VARIANT_DEFAULTS["transfer"]["backbone"], "the transfer variant's backbone (and the "
                                                                      "study's, when it tunes transfer)")
    alpha: float = setting(VARIANT_DEFAULTS["transfer"]["alpha"], help_of(TrainConfig, "alpha"))
    weights: str = setting(TrainConfig.weights, help_of(TrainConfig, "weights"))
    tune_variant: str = setting("densenet", "the variant the study tunes: densenet, transfer, or none (no study)")
    n_trials: int = setting(TuneConfig.n_trials, help_of(TuneConfig, "n_trials"))
    trial_epochs: int = setting(TuneConfig.trial_epochs, help_of(TuneConfig, "trial_epochs"))
    storage: str = setting(TuneConfig.storage, help_of(TuneConfig, "storage"))
    search_space: str = setting(TuneConfig.search_space, help_of(TuneConfig, "search_space"))
    cache_dir: str = setting(TuneConfig.cache_dir, help_of(TuneConfig, "cache_dir"))
    model_name: str = setting(DEFAULT_NAME, "the registered model")
    metric: str = setting(DEFAULT_METRIC, "the validation metric register chooses the best run by")
    output_dir: str = setting("outputs/comparison", "where the comparison table is written")
    reuse: bool = setting(True, "reuse a step's finished run with the same parameters, code and data")

    @property
    def variant_list(self) -> list[str]:
        return [v.strip() for v in self.variants.split(",") if v.strip()]

    def validate(self) -> None:
        """Every step's settings are checked here, before any step runs."""
        super().validate()
        unknown = [v for v in self.variant_list if v not in VARIANTS]
        if not self.variant_list or unknown:
            raise ConfigError(f"variants must be a comma-separated list of {', '.join(VARIANTS)}; "
                              f"got {self.variants!r}")
        if self.tune_variant not in (*BACKBONE_VARIANTS, "none"):
            raise ConfigError(f"tune_variant must be one of {', '.join(BACKBONE_VARIANTS)} or none; "
                              f"got {self.tune_variant!r}")
        check_selection_metric(self.metric)
        for variant in self.variant_list:
            make_train_config(variant, **_variant_params(self, variant))  # bad data or model settings fail here
        if self.tune_variant != "none":
            make_tune_config(self.tune_variant, **_tune_params(self))


def make_workflow_config(**params: Any) -> WorkflowConfig:
    """Validated settings from (possibly string) parameters."""
    config = from_params(WorkflowConfig, params)
    config.validate()
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


def _variant_params(config: WorkflowConfig, variant: str, split_table: str = "") -> dict[str, Any]:
    params = {**asdict(config.data_config()), "image_size": config.image_size, "batch_size": config.batch_size,
              "epochs": config.epochs, "split_table": split_table}
    if variant == "transfer":
        params.update(backbone=config.backbone, alpha=config.alpha)
    if variant in BACKBONE_VARIANTS:
        params.update(weights=config.weights)
    return params


def _tune_params(config: WorkflowConfig, split_table: str = "") -> dict[str, Any]:
    params = {**_variant_params(config, config.tune_variant, split_table), "n_trials": config.n_trials,
              "trial_epochs": config.trial_epochs, "storage": config.storage, "search_space": config.search_space,
              "cache_dir": config.cache_dir}
    for searched in load_search_space(config.search_space).searched:  # the study's to choose
        params.pop(searched, None)
    return params


def _strings(params: dict[str, Any]) -> dict[str, str]:
    return {k: str(v) for k, v in params.items() if v != ""}


def plan(config: WorkflowConfig, experiment: str, split_table: str) -> list[Step]:
    """The steps after the data step, given its split table."""
    steps = [Step(v, v, _strings(_variant_params(config, v, split_table))) for v in config.variant_list]
    if config.tune_variant != "none":
        steps.append(Step("tune", "tune", _strings({**_tune_params(config, split_table),
                                                     "variant": config.tune_variant})))
    steps.append(Step("register", "register", _strings({"experiment": experiment, "metric": config.metric,
                                                         "name": config.model_name}), depends_on_all=True))
    steps.append(Step("promote", "promote", _strings({"name": config.model_name}), depends_on_all=True))
    return steps


def steps_project() -> Path | None:
    """The MLproject the steps run from: the folder `main` runs in when it holds one (`mlflow run .` in a
    clone, MLflow's checkout of a git URI), else the repository this package is installed from."""
    here = Path.cwd()
    return here if (here / "MLproject").is_file() else project_root()


def code_digest(root: Path | None = None) -> str:
    """Of the package's source, the MLproject and the files users edit (in `root`, default: this project):
    a step run with other code is not reused."""
    import histoflow

    package = Path(histoflow.__file__).parent
    files = [(str(p.relative_to(package)), p) for p in sorted(package.rglob("*.py"))]
    root = root or steps_project()
    if root is not None:
        files += [(str(p.relative_to(root)), p) for pattern in PROJECT_FILES for p in sorted(root.glob(pattern))]
    digest = hashlib.sha256()
    for name, path in files:
        digest.update(name.encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


def find_finished(experiment_id: str, step: Step, code: str, data: str) -> str | None:
    """A finished run of this step with the same parameters, code and data, or None."""
    import mlflow

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
    import mlflow
    from mlflow.exceptions import ExecutionException

    root = steps_project()
    if root is None:
        raise ConfigError("the workflow runs the MLproject's entry points; install histoflow from its repository "
                          "with `pip install -e .`")
    # Synchronous: the entry point runs as this process's child (asynchronous runs start an `mlflow run`
    # process around it, ~5 s of imports per step for nothing); Ctrl-C still ends the step's run as FAILED.
    try:
        submitted = mlflow.projects.run(str(root), entry_point=step.entry_point, parameters=step.parameters,
                                        experiment_id=experiment_id, env_manager="local", synchronous=True)
    except ExecutionException as exc:
        raise HistoflowError(f"workflow step {step.name!r} ({step.entry_point}) failed ({exc}): see its run in the "
                             "MLflow UI; re-run main to resume from this step") from exc
    return submitted.run_id


def step_data_digest(client: MlflowClient, run_id: str, data: str) -> str:
    """The data a step's run used: the digest it computed (training and tuning runs log one), else the data step's."""
    return client.get_run(run_id).data.tags.get("dataset.digest") or data


def _run_step(step: Step, config: WorkflowConfig, client: MlflowClient, experiment_id: str, parent_id: str,
              code: str, data: str, anything_new: bool) -> None:
    import mlflow

    start = time.monotonic()
    reusable = config.reuse and not (step.depends_on_all and anything_new)
    step.run_id = (find_finished(experiment_id, step, code, data) if reusable else None) or ""
    step.reused = bool(step.run_id)
    if step.reused:
        print(f"workflow: reusing {step.name}: run {step.run_id} (same parameters, code and data)")
    else:
        print(f"workflow: running {step.name} ({step.entry_point})")
        step.run_id = _execute(step, experiment_id)
        client.set_tag(step.run_id, PARENT_TAG, parent_id)  # nested under main in the UI
        client.set_tag(step.run_id, STEP_TAG, step.name)
        client.set_tag(step.run_id, CODE_TAG, code)
        client.set_tag(step.run_id, DATA_TAG, step_data_digest(client, step.run_id, data))
    step.seconds = time.monotonic() - start
    mlflow.set_tag(f"step.{step.name}", step.run_id)


def run(config: WorkflowConfig) -> dict:
    """Run (or resume) the workflow as a parent run; returns the step table and the comparison."""
    import mlflow
    import pandas as pd
    from mlflow.tracking import MlflowClient

    from histoflow import tracking

    config.validate()
    tracking.configure()
    client = MlflowClient()
    code = code_digest()
    with mlflow.start_run(run_name="main") as parent:
        experiment_id = parent.info.experiment_id
        experiment = mlflow.get_experiment(experiment_id).name
        tracking.log_new_params(asdict(config))
        mlflow.set_tags({"histoflow.step": "workflow", CODE_TAG: code})
        tracking.log_environment()
        data_step = Step("data", "data", _strings(asdict(config.data_config())))
        _run_step(data_step, config, client, experiment_id, parent.info.run_id, code, "", False)
        data = client.get_run(data_step.run_id).data.tags["dataset.digest"]
        steps, anything_new = [data_step], not data_step.reused
        for step in plan(config, experiment, f"runs:/{data_step.run_id}/{SPLIT_TABLE}"):
            _run_step(step, config, client, experiment_id, parent.info.run_id, code, data, anything_new)
            steps.append(step)
            anything_new |= not step.reused
        table = _compare(experiment, config.output_dir)
        result = {"steps": [{"name": s.name, "entry_point": s.entry_point, "run_id": s.run_id, "reused": s.reused,
                             "seconds": round(s.seconds, 1), "parameters": s.parameters} for s in steps],
                  "champion": _champion(config.model_name)}
        tracking.log_json(result, "workflow/steps.json")
        print(pd.DataFrame(result["steps"])[["name", "run_id", "reused", "seconds"]].to_markdown(index=False))
        print(f"\n{table}\nchampion: {result['champion']}")
        result["comparison"] = table
        result["run_id"] = parent.info.run_id
        return result


def _compare(experiment: str, output_dir: str) -> str:
    """The comparison table of the experiment's training runs, saved and logged into the main run."""
    import mlflow

    from histoflow.registry import comparison

    markdown, files = comparison.write(comparison.summary(experiment), output_dir)
    for path in files:
        mlflow.log_artifact(str(path), "workflow")
    return markdown


def _champion(name: str) -> dict | None:
    from histoflow.registry.aliases import alias_version
    from histoflow.registry.policy import load_policy

    version = alias_version(name, load_policy(DEFAULT_POLICY).aliases.champion)
    return None if version is None else {"name": name, "version": version.version, "run_id": version.run_id}
