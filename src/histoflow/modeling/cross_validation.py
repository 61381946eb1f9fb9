"""The `cv` entry point: patient-level cross-validation of a training variant, repeated if asked.

Every image is held out once per repeat: StratifiedGroupKFold over the patient groups (seed + repeat)
makes the folds; inside each fold's training part an inner patient split gives the validation images
that drive early stopping, the temperature and the threshold; the held-out fold is only reported. Each
fold is a nested run with the training run's full logging. The parent run holds, for every validation
and test metric, the mean, standard deviation and a 95 % t-interval across folds; the pooled
out-of-fold predictions (one row per image and repeat); pooled ROC, confusion and reliability figures;
and per-patient results.
"""

from __future__ import annotations

import dataclasses

import mlflow
import numpy as np
import pandas as pd
from scipy import stats
from sklearn.metrics import roc_auc_score

from histoflow import tracking
from histoflow.artifacts import CV_STEP, FOLDS_ARTIFACT, OOF_ARTIFACT
from histoflow.data.splits import cv_folds
from histoflow.data.step import prepare_data
from histoflow.modeling import distributed, figures, metrics
from histoflow.modeling.calibration import calibration_metrics
from histoflow.modeling.evaluation import log_figure
from histoflow.modeling.training_run import TrainOutcome, train_in_run
from histoflow.modeling.variants import CVConfig


def t_interval(values: np.ndarray, level: float = 0.95) -> tuple[float, float]:
    """The mean's interval from Student's t over folds (nan with fewer than two finite values)."""
    values = np.asarray([v for v in values if np.isfinite(v)], dtype=float)
    if len(values) < 2:
        return float("nan"), float("nan")
    if np.ptp(values) == 0:
        return float(values[0]), float(values[0])
    low, high = stats.t.interval(level, len(values) - 1, loc=values.mean(), scale=stats.sem(values))
    return float(low), float(high)


def summarise(outcomes: list[TrainOutcome]) -> dict[str, float]:
    """cv_<split>_<metric>_{mean,std,ci_low,ci_high} over the folds' validation and test metrics; the
    interval of a rate (every metric but the loss) is cut to [0, 1], where a t-interval over 5 folds
    can reach past it."""
    summary = {}
    for split in ("validation", "test"):
        names = sorted({name for o in outcomes for name in getattr(o, split)})
        for name in names:
            values = np.array([getattr(o, split).get(name, np.nan) for o in outcomes], dtype=float)
            finite = values[np.isfinite(values)]
            if not len(finite):
                continue
            low, high = t_interval(finite)
            if name != "loss":
                low, high = max(low, 0.0), min(high, 1.0)
            summary.update({f"cv_{split}_{name}_mean": float(finite.mean()),
                            f"cv_{split}_{name}_std": float(finite.std(ddof=1)) if len(finite) > 1 else 0.0})
            if np.isfinite(low):
                summary.update({f"cv_{split}_{name}_ci_low": low, f"cv_{split}_{name}_ci_high": high})
    return summary


def _log_pooled(oof: pd.DataFrame, class_names: list[str]) -> dict[str, float]:
    """Figures and metrics of the out-of-fold predictions pooled over folds (per repeat, then averaged)."""
    pooled: dict[str, list[float]] = {}
    for repeat, part in oof.groupby("repeat"):
        y, p, decided = part["label"].to_numpy(), part["probability"].to_numpy(), part["predicted"].to_numpy()
        # Each fold decided with its own threshold: the pooled decisions are those, not one new cut.
        scores = {**metrics.decision_metrics(y, decided), "roc_auc": float(roc_auc_score(y, p)),
                  **calibration_metrics(y, p)}
        # Each patient is in one fold per repeat: its call uses that fold's threshold, like its images'.
        per_patient = pd.concat([metrics.patient_table(f["patient"], f["probability"].to_numpy(), f["label"].to_numpy(),
                                                       float(f["threshold"].iloc[0]))
                                 for _, f in part.groupby("fold")], ignore_index=True)
        scores["patient_accuracy"] = float((per_patient["label"] == per_patient["predicted"]).mean())
        for name, value in scores.items():
            pooled.setdefault(name, []).append(value)
        if repeat == 0:
            matrix = pd.crosstab(part["label"], part["predicted"]).reindex(index=[0, 1], columns=[0, 1],
                                                                             fill_value=0).to_numpy()
            log_figure(figures.confusion_figure(matrix, class_names, "out-of-fold confusion (each fold's threshold)"),
                       "cv/oof_confusion_matrix.png")
            log_figure(figures.roc_figure(y, p, "out-of-fold ROC"), "cv/oof_roc_curve.png")
            log_figure(figures.reliability_figure(y, {"calibrated": p}, "out-of-fold reliability"),
                       "cv/oof_reliability.png")
            mlflow.log_table(per_patient, "cv/patients.json")
    return {f"oof_{name}": float(np.mean(values)) for name, values in pooled.items()}


def _cost(outcomes: list) -> dict[str, float]:
    """The model's size and the training time of the whole cross-validation (every fold's)."""
    folds = [mlflow.get_run(o.run_id).data.metrics for o in outcomes]
    return {"n_params": folds[0]["n_params"], "train_time_s": float(sum(f["train_time_s"] for f in folds))}


def run(config: CVConfig) -> str:
    """Cross-validate the variant as a parent run with one nested run per fold; returns the parent's id."""
    config.validate()
    distributed.refuse_cluster("cv")
    t = config.train
    tracking.configure(t.experiment)
    prepared = prepare_data(t)
    folds = cv_folds(prepared.dataset.frame, config.folds, config.repeats, t.val_fraction, t.seed,
                     prepared.dataset.class_names)
    name = t.run_name or f"cv-{t.variant}-{t.model_name}-{prepared.dataset.name}"
    with mlflow.start_run(run_name=name) as parent:
        tracking.log_new_params({**t.to_params(), "folds": config.folds, "repeats": config.repeats})
        mlflow.set_tags({"histoflow.step": CV_STEP, "variant": t.variant, "model": t.model_name,
                         "dataset.name": prepared.dataset.name, "dataset.digest": prepared.dataset.digest,
                         "split_mode": "patient-cv", "split_leaky": "false"})
        tracking.log_environment()
        assignment = pd.concat([f.frame.assign(repeat=f.repeat, fold=f.fold)[["relpath", "patient", "group", "label",
                                                                              "split", "repeat", "fold"]]
                                for f in folds])
        tracking.log_table(assignment, FOLDS_ARTIFACT)
        outcomes, oof = [], []
        for fold in folds:
            print(f"cv {name}: repeat {fold.repeat + 1}/{config.repeats}, fold {fold.fold + 1}/{config.folds}")
            with mlflow.start_run(run_name=f"{name}-r{fold.repeat}-f{fold.fold}", nested=True):
                mlflow.set_tags({"histoflow.step": "cv-fold", "cv.parent_run_id": parent.info.run_id,
                                 "cv.repeat": str(fold.repeat), "cv.fold": str(fold.fold)})
                outcome = train_in_run(t, dataclasses.replace(prepared, frame=fold.frame),
                                       f"{name}-r{fold.repeat}-f{fold.fold}")
            outcomes.append(outcome)
            test = fold.frame[fold.frame["split"] == "test"]
            oof.append(test[["relpath", "patient", "label"]].assign(
                repeat=fold.repeat, fold=fold.fold, probability=outcome.test_probabilities[:, 1],
                predicted=(outcome.test_probabilities[:, 1] >= outcome.calibration.threshold).astype(int),
                threshold=outcome.calibration.threshold, fold_run_id=outcome.run_id))
        table = pd.concat(oof, ignore_index=True)
        tracking.log_table(table, OOF_ARTIFACT)
        summary = summarise(outcomes)
        mlflow.log_metrics({**summary, **_log_pooled(table, prepared.dataset.class_names), **_cost(outcomes)})
        mlflow.set_tag("cv.fold_run_ids", ",".join(o.run_id for o in outcomes))
        auc, std = summary.get("cv_test_roc_auc_mean", float("nan")), summary.get("cv_test_roc_auc_std", float("nan"))
        bal = summary.get("cv_test_balanced_accuracy_mean", float("nan"))
        print(f"cv {name}: test ROC AUC {auc:.4f} +- {std:.4f}, balanced accuracy {bal:.4f} over "
              f"{len(outcomes)} folds (run {parent.info.run_id})")
        print(f"  in the MLflow UI: {tracking.ui_link(parent.info.experiment_id, parent.info.run_id)}")
        return parent.info.run_id
