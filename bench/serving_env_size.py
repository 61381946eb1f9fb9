"""Installed size of the served model's environment: what `mlflow models build-docker` installs into the image.

Logs the serving pyfunc of one network (the baseline CNN, untrained: the weights do not change the
requirements) for each runtime, then installs each model's own requirements.txt into a clean virtual environment
(uv, from the package index) and measures the environment on disk. Reported per runtime: the environment's size
less an empty one's, the largest distributions, and the ratio of the two runtimes. The reference is the
TensorFlow runtime's environment, measured in the same run. Needs the package index (the internet, or a mirror).

    python bench/serving_env_size.py
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import mlflow  # noqa: E402

from histoflow.modeling.architectures import build_baseline  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_store import absolute, temporary_store  # noqa: E402

from histoflow.serving.packaging import log_classifier  # noqa: E402

SIZE = 128


def disk_mib(path: Path) -> float:
    return sum(p.lstat().st_size for p in path.rglob("*") if p.is_file() and not p.is_symlink()) / 2**20


def site_packages(venv: Path) -> Path:
    return next((venv / "lib").glob("python*/site-packages"))


def install(requirements: Path, venv: Path) -> None:
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    uv = Path(sys.executable).with_name("uv")
    subprocess.run([str(uv) if uv.exists() else "uv", "pip", "install", "-q", "--python", str(venv / "bin" / "python"),
                    "-r", str(requirements)], check=True)


def largest(venv: Path, n: int = 5) -> list[tuple[str, float]]:
    """The n largest top-level folders of site-packages (a distribution's package, roughly)."""
    sizes = [(p.name, disk_mib(p)) for p in site_packages(venv).iterdir() if p.is_dir()
             and not p.name.endswith((".dist-info", "__pycache__"))]
    return sorted(sizes, key=lambda x: -x[1])[:n]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--image", default=None, help="the input example (default: the first BreakHis PNG)")
    parser.add_argument("--data_dir", default="../shared/data/breakhis")
    args = parser.parse_args()
    image = absolute(args.image or str(next(iter(sorted(Path(args.data_dir).rglob("*.png"))))))
    tmp = temporary_store("histoflow-bench-envsize-")
    path = tmp / "baseline_cnn.keras"
    build_baseline(SIZE).save(path)
    empty = tmp / "empty"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(empty)], check=True)
    base = disk_mib(empty)
    rows = {}
    for runtime in ("onnx", "tensorflow"):
        with mlflow.start_run():
            uri = log_classifier([path], ["benign", "malignant"], SIZE, image, runtime=runtime).model_uri
        model_dir = Path(mlflow.artifacts.download_artifacts(uri, dst_path=str(tmp / f"model-{runtime}")))
        venv = tmp / f"venv-{runtime}"
        install(model_dir / "requirements.txt", venv)
        rows[runtime] = (disk_mib(venv) - base, largest(venv),
                         (model_dir / "requirements.txt").read_text().split())
        print(f"{runtime}: {rows[runtime][0]:.0f} MiB", flush=True)
    print("\nthe served model's requirements.txt installed into a clean venv (uv), size on disk less an empty venv's")
    print("| runtime | requirements | installed MiB | largest packages (MiB) | ÷ tensorflow |")
    print("|---|---|---:|---|---:|")
    for runtime, (size, top, requirements) in rows.items():
        listed = ", ".join(r.split("==")[0] for r in requirements)
        print(f"| {runtime} | {listed} | {size:.0f} | " + ", ".join(f"{n} {s:.0f}" for n, s in top)
              + f" | {size / rows['tensorflow'][0]:.2f} |")


if __name__ == "__main__":
    main()
