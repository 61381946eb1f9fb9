"""Batch scoring throughput: `predict` in-process against `predict -P engine=spark` (local mode), one run.

Logs the histoflow serving pyfunc of an untrained baseline CNN (the weights do not change the cost) and
scores the same folder both ways through `batch_predict`, which writes the same predictions.csv and
patients.csv: in this process (the reference), then with mlflow.pyfunc.spark_udf on Spark `local[N]`
(a JVM, N Python workers that each load TensorFlow and the model). Wall time from the call to the files
written, Spark's session start included, and images per second; the ratio to in-process is what to read.

    python bench/spark_predict.py --data_dir ../shared/data/idc --image_size 64 --master "local[2]"
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import mlflow  # noqa: E402
import numpy as np  # noqa: E402

from histoflow.data.discovery import discover  # noqa: E402
from histoflow.modeling.architectures import build_baseline  # noqa: E402
from histoflow.serving.batch_predict import batch_predict  # noqa: E402
from histoflow.serving.packaging import log_classifier  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_store import absolute, temporary_store  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data_dir", default="../shared/data/idc")
    parser.add_argument("--image_size", type=int, default=64)
    parser.add_argument("--master", default="local[2]")
    args = parser.parse_args()
    data_dir = absolute(args.data_dir)
    tmp = temporary_store("histoflow-bench-spark-")  # Spark's own files (spark-warehouse, ...) land there too
    mlflow.set_experiment("bench-spark-predict")
    dataset = discover(data_dir)
    path = tmp / "baseline.keras"
    build_baseline(args.image_size).save(path)
    with mlflow.start_run():
        uri = log_classifier([path], dataset.class_names, args.image_size, dataset.frame["path"].iloc[0]).model_uri
    rows = []
    for engine in ("local", "spark"):
        start = time.perf_counter()
        scored = batch_predict(uri, data_dir, str(tmp / engine), engine=engine, spark_master=args.master)
        seconds = time.perf_counter() - start
        rows.append((engine, len(scored), seconds))
        print(f"{engine}: {len(scored)} images in {seconds:.1f} s", flush=True)
    local = {e: s for e, _, s in rows}["local"]
    here = (tmp / "local" / "predictions.csv").read_text().count("\n")
    assert here == (tmp / "spark" / "predictions.csv").read_text().count("\n")
    print(f"\n{args.data_dir}, {args.image_size} px baseline CNN, Spark {args.master}; wall time to the CSVs")
    print("| engine | images | seconds | images/s | x in-process time |")
    print("|---|---:|---:|---:|---:|")
    for engine, n, seconds in rows:
        print(f"| {engine} | {n} | {seconds:.1f} | {n / seconds:.0f} | {seconds / local:.2f} |")
    np.testing.assert_equal(rows[0][1], rows[1][1])


if __name__ == "__main__":
    main()
