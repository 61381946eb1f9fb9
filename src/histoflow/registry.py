"""Model registry: register the best run as `challenger`, promote it past a metric gate, roll back.

Aliases: `challenger` (last registered), `champion` (served), `previous` (the champion it replaced).
Promotion evaluates challenger and champion on the same images with MLflow's evaluation API and moves
`champion` only when `mlflow.validate_evaluation_results` passes (fmind/mlops-python-package style).
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException
from mlflow.models import MetricThreshold, make_metric
from mlflow.models.evaluation.validation import ModelValidationFailedException
from sklearn.metrics import balanced_accuracy_score

from histoflow.errors import ConfigError, DataError, HistoflowError
from histoflow.serving import CLASSIFIER_ARTIFACT, INPUT_COLUMN, encode_file, log_classifier

CHALLENGER, CHAMPION, PREVIOUS = "challenger", "champion", "previous"
DEFAULT_NAME = "histoflow"


class RegistryError(HistoflowError):
    """The registry is not in a state the operation needs (no run, no challenger, nothing to roll back)."""


@dataclass(frozen=True)
class Gate:
    """Promotion thresholds. Against a champion: balanced accuracy must improve by `min_balanced_accuracy_gain`
    (0: must not drop) and malignant recall must not drop by more than `max_recall_drop`; always: absolute
    floors."""

    min_balanced_accuracy_gain: float = 0.0
    max_recall_drop: float = 0.0
    min_balanced_accuracy: float = 0.5
    min_recall: float = 0.0

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


# --------------------------------------------------------------------------------------------- runs
def best_run(experiment: str, metric: str = "validation_roc_auc", include_leaky: bool = False):
    """The finished training run of the experiment with the highest validation metric."""
    if not metric.startswith("validation_"):
        raise ConfigError(f"select by a validation metric (validation_*), not {metric!r}: the test split is "
                          "for reporting, not for choosing")
    exp = mlflow.get_experiment_by_name(experiment)
    if exp is None:
        raise RegistryError(f"no experiment named {experiment!r} in {mlflow.get_tracking_uri()}")
    query = f"attributes.status = 'FINISHED' and metrics.{metric} >= 0"
    if not include_leaky:
        query += " and tags.split_leaky = 'false'"
    runs = mlflow.search_runs([exp.experiment_id], query, order_by=[f"metrics.{metric} DESC"],
                              max_results=1, output_format="list")
    if not runs:
        raise RegistryError(f"experiment {experiment!r} has no finished training run with metric {metric!r}"
                            + ("" if include_leaky else " on a patient split (include_leaky to allow image splits)"))
    return runs[0]


def run_split(run) -> tuple[Path, pd.DataFrame, list[str]]:
    """The run's dataset root, its split table (with absolute paths) and its class names."""
    sources = [json.loads(d.dataset.source).get("uri") for d in run.inputs.dataset_inputs]
    if not sources or not sources[0]:
        raise RegistryError(f"run {run.info.run_id} logged no dataset source")
    root = Path(sources[0])
    split = pd.read_csv(mlflow.artifacts.download_artifacts(run_id=run.info.run_id, artifact_path="data/split.csv"))
    split["path"] = [str(root / rel) for rel in split["relpath"]]
    classes = split.drop_duplicates("label").sort_values("label")["class_name"].tolist()
    return root, split, classes


def _keras_artifact(run_id: str) -> str:
    files = [f.path for f in MlflowClient().list_artifacts(run_id, "keras") if f.path.endswith(".keras")]
    if not files:
        raise RegistryError(f"run {run_id} has no .keras artifact")
    return mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=files[0])


def classifier_uri(run) -> str:
    """The run's serving pyfunc (logged now if the run has none yet)."""
    models = mlflow.search_logged_models(experiment_ids=[run.info.experiment_id], output_format="list",
                                         filter_string=f"source_run_id = '{run.info.run_id}' and "
                                                       f"name = '{CLASSIFIER_ARTIFACT}'")
    if models:
        return f"models:/{models[0].model_id}"
    _, split, classes = run_split(run)
    example = split.loc[split["split"] == "test", "path"].iloc[0]
    with mlflow.start_run(run_id=run.info.run_id):
        info = log_classifier(_keras_artifact(run.info.run_id), classes, int(run.data.params["image_size"]),
                              example, metadata={"source_run_id": run.info.run_id,
                                                 "variant": run.data.tags.get("variant", "")})
    return info.model_uri


# ------------------------------------------------------------------------------------------ register
def register(experiment: str, metric: str = "validation_roc_auc", name: str = DEFAULT_NAME,
             include_leaky: bool = False):
    """Register the best run's serving model under `name` and point `challenger` at it."""
    run = best_run(experiment, metric, include_leaky)
    uri = classifier_uri(run)
    tags = {k: run.data.tags.get(k, "") for k in ("variant", "model", "dataset.name", "dataset.digest",
                                                   "split_mode", "split_leaky")}
    tags.update({"run_id": run.info.run_id, "selected_by": metric})
    tags.update({f"metric.{k}": f"{v:.4f}" for k, v in run.data.metrics.items()
                 if k.startswith(("validation_", "test_"))})
    version = mlflow.register_model(uri, name, tags=tags)
    client = MlflowClient()
    m = run.data.metrics
    client.update_model_version(name, version.version, description=(
        f"{tags['variant']} ({tags['model']}) trained on {tags['dataset.name']} (digest {tags['dataset.digest']}, "
        f"{tags['split_mode']} split) in run {run.info.run_id}; selected by {metric} = {m.get(metric, float('nan')):.4f}. "
        f"Test: accuracy {m.get('test_accuracy', float('nan')):.4f}, balanced accuracy "
        f"{m.get('test_balanced_accuracy', float('nan')):.4f}, ROC AUC {m.get('test_roc_auc', float('nan')):.4f}. "
        "Input: base64 image files; output: label, confidence, probabilities."))
    client.set_registered_model_alias(name, CHALLENGER, version.version)
    print(f"registered {name} version {version.version} from run {run.info.run_id} as @{CHALLENGER}")
    return client.get_model_version(name, version.version)


# ------------------------------------------------------------------------------------------- promote
def _balanced_accuracy(predictions: pd.Series, targets: pd.Series, metrics) -> float:
    return float(balanced_accuracy_score(targets, predictions))


BALANCED_ACCURACY = make_metric(eval_fn=_balanced_accuracy, greater_is_better=True, name="balanced_accuracy")


def evaluation_data(version, data_dir: str = "", layout: str = "auto", max_images: int = 0,
                    seed: int = 42) -> tuple[pd.DataFrame, str, str]:
    """Base64 images + class-name targets: the test split of the version's run, or every image of data_dir."""
    if data_dir:
        from histoflow.datasets import discover

        dataset = discover(data_dir, layout=layout, max_images=max_images, seed=seed)
        frame = dataset.frame.assign(path=dataset.frame["path"].astype(str))
        positive = dataset.class_names[-1]
        source = f"{dataset.root} (all {len(frame)} images, digest {dataset.digest})"
    else:
        run = mlflow.get_run(version.run_id)
        _, split, classes = run_split(run)
        frame = split[split["split"] == "test"]
        if max_images:
            frame = frame.sample(n=min(max_images, len(frame)), random_state=seed)
        positive = classes[-1]
        source = f"test split of run {version.run_id} ({len(frame)} images)"
    missing = [p for p in frame["path"] if not os.path.exists(p)]
    if missing:
        raise DataError(f"{len(missing)} evaluation images are missing (first: {missing[0]}); pass data_dir")
    data = pd.DataFrame({INPUT_COLUMN: [encode_file(p) for p in frame["path"]],
                         "target": frame["class_name"].tolist()})
    return data, positive, source


def _evaluate(uri: str, data: pd.DataFrame, positive: str):
    model = mlflow.pyfunc.load_model(uri)
    # MLflow's classifier evaluator wants one label column; the served model also returns probabilities.
    return mlflow.models.evaluate(
        lambda frame: model.predict(frame)["label"], data, targets="target", model_type="classifier",
        evaluators="default", extra_metrics=[BALANCED_ACCURACY],
        evaluator_config={"pos_label": positive, "log_model_explainability": False},
    )


def _alias_version(name: str, alias: str):
    try:
        return MlflowClient().get_model_version_by_alias(name, alias)
    except MlflowException:
        return None


GATED = ("balanced_accuracy", "recall_score", "precision_score", "accuracy_score", "f1_score")


def promote(name: str = DEFAULT_NAME, gate: Gate = Gate(), data_dir: str = "", layout: str = "auto",
            max_images: int = 0) -> dict:
    """Evaluate @challenger against @champion on the same images; move @champion only if the gate passes."""
    client = MlflowClient()
    challenger = _alias_version(name, CHALLENGER)
    if challenger is None:
        raise RegistryError(f"model {name!r} has no @{CHALLENGER}: run `register` first")
    champion = _alias_version(name, CHAMPION)
    if champion is not None and champion.version == challenger.version:
        raise RegistryError(f"@{CHALLENGER} is already @{CHAMPION} (version {champion.version})")
    data, positive, source = evaluation_data(challenger, data_dir, layout, max_images)
    with mlflow.start_run(run_name=f"promote-{name}-v{challenger.version}") as active:
        mlflow.set_tags({"histoflow.step": "promote", "model_name": name,
                         "challenger_version": challenger.version,
                         "champion_version": champion.version if champion else ""})
        mlflow.log_params({**asdict(gate), "evaluation_data": source[:500]})
        # One nested run per model: MLflow's evaluation logs the same metric names for both.
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
        current = _alias_version(name, CHAMPION)
        if (current and current.version) != (champion and champion.version):
            raise RegistryError(f"@{CHAMPION} moved to version {current.version} during this evaluation; "
                                "re-run promote to evaluate against it")
        decision = "promoted" if passed else "rejected"
        record = {"decision": decision, "reason": reason, "evaluation_data": source, "positive_class": positive,
                  "gate": asdict(gate), "thresholds": {k: str(v) for k, v in thresholds.items()},
                  "challenger_version": challenger.version,
                  "champion_version": champion.version if champion else None, "metrics": scores,
                  "promote_run_id": active.info.run_id}
        mlflow.log_dict(record, "promotion/decision.json")
        mlflow.log_metrics({f"{role}_{k}": v for role, values in scores.items() for k, v in values.items()})
        mlflow.set_tag("decision", decision)
    if passed:
        if champion is not None:
            client.set_registered_model_alias(name, PREVIOUS, champion.version)
        client.set_registered_model_alias(name, CHAMPION, challenger.version)
    tags = {"promotion.decision": decision, "promotion.reason": reason[:4000],
            "promotion.run_id": record["promote_run_id"],
            "promotion.against": champion.version if champion else "none"}
    tags.update({f"promotion.{role}.{k}": f"{v:.4f}" for role, values in scores.items() for k, v in values.items()})
    for key, value in tags.items():
        client.set_model_version_tag(name, challenger.version, key, value)
    print(f"{name} version {challenger.version}: {decision} ({reason.splitlines()[0][:200]})")
    return record


def rollback(name: str = DEFAULT_NAME) -> str:
    """Point @champion back at @previous; the demoted version is tagged and loses its alias."""
    client = MlflowClient()
    previous, champion = _alias_version(name, PREVIOUS), _alias_version(name, CHAMPION)
    if previous is None:
        raise RegistryError(f"model {name!r} has no @{PREVIOUS} version to roll back to")
    client.set_registered_model_alias(name, CHAMPION, previous.version)
    client.delete_registered_model_alias(name, PREVIOUS)
    if champion is not None:
        client.set_model_version_tag(name, champion.version, "rolled_back", "true")
    print(f"{name}: @{CHAMPION} rolled back to version {previous.version}"
          + (f" (from {champion.version})" if champion else ""))
    return previous.version


# ------------------------------------------------------------------------------------------- predict
def batch_predict(model_uri: str, data_dir: str, output_dir: str = "outputs", chunk: int = 32) -> pd.DataFrame:
    """Score every image under data_dir; CSV per image and, where patients are known, per patient."""
    from histoflow.datasets import discover
    from histoflow.errors import DataError as _DataError
    from histoflow.preprocessing import IMAGE_EXTENSIONS

    try:
        dataset = discover(data_dir)
        frame = dataset.frame[["path", "patient", "class_name"]].rename(columns={"class_name": "true_label"})
    except _DataError:
        # Unlabelled folder: score every image file, no patients, no truth.
        paths = sorted(str(p) for p in Path(data_dir).rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS)
        if not paths:
            raise
        frame = pd.DataFrame({"path": paths})
    model = mlflow.pyfunc.load_model(model_uri)
    parts = []
    for start in range(0, len(frame), chunk):
        batch = frame.iloc[start:start + chunk]
        parts.append(model.predict(pd.DataFrame({INPUT_COLUMN: [encode_file(p) for p in batch["path"]]})))
    scored = pd.concat([frame.reset_index(drop=True), pd.concat(parts, ignore_index=True)], axis=1)
    classes = list(scored["probabilities"].iloc[0])
    for name in classes:
        scored[f"p_{name}"] = [p[name] for p in scored["probabilities"]]
    scored = scored.drop(columns=["probabilities"])
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    scored.to_csv(out / "predictions.csv", index=False)
    with mlflow.start_run(run_name="predict", nested=mlflow.active_run() is not None):
        mlflow.set_tag("histoflow.step", "predict")
        mlflow.log_params({"model_uri": model_uri, "data_dir": str(data_dir), "images": len(scored)})
        mlflow.log_artifact(str(out / "predictions.csv"))
        if "patient" in scored:
            positive = classes[-1]
            patients = scored.groupby("patient").agg(images=("path", "size"),
                                                     mean_p=(f"p_{positive}", "mean"),
                                                     true_label=("true_label", "first")).reset_index()
            patients["label"] = np.where(patients["mean_p"] >= 0.5, positive, classes[0])
            patients = patients.rename(columns={"mean_p": f"mean_p_{positive}"})
            patients.to_csv(out / "patients.csv", index=False)
            mlflow.log_artifact(str(out / "patients.csv"))
            if set(scored["true_label"]) <= set(classes):  # folder labelled with the model's class names
                mlflow.log_metrics({"accuracy": float((scored["label"] == scored["true_label"]).mean()),
                                    "patient_accuracy": float((patients["label"] == patients["true_label"]).mean())})
    print(f"scored {len(scored)} images -> {out / 'predictions.csv'}")
    return scored
