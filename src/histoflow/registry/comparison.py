"""The `compare` entry point: the reports' summary table of an experiment's training runs (Markdown + CSV)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import mlflow
import pandas as pd

from histoflow import tracking
from histoflow.errors import DataError


@dataclass(frozen=True)
class CompareConfig:
    experiment: str = ""  # "" = the current experiment (the `mlflow run` run's)
    dataset: str = ""  # "" = runs on every dataset
    output_dir: str = "outputs"

COLUMNS = {
    "tags.mlflow.runName": "Run",
    "tags.model": "Model",
    "tags.dataset.name": "Dataset",
    "tags.split_mode": "Split",
    "metrics.test_accuracy": "Accuracy",
    "metrics.test_loss": "Loss",
    "metrics.test_precision": "Precision",
    "metrics.test_recall": "Recall",
    "metrics.test_f1": "F1",
    "metrics.test_roc_auc": "AUC",
    "metrics.test_roc_auc_ci_low": "AUC low",
    "metrics.test_roc_auc_ci_high": "AUC high",
    "metrics.test_balanced_accuracy": "Balanced accuracy",
    "metrics.test_balanced_accuracy_ci_low": "Balanced accuracy low",
    "metrics.test_balanced_accuracy_ci_high": "Balanced accuracy high",
    "metrics.test_ece": "ECE",
    "metrics.test_patient_score": "Patient score",
    "metrics.n_params": "Params",
    "metrics.train_time_s": "Train time (s)",
}


def summary(experiment: str, dataset: str = "") -> pd.DataFrame:
    """One row per finished training run of the experiment (newest first)."""
    if mlflow.get_experiment_by_name(experiment) is None:
        raise DataError(f"no experiment named {experiment!r} in {mlflow.get_tracking_uri()}")
    query = "attributes.status = 'FINISHED' and metrics.test_accuracy >= 0"
    if dataset:
        query += f" and tags.`dataset.name` = '{dataset}'"
    runs = mlflow.search_runs(experiment_names=[experiment], filter_string=query,
                              order_by=["attributes.start_time DESC"])
    if runs.empty:
        raise DataError(f"experiment {experiment!r} has no finished training run"
                        + (f" on dataset {dataset!r}" if dataset else ""))
    table = runs.reindex(columns=["run_id", *COLUMNS]).rename(columns=COLUMNS)
    table["Params"] = table["Params"].astype("Int64")
    return table.reset_index(drop=True)


def _with_interval(value: float, low: float, high: float) -> str:
    if pd.isna(value):
        return ""
    return f"{value:.4f} [{low:.3f}, {high:.3f}]" if pd.notna(low) and pd.notna(high) else f"{value:.4f}"


def to_markdown(table: pd.DataFrame) -> str:
    """The table as Markdown; AUC and balanced accuracy with their 95 % patient-bootstrap intervals."""
    shown = table.drop(columns=["run_id"]).copy()
    for column in ("AUC", "Balanced accuracy"):
        shown[column] = [_with_interval(*values) for values in
                         zip(shown[column], shown.pop(f"{column} low"), shown.pop(f"{column} high"))]
        shown = shown.rename(columns={column: f"{column} [95% CI]"})
    for column in ("Accuracy", "Loss", "Precision", "Recall", "F1", "ECE", "Patient score"):
        shown[column] = shown[column].map(lambda v: f"{v:.4f}" if pd.notna(v) else "")
    shown["Train time (s)"] = shown["Train time (s)"].map(lambda v: f"{v:.0f}" if pd.notna(v) else "")
    return shown.to_markdown(index=False)


def write(table: pd.DataFrame, output_dir: str) -> tuple[str, list[Path]]:
    """The Markdown table, and comparison.csv/.md saved under output_dir."""
    markdown = to_markdown(table)
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    table.to_csv(out / "comparison.csv", index=False)
    (out / "comparison.md").write_text(markdown + "\n")
    return markdown, [out / "comparison.csv", out / "comparison.md"]


def run(config: CompareConfig) -> pd.DataFrame:
    """Print the table, save CSV and Markdown under output_dir, and log both to a `compare` run."""
    tracking.configure()
    experiment, output_dir = config.experiment or tracking.current_experiment_name(), config.output_dir
    table = summary(experiment, config.dataset)
    markdown, files = write(table, output_dir)
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
    return table
