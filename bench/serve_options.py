"""Serving cost of screening, explanations, test-time augmentation and fold ensembles, against the plain
served model, in one process.

For each network (the baseline CNN and the MobileNet fusion model, 128 px) it logs the histoflow serving
pyfunc and calls it seven ways: one network (with its quality and OOD screening, as every model trained
now is served); the same network without screening (as models were served before it existed); one
network with `explain` (Grad-CAM overlays in the response); with Macenko stain normalisation (the
reference fitted on the request images' folder); with dihedral8 test-time augmentation (8 views per
image); an ensemble of 5 copies of the network (as `cv -P ensemble=true` with 5 folds); and the
ensemble with test-time augmentation. The screening is fitted on the request images themselves (its
cost does not depend on what it was fitted on). Each is loaded with mlflow.pyfunc.load_model and called in-process
(the scoring server adds the same constant per request; bench/serve_latency.py measures it) with requests of 1 and
of 16 real images; latency per request is the median of the repeats, and the ratio to the plain model
measured in the same run is what to read. Weights do not change the arithmetic, so the networks are
built untrained (no training in a benchmark about serving).

    python bench/serve_options.py --data_dir ../shared/data/idc --repeats 30
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
import pandas as pd  # noqa: E402

from histoflow.data.images import read_image, resize_and_scale  # noqa: E402
from histoflow.data.quality import measure  # noqa: E402
from histoflow.data.stain import fit_reference  # noqa: E402
from histoflow.modeling.architectures import build_baseline, build_fusion  # noqa: E402
from histoflow.modeling.calibration import Calibration  # noqa: E402
from histoflow.modeling.inference import feature_model  # noqa: E402
from histoflow.modeling.screening import fit_screening  # noqa: E402
from histoflow.serving.packaging import log_classifier  # noqa: E402
from histoflow.serving.requests import encode_file  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_store import absolute, temporary_store  # noqa: E402

SIZE = 128
MEMBERS = 5


def networks(tmp: Path) -> dict[str, Path]:
    built = {"baseline_cnn": build_baseline(SIZE), "mobilenet_fusion": build_fusion(
        "mobilenet", SIZE, weights="none", alpha=0.75, unfrozen_blocks=0)}
    paths = {}
    for name, model in built.items():
        paths[name] = tmp / f"{name}.keras"
        model.save(paths[name])
    return paths


def screening_file(path: Path, images: list[str]) -> Path:
    import keras

    decoded = [read_image(p) for p in images]
    features = feature_model(keras.saving.load_model(path)).predict(
        np.stack([resize_and_scale(image, SIZE) for image in decoded]), verbose=0)[1]
    quality = measure(decoded, SIZE)
    target = path.with_suffix(".screening.npz")
    fit_screening(features, quality, features, quality).save(target)
    return target


def log_options(path: Path, images: list[str], stain: dict) -> dict[str, tuple[str, dict]]:
    """option -> (model URI, request params)."""
    out = {}
    example, screened = images[0], screening_file(path, images)
    with mlflow.start_run():
        single = log_classifier([path], ["benign", "malignant"], SIZE, example, calibration=Calibration(1.3, 0.5),
                                screenings=[screened], name="single").model_uri
        unscreened = log_classifier([path], ["benign", "malignant"], SIZE, example, calibration=Calibration(1.3, 0.5),
                                    name="unscreened").model_uri
        normalised = log_classifier([path], ["benign", "malignant"], SIZE, example, calibration=Calibration(1.3, 0.5),
                                    stain_references=[stain], screenings=[screened], name="macenko").model_uri
        ensemble = log_classifier([path] * MEMBERS, ["benign", "malignant"], SIZE, example,
                                  calibration=Calibration(1.0, 0.5),
                                  member_temperatures=[1.3] * MEMBERS, screenings=[screened] * MEMBERS,
                                  name="ensemble").model_uri
    out["one network"] = (single, {"tta": "none"})
    out["one network, no screening"] = (unscreened, {"tta": "none"})
    out["one network, explain"] = (single, {"tta": "none", "explain": True})
    out["one network, Macenko stain"] = (normalised, {"tta": "none"})
    out["one network, dihedral8"] = (single, {"tta": "dihedral8"})
    out[f"{MEMBERS}-fold ensemble"] = (ensemble, {"tta": "none"})
    out[f"{MEMBERS}-fold ensemble, dihedral8"] = (ensemble, {"tta": "dihedral8"})
    return out


def latency_ms(model, frame: pd.DataFrame, params: dict, repeats: int) -> float:
    model.predict(frame, params=params)  # warm: the first call of a shape
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        model.predict(frame, params=params)
        times.append(time.perf_counter() - start)
    return 1000 * float(np.median(times))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data_dir", default="../shared/data/idc")
    parser.add_argument("--repeats", type=int, default=30)
    args = parser.parse_args()
    data_dir = absolute(args.data_dir)
    tmp = temporary_store("histoflow-bench-options-")
    mlflow.set_experiment("bench-serve-options")
    images = sorted(str(p) for p in Path(data_dir).rglob("*.png"))[:16]
    requests = {1: pd.DataFrame({"image": [encode_file(images[0])]}),
                16: pd.DataFrame({"image": [encode_file(p) for p in images]})}
    stain = fit_reference("macenko", images, seed=0)
    rows = []
    for network, path in networks(tmp).items():
        reference = {}
        for option, (uri, params) in log_options(path, images, stain).items():
            model = mlflow.pyfunc.load_model(uri)
            for n, frame in requests.items():
                ms = latency_ms(model, frame, params, args.repeats)
                reference.setdefault(n, ms)
                rows.append((network, option, n, ms, ms / reference[n]))
                print(f"{network} | {option} | {n} images: {ms:.1f} ms ({ms / reference[n]:.2f}x)", flush=True)
    print(f"\n{SIZE} px, in-process pyfunc predict, median of {args.repeats} requests")
    print("| network | served as | images per request | ms per request | x one network |")
    print("|---|---|---:|---:|---:|")
    for network, option, n, ms, ratio in rows:
        print(f"| {network} | {option} | {n} | {ms:.1f} | {ratio:.2f} |")


if __name__ == "__main__":
    main()
