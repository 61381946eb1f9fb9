"""Scoring latency, throughput, cold start and memory of the served model against references, in one run.

Models (each trained here for 1 epoch on 200 BreaKHis images, so screening and the quality fields are on):
  baseline    the reports' CNN
  mobilenet   the transfer variant's MobileNet alpha 0.75 fusion (ImageNet weights from --weights when given)
  ensemble    5 members of the mobilenet network with dihedral8 test-time augmentation (40 views an image)
Servers, each `mlflow models serve` with one worker unless said, started here on free ports, one at a time:
  onnx            the histoflow pyfunc on ONNX Runtime, concurrent requests' forward passes gathered (the default)
  onnx-unbatched  the same with HISTOFLOW_MAX_BATCH=0 (a forward pass per request)
  tensorflow      the histoflow pyfunc on TensorFlow, unbatched: what was served before ONNX Runtime and batching
  flask           a minimal Flask app calling `model.predict` per request, like the reports' demo servers
                  (bench/flask_predict_server.py; no screening, no stain, no quality fields)
  floor           MLflow's scoring server with a model that answers one constant row per request, the same request
                  body: what the server, its JSON and the client cost before any image work (the floor the others
                  stand on)
Each model is served from a local folder, as the container serves the one baked into it (not from models:/, which
adds the registry lookup and a download). For each: p50/p95 latency and throughput with one real image per request
at each concurrency; the server's CPU time per request (all its processes, from /proc: what a core costs per image,
whatever the client on the same machine takes); the cold start (process launch to the first successful
prediction) and the worker's peak RSS (VmHWM of the process that scores). The client runs on the same machine
(2 cores here): absolute numbers include its cost, ratios are fair.

    python bench/serve_latency.py --image_size 128 --requests 400 \
        --weights ../shared/keras-weights/mobilenet_7_5_224_tf_no_top.h5
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import mlflow  # noqa: E402
import numpy as np  # noqa: E402
import requests  # noqa: E402

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from bench_store import absolute, temporary_store  # noqa: E402

SERVER_ENV = {"onnx": {}, "onnx-unbatched": {"HISTOFLOW_MAX_BATCH": "0"}, "onnx-batched": {"HISTOFLOW_MAX_BATCH": "64"},
              "tensorflow": {"HISTOFLOW_RUNTIME": "tensorflow", "HISTOFLOW_MAX_BATCH": "0"},
              "tensorflow-batched": {"HISTOFLOW_RUNTIME": "tensorflow", "HISTOFLOW_MAX_BATCH": "64"}}
MEMBERS = 5


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def train(variant: str, data_dir: str, image_size: int, weights: str) -> mlflow.entities.Run:
    from histoflow.modeling import training_run
    from histoflow.modeling.variants import make_train_config

    extra = {"weights": weights, "alpha": 0.75} if variant == "transfer" else {}
    config = make_train_config(variant, data_dir=data_dir, max_images=200, epochs=1, image_size=image_size,
                               gradcam_per_class=1, experiment="bench-serve", **extra)
    return mlflow.get_run(training_run.run(config))


def models(data_dir: str, image_size: int, weights: str) -> tuple[dict[str, tuple[str, str]], str]:
    """{name: (pyfunc uri, .keras path)} and the request's image (the median-size test file)."""
    from histoflow.registry.selection import (
        classifier_uri,
        keras_artifact,
        run_calibration,
        run_screening,
        run_split,
        run_stain_reference,
    )
    from histoflow.serving.packaging import log_classifier

    out = {}
    baseline, mobilenet = train("baseline", data_dir, image_size, weights), train("transfer", data_dir, image_size,
                                                                                  weights)
    for name, run in (("baseline", baseline), ("mobilenet", mobilenet)):
        out[name] = (classifier_uri(run), keras_artifact(run.info.run_id))
    _, split, classes = run_split(mobilenet)
    test = sorted(split.loc[split["split"] == "test", "path"], key=lambda p: Path(p).stat().st_size)
    image = test[len(test) // 2]  # most BreakHis files are 224x224 copies; a few 700x460 originals cost ~4x more
    path = out["mobilenet"][1]
    with mlflow.start_run(run_id=mobilenet.info.run_id):
        ensemble = log_classifier([path] * MEMBERS, classes, image_size, image, name="ensemble",
                                  member_temperatures=[run_calibration(mobilenet).temperature] * MEMBERS,
                                  stain_references=[run_stain_reference(mobilenet)] * MEMBERS,
                                  screenings=[run_screening(mobilenet)] * MEMBERS, tta="dihedral8")
    out["ensemble"] = (ensemble.model_uri, path)
    return out, image


class Floor(mlflow.pyfunc.PythonModel):
    """One constant row per request: MLflow's scoring server with nothing to do."""

    def predict(self, context, model_input, params=None):
        import pandas as pd

        return pd.DataFrame({"label": ["floor"] * len(model_input)})


def floor_model() -> str:
    import pandas as pd

    signature = mlflow.models.infer_signature(pd.DataFrame({"image": ["base64"]}), pd.DataFrame({"label": ["x"]}))
    with mlflow.start_run(run_name="floor"):
        return mlflow.pyfunc.log_model(name="floor", python_model=Floor(), signature=signature).model_uri


def local_copy(uri: str, root: str, name: str) -> str:
    """The model in a folder of its own, as a container holds it."""
    return mlflow.artifacts.download_artifacts(uri, dst_path=str(Path(root) / name))


def descendants(pid: int) -> list[int]:
    """pid and all its descendants (from /proc's children lists)."""
    found, pending = [], [pid]
    while pending:
        p = pending.pop()
        found.append(p)
        for task in Path(f"/proc/{p}/task").glob("*"):
            try:  # noqa: SIM105 - a thread that ended between the listing and the read has no children
                pending += [int(c) for c in (task / "children").read_text().split()]
            except OSError:
                pass
    return found


def proc_file(pid: int, name: str) -> str:
    """/proc/<pid>/<name>, empty for a process that has just ended."""
    try:
        return Path(f"/proc/{pid}/{name}").read_text()
    except OSError:
        return ""


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of the server's processes so far."""
    ticks = 0
    for p in descendants(pid):
        stat = proc_file(p, "stat")
        if stat:
            fields = stat.rsplit(")", 1)[1].split()
            ticks += int(fields[11]) + int(fields[12])  # utime, stime (fields 14 and 15 of proc(5))
    return ticks / os.sysconf("SC_CLK_TCK")


def peak_rss_mib(pid: int) -> float:
    """The largest VmHWM among the server's processes: the one that loads the model and scores."""
    peaks = []
    for p in descendants(pid):
        for line in proc_file(p, "status").splitlines():
            if line.startswith("VmHWM:"):
                peaks.append(int(line.split()[1]) / 1024)
    return max(peaks)


def start(cmd: list[str], ping: str, env: dict) -> subprocess.Popen:
    process = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               start_new_session=True)
    while True:
        if process.poll() is not None:
            raise RuntimeError(f"{cmd[:4]} exited with {process.returncode}")
        try:
            if requests.get(ping, timeout=1).status_code == 200:
                return process
        except requests.RequestException:
            time.sleep(0.02)


def stop(process: subprocess.Popen) -> None:
    os.killpg(process.pid, 15)
    process.wait(timeout=30)


def load(url: str, body: bytes, concurrency: int, total: int) -> tuple[list[float], float]:
    latencies: list[float] = []
    lock = threading.Lock()
    per_thread = max(1, total // concurrency)

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


def measure(name: str, model: str, server: str, cmd: list[str], env: dict, port: int, body: bytes,
            levels: list[int], requests_per_level: int) -> list[dict]:
    url = f"http://127.0.0.1:{port}/invocations"
    began = time.perf_counter()
    process = start(cmd, f"http://127.0.0.1:{port}/ping", env)
    rows = []
    try:
        first = requests.post(url, data=body, headers={"Content-Type": "application/json"}, timeout=300)
        if first.status_code != 200:
            raise RuntimeError(f"{name}: HTTP {first.status_code} {first.text[:300]}")
        cold = time.perf_counter() - began
        load(url, body, 1, 20)  # warm-up
        for c in levels:
            cpu = cpu_seconds(process.pid)
            latencies, wall = load(url, body, c, requests_per_level)
            cpu_ms = (cpu_seconds(process.pid) - cpu) / len(latencies) * 1000
            rows.append({"model": model, "server": server, "concurrency": c, "p50": pct(latencies, 50),
                         "p95": pct(latencies, 95), "rps": len(latencies) / wall, "cold": cold, "cpu": cpu_ms})
            print(f"{model} {server} c={c}: p50 {rows[-1]['p50']:.1f} ms, p95 {rows[-1]['p95']:.1f} ms, "
                  f"{rows[-1]['rps']:.1f} req/s, server CPU {cpu_ms:.1f} ms/request", flush=True)
        rss = peak_rss_mib(process.pid)
        for row in rows:
            row["rss"] = rss
    finally:
        stop(process)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data_dir", default="../shared/data/breakhis")
    parser.add_argument("--image_size", type=int, default=128)
    parser.add_argument("--weights", default="imagenet", help="the MobileNet's weights (a .h5 path offline)")
    parser.add_argument("--requests", type=int, default=400, help="requests per concurrency level")
    parser.add_argument("--concurrency", default="1,2,4,8,16")
    parser.add_argument("--servers", default="onnx,onnx-unbatched,tensorflow,flask,floor")
    parser.add_argument("--models", default="baseline,mobilenet,ensemble")
    args = parser.parse_args()
    data_dir, weights = absolute(args.data_dir), absolute(args.weights)
    tmp = str(temporary_store("histoflow-bench-serve-"))
    served, image = models(data_dir, args.image_size, weights)
    b64 = base64.b64encode(Path(image).read_bytes()).decode()
    bodies = {"mlflow": json.dumps({"inputs": [b64]}).encode(), "flask": json.dumps({"image": b64}).encode()}
    from PIL import Image

    with Image.open(image) as im:
        print(f"image {image} ({im.width}x{im.height}, {Path(image).stat().st_size / 1024:.0f} KiB)", flush=True)
    levels = [int(c) for c in args.concurrency.split(",")]
    folders = {name: local_copy(model_uri, tmp, name) for name, (model_uri, _) in served.items()}
    floor = local_copy(floor_model(), tmp, "floor")
    rows = []
    for model in args.models.split(","):
        keras_path = served[model][1]
        for server in args.servers.split(","):
            if server in ("flask", "floor") and model == "ensemble":
                continue  # the demo server has no ensembles or TTA; the floor is the same for every model
            uri = floor if server == "floor" else folders[model]
            port = free_port()
            if server == "flask":
                cmd = [sys.executable, str(HERE / "flask_predict_server.py"), keras_path, str(args.image_size),
                       str(port)]
            else:
                cmd = [sys.executable, "-m", "mlflow", "models", "serve", "-m", uri, "--env-manager", "local",
                       "--host", "127.0.0.1", "--port", str(port), "--workers", "1"]
            ensemble_levels = [1, 8] if model == "ensemble" else levels
            rows += measure(f"{model}/{server}", model, server, cmd, {**os.environ, **SERVER_ENV.get(server, {})},
                            port, bodies["flask" if server == "flask" else "mlflow"], ensemble_levels,
                            args.requests // (4 if model == "ensemble" else 1))
    print(f"\nat {args.image_size} px, one {Path(image).suffix} image per request, {args.requests} requests per "
          "level (ensemble: a quarter), 1 server worker, client on the same machine")
    print("| model | server | concurrency | p50 ms | p95 ms | images/s | onnx images/s ÷ this | server CPU ms "
          "/ image | cold start s | peak RSS MiB |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    by = {(r["model"], r["server"], r["concurrency"]): r for r in rows}
    for r in rows:
        ours = by.get((r["model"], "onnx", r["concurrency"]))
        ratio = f"{ours['rps'] / r['rps']:.2f}" if ours else ""
        print(f"| {r['model']} | {r['server']} | {r['concurrency']} | {r['p50']:.1f} | {r['p95']:.1f} | "
              f"{r['rps']:.0f} | {ratio} | {r['cpu']:.1f} | {r['cold']:.1f} | {r['rss']:.0f} |")


if __name__ == "__main__":
    main()
