"""A benchmark's MLflow store in a temporary folder, which is also its working directory: MLflow puts the
artifacts of a sqlite store's experiments under ./mlruns of the working directory, and a benchmark must not write
into the checkout it runs from. Resolve relative paths of the command line before calling it."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


def absolute(path: str) -> str:
    """A command line's path made absolute (left alone when it is not a path, e.g. weights="imagenet")."""
    return str(Path(path).resolve()) if os.path.exists(path) else path


def temporary_store(prefix: str) -> Path:
    """A new temporary folder, made the working directory, with its sqlite store as the tracking URI (also in the
    environment, for the servers and runs a benchmark starts)."""
    import mlflow

    folder = Path(tempfile.mkdtemp(prefix=prefix))
    os.chdir(folder)
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{folder}/mlflow.db"
    mlflow.set_tracking_uri(os.environ["MLFLOW_TRACKING_URI"])
    return folder
