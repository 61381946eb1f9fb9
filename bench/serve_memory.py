"""Memory of the scoring server, to size a container's memory request and limit (docker/kubernetes/).

For each network (the baseline CNN and the MobileNet fusion model, 128 px, untrained: the weights do
not change the memory) it logs the histoflow serving pyfunc, starts `mlflow models serve` with
--workers W (as the container runs it, MLFLOW_MODELS_WORKERS), and samples the resident memory (VmRSS)
of the server's whole process tree every 50 ms: once loaded and idle (the reference), then while 2
clients send requests of 16 real BreaKHis images each (every other request with `explain`). Reported:
idle and peak RSS of the tree, per worker, and peak / idle.

    python bench/serve_memory.py --data_dir ../shared/data/breakhis --workers 2 --requests 40
"""

from __future__ import annotations

import argparse
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
import requests  # noqa: E402

from histoflow.modeling.architectures import build_baseline, build_fusion  # noqa: E402
from histoflow.serving.packaging import log_classifier  # noqa: E402
from histoflow.serving.requests import encode_file  # noqa: E402

SIZE = 128


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tree(pid: int) -> list[int]:
    """pid and all its descendants (from /proc's children lists)."""
    found, stack = [], [pid]
    while stack:
        current = stack.pop()
        found.append(current)
        for task in Path(f"/proc/{current}/task").glob("*"):
            try:  # noqa: SIM105 - a task that ended between the listing and the read has no children
                stack += [int(c) for c in (task / "children").read_text().split()]
            except OSError:
                pass
    return found


def rss_mib(pid: int) -> float:
    total = 0
    for p in tree(pid):
        try:
            line = next(x for x in Path(f"/proc/{p}/status").read_text().splitlines() if x.startswith("VmRSS"))
            total += int(line.split()[1])
        except (OSError, StopIteration):
            pass
    return total / 1024


def measure(uri: str, images: list[str], workers: int, n_requests: int) -> tuple[float, float]:
    port = free_port()
    env = {**os.environ, "MLFLOW_MODELS_WORKERS": str(workers)}
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
        peak, done = idle, threading.Event()

        def sample() -> None:
            nonlocal peak
            while not done.is_set():
                peak = max(peak, rss_mib(process.pid))
                time.sleep(0.05)

        def client() -> None:
            for i in range(n_requests):
                requests.post(url, json={**body, "params": {"explain": i % 2 == 1}}, timeout=120).raise_for_status()

        sampler = threading.Thread(target=sample)
        sampler.start()
        clients = [threading.Thread(target=client) for _ in range(2)]
        for c in clients:
            c.start()
        for c in clients:
            c.join()
        done.set()
        sampler.join()
        return idle, peak
    finally:
        process.terminate()
        process.wait(timeout=30)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data_dir", default="../shared/data/breakhis")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--requests", type=int, default=40, help="per client (2 clients)")
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="histoflow-bench-memory-"))
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{tmp}/mlflow.db"
    mlflow.set_tracking_uri(os.environ["MLFLOW_TRACKING_URI"])
    mlflow.set_experiment("bench-serve-memory")
    images = sorted(str(p) for p in Path(args.data_dir).rglob("*.png"))[:16]
    networks = {"baseline_cnn": build_baseline(SIZE),
                "mobilenet_fusion": build_fusion("mobilenet", SIZE, weights="none", alpha=0.75, unfrozen_blocks=0)}
    rows = []
    for name, model in networks.items():
        path = tmp / f"{name}.keras"
        model.save(path)
        with mlflow.start_run():
            uri = log_classifier([path], ["benign", "malignant"], SIZE, images[0]).model_uri
        idle, peak = measure(uri, images, args.workers, args.requests)
        rows.append((name, idle, peak))
        print(f"{name}: idle {idle:.0f} MiB, peak {peak:.0f} MiB", flush=True)
    print(f"\n`mlflow models serve --workers {args.workers}`, {SIZE} px, requests of 16 images, 2 clients "
          f"x {args.requests} requests (every other one with explain); RSS of the server's process tree")
    print("| network | idle MiB | peak MiB | peak / idle |")
    print("|---|---:|---:|---:|")
    for name, idle, peak in rows:
        print(f"| {name} | {idle:.0f} | {peak:.0f} | {peak / idle:.2f} |")


if __name__ == "__main__":
    main()
