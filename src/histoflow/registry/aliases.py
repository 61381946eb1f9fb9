"""The `register` and `rollback` entry points: versions of the registered model and the aliases on them.

`challenger` (last registered), `champion` (served), `previous` (the champion it replaced): the names
come from the promotion policy (registry/gate.yaml).
"""

from __future__ import annotations

import mlflow
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import RESOURCE_DOES_NOT_EXIST, ErrorCode

from histoflow import tracking
from histoflow.artifacts import is_cross_validation
from histoflow.registry.policy import Aliases, load_policy
from histoflow.registry.selection import RegistryError, classifier_uri, select
from histoflow.registry.settings import RegisterConfig, RollbackConfig
from histoflow.serving.settings import DEFAULT_RUNTIME


def alias_version(name: str, alias: str):
    """The version the alias points at, or None when the model does not exist or has no such alias. Any other
    answer (no permission, a server error) stops the caller with the server's message: taken for "no alias",
    it would let promote compare a challenger against no champion. (The registered model's aliases are read
    rather than the alias itself: MLflow answers a missing alias with INVALID_PARAMETER_VALUE, the code of
    a malformed request too.)"""
    client = MlflowClient()
    try:
        version = client.get_registered_model(name).aliases.get(alias)
        return None if version is None else client.get_model_version(name, version)
    except MlflowException as exc:
        if exc.error_code == ErrorCode.Name(RESOURCE_DOES_NOT_EXIST):
            return None
        raise RegistryError(f"cannot read @{alias} of model {name!r} from {mlflow.get_tracking_uri()}: "
                            f"{exc.error_code}: {exc.message}") from exc


def register(experiment: str, metric: str, name: str, aliases: Aliases, include_leaky: bool = False,
             runtime: str = DEFAULT_RUNTIME):
    """Register the best run's serving model (for `runtime`) under `name` and point the challenger alias at it."""
    selection = select(experiment, metric, include_leaky)
    run = selection.run
    uri = classifier_uri(run, runtime)
    tags = {k: run.data.tags.get(k, "") for k in ("variant", "model", "dataset.name", "dataset.digest",
                                                   "split_mode", "split_leaky")}
    tags.update({"run_id": run.info.run_id, "selected_by": metric,
                 "selection.tied_with": ",".join(r.info.run_id for r in selection.tied)})
    tags.update({f"metric.{k}": f"{v:.4f}" for k, v in run.data.metrics.items()
                 if k.startswith(("validation_", "test_")) or k.startswith("cv_") and k.endswith("_mean")})
    version = mlflow.register_model(uri, name, tags=tags)
    client = MlflowClient()
    m = run.data.metrics
    cv = is_cross_validation(run)  # its fold ensemble was registered: its results are the folds' means
    test = {k: m.get(f"cv_test_{k}_mean" if cv else f"test_{k}", float("nan"))
            for k in ("accuracy", "balanced_accuracy", "roc_auc")}
    client.update_model_version(name, version.version, description=(
        f"{tags['variant']} ({tags['model']}) trained on {tags['dataset.name']} (digest {tags['dataset.digest']}, "
        f"{tags['split_mode']} split) in run {run.info.run_id}"
        + (", the average of its fold models" if cv else "") + f"; {selection.describe()}. "
        + ("Held-out folds (mean)" if cv else "Test") + ": "
        f"accuracy {test['accuracy']:.4f}, balanced accuracy {test['balanced_accuracy']:.4f}, "
        f"ROC AUC {test['roc_auc']:.4f}. Input: base64 image files; output: label, positive_class, "
        "positive_probability, probabilities, threshold."))
    client.set_registered_model_alias(name, aliases.challenger, version.version)
    print(f"registered {name} version {version.version} from run {run.info.run_id} as @{aliases.challenger}")
    return client.get_model_version(name, version.version)


def rollback(name: str, aliases: Aliases) -> str:
    """Point the champion alias back at the previous one; the demoted version is tagged and loses its alias."""
    client = MlflowClient()
    previous, champion = alias_version(name, aliases.previous), alias_version(name, aliases.champion)
    if previous is None:
        raise RegistryError(f"model {name!r} has no @{aliases.previous} version to roll back to")
    client.set_registered_model_alias(name, aliases.champion, previous.version)
    client.delete_registered_model_alias(name, aliases.previous)
    if champion is not None:
        client.set_model_version_tag(name, champion.version, "rolled_back", "true")
    print(f"{name}: @{aliases.champion} rolled back to version {previous.version}"
          + (f" (from {champion.version})" if champion else ""))
    return previous.version


def run_register(config: RegisterConfig):
    config.validate()
    tracking.configure()
    experiment = config.experiment or tracking.current_experiment_name()
    return register(experiment, config.metric, config.name, load_policy(config.policy).aliases, config.include_leaky,
                    config.runtime)


def run_rollback(config: RollbackConfig) -> str:
    tracking.configure()
    return rollback(config.name, load_policy(config.policy).aliases)
