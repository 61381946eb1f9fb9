"""Where one scoring request's time goes: each step of the served model's predict for one image, on TensorFlow
(the .keras networks, resized by tf.image.resize as before) and on ONNX Runtime (the default), in one run.

Steps: decode (base64 + Pillow), stain (normalisation to the run's reference), resize (to the model's size, and
scale), quality (tissue, focus, colour), forward (the network: probabilities and features), screening (OOD and
colour distances, flags), frame (the response's rows), json (MLflow's serialisation of them), and the whole
predict. Medians of --repeats calls, in process (no HTTP).

Then, for the micro-batcher's defaults: the ONNX forward pass's cost per image against the batch size (where
gathering requests stops paying), and what a lone request pays for going through the batcher (the served model
loaded twice, with and without batching, called alternately: the median of the paired differences).

    python bench/serve_profile.py --image_size 128 --repeats 200 \
        --weights ../shared/keras-weights/mobilenet_7_5_224_tf_no_top.h5
"""

from __future__ import annotations

import argparse
import io
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import mlflow  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_store import absolute, temporary_store  # noqa: E402
from serve_latency import models  # noqa: E402


def timed(step, repeats: int) -> float:
    step()  # first call apart: lazy set-up is the cold start's, not a request's
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    return float(np.median(times)) * 1000


def tf_resize(image: np.ndarray, size: int) -> np.ndarray:
    """The resize served before this change: TensorFlow's antialiased bilinear, compiled once."""
    import tensorflow as tf

    global _TF_RESIZE
    if "_TF_RESIZE" not in globals():
        _TF_RESIZE = tf.function(lambda x: tf.cast(tf.round(tf.clip_by_value(tf.image.resize(
            tf.cast(x, tf.float32), (size, size), antialias=True), 0, 255)), tf.uint8), autograph=False,
            input_signature=[tf.TensorSpec([None, None, 3], tf.uint8)])
    return _TF_RESIZE(image).numpy().astype(np.float32) / 255.0


def profile(uri: str, image: str, runtime: str, repeats: int) -> dict[str, float]:
    from mlflow.pyfunc.scoring_server import predictions_to_json

    from histoflow.data.images import resize_and_scale
    from histoflow.data.quality import COLOUR, measure
    from histoflow.modeling.screening import flags
    from histoflow.serving.requests import decode_item, encode_file

    os.environ["HISTOFLOW_RUNTIME"] = runtime
    os.environ["HISTOFLOW_MAX_BATCH"] = "0"
    model = mlflow.pyfunc.load_model(uri)
    served = model.unwrap_python_model()
    item = encode_file(image)
    decoded = decode_item(0, item)
    stain, networks = next(iter(served._groups.values()))
    normalized = stain.normalize(decoded)[0]
    resize = (lambda x: resize_and_scale(x, served.image_size)) if runtime == "onnx" else \
        (lambda x: tf_resize(x, served.image_size))
    batch = resize(normalized)[None]
    network = networks[0]
    probabilities, features = network.infer(served.tta, batch)
    quality = measure([decoded], served.image_size)
    request = pd.DataFrame({"image": [item]})
    out = model.predict(request)

    def screening():
        ood = network.screening.features.scores(features)
        colour = network.screening.colour.scores(quality[:, COLOUR])
        flags(quality, ood, colour, served.screening)

    steps = {"decode": lambda: decode_item(0, item), "stain": lambda: stain.normalize(decoded),
             "resize": lambda: resize(normalized), "quality": lambda: measure([decoded], served.image_size),
             "forward": lambda: network.infer(served.tta, batch), "screening": screening,
             "frame": lambda: served._predict_chunk([decoded], served.tta, False),
             "json": lambda: predictions_to_json(out, io.StringIO()),
             "predict": lambda: model.predict(request)}
    result = {name: timed(step, repeats) for name, step in steps.items()}
    # frame holds score() (stain, resize, forward, screening) and quality: the response's own rows are the rest.
    result["frame"] -= sum(result[k] for k in ("stain", "resize", "quality", "forward", "screening"))
    return result


BATCH_SIZES = (1, 2, 4, 8, 16, 32, 64)


def batch_curve(uri: str, repeats: int) -> dict[int, float]:
    """ms per image of the served network's forward pass (ONNX Runtime) at each batch size."""
    os.environ["HISTOFLOW_RUNTIME"] = "onnx"
    served = mlflow.pyfunc.load_model(uri).unwrap_python_model()
    network = next(iter(served._groups.values()))[1][0]
    rng = np.random.default_rng(0)
    curve = {}
    for size in BATCH_SIZES:
        batch = rng.random((size, served.image_size, served.image_size, 3), dtype=np.float32)
        curve[size] = timed(lambda b=batch: network.infer("none", b), max(5, repeats // size)) / size
    return curve


def lone_request_cost(uri: str, image: str, repeats: int) -> float:
    """Median of (through the batcher - straight) ms for one request when no other is on its way."""
    from histoflow.serving.requests import encode_file

    os.environ["HISTOFLOW_RUNTIME"] = "onnx"
    loaded = {}
    for max_batch in ("0", ""):  # "": the model's default
        os.environ["HISTOFLOW_MAX_BATCH"] = max_batch
        loaded[max_batch] = mlflow.pyfunc.load_model(uri)
    request = pd.DataFrame({"image": [encode_file(image)]})
    differences = []
    for _ in range(repeats):
        times = {}
        for max_batch, model in loaded.items():
            t0 = time.perf_counter()
            model.predict(request)
            times[max_batch] = time.perf_counter() - t0
        differences.append(times[""] - times["0"])
    return float(np.median(differences)) * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data_dir", default="../shared/data/breakhis")
    parser.add_argument("--image_size", type=int, default=128)
    parser.add_argument("--weights", default="imagenet", help="the MobileNet's weights (a .h5 path offline)")
    parser.add_argument("--repeats", type=int, default=200)
    args = parser.parse_args()
    data_dir, weights = absolute(args.data_dir), absolute(args.weights)
    temporary_store("histoflow-bench-profile-")
    served, image = models(data_dir, args.image_size, weights)
    rows = {}
    for model in ("baseline", "mobilenet"):
        for runtime in ("tensorflow", "onnx"):
            rows[(model, runtime)] = profile(served[model][0], image, runtime, args.repeats)
            print(model, runtime, {k: round(v, 2) for k, v in rows[(model, runtime)].items()}, flush=True)
    steps = list(next(iter(rows.values())))
    print(f"\none request of one image ({image}), at {args.image_size} px, medians of {args.repeats} calls (ms)")
    print("| model | runtime | " + " | ".join(steps) + " |")
    print("|---|---|" + "---:|" * len(steps))
    for (model, runtime), row in rows.items():
        print(f"| {model} | {runtime} | " + " | ".join(f"{row[s]:.2f}" for s in steps) + " |")
    for model in ("baseline", "mobilenet"):
        before, after = rows[(model, "tensorflow")]["predict"], rows[(model, "onnx")]["predict"]
        print(f"{model}: predict {before:.2f} ms on TensorFlow, {after:.2f} ms on ONNX Runtime ({before / after:.2f}x)")
    print("\nONNX Runtime forward pass, ms per image by batch size (÷ batch 1)")
    print("| model | " + " | ".join(str(b) for b in BATCH_SIZES) + " |")
    print("|---|" + "---:|" * len(BATCH_SIZES))
    for model in ("baseline", "mobilenet"):
        curve = batch_curve(served[model][0], args.repeats)
        print(f"| {model} | " + " | ".join(f"{curve[b]:.2f} ({curve[b] / curve[1]:.2f})" for b in BATCH_SIZES)
              + " |", flush=True)
    for model in ("baseline", "mobilenet"):
        cost = lone_request_cost(served[model][0], image, args.repeats * 5)
        print(f"{model}: a lone request through the batcher costs {cost:+.3f} ms (median of {args.repeats * 5} "
              "paired calls)", flush=True)


if __name__ == "__main__":
    main()
