"""Where one scoring request's time goes: each step of the served model's predict for one image, on TensorFlow
(the .keras networks, resized by tf.image.resize as before) and on ONNX Runtime (the default), in one run.

Steps: decode (base64 + Pillow), stain (normalisation to the run's reference), resize (to the model's size, and
scale), quality (tissue, focus, colour), forward (the network: probabilities and features), screening (OOD and
colour distances, flags), frame (the response's rows), json (MLflow's serialisation of them), and the whole
predict. Medians of --repeats calls, in process (no HTTP).

    python bench/serve_profile.py --image_size 128 --repeats 200 \
        --weights ../shared/keras-weights/mobilenet_7_5_224_tf_no_top.h5
"""

from __future__ import annotations

import argparse
import io
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import mlflow  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data_dir", default="../shared/data/breakhis")
    parser.add_argument("--image_size", type=int, default=128)
    parser.add_argument("--weights", default="imagenet", help="the MobileNet's weights (a .h5 path offline)")
    parser.add_argument("--repeats", type=int, default=200)
    args = parser.parse_args()
    tmp = tempfile.mkdtemp(prefix="histoflow-bench-profile-")
    mlflow.set_tracking_uri(f"sqlite:///{tmp}/mlflow.db")
    served, image = models(args.data_dir, args.image_size, args.weights)
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


if __name__ == "__main__":
    main()
