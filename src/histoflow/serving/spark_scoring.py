"""Batch scoring on Spark (`predict -P engine=spark`): the registered model as `mlflow.pyfunc.spark_udf`
over Spark's binaryFile source (or a Parquet table of image bytes), so that a cluster scores a folder
that one machine would take hours over.

`spark_master` (or SPARK_MASTER) says where: `local[*]` (every core of this machine, the default) or a
cluster's master URL; under `spark-submit` the session it made is used. The model runs in each
executor's own Python (env_manager=local: the executors need this package's dependencies, as the
scoring image has them). Images travel as base64 strings, the served model's input; each Arrow batch
holds at most ARROW_BATCH images, so that executors hold a bounded number of decoded images.
"""

from __future__ import annotations

import os
from urllib.parse import unquote

import pandas as pd

from histoflow.data.images import IMAGE_EXTENSIONS
from histoflow.errors import ConfigError
from histoflow.serving.requests import INPUT_COLUMN
from histoflow.serving.settings import is_parquet_table

ARROW_BATCH = 256
SQL_CONF = {
    # Spark 4 splits base64 into 76-character lines by default; the model takes plain base64.
    "spark.sql.chunkBase64String.enabled": "false",
    "spark.sql.execution.arrow.maxRecordsPerBatch": str(ARROW_BATCH),
    # Every partition loads the model (TensorFlow, ~2 s): Spark's default cost of 4 MB a file when it packs
    # files into partitions puts only ~32 small tiles in one, so 10,000 IDC patches would load it 320 times.
    "spark.sql.files.openCostInBytes": str(64 * 1024),
}
FILE_PREFIX = "file:"


def spark_session(master: str = ""):
    """The active session (spark-submit's), or one on `master`, SPARK_MASTER, or local[*]; with SQL_CONF."""
    from pyspark.sql import SparkSession

    session = SparkSession.getActiveSession() or (
        SparkSession.builder.master(master or os.environ.get("SPARK_MASTER", "local[*]"))
        .appName("histoflow-predict").config("spark.ui.enabled", "false").getOrCreate())
    for key, value in SQL_CONF.items():
        session.conf.set(key, value)
    return session


def result_type(model_uri: str) -> str:
    """The UDF's struct type: the model signature's output columns that every response has (gradcam, asked
    for per request, is not one), as Spark DDL."""
    from mlflow.models import get_model_info
    from mlflow.types.schema import Map

    def ddl(kind) -> str:
        return f"map<string,{ddl(kind.value_type)}>" if isinstance(kind, Map) else kind.name

    signature = get_model_info(model_uri).signature
    if signature is None or signature.outputs is None:
        raise ConfigError(f"{model_uri} has no output signature: it is not a histoflow serving model")
    return ", ".join(f"{column.name} {ddl(column.type)}" for column in signature.outputs.inputs if column.required)


def image_table(spark, source: str, paths: list[str] | None = None):
    """path, content of the images: a Parquet table (columns path and content, as binaryFile writes them),
    or every image file under a folder (only `paths` among them, when given)."""
    from pyspark.sql import functions as F

    if is_parquet_table(source):
        table = spark.read.parquet(source)
        missing = {"path", "content"} - set(table.columns)
        if missing:
            raise ConfigError(f"{source}: a Parquet table of images needs the columns path and content "
                              f"(missing {', '.join(sorted(missing))})")
        return table.select("path", "content")
    # Hadoop globs are case-sensitive: both spellings of every extension.
    extensions = sorted({e.lstrip(".") for ext in IMAGE_EXTENSIONS for e in (ext.lower(), ext.upper())})
    table = (spark.read.format("binaryFile").option("recursiveFileLookup", "true")
             .option("pathGlobFilter", "*.{" + ",".join(extensions) + "}").load(source)
             # Local files are file: URIs, percent-encoded: back to the paths discovery gives.
             .select(F.expr(f"url_decode(regexp_replace(path, '^{FILE_PREFIX}', ''))").alias("path"), "content"))
    if paths is not None:
        wanted = spark.createDataFrame(pd.DataFrame({"path": [os.path.abspath(p) for p in paths]}))
        table = table.join(F.broadcast(wanted), "path")
    return table


def score_on_spark(model_uri: str, source: str, paths: list[str] | None = None, master: str = "") -> pd.DataFrame:
    """One row per image: path (a local path for local files) and the served model's columns."""
    import mlflow
    from pyspark.sql import functions as F

    spark = spark_session(master)
    predict = mlflow.pyfunc.spark_udf(spark, model_uri, result_type=result_type(model_uri), env_manager="local")
    images = image_table(spark, source, paths)
    scored = images.select("path", predict(F.base64("content").alias(INPUT_COLUMN)).alias("served"))
    out = scored.select("path", "served.*").toPandas()
    # A Parquet table written from binaryFile keeps its file: URIs.
    out["path"] = [unquote(p.removeprefix(FILE_PREFIX)) if p.startswith(FILE_PREFIX) else p for p in out["path"]]
    # Spark's maps arrive as lists of (key, value) pairs; the served model's are dicts.
    for column in out.columns:
        if len(out) and isinstance(out[column].iloc[0], list):
            out[column] = [dict(pairs) for pairs in out[column]]
    return out
