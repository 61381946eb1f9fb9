"""Python's garbage collector in a short training run: its default threshold against histoflow's.

`histoflow` sets the young generation's threshold to histoflow.cli.GC_THRESHOLD (a collection every 50,000
allocations instead of Python's 700): Keras and TensorFlow trace a model's graph out of millions of short-lived
Python objects, and with the default the collector runs thousands of times during a run. Each row is one
`training_run.run` in a fresh process (imports not counted: the run alone), alternating default and
histoflow's threshold, `--repeats` times each: the run's CPU seconds (RUSAGE_SELF around it), the collector's
own seconds (gc.callbacks) and the process's peak resident memory. Reported: medians and the ratio
histoflow / default, per variant.

    python bench/gc_threshold.py --data_dir ../shared/data/breakhis --variants baseline,transfer
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_store import absolute  # noqa: E402

CHILD = r"""
import gc, json, resource, sys, time
threshold, variant, data_dir, store = sys.argv[1:5]
if threshold != "default":
    gc.set_threshold(int(threshold), *gc.get_threshold()[1:])
import mlflow
from histoflow.modeling import training_run
from histoflow.modeling.variants import make_train_config
mlflow.set_tracking_uri(f"sqlite:///{store}/mlflow.db")
spent = [0.0, 0.0]
def timer(phase, info):
    if phase == "start":
        spent[1] = time.perf_counter()
    else:
        spent[0] += time.perf_counter() - spent[1]
extra = {"weights": "imagenet"} if variant == "transfer" else {}
config = make_train_config(variant, data_dir=data_dir, max_images=60, image_size=32, batch_size=16, epochs=1,
                           gradcam_per_class=1, bootstrap=200, experiment="gc", checkpoint_dir="none", **extra)
before = resource.getrusage(resource.RUSAGE_SELF)
gc.callbacks.append(timer)
training_run.run(config)
after = resource.getrusage(resource.RUSAGE_SELF)
print(json.dumps({"cpu": after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime, "gc": spent[0],
                  "rss_mib": after.ru_maxrss / 1024}))
"""


def _run(threshold: str, variant: str, data_dir: str, store: str) -> dict:
    """One child run, in the store's folder: MLflow puts a sqlite store's artifacts under ./mlruns."""
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
    out = subprocess.run([sys.executable, "-c", CHILD, threshold, variant, data_dir, store], capture_output=True,
                         text=True, env=env, check=True, cwd=store)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    from histoflow.cli import GC_THRESHOLD

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data_dir", default="../shared/data/breakhis")
    parser.add_argument("--variants", default="baseline,transfer")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    data_dir = absolute(args.data_dir)
    print("| variant | threshold | run CPU s | collector s | peak RSS MiB |")
    print("|---|---|---:|---:|---:|")
    ratios = []
    with tempfile.TemporaryDirectory() as store:
        _run("default", "baseline", data_dir, store)  # the store's tables and the image cache, once
        for variant in args.variants.split(","):
            rows: dict[str, list[dict]] = {"default": [], str(GC_THRESHOLD): []}
            for _ in range(args.repeats):
                for threshold in rows:
                    rows[threshold].append(_run(threshold, variant, data_dir, store))
            medians = {t: {k: statistics.median(r[k] for r in runs) for k in runs[0]} for t, runs in rows.items()}
            for threshold, m in medians.items():
                label = "Python's 700" if threshold == "default" else f"histoflow's {threshold}"
                print(f"| {variant} | {label} | {m['cpu']:.1f} | {m['gc']:.2f} | {m['rss_mib']:.0f} |")
            ratios.append((variant, medians[str(GC_THRESHOLD)]["cpu"] / medians["default"]["cpu"]))
    for variant, ratio in ratios:
        print(f"\n{variant}: run CPU histoflow / default = {ratio:.2f}")


if __name__ == "__main__":
    main()
