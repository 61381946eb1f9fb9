"""Choosing a model among runs: the best finished training run by a validation metric, and its servable model."""

from __future__ import annotations

import json
import posixpath
from dataclasses import dataclass, fields
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
from mlflow import MlflowClient

from histoflow.artifacts import (
    CALIBRATION_ARTIFACT,
    CLASSIFIER_ARTIFACT,
    OOF_ARTIFACT,
    PREDICTIONS_ARTIFACT,
    SCREENING_ARTIFACT,
    SPLIT_TABLE,
    STAIN_ARTIFACT,
    is_cross_validation,
)
from histoflow.data.stain import NO_STAIN_NORMALIZATION
from histoflow.errors import HistoflowError
from histoflow.modeling.calibration import Calibration, choose_threshold
from histoflow.modeling.metrics import INTERVAL_METRICS, paired_patient_bootstrap, patient_bootstrap
from histoflow.registry.settings import DEFAULT_METRIC, check_selection_metric
from histoflow.serving.settings import DEFAULT_RUNTIME, RUNTIME_TAG


class RegistryError(HistoflowError):
    """The registry is not in a state the operation needs (no run, no challenger, nothing to roll back)."""


# Candidates compared with the best for a tie: beyond these, a run's metric is far enough below to matter.
TIE_CANDIDATES = 20
TIE_RULE = ("runs whose difference from the best lies inside its 95 % interval are ties, and the cheapest to serve "
            "(parameters x pixels x networks x TTA views) of them is chosen, then the earliest")


@dataclass(frozen=True)
class Selection:
    """The chosen run, and the runs it was tied with (the best by the metric first, when another was chosen)."""

    run: object
    metric: str
    tied: tuple = ()

    def describe(self) -> str:
        """The selection in words, for the registered version's description."""
        value = self.run.data.metrics[self.metric]
        if not self.tied:
            return f"selected by {self.metric} = {value:.4f}"
        others = ", ".join(f"{r.info.run_id} ({r.data.metrics[self.metric]:.4f})" for r in self.tied)
        return (f"selected by {self.metric} = {value:.4f}, tied with {others}: {TIE_RULE}; serving cost "
                f"{serving_cost(self.run):.3g} against {', '.join(f'{serving_cost(r):.3g}' for r in self.tied)}")


def serving_cost(run) -> float:
    """A run's cost per served image, roughly: parameters x input pixels x networks (a cross-validation's
    ensemble has one per fold) x test-time augmentation views. Only runs are compared by it, not machines."""
    params, metrics = run.data.params, run.data.metrics
    networks = int(params.get("folds", 1)) if is_cross_validation(run) else 1
    views = 8 if params.get("tta", "none") == "dihedral8" else 1
    return metrics.get("n_params", float("inf")) * int(params.get("image_size", 0)) ** 2 * networks * views


def _candidates(experiment: str, metric: str, include_leaky: bool) -> list:
    check_selection_metric(metric)
    exp = mlflow.get_experiment_by_name(experiment)
    if exp is None:
        raise RegistryError(f"no experiment named {experiment!r} in {mlflow.get_tracking_uri()}")
    query = f"attributes.status = 'FINISHED' and metrics.{metric} >= 0"
    if not include_leaky:
        query += " and tags.split_leaky = 'false'"
    order = [f"metrics.{metric} DESC", "attributes.start_time ASC"]
    runs = [r for r in mlflow.search_runs([exp.experiment_id], query, order_by=order, output_format="list")
            if "cv.parent_run_id" not in r.data.tags]  # a cross-validation's folds are parts of one result
    if not runs:
        raise RegistryError(f"experiment {experiment!r} has no finished training run with metric {metric!r}"
                            + ("" if include_leaky else " on a patient split (include_leaky to allow image splits)"))
    return runs


def predictions(run, split: str) -> pd.DataFrame | None:
    """What a training run's evaluation logged for a split (relpath, patient, label, probability_malignant,
    probability_uncalibrated), or None when it logged none."""
    artifact = PREDICTIONS_ARTIFACT.format(split=split)
    if not _has_artifact(run, artifact):
        return None
    table = MlflowClient().load_table(run.info.experiment_id, artifact, [run.info.run_id])
    return table.drop(columns=["run_id"], errors="ignore")


def _tied(best, other, metric: str, a: pd.DataFrame | None) -> bool:
    """Whether `other`'s metric is inside the 95 % interval of the difference from the best's (`a`: the best's
    validation decisions, _decisions).

    A cross-validation's mean: inside the best's t-interval over folds. A training run's validation metric:
    the paired patient bootstrap of the difference where both runs scored the same validation images (ROC AUC,
    balanced accuracy), else the best's own patient bootstrap interval. A run without what that needs is no tie.
    """
    name = metric.removeprefix("cv_validation_").removesuffix("_mean").removeprefix("validation_")
    if metric.startswith("cv_"):
        low = best.data.metrics.get(f"cv_validation_{name}_ci_low")
        return low is not None and other.data.metrics[metric] >= low
    b = _decisions(other)
    if a is None or b is None:
        return False
    same = len(a) == len(b) and (a["relpath"].to_numpy() == b["relpath"].to_numpy()).all()
    if same and name in ("roc_auc", "balanced_accuracy"):
        paired = paired_patient_bootstrap(a["patient"], a["label"], np.zeros(len(a)),
                                          (a["probability_malignant"], a["decision"]),
                                          (b["probability_malignant"], b["decision"]))
        return name in paired and paired[name][1] <= 0.0
    if name not in INTERVAL_METRICS:
        return False
    probabilities = np.stack([1 - a["probability_malignant"], a["probability_malignant"]], axis=1)
    low, _ = patient_bootstrap(a["patient"], a["label"].to_numpy(), probabilities, a.attrs["threshold"],
                               names=(name,))[name]
    return bool(np.isfinite(low)) and other.data.metrics[metric] >= low


def _decisions(run) -> pd.DataFrame | None:
    """A run's validation predictions in relpath order with its served decision (its threshold in attrs)."""
    table = predictions(run, "validation")
    if table is None:
        return None
    threshold = run_calibration(run).threshold
    frame = table.sort_values("relpath", ignore_index=True).assign(
        decision=lambda t: (t["probability_malignant"] >= threshold).astype(int))
    frame.attrs["threshold"] = threshold
    return frame


def select(experiment: str, metric: str = DEFAULT_METRIC, include_leaky: bool = False) -> Selection:
    """The run to register: among the finished runs of the experiment (training runs by validation_*,
    cross-validations by cv_validation_*_mean; folds are not candidates), the best by the metric, unless
    others are tied with it (TIE_RULE): a difference inside the noise of a validation split is no reason to
    serve a costlier model, and picking by it picks by chance."""
    runs = _candidates(experiment, metric, include_leaky)
    best = runs[0]
    decisions = None if metric.startswith("cv_") else _decisions(best)  # once, not per candidate
    tied = [best] + [r for r in runs[1:TIE_CANDIDATES] if _tied(best, r, metric, decisions)]
    chosen = min(tied, key=lambda r: (serving_cost(r), r.info.start_time))
    return Selection(chosen, metric, tuple(r for r in tied if r is not chosen))


def best_run(experiment: str, metric: str = DEFAULT_METRIC, include_leaky: bool = False):
    """The run `select` chooses."""
    return select(experiment, metric, include_leaky).run


def run_split(run) -> tuple[Path, pd.DataFrame, list[str]]:
    """The run's dataset root, its split table (with absolute paths) and its class names."""
    sources = [json.loads(d.dataset.source).get("uri") for d in run.inputs.dataset_inputs]
    if not sources or not sources[0]:
        raise RegistryError(f"run {run.info.run_id} logged no dataset source")
    root = Path(sources[0])
    split = pd.read_csv(mlflow.artifacts.download_artifacts(run_id=run.info.run_id, artifact_path=SPLIT_TABLE))
    split["path"] = [str(root / rel) for rel in split["relpath"]]
    classes = split.drop_duplicates("label").sort_values("label")["class_name"].tolist()
    return root, split, classes


def keras_artifact(run_id: str) -> str:
    files = [f.path for f in MlflowClient().list_artifacts(run_id, "keras") if f.path.endswith(".keras")]
    if not files:
        raise RegistryError(f"run {run_id} has no .keras artifact")
    return mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=files[0])


def classifier_uri(run, runtime: str = DEFAULT_RUNTIME) -> str:
    """The run's serving pyfunc for `runtime`, logged now if the run has none yet: a training run's network, or a
    cross-validation's fold networks (of its first repeat) averaged. (A model whose networks would not convert to
    ONNX is logged for tensorflow: asked for onnx again, the run logs it again, and says why again.)"""
    models = mlflow.search_logged_models(experiment_ids=[run.info.experiment_id], output_format="list",
                                         filter_string=f"source_run_id = '{run.info.run_id}' and "
                                                       f"name = '{CLASSIFIER_ARTIFACT}'")
    # Models logged before the ONNX graphs carry no runtime tag: they are TensorFlow's.
    models = [m for m in models if (m.tags or {}).get(RUNTIME_TAG, "tensorflow") == runtime]
    if models:
        return f"models:/{models[0].model_id}"
    if is_cross_validation(run):
        return _log_ensemble(run, runtime)
    from histoflow.serving.packaging import log_classifier  # TensorFlow: only when a run has none logged

    classes, example = _classes_and_example(run)
    with mlflow.start_run(run_id=run.info.run_id):
        info = log_classifier([keras_artifact(run.info.run_id)], classes, int(run.data.params["image_size"]),
                              example, calibration=run_calibration(run), stain_references=[run_stain_reference(run)],
                              tta=run.data.params.get("tta", "none"), screenings=[run_screening(run)],
                              metadata={"source_run_id": run.info.run_id, "variant": run.data.tags.get("variant", "")},
                              runtime=runtime, input_mpp=run_input_mpp(run))
    return info.model_uri


def run_input_mpp(run) -> float:
    """Micrometres per pixel of the network's input: the training images' field of view (the data setting mpp
    makes the run log it as field_um) over the input size; 0 when the run's data had no mpp."""
    params = run.data.params
    return float(params["field_um"]) / int(params["image_size"]) if "field_um" in params else 0.0


def _classes_and_example(run) -> tuple[list[str], str]:
    """A training run's class names, and one of its test images (the served model's input example)."""
    _, split, classes = run_split(run)
    return classes, split.loc[split["split"] == "test", "path"].iloc[0]


def _log_ensemble(run, runtime: str) -> str:
    """The fold models of the first repeat as one pyfunc: each with its temperature, averaged; the threshold
    chosen by the run's policy on the pooled out-of-fold probabilities (the only held-out predictions there
    are: every image was in some fold's training part)."""
    from histoflow.serving.packaging import log_classifier

    oof = pd.read_csv(mlflow.artifacts.download_artifacts(run_id=run.info.run_id, artifact_path=OOF_ARTIFACT))
    first = oof[oof["repeat"] == oof["repeat"].min()]
    fold_runs = [mlflow.get_run(r) for r in first.sort_values("fold")["fold_run_id"].unique()]
    calibrations = [run_calibration(r) for r in fold_runs]
    policy = run.data.params.get("threshold_policy", "argmax")
    threshold = choose_threshold(policy, first["label"].to_numpy(), first["probability"].to_numpy())
    classes, example = _classes_and_example(fold_runs[0])
    with mlflow.start_run(run_id=run.info.run_id):
        info = log_classifier([keras_artifact(r.info.run_id) for r in fold_runs], classes,
                              int(run.data.params["image_size"]), example,
                              calibration=Calibration(1.0, threshold, "temperature per fold model", policy),
                              member_temperatures=[c.temperature for c in calibrations],
                              stain_references=[run_stain_reference(r) for r in fold_runs],
                              tta=run.data.params.get("tta", "none"),
                              screenings=[run_screening(r) for r in fold_runs],
                              metadata={"source_run_id": run.info.run_id, "variant": run.data.tags.get("variant", ""),
                                        "fold_run_ids": [r.info.run_id for r in fold_runs]},
                              runtime=runtime, input_mpp=run_input_mpp(fold_runs[0]))
    mlflow.MlflowClient().set_tag(run.info.run_id, "cv.ensemble_model", info.model_uri)
    return info.model_uri


def _has_artifact(run, path: str) -> bool:
    return path in {f.path for f in MlflowClient().list_artifacts(run.info.run_id, posixpath.dirname(path))}


def run_stain_reference(run) -> dict:
    """The stain reference a training run fitted on its training split (none: no normalisation)."""
    if not _has_artifact(run, STAIN_ARTIFACT):
        return dict(NO_STAIN_NORMALIZATION)
    return mlflow.artifacts.load_dict(f"runs:/{run.info.run_id}/{STAIN_ARTIFACT}")


def run_screening(run) -> str | None:
    """The local path of a training run's screening file (None for runs logged before screening existed)."""
    if not _has_artifact(run, SCREENING_ARTIFACT):
        return None
    return mlflow.artifacts.download_artifacts(run_id=run.info.run_id, artifact_path=SCREENING_ARTIFACT)


def run_calibration(run) -> Calibration:
    """The temperature and threshold a training run fitted on its validation split (none: identity, 0.5)."""
    if not _has_artifact(run, CALIBRATION_ARTIFACT):
        return Calibration()
    saved = mlflow.artifacts.load_dict(f"runs:/{run.info.run_id}/{CALIBRATION_ARTIFACT}")
    return Calibration(**{f.name: saved[f.name] for f in fields(Calibration)})
