"""What a registered model costs to serve, per image, against a reference model served the same way in the same run.

Each model is served by `mlflow models serve` (one worker, this machine's cores), warmed up, then sent real
images as base64 files: one image per request from one client (latency), and `--batch` images per request
from two clients (throughput, the cost per image of a scoring job). The table gives milliseconds per image,
images per second and the server's peak RSS, and each row's cost as a ratio to the reference's (e.g. a
5-fold ensemble against one of its fold networks, or the champion against the model it replaced).

    python bench/serve_champion.py --model models:/histoflow-breakhis@champion \
        --reference runs:/<fold run id>/classifier --data_dir ../shared/data/breakhis
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
import requests  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from serve_latency import free_port, load, pct, start, stop  # noqa: E402


def images(data_dir: str, count: int, seed: int = 0) -> list[str]:
    """`count` image files of the folder, drawn at random (seeded), as base64."""
    files = sorted(p for p in Path(data_dir).rglob("*") if p.suffix.lower() in (".png", ".jpg", ".jpeg", ".tif"))
    if not files:
        raise SystemExit(f"no images under {data_dir}")
    chosen = np.random.default_rng(seed).choice(len(files), size=min(count, len(files)), replace=False)
    return [base64.b64encode(files[i].read_bytes()).decode() for i in chosen]


def _family(pid: int) -> list[int]:
    """The process and its descendants (Linux /proc)."""
    children = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            children += [int(c) for c in (task / "children").read_text().split()]
        except OSError:
            continue
    return [pid] + [d for c in children for d in _family(c)]


def peak_rss_mib(pid: int) -> float:
    """The largest peak RSS (VmHWM) among the server process and its descendants (the scoring worker)."""
    peaks = []
    for member in _family(pid):
        try:
            status = Path(f"/proc/{member}/status").read_text()
        except OSError:
            continue
        peaks += [int(line.split()[1]) / 1024 for line in status.splitlines() if line.startswith("VmHWM")]
    return max(peaks, default=float("nan"))


def measure(model: str, encoded: list[str], batch: int, requests_n: int) -> dict[str, float]:
    port = free_port()
    url = f"http://127.0.0.1:{port}/invocations"
    cmd = [sys.executable, "-m", "mlflow", "models", "serve", "-m", model, "--env-manager", "local",
           "--host", "127.0.0.1", "--port", str(port), "--workers", "1"]
    with tempfile.TemporaryDirectory() as scratch:
        process, _ = start(cmd, f"http://127.0.0.1:{port}/ping", {**os.environ, "TMPDIR": scratch})
        try:
            single = json.dumps({"inputs": encoded[:1]}).encode()
            many = json.dumps({"inputs": encoded[:batch]}).encode()
            for body in (single, many):  # warm-up, and a check that the model answers
                answer = requests.post(url, data=body, headers={"Content-Type": "application/json"}, timeout=600)
                if answer.status_code != 200:
                    raise SystemExit(f"{model}: HTTP {answer.status_code} {answer.text[:300]}")
            latencies, _ = load(url, single, 1, requests_n)
            _, wall = load(url, many, 2, max(2, requests_n // 4))
            served = 2 * (max(2, requests_n // 4) // 2) * batch
            return {"p50": pct(latencies, 50), "p95": pct(latencies, 95), "ms_per_image": 1000 * wall / served,
                    "images_per_s": served / wall, "rss": peak_rss_mib(process.pid)}
        finally:
            stop(process)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="the model to cost (models:/name@alias, runs:/...)")
    parser.add_argument("--reference", required=True, help="the model it is compared with, served the same way")
    parser.add_argument("--data_dir", default="../shared/data/breakhis")
    parser.add_argument("--batch", type=int, default=16, help="images per request in the throughput part")
    parser.add_argument("--requests", type=int, default=40, help="single-image requests (throughput: a quarter)")
    args = parser.parse_args()
    encoded = images(args.data_dir, args.batch)
    rows = {}
    for name, uri in (("reference", args.reference), ("model", args.model)):
        rows[name] = measure(uri, encoded, args.batch, args.requests)
        print(f"{name} {uri}: {rows[name]}", flush=True)
    ref = rows["reference"]
    print(f"\n{len(encoded)} images of {args.data_dir}, `mlflow models serve` with 1 worker, client on the same "
          f"machine; single: 1 image per request, 1 client; batch: {args.batch} images per request, 2 clients")
    print("| model | single p50 ms | single p95 ms | batch ms/image | images/s | peak RSS MiB | cost ÷ reference |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name, uri in (("reference", args.reference), ("model", args.model)):
        r = rows[name]
        print(f"| {name}: `{uri}` | {r['p50']:.0f} | {r['p95']:.0f} | {r['ms_per_image']:.1f} | "
              f"{r['images_per_s']:.1f} | {r['rss']:.0f} | {r['ms_per_image'] / ref['ms_per_image']:.2f} |")


if __name__ == "__main__":
    main()
