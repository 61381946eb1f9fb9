"""Scoring latency and throughput of the served model against two references, in one run.

Servers, each one process with one worker, started here on free ports, one at a time:
  histoflow   `mlflow models serve` of the histoflow pyfunc (base64 image file in, compiled tf.function,
              concurrent requests' forward passes gathered: histoflow/serving/batching.py)
  histoflow-unbatched  the same with HISTOFLOW_MAX_BATCH=0 (a forward pass per request, as before batching)
  mlflow-keras `mlflow models serve` of MLflow's default keras pyfunc of the same model (the client sends
              the preprocessed float tensor as JSON; its preprocessing is done once, up front, and not timed)
  flask       a minimal Flask app calling `model.predict` per request, like the reports' demo servers
              (bench/flask_predict_server.py; base64 image file in)
For each: p50/p95/p99 latency and throughput at concurrency 1, 2, 4, 8 with one real image per request,
and the cold start (process launch to the first successful prediction) of the histoflow server.
The client runs on the same machine (2 cores here): absolute numbers include its cost, ratios are fair.

    python bench/serve_latency.py --image_size 128 --requests 200
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import mlflow  # noqa: E402
import numpy as np  # noqa: E402
import requests  # noqa: E402

HERE = Path(__file__).resolve().parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def train_model(data_dir: str, image_size: int, tmp: str) -> tuple[str, str, str, str]:
    """A small real model (1 epoch on 200 images): returns (pyfunc uri, keras-flavor uri, .keras path, image)."""
    from histoflow.modeling import training_run
    from histoflow.modeling.variants import make_train_config
    from histoflow.registry.selection import classifier_uri, keras_artifact, run_split

    config = make_train_config("baseline", data_dir=data_dir, max_images=200, epochs=1, image_size=image_size,
                               gradcam_per_class=1, experiment="bench-serve")
    run = mlflow.get_run(training_run.run(config))
    classifier = classifier_uri(run)
    keras_model = f"models:/{run.outputs.model_outputs[0].model_id}"
    _, split, _ = run_split(run)
    # The typical file: median size among the test images (most BreakHis files are 224x224 copies; a few
    # are 700x460 originals, which cost ~4x more to decode).
    test = sorted(split.loc[split["split"] == "test", "path"], key=lambda p: Path(p).stat().st_size)
    image = test[len(test) // 2]
    keras_path = keras_artifact(run.info.run_id)
    return classifier, keras_model, keras_path, image


def start(cmd: list[str], ping: str, env: dict) -> tuple[subprocess.Popen, float]:
    began = time.perf_counter()
    process = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               start_new_session=True)
    while True:
        if process.poll() is not None:
            raise RuntimeError(f"{cmd[:4]} exited with {process.returncode}")
        try:
            if requests.get(ping, timeout=1).status_code == 200:
                return process, began
        except requests.RequestException:
            time.sleep(0.05)


def stop(process: subprocess.Popen) -> None:
    os.killpg(process.pid, 15)
    process.wait(timeout=30)


def load(url: str, body: bytes, concurrency: int, total: int) -> tuple[list[float], float]:
    latencies: list[float] = []
    lock = threading.Lock()
    per_thread = total // concurrency

    def worker() -> None:
        session = requests.Session()
        mine = []
        for _ in range(per_thread):
            t0 = time.perf_counter()
            response = session.post(url, data=body, headers={"Content-Type": "application/json"}, timeout=120)
            mine.append(time.perf_counter() - t0)
            if response.status_code != 200:
                raise RuntimeError(f"{url}: HTTP {response.status_code} {response.text[:200]}")
        with lock:
            latencies.extend(mine)

    threads = [threading.Thread(target=worker) for _ in range(concurrency)]
    began = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return latencies, time.perf_counter() - began


def pct(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data_dir", default="../shared/data/breakhis")
    parser.add_argument("--image_size", type=int, default=128)
    parser.add_argument("--requests", type=int, default=200, help="requests per concurrency level")
    parser.add_argument("--concurrency", default="1,2,4,8")
    parser.add_argument("--servers", default="histoflow,histoflow-unbatched,mlflow-keras,flask")
    args = parser.parse_args()
    tmp = tempfile.mkdtemp(prefix="histoflow-bench-serve-")
    uri = f"sqlite:///{tmp}/mlflow.db"
    mlflow.set_tracking_uri(uri)
    os.environ["MLFLOW_TRACKING_URI"] = uri
    env = {**os.environ}
    classifier, keras_model, keras_path, image = train_model(args.data_dir, args.image_size, tmp)
    b64 = base64.b64encode(Path(image).read_bytes()).decode()
    from histoflow.data.images import preprocess_bytes

    tensor = preprocess_bytes(Path(image).read_bytes(), args.image_size)[None].tolist()
    bodies = {"histoflow": json.dumps({"inputs": [b64]}).encode(),
              "histoflow-unbatched": json.dumps({"inputs": [b64]}).encode(),
              "mlflow-keras": json.dumps({"inputs": tensor}).encode(),
              "flask": json.dumps({"image": b64}).encode()}
    from PIL import Image

    with Image.open(image) as im:
        shape = f"{im.width}x{im.height}"
    print(f"image {image} ({shape}, {Path(image).stat().st_size / 1024:.0f} KiB); request bodies: "
          + ", ".join(f"{k} {len(v) / 1024:.0f} KiB" for k, v in bodies.items()), flush=True)
    levels = [int(c) for c in args.concurrency.split(",")]
    rows, cold = [], None
    for name in args.servers.split(","):
        port = free_port()
        if name == "flask":
            cmd = [sys.executable, str(HERE / "flask_predict_server.py"), keras_path, str(args.image_size),
                   str(port)]
        else:
            model = classifier if name.startswith("histoflow") else keras_model
            cmd = [sys.executable, "-m", "mlflow", "models", "serve", "-m", model, "--env-manager", "local",
                   "--host", "127.0.0.1", "--port", str(port), "--workers", "1"]
        url = f"http://127.0.0.1:{port}/invocations"
        process, began = start(cmd, f"http://127.0.0.1:{port}/ping",
                               {**env, "HISTOFLOW_MAX_BATCH": "0"} if name == "histoflow-unbatched" else env)
        try:
            first = requests.post(url, data=bodies[name], headers={"Content-Type": "application/json"}, timeout=120)
            if first.status_code != 200:
                raise RuntimeError(f"{name}: HTTP {first.status_code} {first.text[:300]}")
            if name == "histoflow":
                cold = time.perf_counter() - began
            load(url, bodies[name], 1, 20)  # warm-up
            for c in levels:
                latencies, wall = load(url, bodies[name], c, args.requests)
                rows.append((name, c, pct(latencies, 50), pct(latencies, 95), pct(latencies, 99),
                             len(latencies) / wall))
                print(f"{name} c={c}: p50 {rows[-1][2]:.1f} ms, p95 {rows[-1][3]:.1f} ms, "
                      f"{rows[-1][5]:.1f} req/s", flush=True)
        finally:
            stop(process)
    by = {(r[0], r[1]): r for r in rows}
    print()
    print(f"baseline CNN at {args.image_size} px, one {Path(image).suffix} image per request, "
          f"{args.requests} requests per level, 1 server worker, client on the same machine")
    print("| server | concurrency | p50 ms | p95 ms | p99 ms | req/s | histoflow req/s ÷ this |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name, c, p50, p95, p99, rps in rows:
        ours = by.get(("histoflow", c))
        ratio = f"{ours[5] / rps:.2f}" if ours else ""
        print(f"| {name} | {c} | {p50:.1f} | {p95:.1f} | {p99:.1f} | {rps:.1f} | {ratio} |")
    if cold is not None:
        print(f"\ncold start (launch of `mlflow models serve` to the first successful prediction): {cold:.1f} s")


if __name__ == "__main__":
    main()
