"""A short training run's wall time with MLflow's asynchronous logging as MLflow leaves it, and as histoflow sets it.

A training run logs its epochs asynchronously and flushes MLflow's queue when fit ends and when the run ends.
Left alone (MLFLOW_ASYNC_LOGGING_BUFFERING_SECONDS unset: the reference, run here as "0", which MLflow reads
the same way), MLflow's logging thread polls its queue each second and each flush waits for the poll to time
out. histoflow.tracking.configure sets a buffer of ASYNC_BUFFER_S: the thread waits on its stop signal instead.
Each mode runs in a fresh process: one run to warm up (imports, first traces), then `--repeats` timed
`training_run.run`s (60 BreaKHis images at 32 px, 2 epochs, no Grad-CAM, no checkpoint); medians of their
wall and CPU seconds, and the ratio histoflow / MLflow's.

    python bench/async_flush.py --data_dir ../shared/data/breakhis
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_store import absolute, temporary_store  # noqa: E402

CHILD = r"""
import json, os, sys, tempfile, time
mode, data_dir, repeats = sys.argv[1], sys.argv[2], int(sys.argv[3])
if mode == "mlflow":
    os.environ["MLFLOW_ASYNC_LOGGING_BUFFERING_SECONDS"] = "0"
from histoflow.cli import collect_garbage_less
collect_garbage_less()
from histoflow.modeling import training_run
from histoflow.modeling.variants import make_train_config
store = tempfile.mkdtemp(prefix=f"{mode}-", dir=os.getcwd())  # a new store per mode, in the bench's folder
os.chdir(store)
os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{store}/mlflow.db"
config = make_train_config("baseline", data_dir=data_dir, max_images=60, epochs=2, image_size=32, batch_size=16,
                           gradcam_per_class=0, bootstrap=200, experiment="flush", checkpoint_dir="none")
timed = []
for k in range(repeats + 1):
    wall, cpu = time.perf_counter(), time.process_time()
    training_run.run(config)
    if k:
        timed.append((time.perf_counter() - wall, time.process_time() - cpu))
print(json.dumps({"runs": timed, "buffer": os.environ["MLFLOW_ASYNC_LOGGING_BUFFERING_SECONDS"]}))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data_dir", required=True)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    data_dir = absolute(args.data_dir)
    temporary_store("histoflow-bench-flush-")  # the children's working directory: their stores and artifacts
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "TF_NUM_INTRAOP_THREADS": "1", "TF_NUM_INTEROP_THREADS": "1"}
    env.pop("MLFLOW_ASYNC_LOGGING_BUFFERING_SECONDS", None)
    medians = {}
    print(f"{'logging':<10} {'buffer s':>8} {'wall s':>7} {'CPU s':>6}")
    for mode in ("mlflow", "histoflow"):
        out = subprocess.run([sys.executable, "-c", CHILD, mode, data_dir, str(args.repeats)], env=env,
                             capture_output=True, text=True, check=True)
        result = json.loads(out.stdout.strip().splitlines()[-1])
        wall, cpu = (statistics.median(x) for x in zip(*result["runs"], strict=True))
        medians[mode] = wall
        print(f"{mode:<10} {result['buffer']:>8} {wall:>7.2f} {cpu:>6.2f}")
    print(f"wall histoflow / mlflow: {medians['histoflow'] / medians['mlflow']:.2f}")


if __name__ == "__main__":
    main()
