"""Measure the fold ensemble against its own members on patients that no fold has seen.

Inside a cross-validation every image is in the training part of all members but one, so the ensemble's
effect cannot be read from the out-of-fold predictions. This holds a fifth of the patients out *before*
the cross-validation (StratifiedGroupKFold by patient group, as the `cv` folds), runs nothing itself in
between, and afterwards scores the held-out patients through the served models: the ensemble that
`cv -P ensemble=true` logged, and each fold model as `register` would serve it alone (its own temperature
and validation threshold). Prints each model's metrics and the paired bootstrap over patients of the
ensemble against each member.

Usage (venv active, MLFLOW_TRACKING_URI pointing at the runs):
    python docs/ensemble_holdout.py split <data_dir> <out>       # <out>/dev and <out>/holdout, symlinks
    mlflow run . -e cv -P data_dir=<out>/dev -P ensemble=true ...    # the cross-validation, as usual
    python docs/ensemble_holdout.py score <out>/holdout --run <cv parent run id>   # or --experiment <name>:
                                                                             # its latest cross-validation
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import tempfile
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
from sklearn.metrics import roc_auc_score
from sklearn.model_selection import StratifiedGroupKFold

from histoflow.data.discovery import discover
from histoflow.modeling.calibration import calibration_metrics
from histoflow.modeling.metrics import decision_metrics, paired_patient_bootstrap
from histoflow.registry.selection import classifier_uri
from histoflow.serving.batch_predict import batch_predict
from histoflow.serving.requests import model_decision

COLUMNS = ("roc_auc", "balanced_accuracy", "recall", "specificity", "f1", "ece", "brier")


def split(data_dir: str, out: str, folds: int = 5, seed: int = 42) -> None:
    """Link every image under <out>/dev or <out>/holdout at its relative path (one fold of patient groups
    held out), so that both folders keep the dataset's layout and its patients."""
    dataset = discover(data_dir)
    frame = dataset.frame
    splitter = StratifiedGroupKFold(n_splits=folds, shuffle=True, random_state=seed)
    _, held_out = next(splitter.split(frame, frame["label"], frame["group"]))
    part = np.full(len(frame), "dev", dtype=object)
    part[held_out] = "holdout"
    for (relpath, path), where in zip(frame[["relpath", "path"]].itertuples(index=False), part, strict=True):
        link = Path(out) / where / relpath
        link.parent.mkdir(parents=True, exist_ok=True)
        if not link.exists():
            os.symlink(Path(path).resolve(), link)
    counts = frame.assign(part=part).groupby("part").agg(images=("path", "size"), patients=("patient", "nunique"))
    print(counts.to_string())


def _positive(scored: pd.DataFrame) -> str:
    """The positive class: the model's last probability column (histoflow orders classes positive last)."""
    return [c.removeprefix("p_") for c in scored.columns if c.startswith("p_")][-1]


def _scores(scored: pd.DataFrame) -> tuple[dict[str, float], np.ndarray, np.ndarray]:
    """Metrics of one model's served predictions: its probabilities, and its decisions at its threshold."""
    positive = _positive(scored)
    y = (scored["true_label"] == positive).to_numpy(dtype=int)
    probability = scored[f"p_{positive}"].to_numpy()
    decision = (model_decision(scored) == positive).to_numpy(dtype=int)
    metrics = {**decision_metrics(y, decision), "roc_auc": float(roc_auc_score(y, probability)),
               **calibration_metrics(y, probability)}
    return metrics, probability, decision


def _served(parent_id: str) -> dict[str, str]:
    """The cross-validation's ensemble and each of its members as a served model, by name."""
    parent = mlflow.get_run(parent_id)
    ensemble_uri = parent.data.tags.get("cv.ensemble_model")
    if not ensemble_uri:
        raise SystemExit(f"run {parent_id} logged no fold ensemble: run the cv with -P ensemble=true")
    members = mlflow.models.get_model_info(ensemble_uri).metadata["fold_run_ids"]
    return {"ensemble": ensemble_uri} | {f"fold {k}": classifier_uri(mlflow.get_run(r))
                                         for k, r in enumerate(members)}


def score(parent_id: str, holdout_dir: str) -> None:
    models = _served(parent_id)
    results, rows = {}, []
    with tempfile.TemporaryDirectory() as tmp, mlflow.start_run(run_name="ensemble-holdout"):
        mlflow.set_tag("cv.parent_run_id", parent_id)
        for name, uri in models.items():
            with contextlib.redirect_stdout(sys.stderr):  # stdout is the report
                scored = batch_predict(uri, holdout_dir, str(Path(tmp) / name.replace(" ", "_")))
            metrics, probability, decision = _scores(scored)
            results[name] = (scored, probability, decision)
            rows.append({"model": name, "threshold": float(scored["threshold"].iloc[0]),
                         **{c: metrics[c] for c in COLUMNS}})
    table = pd.DataFrame(rows)
    scored, p_ens, d_ens = results["ensemble"]
    print(f"\n## {mlflow.get_run(parent_id).info.run_name}, run {parent_id}: {len(scored)} images of "
          f"{scored['patient'].nunique()} held-out patients\n")
    print("| model | threshold | " + " | ".join(COLUMNS) + " |")
    print("|---|---:|" + "---:|" * len(COLUMNS))
    for row in table.itertuples(index=False):
        print(f"| {row.model} | {row.threshold:.3f} | " + " | ".join(f"{getattr(row, c):.3f}" for c in COLUMNS) + " |")
    folds = table[table.model != "ensemble"]
    print("| members, mean ± std | | " + " | ".join(f"{folds[c].mean():.3f} ± {folds[c].std(ddof=1):.3f}"
                                                 for c in COLUMNS) + " |")
    y = (scored["true_label"] == _positive(scored)).to_numpy(dtype=int)
    print("\nensemble - member (paired bootstrap over patients, 1000 resamples):\n")
    print("| member | ROC AUC | balanced accuracy |\n|---|---:|---:|")
    for name, (member, p, d) in results.items():
        if name == "ensemble":
            continue
        if not (member["path"].to_numpy() == scored["path"].to_numpy()).all():
            raise SystemExit(f"{name} scored other images than the ensemble")
        diff = paired_patient_bootstrap(scored["patient"], y, np.zeros(len(scored)), (p_ens, d_ens), (p, d))
        print(f"| {name} | " + " | ".join(_cell(*diff[m]) for m in ("roc_auc", "balanced_accuracy")) + " |")


def _latest_cv(experiment: str) -> str:
    runs = mlflow.search_runs(experiment_names=[experiment], filter_string="tags.`histoflow.step` = 'cv'",
                              order_by=["start_time DESC"], max_results=1)
    if runs.empty:
        raise SystemExit(f"no cross-validation in experiment {experiment!r}")
    return runs.run_id[0]


def _cell(d: float, low: float, high: float, p: float) -> str:
    return f"{d:+.3f} [{low:+.3f}, {high:+.3f}], " + ("p < 0.001" if p < 0.001 else f"p = {p:.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    s = commands.add_parser("split", help="link the images into <out>/dev and <out>/holdout by patient group")
    s.add_argument("data_dir")
    s.add_argument("out")
    s.add_argument("--folds", type=int, default=5, help="hold out one of this many patient folds")
    s.add_argument("--seed", type=int, default=42)
    c = commands.add_parser("score", help="score the held-out patients through the ensemble and each member")
    c.add_argument("holdout_dir")
    which = c.add_mutually_exclusive_group(required=True)
    which.add_argument("--run", help="the cross-validation's parent run id")
    which.add_argument("--experiment", help="take the latest cross-validation of this experiment")
    args = parser.parse_args()
    if args.command == "split":
        split(args.data_dir, args.out, args.folds, args.seed)
    else:
        score(args.run or _latest_cv(args.experiment), args.holdout_dir)


if __name__ == "__main__":
    main()
