"""Graph tracing of a training run: what a short run spends before and around its first batches.

Each row runs twice in this process on a fresh model, Keras's default way (the reference) and histoflow's:

  fit      one epoch of `model.fit` on the run's training and validation pipelines: Keras's TensorFlow
           trainer creates the optimizer's and metrics' variables inside the first trace of its training
           step, so tf.function traces the step twice; histoflow.modeling.fitting.build_training_state
           creates them first.
  validate one epoch of fit, then the evaluation's pass over the validation and test splits (the network's
           screening extractor): Keras's validation (a test step traced for it alone) against
           histoflow.modeling.fitting.InferenceValidation (the extractor's inference graph, traced once for
           both); the variables built first in both.
  predict  the validation, test and a training-sized split through `model.predict` (which traces its step
           for the first batch's exact shape, then again for the next) against
           histoflow.modeling.inference.predict (one graph for any batch size).

Reported: seconds and traces of each, and the ratio histoflow / Keras. The models are the run's own
(DenseNet121 fusion, weights=none, frozen backbone; or the baseline CNN), on real BreaKHis images.

    python bench/tracing.py --data_dir ../shared/data/breakhis --variants densenet,baseline
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402

from histoflow.data.step import prepare_data  # noqa: E402
from histoflow.modeling import inference, training_run  # noqa: E402
from histoflow.modeling.fitting import InferenceValidation, build_training_state  # noqa: E402
from histoflow.modeling.variants import make_train_config  # noqa: E402


def _counted(model: keras.Model, method: str) -> list[int]:
    calls: list[int] = []
    original = getattr(model, method)
    setattr(model, method, lambda data: calls.append(1) or original(data))
    return calls


def _fresh(config, prepared, method: str):
    """A new model of the run, its three pipelines, and the count of traces of its `method`."""
    keras.backend.clear_session()
    setup = training_run._training_setup(config, prepared)
    return setup.model, setup.datasets, _counted(setup.model, method)


def _fit(config, prepared, prebuild: bool) -> tuple[float, int]:
    model, (train_ds, val_ds, _), traces = _fresh(config, prepared, "train_step")
    start = time.perf_counter()
    if prebuild:
        build_training_state(model, train_ds)
    model.fit(train_ds, validation_data=val_ds, epochs=1, verbose=0)
    return time.perf_counter() - start, len(traces)


def _validate(config, prepared, ours: bool) -> tuple[float, int]:
    model, (train_ds, val_ds, test_ds), traces = _fresh(config, prepared, "test_step")
    start = time.perf_counter()
    build_training_state(model, train_ds)
    model.fit(train_ds, validation_data=None if ours else val_ds, epochs=1, verbose=0,
              callbacks=[InferenceValidation(val_ds)] if ours else [])
    extractor = inference.feature_model(model)
    for data in (val_ds, test_ds):
        inference.predict(extractor, data)
    return time.perf_counter() - start, len(traces) + inference.forward(extractor).experimental_get_tracing_count()


def _predict(config, prepared, ours: bool) -> tuple[float, int]:
    model, (train_ds, val_ds, test_ds), traces = _fresh(config, prepared, "predict_step")
    start = time.perf_counter()
    for data in (val_ds, test_ds, train_ds):
        inference.predict(model, data) if ours else model.predict(data, verbose=0)
    count = inference.forward(model).experimental_get_tracing_count() if ours else len(traces)
    return time.perf_counter() - start, count


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data_dir", default="../shared/data/breakhis")
    parser.add_argument("--variants", default="densenet,baseline")
    parser.add_argument("--max_images", type=int, default=60)
    parser.add_argument("--image_size", type=int, default=32)
    args = parser.parse_args()
    print("| model | step | Keras s | traces | histoflow s | traces | ratio |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for variant in args.variants.split(","):
        extra = {"weights": "none", "unfrozen_blocks": 0} if variant == "densenet" else {}
        config = make_train_config(variant, data_dir=args.data_dir, max_images=args.max_images, epochs=1,
                                   image_size=args.image_size, batch_size=16, **extra)
        prepared = prepare_data(config)
        for step, measure in (("fit, 1 epoch", _fit), ("fit + evaluation pass", _validate),
                              ("predict val+test+train", _predict)):
            (keras_s, keras_n), (ours_s, ours_n) = measure(config, prepared, False), measure(config, prepared, True)
            print(f"| {config.model_name} | {step} | {keras_s:.1f} | {keras_n} | {ours_s:.1f} | {ours_n} | "
                  f"{ours_s / keras_s:.2f} |", flush=True)


if __name__ == "__main__":
    main()
