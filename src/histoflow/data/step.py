"""The data step: discover and split a dataset, describe both in MLflow, and hand the split on.

Every training run logs this description. The `data` entry point logs it alone, as the first step of
the workflow, so that a bad folder (unreadable files, one class, an unknown layout) is found before
any training; its split table (`data/split.csv`, beside `data/data_report.json`) is then handed to the
later steps as `split_table`, which read it instead of discovering, hashing and splitting again.
"""

from __future__ import annotations

import os
import posixpath
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
from PIL import Image

from histoflow import tracking
from histoflow.artifacts import SPLIT_TABLE
from histoflow.data.discovery import COLUMNS, Dataset, discover
from histoflow.data.download import ensure_dataset
from histoflow.data.settings import DataConfig, DataStepConfig
from histoflow.data.splits import LEAKY_MODES, SPLITS, check_split, split_dataset
from histoflow.errors import ConfigError, DataError

DATA_REPORT = "data/data_report.json"
# Settings that describe the images without choosing or splitting them: a split table serves any value.
UNSPLIT_SETTINGS = frozenset({"mpp"})
FIELD_SAMPLE = 2000  # training images whose size gives the field of view (headers only)
TABLE_COLUMNS = ["relpath", "label", "class_name", "patient", "group", "subtype", "magnification", "split"]


@dataclass(frozen=True)
class PreparedData:
    """A dataset with its split: what every step after the data step works on."""

    dataset: Dataset
    frame: pd.DataFrame  # the dataset's rows with a `split` column (train, val, test)
    settings: DataConfig
    split_table: str = ""  # the URI it was read from; "" when discovered and split here

    def rows(self, split: str) -> pd.DataFrame:
        return self.frame[self.frame["split"] == split]

    def summary(self) -> dict[str, dict]:
        return {s: {"images": int(len(part := self.rows(s))), "patients": int(part["patient"].nunique()),
                    "malignant_share": float(part["label"].mean())} for s in SPLITS}

    def report(self) -> dict:
        """The data report (data_report.json): the dataset's counts, the split's, and the settings."""
        return {**self.dataset.report(), "splits": self.summary(), "settings": asdict(self.settings),
                **({"split_table": self.split_table} if self.split_table else {})}


def prepare_data(config: DataConfig, split_table: str = "") -> PreparedData:
    """The split dataset: read from a data step's split table, or discovered and split now."""
    settings = config.data_config()
    if split_table:
        return read_split_table(split_table, settings)
    dataset = discover(ensure_dataset(settings.data_dir), settings.layout, settings.magnification,
                       settings.max_images, settings.seed)
    frame = split_dataset(dataset.frame, settings.split, settings.val_fraction, settings.test_fraction,
                          settings.seed)
    return PreparedData(dataset, frame, settings)


def _local_copy(uri: str) -> Path:
    if os.path.exists(uri):
        return Path(uri)
    try:
        return Path(mlflow.artifacts.download_artifacts(artifact_uri=uri))
    except Exception as exc:  # noqa: BLE001 - MLflow raises several types for a missing run or artifact
        raise DataError(f"cannot read {uri}: {exc}") from exc


def read_split_table(uri: str, settings: DataConfig) -> PreparedData:
    """A data step's split table (runs:/<id>/data/split.csv, or a local copy with data_report.json beside
    it), checked against the data settings of the step that reads it."""
    table = pd.read_csv(_local_copy(uri), dtype={"patient": str, "group": str, "magnification": str})
    report = tracking.read_json(_local_copy(posixpath.join(posixpath.dirname(uri), "data_report.json")))
    missing = sorted(set(TABLE_COLUMNS) - set(table.columns))
    if missing or "settings" not in report:
        raise DataError(f"{uri} is not a split table of histoflow's data step (missing "
                        f"{', '.join(missing) or 'the settings in data_report.json'}): run the data step again")
    made_with = DataConfig(**report["settings"])
    differ = [f"{f.name}={getattr(made_with, f.name)!r} (here {getattr(settings, f.name)!r})"
              for f in fields(DataConfig)
              if f.name not in UNSPLIT_SETTINGS and getattr(made_with, f.name) != getattr(settings, f.name)]
    if differ:
        raise ConfigError(f"split_table {uri} was made with {', '.join(differ)}: give this step the data "
                          "settings of the data step that made it")
    root = Path(report["root"])
    frame = table.assign(path=[str(root / rel) for rel in table["relpath"]], source_split=None)
    absent = [p for p in frame["path"] if not os.path.exists(p)]
    if absent:
        raise DataError(f"{len(absent)} images of the split table {uri} are missing under {root} "
                        f"(first: {absent[0]}); run the data step again")
    check_split(frame)
    dataset = Dataset(root=root, layout=report["layout"], class_names=list(report["class_names"]),
                      frame=frame[COLUMNS].reset_index(drop=True),
                      skipped=pd.DataFrame(report.get("skipped", []), columns=["relpath", "reason"]),
                      ignored_files=int(report.get("ignored_non_image_files", 0)), digest=report["digest"])
    return PreparedData(dataset, frame[[*COLUMNS, "split"]].reset_index(drop=True), settings, split_table=uri)


def log_data(prepared: PreparedData) -> dict:
    """Into the active run: dataset tags, the mlflow.data inputs, the split table and the data report."""
    dataset, mode = prepared.dataset, prepared.settings.split
    leaky = mode in LEAKY_MODES
    mlflow.set_tags({"dataset.name": dataset.name, "dataset.digest": dataset.digest,
                     "dataset.layout": dataset.layout, "split_mode": mode, "split_leaky": str(leaky).lower()})
    if leaky:
        mlflow.set_tag("mlflow.note.content", "LEAKY image-level split: one patient's images can be in "
                       "train and test; results are optimistic and not comparable to patient splits.")
    tracking.log_environment()
    tracking.log_dataset(dataset.name, dataset.digest, str(dataset.root), prepared.frame[TABLE_COLUMNS],
                         SPLIT_TABLE)
    report = prepared.report()
    if prepared.settings.mpp > 0:
        report["field_um"] = field_of_view_um(prepared.rows("train")["path"].tolist(), prepared.settings.mpp,
                                              prepared.settings.seed)
        tracking.log_new_params({"field_um": round(report["field_um"], 3)})
    tracking.log_json(report, DATA_REPORT)
    return report


def field_of_view_um(paths: list[str], mpp: float, seed: int = 0) -> float:
    """The side, in micrometres, of a typical training image taken as a square: mpp x the median of
    sqrt(width x height). The model squashes every image to its square input, so a slide's tile of this side
    shows it what a training image did (for non-square images, the same area). From the headers of at most
    FIELD_SAMPLE images."""
    if not paths:
        raise DataError("no training images to measure the field of view of")
    sample = pd.Series(paths).sample(min(len(paths), FIELD_SAMPLE), random_state=seed)
    sides = []
    for path in sample:
        with Image.open(path) as image:
            sides.append((image.width * image.height) ** 0.5)
    return float(mpp * np.median(sides))


def run(config: DataStepConfig) -> str:
    """The data step as its own run; returns the run id."""
    config.validate()
    tracking.configure(config.experiment)
    prepared = prepare_data(config)
    with mlflow.start_run(run_name=config.run_name or f"data-{prepared.dataset.name}") as active:
        tracking.log_new_params(asdict(config.data_config()))
        mlflow.set_tag("histoflow.step", "data")
        report = log_data(prepared)
        mlflow.log_metrics({"images": report["images"], "patients": report["patients"],
                            "skipped_files": len(report["skipped"]),
                            **{f"{s}_{k}": v for s, counts in report["splits"].items() for k, v in counts.items()}})
        table = pd.DataFrame(report["splits"]).T.rename_axis("split")
        print(f"{prepared.dataset.name} ({prepared.dataset.layout}, digest {prepared.dataset.digest}): "
              f"{report['images']} images of {report['patients']} patients, classes {prepared.dataset.class_names}, "
              f"{len(report['skipped'])} files skipped\n{table.to_markdown(floatfmt='.3f')}\n"
              f"split table: runs:/{active.info.run_id}/{SPLIT_TABLE}")
        return active.info.run_id
