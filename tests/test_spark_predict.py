"""`predict -P engine=spark`: the registered model as a Spark UDF in local mode (pyspark, Java from Debian)
gives what in-process `predict` gives, for a folder and for a Parquet table of image bytes."""

from __future__ import annotations

import shutil

import numpy as np
import pandas as pd
import pytest

from conftest import BREAKHIS
from histoflow.errors import ConfigError
from histoflow.serving.batch_predict import PredictConfig, batch_predict

MASTER = "local[1]"  # one Python worker: one copy of the model (scoring on Spark is what is checked, not its speed)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """A BreaKHis tree: 4 images of a benign and 4 of a malignant patient (copies), and a truncated file."""
    root = tmp_path_factory.mktemp("spark-data") / "breakhis"
    slides = BREAKHIS / "BreaKHis_v1" / "histology_slides" / "breast"
    for cls in ("benign", "malignant"):
        patient = sorted(p for p in (slides / cls / "SOB").glob("*/*") if p.is_dir())[0]
        images = sorted(patient.rglob("*.png"))[:4]
        for image in images:
            target = root / image.relative_to(BREAKHIS)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(image, target)
    broken = target.with_name(target.stem[:-3] + "999.png")
    broken.write_bytes(target.read_bytes()[:300])
    return root


@pytest.fixture(scope="module")
def spark():
    from histoflow.serving.spark_scoring import spark_session

    session = spark_session(MASTER)
    yield session
    session.stop()


def _compare(spark_scored: pd.DataFrame, here: pd.DataFrame) -> None:
    here = here.assign(path=[str(p) for p in here["path"]]).set_index("path").sort_index()
    there = spark_scored.set_index("path").sort_index()
    assert list(there.index) == list(here.index)
    for column in ("label", "model_label", "flags", "patient"):
        assert there[column].tolist() == here[column].tolist(), column
    for column in ("p_benign", "p_malignant", "positive_probability", "tissue_fraction", "focus", "ood_score",
                   "colour_score"):
        np.testing.assert_allclose(there[column], here[column], atol=1e-6, err_msg=column)


@pytest.mark.slow
def test_a_folder_on_spark_gives_the_in_process_predictions(use_store, classifier, folder, spark, tmp_path):
    import mlflow

    model_uri, _ = classifier
    here = batch_predict(model_uri, str(folder), str(tmp_path / "here"))
    there = batch_predict(model_uri, str(folder), str(tmp_path / "spark"), engine="spark", spark_master=MASTER)
    assert len(there) == 8 and not there["path"].str.endswith("999.png").any()  # unreadable: left out in both
    _compare(there, here)
    patients_here = pd.read_csv(tmp_path / "here" / "patients.csv")
    patients_spark = pd.read_csv(tmp_path / "spark" / "patients.csv")
    pd.testing.assert_frame_equal(patients_spark, patients_here, atol=1e-9)
    run = mlflow.search_runs(filter_string="params.engine = 'spark'", output_format="list")[0]
    assert run.data.metrics["accuracy"] == pytest.approx(float((there["model_label"] == there["true_label"]).mean()))


@pytest.mark.slow
def test_a_parquet_table_of_images(use_store, classifier, folder, spark, tmp_path):
    model_uri, _ = classifier
    table = str(tmp_path / "images.parquet")
    (spark.read.format("binaryFile").option("recursiveFileLookup", "true").option("pathGlobFilter", "*[0-8].png")
     .load(str(folder)).write.parquet(table))
    there = batch_predict(model_uri, table, str(tmp_path / "spark"), engine="spark", spark_master=MASTER)
    here = batch_predict(model_uri, str(folder), str(tmp_path / "here"))
    assert len(there) == 8 and there["patient"].str.startswith("SOB_").all()  # patients from the file names
    _compare(there.assign(true_label=None), here.assign(true_label=None))
    bad = str(tmp_path / "paths.parquet")
    spark.createDataFrame(pd.DataFrame({"path": ["a.png"]})).write.parquet(bad)
    with pytest.raises(ConfigError, match="needs the columns path and content"):
        batch_predict(model_uri, bad, str(tmp_path / "bad"), engine="spark", spark_master=MASTER)


def test_engine_settings_are_checked():
    with pytest.raises(ConfigError, match="engine must be one of local, spark"):
        PredictConfig(data_dir="x", engine="dask").validate()
    with pytest.raises(ConfigError, match="scored with engine=spark"):
        PredictConfig(data_dir="images.parquet").validate()


@pytest.mark.slow
def test_slides_on_spark_give_the_in_process_results(use_store, classifier, spark, tmp_path):
    """predict-slide with engine=spark (a task per slide, each executor loading the model and writing its slide's
    folder) gives the tiles and summaries of the local engine; a file that is not a slide is reported, not fatal."""
    import dataclasses

    from conftest import IDC
    from histoflow.serving.settings import SlideConfig
    from histoflow.serving.slide_predict import run
    from test_slides import IDC_MPP, PATCH, mosaic, write_pyramid

    folder = tmp_path / "slides"
    folder.mkdir()
    for i, patient in enumerate(sorted(p.name for p in IDC.iterdir() if p.is_dir())[:2]):
        canvas, _ = mosaic([patient])
        write_pyramid(folder / f"slide{i}.tiff", canvas, IDC_MPP)
    (folder / "broken.svs").write_text("not a slide")
    local = SlideConfig(slides=str(folder), model_uri=classifier[0], output_dir=str(tmp_path / "local"),
                        tile_px=PATCH, mpp=IDC_MPP, batch=16)
    here = run(local)
    there = run(dataclasses.replace(local, output_dir=str(tmp_path / "spark"), engine="spark", spark_master=MASTER))
    assert there["call"].tolist() == here["call"].tolist() and there["problem"].notna().sum() == 1
    for name in ("slide0", "slide1"):
        a, b = (pd.read_csv(tmp_path / engine / name / "tiles.csv") for engine in ("local", "spark"))
        assert a[["x", "y"]].equals(b[["x", "y"]])
        np.testing.assert_allclose(a["positive_probability"], b["positive_probability"], atol=1e-6)
