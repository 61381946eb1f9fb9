"""The data step: discover and split a dataset, and describe both in MLflow.

Every training run logs this description; the `data` entry point logs it alone, as the first step of
the workflow, so a bad folder (unreadable files, one class, an unknown layout) is found before any
training, and the dataset digest the later steps are keyed on is known.
"""

from __future__ import annotations

import mlflow
import pandas as pd

from histoflow import tracking
from histoflow.config import TrainConfig
from histoflow.datasets import Dataset, discover
from histoflow.download import ensure_dataset
from histoflow.splits import LEAKY_MODES, split_dataset

DATA_PARAMS = ("data_dir", "layout", "magnification", "max_images", "split", "val_fraction", "test_fraction",
               "seed")
SPLITS = ("train", "val", "test")


def prepare_data(config: TrainConfig) -> tuple[Dataset, pd.DataFrame]:
    dataset = discover(ensure_dataset(config.data_dir), config.layout, config.magnification,
                       config.max_images, config.seed)
    frame = split_dataset(dataset.frame, config.split, config.val_fraction, config.test_fraction, config.seed)
    return dataset, frame


def split_summary(frame: pd.DataFrame) -> dict[str, dict]:
    return {s: {"images": int((frame["split"] == s).sum()),
                "patients": int(frame.loc[frame["split"] == s, "patient"].nunique()),
                "malignant_share": float(frame.loc[frame["split"] == s, "label"].mean())}
            for s in SPLITS}


def log_data(config: TrainConfig, dataset: Dataset, frame: pd.DataFrame) -> dict:
    """Into the active run: dataset tags, the mlflow.data input, the split table and the data report."""
    leaky = config.split in LEAKY_MODES
    mlflow.set_tags({"dataset.name": dataset.name, "dataset.digest": dataset.digest, "dataset.layout": dataset.layout,
                     "split_mode": config.split, "split_leaky": str(leaky).lower()})
    if leaky:
        mlflow.set_tag("mlflow.note.content", "LEAKY image-level split: one patient's images can be in "
                       "train and test; results are optimistic and not comparable to patient splits.")
    tracking.log_environment()
    tracking.log_dataset(dataset.name, dataset.digest, str(dataset.root), frame)
    report = dataset.report()
    report["splits"] = split_summary(frame)
    tracking.log_json(report, "data/data_report.json")
    return report


def run(config: TrainConfig) -> str:
    """The data step as its own run; returns the run id."""
    tracking.configure(config.experiment)
    dataset, frame = prepare_data(config)
    with mlflow.start_run(run_name=config.run_name or f"data-{dataset.name}") as active:
        logged = mlflow.get_run(active.info.run_id).data.params
        params = config.to_params()
        mlflow.log_params({k: params[k] for k in DATA_PARAMS if k not in logged})
        report = log_data(config, dataset, frame)
        summary = report["splits"]
        mlflow.log_metrics({"images": report["images"], "patients": report["patients"],
                            "skipped_files": len(report["skipped"]),
                            **{f"{s}_{k}": v for s, counts in summary.items() for k, v in counts.items()}})
        table = pd.DataFrame(summary).T.rename_axis("split")
        print(f"{dataset.name} ({dataset.layout}, digest {dataset.digest}): {report['images']} images of "
              f"{report['patients']} patients, classes {dataset.class_names}, {len(report['skipped'])} files "
              f"skipped\n{table.to_markdown(floatfmt='.3f')}\n(run {active.info.run_id})")
        return active.info.run_id
