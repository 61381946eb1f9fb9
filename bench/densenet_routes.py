"""Seconds per training epoch of each route to a DenseNet121 (or other backbone) fusion model, on one
dataset, in one process: which route should a CPU user take?

Routes (the same split, batch size and seed; each model built fresh):
- ``frozen, images``: the whole model on the images every epoch, backbone frozen (`unfrozen_blocks=0
  feature_cache=off`): the reference every ratio is taken against;
- ``frozen, cached features``: the head alone on the pooled taps, extracted once per image into the
  feature store (`unfrozen_blocks=0`, feature_cache auto): its one-off extraction is reported apart, per image;
- ``fine-tune top stage`` / ``fine-tune all stages``: `unfrozen_blocks=1` / `3` on the images (a warm-up
  before them runs on the cached features, at the head's cost per epoch).

An epoch's time is the fastest epoch after the first (the first pays graph tracing; single epochs on a
shared 2-core machine vary, and the fastest is the least disturbed). The reference route runs first and
again last (`--routes` default), and its faster measurement is taken: a route that comes first also pays
the process's warm-up (memory, thread pools), as a route measured in a drifting machine would.
Augmentation ``none`` (the frozen-images route with ``random`` or ``hed`` costs the same plus their
per-image transforms).

    python bench/densenet_routes.py --data_dir ../shared/data/breakhis --image_size 224 \
        --weights ../shared/keras-weights/densenet121_weights_tf_dim_ordering_tf_kernels_notop.h5
"""

from __future__ import annotations

import argparse
import os
import resource
import tempfile
import time
from dataclasses import replace

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
from train_throughput import EpochTimer  # noqa: E402  (bench/, the script's folder, is on the path)

from histoflow.data.step import prepare_data  # noqa: E402
from histoflow.modeling import training_run  # noqa: E402
from histoflow.modeling.architectures import compile_model  # noqa: E402
from histoflow.modeling.features import head_dataset, head_model, load_or_extract  # noqa: E402
from histoflow.modeling.fitting import set_seeds  # noqa: E402
from histoflow.modeling.variants import make_train_config  # noqa: E402


def _fit(model: keras.Model, train, val, epochs: int) -> float:
    timer = EpochTimer()
    model.fit(train, validation_data=val, epochs=epochs, verbose=0, callbacks=[timer])
    return min(timer.times[1:])


def image_route(config, prepared, stain, unfrozen_blocks: int, epochs: int) -> float:
    routed = replace(config, unfrozen_blocks=unfrozen_blocks, feature_cache="off")
    set_seeds(config.seed)
    model = training_run.build(routed)
    train_ds, val_ds, _ = training_run.datasets(routed, prepared, stain)
    return _fit(model, train_ds, val_ds, epochs)


def feature_route(config, prepared, stain, cache: str, epochs: int) -> tuple[float, float, int]:
    """(seconds per head epoch, extraction seconds per image, images extracted)."""
    start = time.perf_counter()
    features = load_or_extract(config, prepared, cache, stain)
    per_image = (time.perf_counter() - start) / len(prepared.frame)
    set_seeds(config.seed)
    head = compile_model(head_model(features.widths, config.fusion_width, config.dropout), config.learning_rate,
                         config.optimizer)
    epoch = _fit(head, head_dataset(features.splits["train"], config.batch_size, True, config.seed),
                 head_dataset(features.splits["val"], config.batch_size, False, config.seed), epochs)
    return epoch, per_image, len(prepared.frame)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data_dir", required=True)
    parser.add_argument("--image_size", type=int, default=224)
    parser.add_argument("--max_images", type=int, default=0)
    parser.add_argument("--weights", default="imagenet")
    parser.add_argument("--backbone", default="densenet121")
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--epochs", type=int, default=3, help="epochs per route (the first is not counted)")
    parser.add_argument("--routes", default="frozen,cached,top,all,frozen",
                        help="in this order; a route named twice keeps its faster measurement")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        config = make_train_config(
            "transfer", data_dir=args.data_dir, image_size=args.image_size, max_images=args.max_images,
            weights=args.weights, backbone=args.backbone, batch_size=args.batch_size, augment="none",
            learning_rate=1e-4, image_cache=f"{tmp}/images")
        prepared = prepare_data(config)
        stain = training_run.stain_normalizer(config, prepared)
        n_train = len(prepared.rows("train"))
        print(f"{prepared.dataset.name}: {len(prepared.frame)} images (train {n_train}, val "
              f"{len(prepared.rows('val'))}), {args.image_size} px, {args.backbone}, batch {args.batch_size}, "
              f"{args.epochs} epochs per route (the first not counted)", flush=True)
        wanted = args.routes.split(",")
        rows: list[tuple[str, float]] = []
        extraction = None
        for route in wanted:
            start = time.perf_counter()
            if route == "cached":
                epoch, per_image, n = feature_route(config, prepared, stain, f"{tmp}/features", args.epochs)
                extraction = (per_image, n)
                rows.append(("frozen, cached features (head alone)", epoch))
            else:
                blocks = {"frozen": 0, "top": 1, "all": 3}[route]
                name = {"frozen": "frozen, images", "top": "fine-tune top stage", "all": "fine-tune all stages"}[route]
                rows.append((name, image_route(config, prepared, stain, blocks, args.epochs)))
            print(f"  {rows[-1][0]}: {rows[-1][1]:.2f} s per epoch ({time.perf_counter() - start:.0f} s in all)",
                  flush=True)
            keras.backend.clear_session()
    best: dict[str, float] = {}
    for name, seconds in rows:
        best[name] = min(seconds, best.get(name, seconds))
    reference = best.get("frozen, images")
    print("\n| route | s per epoch | train images/s | ratio to frozen, images |\n|---|---:|---:|---:|")
    for name, seconds in best.items():
        ratio = f"{seconds / reference:.4f}" if reference else "n/a"
        print(f"| {name} | {seconds:.2f} | {n_train / seconds:.0f} | {ratio} |")
    if extraction:
        print(f"\nfeature extraction (once per image, every split): {extraction[0] * 1000:.1f} ms per image, "
              f"{extraction[0] * extraction[1]:.1f} s for {extraction[1]} images")
    print(f"peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB")


if __name__ == "__main__":
    main()
