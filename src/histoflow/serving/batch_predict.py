"""The `predict` entry point: score every image of a folder with a registered model, as a run.

Writes predictions.csv (path, the served model's columns: label, model_label, positive_class,
positive_probability, threshold, flags, one probability column per class, the quality measures) and, where the
folder's layout gives patients, patients.csv with the patient-level call made by the same rule as
evaluation (histoflow.modeling.metrics.patient_table).
"""

from __future__ import annotations

import os
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd

from histoflow import tracking
from histoflow.data.discovery import discover, patient_from_name
from histoflow.data.images import IMAGE_EXTENSIONS
from histoflow.errors import DataError
from histoflow.modeling.metrics import patient_table
from histoflow.modeling.screening import INDETERMINATE
from histoflow.progress import progress
from histoflow.serving.requests import INPUT_COLUMN, MAX_IMAGES_PER_REQUEST, encode_file, model_decision
from histoflow.serving.settings import PredictConfig, is_parquet_table


def _images(data_dir: str) -> tuple[pd.DataFrame, list[str]]:
    """The folder's images, with patients and labels where its layout gives them (and its class names, the
    positive one last), else every image file."""
    try:
        dataset = discover(data_dir)
        return (dataset.frame[["path", "patient", "class_name"]].rename(columns={"class_name": "true_label"}),
                dataset.class_names)
    except DataError:
        # An unlabelled folder: score every image file, no patients, no truth.
        paths = sorted(str(p) for p in Path(data_dir).rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS)
        if not paths:
            raise
        return pd.DataFrame({"path": paths}), []


def _patients(scored: pd.DataFrame, model_classes: list[str], folder_classes: list[str]) -> pd.DataFrame:
    """Per patient: the model's call from the mean positive probability at the model's threshold (as
    evaluation decides) and, from the folder's labels, the patient's own label (in the folder's class names,
    which may be other than the model's)."""
    positive = model_classes[-1]
    truth = (scored["true_label"] == folder_classes[-1]).astype(int) if folder_classes else None
    threshold = float(scored["threshold"].iloc[0]) if "threshold" in scored else 0.5  # older models: argmax
    table = patient_table(scored["patient"], scored[f"p_{positive}"], truth, threshold)
    table["predicted"] = np.where(table["predicted"] == 1, positive, model_classes[0])
    if truth is not None:
        table["true_label"] = np.where(table.pop("label") == 1, folder_classes[-1], folder_classes[0])
    return table.rename(columns={"mean_p": f"mean_p_{positive}", "predicted": "label"})


def _score_here(model_uri: str, paths: list[str], chunk: int) -> pd.DataFrame:
    model = mlflow.pyfunc.load_model(model_uri)
    parts = []
    for start in progress(range(0, len(paths), chunk), desc=f"scoring {len(paths)} images", unit="batch"):
        parts.append(model.predict(pd.DataFrame({INPUT_COLUMN: [encode_file(p) for p in paths[start:start + chunk]]})))
    return pd.concat(parts, ignore_index=True)


def _scored_on_spark(model_uri: str, data_dir: str, spark_master: str) -> tuple[pd.DataFrame, list[str]]:
    """The images (with patients and labels where the folder's layout gives them) and their served columns,
    scored on Spark. A folder is discovered here first, so that unreadable files are left out as in-process."""
    from histoflow.serving.spark_scoring import score_on_spark

    if is_parquet_table(data_dir):
        served = score_on_spark(model_uri, data_dir, None, spark_master)
        frame = served[["path"]].copy()
        patients = [patient_from_name(Path(p).name) for p in frame["path"]]
        if all(patients):
            frame["patient"] = patients
        return pd.concat([frame, served.drop(columns=["path"])], axis=1), []
    frame, folder_classes = _images(data_dir)
    frame = frame.assign(path=[os.path.abspath(p) for p in frame["path"]]).reset_index(drop=True)
    served = score_on_spark(model_uri, data_dir, frame["path"].tolist(), spark_master).set_index("path")
    return pd.concat([frame, served.loc[frame["path"]].reset_index(drop=True)], axis=1), folder_classes


def batch_predict(model_uri: str, data_dir: str, output_dir: str = "outputs", chunk: int = MAX_IMAGES_PER_REQUEST,
                  engine: str = "local", spark_master: str = "") -> pd.DataFrame:
    """Score every image under data_dir; CSV per image and, where patients are known, per patient."""
    if engine == "spark":
        scored, folder_classes = _scored_on_spark(model_uri, data_dir, spark_master)
    else:
        frame, folder_classes = _images(data_dir)
        scored = pd.concat([frame.reset_index(drop=True), _score_here(model_uri, frame["path"].tolist(), chunk)],
                           axis=1)
    classes = list(scored["probabilities"].iloc[0])
    for name in classes:
        scored[f"p_{name}"] = [p[name] for p in scored["probabilities"]]
    scored = scored.drop(columns=["probabilities"])
    if "quality" in scored:  # models logged before screening existed have no quality measures
        scored = pd.concat([scored.drop(columns=["quality"]), pd.DataFrame(scored["quality"].tolist(),
                                                                            index=scored.index)], axis=1)
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    scored.to_csv(out / "predictions.csv", index=False)
    with mlflow.start_run(run_name="predict", nested=mlflow.active_run() is not None):
        mlflow.set_tag("histoflow.step", "predict")
        tracking.log_new_params({"model_uri": model_uri, "data_dir": str(data_dir), "images": len(scored),
                                 "engine": engine})
        mlflow.log_artifact(str(out / "predictions.csv"))
        mlflow.log_metric("flagged_share", float((scored["label"] == INDETERMINATE).mean()))
        if "patient" in scored:
            patients = _patients(scored, classes, folder_classes)
            patients.to_csv(out / "patients.csv", index=False)
            mlflow.log_artifact(str(out / "patients.csv"))
            if folder_classes == classes:  # labelled with the model's own classes: its accuracy
                mlflow.log_metrics({"accuracy": float((model_decision(scored) == scored["true_label"]).mean()),
                                    "patient_accuracy": float((patients["label"] == patients["true_label"]).mean())})
    print(f"scored {len(scored)} images -> {out / 'predictions.csv'}")
    return scored


def run(config: PredictConfig) -> pd.DataFrame:
    config.validate()
    tracking.configure()
    return batch_predict(config.model_uri, config.data_dir, config.output_dir, engine=config.engine,
                         spark_master=config.spark_master)
