"""What a tracking server costs to start: `mlflow server` as MLflow 3.17 starts it (the reference) against the
same command with MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false, as docs/team-server.md runs it.

MLflow 3's server starts, besides its uvicorn worker, a job runner with a Huey consumer per kind of GenAI job
(scorers, trace roll-ups, periodic tasks), each a process importing MLflow; histoflow uses none of them. For
each setting the server starts on a new SQLite store with --workers 1; measured: the seconds until /health
answers, then, SETTLE seconds later, the processes of the server's tree, their CPU seconds since the start
(user + system, from /proc) and their resident memory (VmRSS). Each setting runs REPEATS times, alternating;
the table gives medians and the ratio to the reference.

    python bench/tracking_server.py --repeats 3
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from serve_latency import descendants, free_port  # noqa: E402
from serve_memory import rss_mib  # noqa: E402

SETTINGS = {"MLflow's default": {}, "job execution off": {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}}


def cpu_seconds(pid: int) -> float:
    ticks = os.sysconf("SC_CLK_TCK")
    total = 0
    for p in descendants(pid):
        try:
            stat = Path(f"/proc/{p}/stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rfind(")") + 2:].split()
        total += int(fields[11]) + int(fields[12])  # utime, stime
    return total / ticks


def measure(env: dict, settle: float) -> tuple[float, int, float, float]:
    """(seconds to /health, processes, CPU seconds, RSS MiB) of one server start."""
    root, port = Path(tempfile.mkdtemp(prefix="tracking-server-")), free_port()
    started = time.perf_counter()
    process = subprocess.Popen([sys.executable, "-m", "mlflow", "server", "--backend-store-uri",
                                f"sqlite:///{root / 'mlflow.db'}", "--artifacts-destination", str(root / "artifacts"),
                                "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
                               env={**os.environ, **env}, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               start_new_session=True)
    try:
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"mlflow server exited with {process.returncode}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2):
                    break
            except OSError:
                time.sleep(0.2)
        up = time.perf_counter() - started
        time.sleep(settle)
        return up, len(descendants(process.pid)), cpu_seconds(process.pid), rss_mib(process.pid)
    finally:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--settle", type=float, default=20.0, help="seconds after /health answers")
    args = parser.parse_args()
    results: dict[str, list[tuple[float, int, float, float]]] = {name: [] for name in SETTINGS}
    for _ in range(args.repeats):
        for name, env in SETTINGS.items():
            results[name].append(measure(env, args.settle))
    medians = {name: [statistics.median(column) for column in zip(*rows, strict=True)]
               for name, rows in results.items()}
    reference = medians["MLflow's default"]
    print("| server | up s | processes | CPU s | RSS MiB | CPU / default | RSS / default |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name, (up, processes, cpu, rss) in medians.items():
        print(f"| {name} | {up:.1f} | {processes:.0f} | {cpu:.1f} | {rss:.0f} | {cpu / reference[2]:.2f} | "
              f"{rss / reference[3]:.2f} |")


if __name__ == "__main__":
    main()
