"""The `compare` entry point: the reports' summary table of an experiment's training runs and cross-validations
(Markdown + CSV), with paired comparisons of cross-validations run on the same folds."""

from __future__ import annotations

import itertools
import os
from pathlib import Path

import mlflow
import pandas as pd

from histoflow import tracking
from histoflow.artifacts import CV_STEP, FOLDS_ARTIFACT, OOF_ARTIFACT
from histoflow.errors import DataError
from histoflow.modeling.metrics import paired_patient_bootstrap
from histoflow.registry.settings import CompareConfig

# Single runs: the test metric, and its patient-bootstrap interval where one exists.
METRICS = {"test_accuracy": "Accuracy", "test_loss": "Loss", "test_precision": "Precision", "test_recall": "Recall",
           "test_f1": "F1", "test_roc_auc": "AUC", "test_balanced_accuracy": "Balanced accuracy", "test_ece": "ECE",
           "test_patient_score": "Patient score"}
WITH_INTERVAL = ("AUC", "Balanced accuracy")
TAGS = {"tags.mlflow.runName": "Run", "Settings": "Settings", "tags.model": "Model",
        "tags.dataset.name": "Dataset", "tags.split_mode": "Split"}
OTHER = {"metrics.n_params": "Params", "metrics.train_time_s": "Train time (s)"}
PAIRED = ("roc_auc", "balanced_accuracy")
# Not shown as settings: where a run's inputs were, and the variant (the run's name says it).
NOT_SETTINGS = ("params.split_table", "params.data_dir", "params.variant")


def settings(runs: pd.DataFrame) -> list[str]:
    """What tells runs of the same model apart: the parameters whose values differ among them, as
    `name=value` (runs of a model with no sibling get "")."""
    params = [c for c in runs.columns if c.startswith("params.") and c not in NOT_SETTINGS]
    out = pd.Series("", index=runs.index)
    model = runs["tags.model"].fillna("") if "tags.model" in runs else pd.Series("", index=runs.index)
    for _, group in runs.groupby(model, sort=False):
        varying = [c for c in params if group[c].dropna().nunique() > 1]
        for i, row in group.iterrows():
            out[i] = ", ".join(f"{c.removeprefix('params.')}={row[c]}" for c in varying if pd.notna(row[c]))
    return out.tolist()


def _search(experiment: str, query: str, dataset: str) -> pd.DataFrame:
    if dataset:
        query += f" and tags.`dataset.name` = '{dataset}'"
    return mlflow.search_runs(experiment_names=[experiment], filter_string=query,
                              order_by=["attributes.start_time DESC"])


def summary(experiment: str, dataset: str = "") -> pd.DataFrame:
    """One row per finished training run (not the folds of a cross-validation) and per cross-validation.

    A run's metrics are its test metrics (AUC and balanced accuracy with their 95 % patient-bootstrap
    interval, `... low`/`... high`); a cross-validation's are the means over its folds, with `... std`.
    """
    if mlflow.get_experiment_by_name(experiment) is None:
        raise DataError(f"no experiment named {experiment!r} in {mlflow.get_tracking_uri()}")
    runs = _search(experiment, "attributes.status = 'FINISHED' and metrics.test_accuracy >= 0", dataset)
    if not runs.empty and "tags.cv.parent_run_id" in runs:
        runs = runs[runs["tags.cv.parent_run_id"].isna()]
    cvs = _search(experiment, f"attributes.status = 'FINISHED' and tags.`histoflow.step` = '{CV_STEP}'", dataset)
    if runs.empty and cvs.empty:
        raise DataError(f"experiment {experiment!r} has no finished training run"
                        + (f" on dataset {dataset!r}" if dataset else ""))
    both = pd.concat([runs, cvs], keys=["run", "cv"])
    # Joined, not set in place: search_runs builds its frame a column at a time, and a column inserted into that
    # fragmented frame made pandas warn (PerformanceWarning) in every comparison.
    both = pd.concat([both, pd.Series(settings(both), index=both.index, name="Settings")], axis=1)
    runs, cvs = (both.loc[kind] if kind in both.index.get_level_values(0) else pd.DataFrame()
                 for kind in ("run", "cv"))
    parts = []
    if not runs.empty:
        columns = {**TAGS, **{f"metrics.{k}": v for k, v in METRICS.items()},
                   **{f"metrics.{k}_ci_{end}": f"{v} {end}" for k, v in METRICS.items() if v in WITH_INTERVAL
                      for end in ("low", "high")}, **OTHER}
        parts.append(runs.reindex(columns=["run_id", *columns]).rename(columns=columns).assign(Kind="run"))
    if not cvs.empty:
        columns = {**TAGS, **{f"metrics.cv_{k}_mean": v for k, v in METRICS.items()},
                   **{f"metrics.cv_{k}_std": f"{v} std" for k, v in METRICS.items()}, **OTHER}
        table = cvs.reindex(columns=["run_id", *columns, "params.folds", "params.repeats"]).rename(columns=columns)
        table["Split"] = [f"patient {f}-fold CV x{r}" for f, r in zip(table.pop("params.folds"),
                                                                      table.pop("params.repeats"), strict=True)]
        parts.append(table.assign(Kind="cv"))
    table = pd.concat(parts, ignore_index=True)
    table["Params"] = table["Params"].astype("Int64")
    return table[["run_id", "Kind", *[c for c in table if c not in ("run_id", "Kind")]]]


def _number(value: float, low: float = float("nan"), high: float = float("nan"), std: float = float("nan")) -> str:
    if pd.isna(value):
        return ""
    if pd.notna(std):
        return f"{value:.4f} ± {std:.4f}"
    return f"{value:.4f} [{low:.3f}, {high:.3f}]" if pd.notna(low) and pd.notna(high) else f"{value:.4f}"


def to_markdown(table: pd.DataFrame) -> str:
    """The table as Markdown: single runs with 95 % intervals [low, high], cross-validations as mean ± std."""
    shown = table.drop(columns=["run_id"]).copy()
    for name in METRICS.values():
        low, high, std = (shown.pop(c) if c in shown else pd.Series(float("nan"), index=shown.index)
                          for c in (f"{name} low", f"{name} high", f"{name} std"))
        shown[name] = [_number(*values) for values in zip(shown[name], low, high, std, strict=True)]
    shown = shown.rename(columns={name: f"{name} [95% CI] / ± std" for name in WITH_INTERVAL})
    shown["Train time (s)"] = shown["Train time (s)"].map(lambda v: f"{v:.0f}" if pd.notna(v) else "")
    return shown.to_markdown(index=False)


def _same_folds(a: str, b: str) -> bool:
    folds = [pd.read_csv(mlflow.artifacts.download_artifacts(run_id=r, artifact_path=FOLDS_ARTIFACT))
             .sort_values(["repeat", "relpath"]).reset_index(drop=True) for r in (a, b)]
    return folds[0][["relpath", "repeat", "fold", "split"]].equals(folds[1][["relpath", "repeat", "fold", "split"]])


def paired(table: pd.DataFrame, resamples: int = 1000, seed: int = 42) -> pd.DataFrame:
    """Every two cross-validations run on the same folds, compared on their out-of-fold predictions by a
    paired bootstrap over patients: the difference (first - second) of ROC AUC and balanced accuracy,
    its 95 % interval and two-sided p-value."""
    cv_runs = table[table["Kind"] == "cv"]
    rows = []
    for (_, a), (_, b) in itertools.combinations(cv_runs.iterrows(), 2):
        if not _same_folds(a["run_id"], b["run_id"]):
            continue
        oof = [pd.read_csv(mlflow.artifacts.download_artifacts(run_id=r, artifact_path=OOF_ARTIFACT),
                           dtype={"patient": str}) for r in (a["run_id"], b["run_id"])]
        both = oof[0].merge(oof[1], on=["relpath", "repeat"], suffixes=("_a", "_b"))
        result = paired_patient_bootstrap(both["patient_a"], both["label_a"], both["repeat"],
                                          (both["probability_a"], both["predicted_a"]),
                                          (both["probability_b"], both["predicted_b"]), resamples, seed=seed)
        row = {"A": _label(a), "B": _label(b), "A run_id": a["run_id"], "B run_id": b["run_id"]}
        for name in PAIRED:
            difference, low, high, p = result[name]
            row.update({f"{name} difference": difference, f"{name} low": low, f"{name} high": high,
                        f"{name} p": p})
        rows.append(row)
    return pd.DataFrame(rows)


def _label(row: pd.Series) -> str:
    return f"{row['Run']} ({row['Settings']})" if row.get("Settings") else row["Run"]


def paired_markdown(pairs: pd.DataFrame) -> str:
    shown = pairs[["A", "B"]].copy()
    for name, title in (("roc_auc", "AUC"), ("balanced_accuracy", "Balanced accuracy")):
        shown[f"{title} A - B [95% CI]"] = [f"{d:+.4f} [{lo:+.3f}, {hi:+.3f}]" for d, lo, hi in
                                            zip(pairs[f"{name} difference"], pairs[f"{name} low"],
                                                pairs[f"{name} high"], strict=True)]
        shown[f"{title} p"] = pairs[f"{name} p"].map(lambda v: f"{v:.3f}")
    return shown.to_markdown(index=False)


def write(table: pd.DataFrame, output_dir: str, pairs: pd.DataFrame | None = None) -> tuple[str, list[Path]]:
    """The Markdown table(s), and comparison.csv/.md (and comparison_paired.csv/.md) saved under output_dir."""
    markdown = to_markdown(table)
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    table.to_csv(out / "comparison.csv", index=False)
    (out / "comparison.md").write_text(markdown + "\n")
    files = [out / "comparison.csv", out / "comparison.md"]
    if pairs is not None and not pairs.empty:
        pairs.to_csv(out / "comparison_paired.csv", index=False)
        paired_text = paired_markdown(pairs)
        (out / "comparison_paired.md").write_text(paired_text + "\n")
        files += [out / "comparison_paired.csv", out / "comparison_paired.md"]
        markdown += "\n\nCross-validations on the same folds, paired bootstrap over patients:\n\n" + paired_text
    return markdown, files


def run(config: CompareConfig) -> pd.DataFrame:
    """Print the table, save CSV and Markdown under output_dir, and log both to a `compare` run."""
    tracking.configure()
    experiment, output_dir = config.experiment or tracking.current_experiment_name(), config.output_dir
    table = summary(experiment, config.dataset)
    pairs = paired(table)
    markdown, files = write(table, output_dir, pairs)
    print(markdown)
    experiment_id = mlflow.get_experiment_by_name(experiment).experiment_id
    # Under `mlflow run` the run already exists (MLFLOW_RUN_ID) and start_run resumes it.
    in_project = bool(os.environ.get("MLFLOW_RUN_ID"))
    with mlflow.start_run(experiment_id=None if in_project else experiment_id, run_name="compare"):
        mlflow.set_tag("histoflow.step", "compare")
        tracking.log_new_params({"experiment": experiment, "dataset": config.dataset, "output_dir": output_dir,
                                 "compared_runs": len(table)})
        for path in files:
            mlflow.log_artifact(str(path))
        for i, row in pairs.iterrows():  # the paired differences as metrics too, one step per pair
            mlflow.log_metrics({f"paired_{k.replace(' ', '_')}": row[k] for k in row.index if k.startswith(PAIRED)},
                               step=int(i))
    return table
