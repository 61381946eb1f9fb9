"""Cold start of the serving image's own command: launch to the first successful prediction, ONNX Runtime against
TensorFlow (HISTOFLOW_RUNTIME=tensorflow), alternating, on the same model folder.

The command is the ENTRYPOINT of MLflow's generated Dockerfile (`mlflow.models.container._serve`), run here as
tests/test_docker.py runs it (no Docker engine): MODEL_PATH pointed at the model's folder instead of
/opt/ml/model, nginx off (the scoring server answers on its own port 8000), one worker. What Cloud Run waits for
when it starts an instance, less the image pull. Model: the baseline CNN (untrained: the weights do not change the
start-up) logged with screening off, 128 px.

    python bench/serve_cold_start.py --rounds 3
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import mlflow  # noqa: E402
import numpy as np  # noqa: E402
import requests  # noqa: E402

from histoflow.modeling.architectures import build_baseline  # noqa: E402
from histoflow.serving.packaging import log_classifier  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_store import absolute, temporary_store  # noqa: E402

SIZE = 128
PORT = 8000  # the container's scoring server behind nginx (mlflow.models.container)


def first_prediction_s(model_dir: str, runtime: str, body: str) -> float:
    code = f"from mlflow.models import container as C; C.MODEL_PATH = {model_dir!r}; C._serve('local')"
    env = {**os.environ, "DISABLE_NGINX": "true", "MLFLOW_DISABLE_ENV_CREATION": "True",
           "MLFLOW_MODELS_WORKERS": "1", "HISTOFLOW_RUNTIME": runtime}
    env.pop("MLFLOW_TRACKING_URI", None)  # the container has no registry
    began = time.perf_counter()
    process = subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"the container command exited with {process.returncode}")
            try:
                response = requests.post(f"http://127.0.0.1:{PORT}/invocations", data=body, timeout=30,
                                         headers={"Content-Type": "application/json"})
                if response.status_code == 200:
                    return time.perf_counter() - began
            except requests.RequestException:
                time.sleep(0.02)
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=30)
        time.sleep(1)  # the port free again


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data_dir", default="../shared/data/breakhis")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    image = str(next(iter(sorted(Path(absolute(args.data_dir)).rglob("*.png")))))
    tmp = temporary_store("histoflow-bench-cold-")
    path = tmp / "baseline_cnn.keras"
    build_baseline(SIZE).save(path)
    with mlflow.start_run():
        uri = log_classifier([path], ["benign", "malignant"], SIZE, image).model_uri
    model_dir = mlflow.artifacts.download_artifacts(uri, dst_path=str(tmp / "model"))
    body = json.dumps({"inputs": [base64.b64encode(Path(image).read_bytes()).decode()]})
    times: dict[str, list[float]] = {"onnx": [], "tensorflow": []}
    for _ in range(args.rounds):
        for runtime, found in times.items():
            found.append(first_prediction_s(model_dir, runtime, body))
            print(f"{runtime}: {found[-1]:.2f} s", flush=True)
    print(f"\nthe image's command (mlflow.models.container._serve, nginx off, 1 worker), launch to the first "
          f"prediction, {args.rounds} rounds alternating")
    print("| runtime | median s | min s | max s | ÷ tensorflow |")
    print("|---|---:|---:|---:|---:|")
    reference = float(np.median(times["tensorflow"]))
    for runtime, found in times.items():
        print(f"| {runtime} | {np.median(found):.2f} | {min(found):.2f} | {max(found):.2f} | "
              f"{np.median(found) / reference:.2f} |")


if __name__ == "__main__":
    main()
