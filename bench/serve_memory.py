"""Memory of the scoring server, to size a container's memory request and limit (docker/kubernetes/).

For each network (the baseline CNN and the MobileNet fusion model, 128 px, untrained: the weights do
not change the memory) it logs the histoflow serving pyfunc, and for each runtime (ONNX Runtime, the default,
and TensorFlow: HISTOFLOW_RUNTIME=tensorflow) starts `mlflow models serve` with --workers W (as the container
runs it, MLFLOW_MODELS_WORKERS), and samples the resident memory (VmRSS) of the server's whole process tree
every 50 ms: once loaded and idle (the reference), then while 2 clients send requests of 16 real BreaKHis
images each, scoring only, then again with every other request asking for `explain` (on ONNX Runtime the
first explain imports TensorFlow into the worker). Reported: idle, peak when scoring, peak with explain.

    python bench/serve_memory.py --data_dir ../shared/data/breakhis --workers 2 --requests 40
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import mlflow  # noqa: E402
import requests  # noqa: E402

from histoflow.modeling.architectures import build_baseline, build_fusion  # noqa: E402
from histoflow.serving.packaging import log_classifier  # noqa: E402
from histoflow.serving.requests import encode_file  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_store import absolute, temporary_store  # noqa: E402
from serve_latency import descendants, free_port, proc_file  # noqa: E402

SIZE = 128


def rss_mib(pid: int) -> float:
    """VmRSS summed over the process tree."""
    total = 0
    for p in descendants(pid):
        total += sum(int(x.split()[1]) for x in proc_file(p, "status").splitlines() if x.startswith("VmRSS"))
    return total / 1024


def measure(uri: str, images: list[str], workers: int, n_requests: int, runtime: str) -> tuple[float, ...]:
    """Idle, peak when scoring, peak with explain (MiB, the server's process tree)."""
    port = free_port()
    env = {**os.environ, "MLFLOW_MODELS_WORKERS": str(workers), "HISTOFLOW_RUNTIME": runtime}
    process = subprocess.Popen([sys.executable, "-m", "mlflow", "models", "serve", "-m", uri, "--env-manager",
                                "local", "--host", "127.0.0.1", "--port", str(port), "--workers", str(workers)],
                               env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}/invocations"
    body = {"inputs": {"image": [encode_file(p) for p in images]}}
    try:
        for _ in range(600):
            try:
                # Every worker loads the model on its first request: warm them all before "idle".
                if all(requests.post(url, json=body, timeout=120).ok for _ in range(2 * workers)):
                    break
            except requests.ConnectionError:
                time.sleep(0.5)
        time.sleep(2)
        idle = rss_mib(process.pid)
        return (idle, *(peak_under_load(process.pid, url, body, n_requests, explain) for explain in (False, True)))
    finally:
        process.terminate()
        process.wait(timeout=30)


def peak_under_load(pid: int, url: str, body: dict, n_requests: int, explain: bool) -> float:
    peak, done = rss_mib(pid), threading.Event()

    def sample() -> None:
        nonlocal peak
        while not done.is_set():
            peak = max(peak, rss_mib(pid))
            time.sleep(0.05)

    def client() -> None:
        for i in range(n_requests):
            requests.post(url, json={**body, "params": {"explain": explain and i % 2 == 1}},
                          timeout=120).raise_for_status()

    sampler = threading.Thread(target=sample)
    sampler.start()
    clients = [threading.Thread(target=client) for _ in range(2)]
    for c in clients:
        c.start()
    for c in clients:
        c.join()
    done.set()
    sampler.join()
    return peak


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data_dir", default="../shared/data/breakhis")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--requests", type=int, default=40, help="per client (2 clients)")
    args = parser.parse_args()
    data_dir = absolute(args.data_dir)
    tmp = temporary_store("histoflow-bench-memory-")
    mlflow.set_experiment("bench-serve-memory")
    images = sorted(str(p) for p in Path(data_dir).rglob("*.png"))[:16]
    networks = {"baseline_cnn": build_baseline(SIZE),
                "mobilenet_fusion": build_fusion("mobilenet", SIZE, weights="none", alpha=0.75, unfrozen_blocks=0)}
    rows = []
    for name, model in networks.items():
        path = tmp / f"{name}.keras"
        model.save(path)
        with mlflow.start_run():
            uri = log_classifier([path], ["benign", "malignant"], SIZE, images[0]).model_uri
        for runtime in ("onnx", "tensorflow"):
            idle, scoring, explaining = measure(uri, images, args.workers, args.requests, runtime)
            rows.append((name, runtime, idle, scoring, explaining))
            print(f"{name} {runtime}: idle {idle:.0f} MiB, peak {scoring:.0f} MiB scoring, {explaining:.0f} MiB "
                  "with explain", flush=True)
    print(f"\n`mlflow models serve --workers {args.workers}`, {SIZE} px, requests of 16 images, 2 clients "
          f"x {args.requests} requests, scoring only then every other one with explain; RSS of the server's "
          "process tree")
    print("| network | runtime | idle MiB | peak MiB, scoring | peak MiB, with explain | onnx ÷ tensorflow, scoring |")
    print("|---|---|---:|---:|---:|---:|")
    tensorflow = {name: scoring for name, runtime, _, scoring, _ in rows if runtime == "tensorflow"}
    for name, runtime, idle, scoring, explaining in rows:
        print(f"| {name} | {runtime} | {idle:.0f} | {scoring:.0f} | {explaining:.0f} | "
              f"{scoring / tensorflow[name]:.2f} |")

if __name__ == "__main__":
    main()
