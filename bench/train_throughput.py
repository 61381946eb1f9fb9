"""Training throughput with MLflow tracking on vs a bare `model.fit`, per variant, in one process.

For each variant the same data and a freshly built model (same seed) are trained twice per repeat,
in alternating order: (a) bare `model.fit(train, validation_data=val)`, (b) histoflow's tracked fit
(EarlyStopping, ReduceLROnPlateau and per-epoch MLflow metrics inside an active run). Throughput is
training images per second of the fastest epoch after the first, over all repeats (the first epoch
pays graph tracing; on a shared 2-core machine single epochs of the same model vary by up to 2x, and
the fastest epoch is the least disturbed, as timeit takes the minimum). The ratio (tracked / bare)
is what to read.

    python bench/train_throughput.py --data_dir ../shared/data/idc --max_images 768 --image_size 64
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import mlflow  # noqa: E402

from histoflow.data.pipeline import augmented_size  # noqa: E402
from histoflow.data.step import prepare_data  # noqa: E402
from histoflow.modeling import training_run  # noqa: E402
from histoflow.modeling.fitting import EpochMetrics, fit, set_seeds  # noqa: E402
from histoflow.modeling.variants import make_train_config  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_store import absolute, temporary_store  # noqa: E402


class EpochTimer(keras.callbacks.Callback):
    def on_train_begin(self, logs=None):
        self.times: list[float] = []

    def on_epoch_begin(self, epoch, logs=None):
        self.start = time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):
        self.times.append(time.perf_counter() - self.start)


def measure(config, datasets, n_train: int, tracked: bool, epochs: int) -> float:
    set_seeds(config.seed)
    model = training_run.build(config)
    train_ds, val_ds, _ = datasets
    timer = EpochTimer()
    if tracked:
        with mlflow.start_run(run_name=f"bench-{config.variant}"):
            # patience > epochs: every epoch runs in both modes.
            fit(model, train_ds, val_ds, epochs=epochs, extra_callbacks=[EpochMetrics(), timer], class_weight=None,
                patience=epochs + 1, lr_patience=epochs + 1)
    else:
        model.fit(train_ds, validation_data=val_ds, epochs=epochs, verbose=0, callbacks=[timer])
    return n_train / min(timer.times[1:])  # fastest epoch of this run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data_dir", default="../shared/data/idc")
    parser.add_argument("--max_images", type=int, default=768)
    parser.add_argument("--image_size", type=int, default=64)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--variants", default="baseline,augmented,densenet,transfer")
    parser.add_argument("--transfer_weights", default="imagenet")
    args = parser.parse_args()
    data_dir, transfer_weights = absolute(args.data_dir), absolute(args.transfer_weights)
    temporary_store("histoflow-bench-train-")
    mlflow.set_experiment("bench-train-throughput")
    rows = []
    for variant in args.variants.split(","):
        extra = {"weights": "none"} if variant == "densenet" else {}
        if variant == "transfer":
            extra = {"weights": transfer_weights}
        config = make_train_config(variant, data_dir=data_dir, max_images=args.max_images,
                                   image_size=args.image_size, batch_size=32, **extra)
        prepared = prepare_data(config)
        datasets = training_run.datasets(config, prepared)
        n_train = augmented_size(len(prepared.rows("train")), config.augment)
        bare, tracked = [], []
        for repeat in range(args.repeats):
            order = (False, True) if repeat % 2 == 0 else (True, False)
            for is_tracked in order:
                (tracked if is_tracked else bare).append(measure(config, datasets, n_train, is_tracked, args.epochs))
        b, t = max(bare), max(tracked)  # fastest epoch over all repeats
        rows.append((variant, config.model_name, n_train, b, t, t / b))
        print(f"{variant}: bare {b:.1f} img/s, tracked {t:.1f} img/s, ratio {t / b:.3f}", flush=True)
    print()
    print(f"max_images={args.max_images}, image_size={args.image_size}, batch 32, {args.epochs} epochs "
          f"(fastest epoch after the first, over {args.repeats} repeats)")
    print("| variant | model | train images/epoch | bare model.fit img/s | tracked img/s | tracked / bare |")
    print("|---|---|---:|---:|---:|---:|")
    for variant, model, n, b, t, ratio in rows:
        print(f"| {variant} | {model} | {n} | {b:.1f} | {t:.1f} | {ratio:.3f} |")


if __name__ == "__main__":
    main()
