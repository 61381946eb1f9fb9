"""Shared fixtures: real data from ../shared, an isolated MLflow store and a seeded Keras cache."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("HISTOFLOW_SHARED", REPO.parent / "shared"))
IDC = SHARED / "data" / "idc"
BREAKHIS = SHARED / "data" / "breakhis"
KERAS_WEIGHTS = SHARED / "keras-weights"

if not IDC.is_dir() or not BREAKHIS.is_dir():
    raise RuntimeError(f"the real test data is missing: expected {IDC} and {BREAKHIS}")


def _seed_keras_home() -> Path:
    """$KERAS_HOME with the offline MobileNet ImageNet weights in models/, so nothing downloads.

    Keras reads KERAS_HOME once, at import, so this runs before any test module imports it; the
    subprocesses (mlflow run) inherit it.
    """
    home = Path(tempfile.mkdtemp(prefix="histoflow-keras-home-"))
    (home / "models").mkdir()
    for weights in KERAS_WEIGHTS.glob("*.h5"):
        shutil.copy(weights, home / "models" / weights.name)
    os.environ["KERAS_HOME"] = str(home)
    return home


KERAS_HOME = _seed_keras_home()


@pytest.fixture(scope="session")
def keras_home() -> Path:
    return KERAS_HOME


@pytest.fixture
def tracking_uri(tmp_path, monkeypatch) -> str:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.chdir(tmp_path)
    import mlflow

    mlflow.set_tracking_uri(uri)
    return uri


def idc_patient_dirs(n: int) -> list[Path]:
    return sorted(p for p in IDC.iterdir() if p.is_dir())[:n]


def copy_tree_subset(files: list[Path], source_root: Path, target_root: Path) -> None:
    for f in files:
        dest = target_root / f.relative_to(source_root)
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(f, dest)


def run_cli(*args: str, env: dict | None = None, cwd: Path | None = None, timeout: int = 900):
    """Run `histoflow ...` in a subprocess (the installed console script's module)."""
    return subprocess.run([sys.executable, "-m", "histoflow.cli", *args], capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, cwd=cwd, timeout=timeout)
