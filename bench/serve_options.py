"""Serving cost of test-time augmentation and fold ensembles, against the plain served model, in one process.

For each network (the baseline CNN and the MobileNet fusion model, 128 px) it logs the histoflow serving
pyfunc five ways: one network; one network with Macenko stain normalisation (the reference fitted on
the request images' folder); one network with dihedral8 test-time augmentation (8 views per image); an
ensemble of 5 copies of the network (as `cv -P ensemble=true` with 5 folds); and the ensemble with
test-time augmentation. Each is loaded with mlflow.pyfunc.load_model and called in-process (the scoring
server adds the same constant per request; bench/serve_latency.py measures it) with requests of 1 and
of 16 real images; latency per request is the median of the repeats, and the ratio to the plain model
measured in the same run is what to read. Weights do not change the arithmetic, so the networks are
built untrained (no training in a benchmark about serving).

    python bench/serve_options.py --data_dir ../shared/data/idc --repeats 30
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import mlflow  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from histoflow.data.stain import fit_reference  # noqa: E402
from histoflow.modeling.architectures import build_baseline, build_fusion  # noqa: E402
from histoflow.modeling.calibration import Calibration  # noqa: E402
from histoflow.serving.classifier import log_classifier  # noqa: E402
from histoflow.serving.requests import encode_file  # noqa: E402

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


def log_options(path: Path, example: str, stain: dict) -> dict[str, tuple[str, dict]]:
    """option -> (model URI, request params)."""
    out = {}
    with mlflow.start_run():
        single = log_classifier([path], ["benign", "malignant"], SIZE, example, Calibration(1.3, 0.5),
                                name="single").model_uri
        normalised = log_classifier([path], ["benign", "malignant"], SIZE, example, Calibration(1.3, 0.5),
                                    stain_references=[stain], name="macenko").model_uri
        ensemble = log_classifier([path] * MEMBERS, ["benign", "malignant"], SIZE, example, Calibration(1.0, 0.5),
                                  member_temperatures=[1.3] * MEMBERS, name="ensemble").model_uri
    out["one network"] = (single, {"tta": "none"})
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
    tmp = Path(tempfile.mkdtemp(prefix="histoflow-bench-options-"))
    mlflow.set_tracking_uri(f"sqlite:///{tmp}/mlflow.db")
    mlflow.set_experiment("bench-serve-options")
    images = sorted(str(p) for p in Path(args.data_dir).rglob("*.png"))[:16]
    requests = {1: pd.DataFrame({"image": [encode_file(images[0])]}),
                16: pd.DataFrame({"image": [encode_file(p) for p in images]})}
    stain = fit_reference("macenko", images, seed=0)
    rows = []
    for network, path in networks(tmp).items():
        reference = {}
        for option, (uri, params) in log_options(path, images[0], stain).items():
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
