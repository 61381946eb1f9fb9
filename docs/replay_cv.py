"""Replay a cross-validation under other evaluation settings (threshold policy, test-time augmentation),
from what its fold runs logged: no training.

Neither setting changes a weight (training and early stopping never see them), so each fold's network is
the one `cv` logged. With the logged predictions (`evaluation/{validation,test}_predictions.json`,
uncalibrated probabilities included) or, for `--tta dihedral8`, the fold's logged `.keras` model applied
again to its validation and held-out images, this fits the temperature and each policy's threshold on
the fold's inner validation split, exactly as a `cv` run with `-P threshold_policy=<policy> -P tta=<tta>`
would, and evaluates its held-out fold once. Prints mean ± std over folds per policy and the paired
bootstrap over patients of each policy against the first on the pooled out-of-fold predictions.

Usage (venv active, MLFLOW_TRACKING_URI pointing at the runs, run where the data_dir of the runs exists):
    python docs/replay_cv.py <cv parent run id> [...] [--policies argmax,youden,sensitivity:0.8] [--tta dihedral8]
    python docs/replay_cv.py --experiment results-cv-idc   # every cross-validation there
"""

from __future__ import annotations

import argparse
from pathlib import Path

import keras
import mlflow
import numpy as np
import pandas as pd

from histoflow.data.pipeline import make_dataset
from histoflow.modeling.calibration import fit_calibration
from histoflow.modeling.inference import predict
from histoflow.modeling.metrics import evaluate, paired_patient_bootstrap
from histoflow.registry.selection import predictions

COLUMNS = ("roc_auc", "balanced_accuracy", "recall", "specificity", "f1", "accuracy")


def _table(run_id: str, split: str) -> pd.DataFrame:
    return predictions(mlflow.get_run(run_id), split)


def _two_columns(positive: np.ndarray) -> np.ndarray:
    return np.column_stack([1 - positive, positive])


def _raw(fold_id: str, tables: list[pd.DataFrame], tta: str) -> list[np.ndarray]:
    """Each table's uncalibrated probabilities: as logged, or predicted again by the fold's model with `tta`."""
    if tta == "none":
        return [_two_columns(t["probability_uncalibrated"].to_numpy()) for t in tables]
    params = mlflow.get_run(fold_id).data.params
    if params.get("stain_norm", "none") != "none":
        raise ValueError("replaying TTA of a stain-normalised run is not supported by this script")
    folder = Path(mlflow.artifacts.download_artifacts(run_id=fold_id, artifact_path="keras"))
    model = keras.saving.load_model(next(folder.glob("*.keras")), compile=False)
    root, size = Path(params["data_dir"]), int(params["image_size"])
    return [predict(model, make_dataset([str(root / p) for p in t["relpath"]], t["label"].to_numpy(), size, 64), tta)
            for t in tables]


def replay(parent_id: str, policies: list[str], tta: str = "none") -> tuple[pd.DataFrame, dict[str, pd.DataFrame]]:
    """Per fold and policy, the held-out metrics; and per policy the pooled held-out decisions."""
    parent = mlflow.get_run(parent_id)
    folds = mlflow.search_runs(experiment_ids=[parent.info.experiment_id],
                               filter_string=f"tags.mlflow.parentRunId = '{parent_id}'")
    method = parent.data.params.get("calibration", "temperature")
    rows, pooled = [], {p: [] for p in policies}
    for fold_id, fold_name in zip(folds.run_id, folds["tags.mlflow.runName"], strict=True):
        val, test = _table(fold_id, "validation"), _table(fold_id, "test")
        val_raw, test_raw = _raw(fold_id, [val, test], tta)
        for policy in policies:
            calibration = fit_calibration(method, policy, val["label"].to_numpy(), val_raw)
            probabilities = calibration.apply(test_raw)
            scores = evaluate(test, probabilities, calibration.threshold)
            rows.append({"fold": fold_name, "policy": policy, "threshold": calibration.threshold,
                         **{k: scores[k] for k in COLUMNS}})
            pooled[policy].append(test.assign(probability=probabilities[:, 1],
                                              decision=calibration.decide(probabilities), fold=fold_name))
    return pd.DataFrame(rows), {p: pd.concat(frames, ignore_index=True) for p, frames in pooled.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="*")
    parser.add_argument("--experiment", help="replay every cross-validation (parent run) of this experiment")
    parser.add_argument("--policies", default="argmax,youden")
    parser.add_argument("--tta", default="none", choices=["none", "dihedral8"])
    args = parser.parse_args()
    policies = args.policies.split(",")
    runs = list(args.runs)
    if args.experiment:
        found = mlflow.search_runs(experiment_names=[args.experiment], filter_string="tags.histoflow.step = 'cv'")
        runs += found.run_id.tolist()
    for parent_id in runs:
        try:
            per_fold, pooled = replay(parent_id, policies, args.tta)
        except ValueError as exc:
            print(f"\n## run {parent_id}: skipped ({exc})")
            continue
        params = mlflow.get_run(parent_id).data.params
        setting = ", ".join(f"{k}={params.get(k)}" for k in ("variant", "backbone", "augment", "stain_norm"))
        print(f"\n## {mlflow.get_run(parent_id).info.run_name} ({setting}; tta={args.tta}), run {parent_id}, "
              f"{per_fold.fold.nunique()} folds\n")
        print("| policy | threshold | " + " | ".join(COLUMNS) + " |")
        print("|---|---:|" + "---:|" * len(COLUMNS))
        for policy, group in per_fold.groupby("policy", sort=False):
            cells = [f"{group[c].mean():.3f} ± {group[c].std(ddof=1):.3f}" for c in COLUMNS]
            print(f"| {policy} | {group.threshold.mean():.3f} | " + " | ".join(cells) + " |")
        base = pooled[policies[0]]
        for policy in policies[1:]:
            _print_paired(f"{policy} - {policies[0]}", pooled[policy], base, ("balanced_accuracy",))
        if args.tta != "none":  # the same policies without TTA, from the logged predictions
            _, plain = replay(parent_id, policies, "none")
            for policy in policies:
                _print_paired(f"{args.tta} - none, {policy}", pooled[policy], plain[policy],
                              ("roc_auc", "balanced_accuracy"))


def _print_paired(title: str, a: pd.DataFrame, b: pd.DataFrame, names: tuple[str, ...]) -> None:
    """A - B on the same pooled out-of-fold images, bootstrap over patients."""
    diff = paired_patient_bootstrap(b["patient"], b["label"].to_numpy(), np.zeros(len(b)),
                                    (a["probability"].to_numpy(), a["decision"].to_numpy()),
                                    (b["probability"].to_numpy(), b["decision"].to_numpy()))
    cells = []
    for name in names:
        d, low, high, p = diff[name]
        cells.append(f"{name} {d:+.3f} [{low:+.3f}, {high:+.3f}], " + ("p < 0.001" if p < 0.001 else f"p = {p:.3f}"))
    print(f"\n{title} (pooled, bootstrap over patients): " + "; ".join(cells))


if __name__ == "__main__":
    main()
