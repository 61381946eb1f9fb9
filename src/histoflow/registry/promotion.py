"""The `promote` entry point: evaluate @challenger against @champion on the same images, move the alias on a pass.

Both models are evaluated with MLflow's evaluation API on the same images (the challenger's test
split, or a folder), and `mlflow.validate_evaluation_results` applies the gate of the promotion policy
(registry/gate.yaml); the decision is recorded on the version and as promotion/decision.json.

A cross-validation's fold ensemble has no test split (every image trained some fold). Without a folder,
its gate reads the cross-validation's out-of-fold predictions instead, each image predicted by the fold
model that did not train on it: an estimate of the ensemble's, said so in the version's description; a
champion is compared only when its own out-of-fold predictions cover the same images.
"""

from __future__ import annotations

import os
from dataclasses import asdict

import mlflow
import pandas as pd
from mlflow import MlflowClient
from mlflow.models import make_metric
from mlflow.models.evaluation import EvaluationResult
from mlflow.models.evaluation.validation import ModelValidationFailedException
from sklearn.metrics import accuracy_score, balanced_accuracy_score, f1_score, precision_score, recall_score

from histoflow import tracking
from histoflow.artifacts import OOF_ARTIFACT, is_cross_validation
from histoflow.data.discovery import discover
from histoflow.errors import DataError
from histoflow.registry.aliases import alias_version
from histoflow.registry.policy import Policy, load_policy
from histoflow.registry.selection import RegistryError, run_split
from histoflow.registry.settings import PromoteConfig
from histoflow.serving.requests import INPUT_COLUMN, encode_file, model_decision

GATED = ("balanced_accuracy", "recall_score", "precision_score", "accuracy_score", "f1_score")


def policy_of(config: PromoteConfig) -> Policy:
    """The promotion policy: the file's, with the thresholds the command gave in place of its own."""
    return load_policy(config.policy, min_balanced_accuracy=config.min_balanced_accuracy,
                       min_recall=config.min_recall, min_balanced_accuracy_gain=config.min_balanced_accuracy_gain,
                       max_recall_drop=config.max_recall_drop)


def _balanced_accuracy(predictions: pd.Series, targets: pd.Series, metrics) -> float:
    return float(balanced_accuracy_score(targets, predictions))


BALANCED_ACCURACY = make_metric(eval_fn=_balanced_accuracy, greater_is_better=True, name="balanced_accuracy")


def model_classes(model_uri: str) -> list[str]:
    """The class names a registered model answers with (its metadata)."""
    return list(mlflow.models.get_model_info(model_uri).metadata["class_names"])


def evaluation_data(version, data_dir: str = "", layout: str = "auto", max_images: int = 0,
                    seed: int = 42) -> tuple[pd.DataFrame, list[str], str]:
    """Base64 images + class-name targets: the test split of the version's run, or every image of data_dir;
    with the class names of those images (positive last) and a description of the source."""
    if data_dir:
        dataset = discover(data_dir, layout=layout, max_images=max_images, seed=seed)
        frame, classes = dataset.frame, dataset.class_names
        source = f"{dataset.root} (all {len(frame)} images, digest {dataset.digest})"
    else:
        _, split, classes = run_split(mlflow.get_run(version.run_id))
        frame = split[split["split"] == "test"]
        if max_images:
            frame = frame.sample(n=min(max_images, len(frame)), random_state=seed)
        source = f"test split of run {version.run_id} ({len(frame)} images)"
    missing = [p for p in frame["path"] if not os.path.exists(p)]
    if missing:
        raise DataError(f"{len(missing)} evaluation images are missing (first: {missing[0]}); pass data_dir")
    data = pd.DataFrame({INPUT_COLUMN: [encode_file(p) for p in frame["path"]],
                         "target": frame["class_name"].tolist()})
    return data, classes, source


def _check_classes(name: str, versions: dict[str, object], evaluation: list[str], source: str) -> None:
    """Metrics of a model on images of other classes mean nothing: refuse before evaluating."""
    for role, version in versions.items():
        classes = model_classes(f"models:/{name}/{version.version}")
        if classes != evaluation:
            raise DataError(f"{role} (version {version.version}) classifies {classes}, but the evaluation "
                            f"images ({source}) are {evaluation}: evaluate on images of the model's classes")


def _evaluate(uri: str, data: pd.DataFrame, positive: str):
    model = mlflow.pyfunc.load_model(uri)
    # MLflow's classifier evaluator wants one label column; the served model also returns probabilities.
    # The gate judges the model's decision (model_label): "indeterminate" flags an input, not a class.
    return mlflow.models.evaluate(
        lambda frame: model_decision(model.predict(frame)), data, targets="target", model_type="classifier",
        evaluators="default", extra_metrics=[BALANCED_ACCURACY],
        evaluator_config={"pos_label": positive, "log_model_explainability": False},
    )


def _out_of_fold(run) -> pd.DataFrame:
    """The first repeat's pooled out-of-fold rows (relpath, label, decision at the fold's threshold, ...)."""
    oof = pd.read_csv(mlflow.artifacts.download_artifacts(run_id=run.info.run_id, artifact_path=OOF_ARTIFACT))
    return oof[oof["repeat"] == oof["repeat"].min()].sort_values("relpath", ignore_index=True)


def _scores(frame: pd.DataFrame) -> EvaluationResult:
    """The gated metrics of out-of-fold decisions, as MLflow's evaluation names them."""
    y, called = frame["label"].to_numpy(), frame["predicted"].to_numpy()
    return EvaluationResult(metrics={
        "balanced_accuracy": float(balanced_accuracy_score(y, called)),
        "recall_score": float(recall_score(y, called, zero_division=0)),
        "precision_score": float(precision_score(y, called, zero_division=0)),
        "accuracy_score": float(accuracy_score(y, called)), "f1_score": float(f1_score(y, called, zero_division=0))},
        artifacts={})


def _out_of_fold_results(name: str, challenger, run, champion) -> tuple[EvaluationResult, EvaluationResult | None,
                                                                        str]:
    """The gate's inputs for a cross-validation's ensemble (`run`) without held-out images: both models'
    out-of-fold estimates on the same images, or the challenger's alone when there is no champion."""
    oof = _out_of_fold(run)
    source = (f"out-of-fold predictions of cross-validation run {challenger.run_id} ({len(oof)} images, each "
              "predicted by the fold model that did not train on it): an estimate of its fold ensemble's")
    if champion is None:
        return _scores(oof), None, source
    theirs = mlflow.get_run(champion.run_id)
    same = is_cross_validation(theirs) and (other := _out_of_fold(theirs))["relpath"].equals(oof["relpath"])
    if not same:
        raise RegistryError(f"version {challenger.version} of {name!r} averages the fold models of cross-validation "
                            f"run {challenger.run_id}: every image of its data trained some fold, and the champion "
                            f"(version {champion.version}) has no out-of-fold predictions of the same images to "
                            "compare with; pass -P data_dir=<held-out folder>")
    return _scores(oof), _scores(other), source


def promote(name: str, policy: Policy, data_dir: str = "", layout: str = "auto", max_images: int = 0) -> dict:
    """Evaluate the challenger against the champion on the same images; move the champion alias only on a pass."""
    client = MlflowClient()
    aliases, gate = policy.aliases, policy.gate
    challenger = alias_version(name, aliases.challenger)
    if challenger is None:
        raise RegistryError(f"model {name!r} has no @{aliases.challenger}: run `register` first")
    champion = alias_version(name, aliases.champion)
    if champion is not None and champion.version == challenger.version:
        raise RegistryError(f"@{aliases.challenger} is already @{aliases.champion} (version {champion.version})")
    roles = {f"@{aliases.challenger}": challenger, **({f"@{aliases.champion}": champion} if champion else {})}
    source_run = mlflow.get_run(challenger.run_id)
    out_of_fold = not data_dir and is_cross_validation(source_run)
    if out_of_fold:
        candidate, baseline, source = _out_of_fold_results(name, challenger, source_run, champion)
        positive = model_classes(f"models:/{name}/{challenger.version}")[-1]
    else:
        data, classes, source = evaluation_data(challenger, data_dir, layout, max_images)
        _check_classes(name, roles, classes, source)
        positive = classes[-1]
    with mlflow.start_run(run_name=f"promote-{name}-v{challenger.version}") as active:
        # Before the evaluations: a parameter MLflow refuses fails the command before minutes of work.
        tracking.log_new_params({"name": name, "data_dir": data_dir, "layout": layout, "max_images": max_images,
                                 "policy": policy.source, **asdict(gate), "evaluation_data": source[:500]})
        mlflow.set_tags({"histoflow.step": "promote", "model_name": name,
                         "challenger_version": challenger.version,
                         "champion_version": champion.version if champion else ""})
        if not out_of_fold:  # one nested run per model: MLflow's evaluation logs the same metric names for both
            with mlflow.start_run(run_name=f"challenger-v{challenger.version}", nested=True):
                candidate = _evaluate(f"models:/{name}/{challenger.version}", data, positive)
            baseline = None
            if champion is not None:
                with mlflow.start_run(run_name=f"champion-v{champion.version}", nested=True):
                    baseline = _evaluate(f"models:/{name}/{champion.version}", data, positive)
        scores = {"challenger": {k: float(candidate.metrics[k]) for k in GATED}}
        if baseline is not None:
            scores["champion"] = {k: float(baseline.metrics[k]) for k in GATED}
        thresholds = gate.thresholds(scores.get("champion"))
        try:
            mlflow.validate_evaluation_results(thresholds, candidate, baseline)
            passed, reason = True, "all thresholds met"
        except ModelValidationFailedException as exc:
            passed, reason = False, str(exc)
        # Optimistic check: another promote may have moved the champion while this one evaluated.
        current = alias_version(name, aliases.champion)
        if (current and current.version) != (champion and champion.version):
            raise RegistryError(f"@{aliases.champion} moved to version {current.version} during this evaluation; "
                                "re-run promote to evaluate against it")
        decision = "promoted" if passed else "rejected"
        record = {"decision": decision, "reason": reason, "evaluation_data": source, "positive_class": positive,
                  "gate": asdict(gate), "policy": policy.source,
                  "thresholds": {k: str(v) for k, v in thresholds.items()},
                  "challenger_version": challenger.version,
                  "champion_version": champion.version if champion else None, "metrics": scores,
                  "promote_run_id": active.info.run_id}
        mlflow.log_dict(record, "promotion/decision.json")
        mlflow.log_metrics({f"{role}_{k}": v for role, values in scores.items() for k, v in values.items()})
        mlflow.set_tag("decision", decision)
    if passed:
        if champion is not None:
            client.set_registered_model_alias(name, aliases.previous, champion.version)
        client.set_registered_model_alias(name, aliases.champion, challenger.version)
    tags = {"promotion.decision": decision, "promotion.reason": reason[:4000],
            "promotion.run_id": record["promote_run_id"],
            "promotion.against": champion.version if champion else "none"}
    tags.update({f"promotion.{role}.{k}": f"{v:.4f}" for role, values in scores.items() for k, v in values.items()})
    if out_of_fold:
        tags["promotion.estimate"] = "out-of-fold"
        client.update_model_version(name, challenger.version, description=(
            f"{challenger.description or ''} Promotion {decision} on the cross-validation's out-of-fold estimate "
            f"(no held-out images: {source})").strip())
    for key, value in tags.items():
        client.set_model_version_tag(name, challenger.version, key, value)
    print(f"{name} version {challenger.version}: {decision} ({reason.splitlines()[0][:200]})")
    return record


def run(config: PromoteConfig) -> dict:
    tracking.configure()
    return promote(config.name, policy_of(config), config.data_dir, config.layout, config.max_images)
