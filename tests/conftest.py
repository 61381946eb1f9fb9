"""Shared fixtures: real data from ../shared, an isolated MLflow store and a seeded Keras cache."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
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


@pytest.fixture(scope="session", autouse=True)
def _outside_the_working_tree(tmp_path_factory) -> None:
    """Fixtures of wider scope start in a folder of their own, not in the working tree (after collection,
    which resolves the test paths against the invocation folder)."""
    os.chdir(tmp_path_factory.mktemp("cwd"))


@pytest.fixture(scope="session")
def keras_home() -> Path:
    return KERAS_HOME


# As the suite found them: a developer may run it with an experiment of their own exported.
EXPERIMENT_ENV = {name: os.environ.get(name) for name in ("MLFLOW_EXPERIMENT_ID", "MLFLOW_EXPERIMENT_NAME")}


def forget_experiment() -> None:
    """Undo mlflow.set_experiment: it caches the id in-process and exports MLFLOW_EXPERIMENT_ID, which the
    next test's store (or a worker process it starts) would then look up and not find."""
    from mlflow.tracking import fluent

    fluent._active_experiment_id = None
    for name, value in EXPERIMENT_ENV.items():
        os.environ.pop(name, None)
        if value is not None:
            os.environ[name] = value


@pytest.fixture(autouse=True)
def isolated_experiment():
    forget_experiment()
    yield
    forget_experiment()


@pytest.fixture(autouse=True)
def outside_the_repository(tmp_path, monkeypatch):
    """Every test runs in its own temporary folder: relative defaults (./mlruns of a new MLflow store,
    optuna.db, outputs/) land there, never in the working tree."""
    monkeypatch.chdir(tmp_path)


@pytest.fixture
def tracking_uri(tmp_path) -> Iterator[str]:
    with sqlite_store(tmp_path) as uri:
        yield uri


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


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def sqlite_store(root: Path) -> Iterator[str]:
    """MLflow pointed at a SQLite store in `root`, which is also the working folder, until the block ends
    (for fixtures wider than a test, which cannot use `monkeypatch`); yields the store's URI."""
    import mlflow

    uri = f"sqlite:///{root / 'mlflow.db'}"
    mp = pytest.MonkeyPatch()
    mp.setenv("MLFLOW_TRACKING_URI", uri)
    mp.chdir(root)
    mlflow.set_tracking_uri(uri)
    try:
        yield uri
    finally:
        mp.undo()


@pytest.fixture(scope="session")
def tiny_store(tmp_path_factory):
    """A SQLite store with two small trained BreakHis models (baseline and augmented, 32 px, 1 epoch; the
    baseline with a Youden threshold, dihedral test-time augmentation and Macenko stain normalisation, so
    that the served decision is neither the argmax nor a single view of the raw colours).

    Session-scoped: the registry, serving and docker tests share it. Returns (root, uri, run ids).
    """
    from histoflow.modeling import training_run
    from histoflow.modeling.variants import make_train_config

    root = tmp_path_factory.mktemp("registry-store")
    runs = {}
    with sqlite_store(root) as uri:
        for variant, policy, tta, stain in (("baseline", "youden", "dihedral8", "macenko"),
                                            ("augmented", "argmax", "none", "none")):
            config = make_train_config(variant, data_dir=str(BREAKHIS), max_images=60, epochs=1, image_size=32,
                                       batch_size=16, gradcam_per_class=1, experiment="tiny",
                                       threshold_policy=policy, tta=tta, stain_norm=stain, bootstrap=200)
            runs[variant] = training_run.run(config)
    forget_experiment()
    return root, uri, runs


@pytest.fixture
def use_store(tiny_store, monkeypatch):
    root, uri, runs = tiny_store
    import mlflow

    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "tiny")
    mlflow.set_tracking_uri(uri)
    mlflow.set_experiment("tiny")
    return tiny_store


@pytest.fixture(scope="session")
def registered_classifier(tiny_store) -> str:
    """The baseline run's serving pyfunc as MLflow names it (models:/m-...), in the tiny store."""
    import mlflow

    from histoflow.registry.selection import classifier_uri

    _, uri, runs = tiny_store
    mlflow.set_tracking_uri(uri)
    return classifier_uri(mlflow.get_run(runs["baseline"]))


@pytest.fixture(scope="session")
def classifier(tiny_store, registered_classifier):
    """The baseline run's serving pyfunc and the run's test images.

    The model is a local folder, a copy of the logged model: it loads whatever store a test points at.
    """
    import mlflow

    from histoflow.registry.selection import run_split

    root, uri, runs = tiny_store
    mlflow.set_tracking_uri(uri)
    model_dir = mlflow.artifacts.download_artifacts(registered_classifier, dst_path=str(root / "classifier"))
    _, split, _ = run_split(mlflow.get_run(runs["baseline"]))
    return model_dir, split


def wait_for(url: str, process, timeout: float = 120.0) -> None:
    import time
    import urllib.request

    deadline = time.time() + timeout
    while time.time() < deadline:
        if process.poll() is not None:
            said = process.stderr.read()[-3000:] if process.stderr else ""
            raise RuntimeError(f"server exited with {process.returncode}: {said}")
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    raise TimeoutError(f"{url} did not answer in {timeout} s")


POSTGRES_ROLE = "histoflow_test"
POSTGRES_PASSWORD = "histoflow_test"


def _postgres_superuser(sql: str) -> None:
    """Run SQL as the cluster's superuser (peer authentication of the postgres account)."""
    import shlex

    command = ["psql", "-q", "-v", "ON_ERROR_STOP=1", "-c", sql]
    if os.geteuid() == 0:
        command = ["su", "postgres", "-c", " ".join(shlex.quote(part) for part in command)]
    subprocess.run(command, check=True, capture_output=True, text=True, timeout=60)


def _require_postgres() -> None:
    """Skip, saying why, unless a PostgreSQL server answers on 127.0.0.1:5432 (.ci/run starts one)."""
    import socket

    try:
        socket.create_connection(("127.0.0.1", 5432), timeout=2).close()
    except OSError as exc:
        pytest.skip(f"PostgreSQL is not running on 127.0.0.1:5432 ({exc}); start it (pg_ctlcluster 15 main start, "
                    "as .ci/run does) to run the tests that need it")
    try:
        _postgres_superuser("SELECT 1")
    except (OSError, subprocess.SubprocessError) as exc:
        pytest.skip(f"PostgreSQL runs, but its superuser cannot be reached through the postgres account ({exc}); "
                    "the tests create their own role and database with it")


@pytest.fixture(scope="session")
def postgres_url():
    """A fresh database on the local PostgreSQL, owned by a password role; dropped after the session.

    The role may create databases: a test needing another one (e.g. an MLflow store) names it
    `<this database>_<suffix>`, and it is dropped with this one.
    """
    import sqlalchemy

    _require_postgres()
    _postgres_superuser(
        f"DO $$ BEGIN CREATE ROLE {POSTGRES_ROLE} LOGIN CREATEDB PASSWORD '{POSTGRES_PASSWORD}'; "
        "EXCEPTION WHEN duplicate_object THEN NULL; END $$")
    _postgres_superuser(f"ALTER ROLE {POSTGRES_ROLE} LOGIN CREATEDB PASSWORD '{POSTGRES_PASSWORD}'")
    server = f"postgresql+psycopg2://{POSTGRES_ROLE}:{POSTGRES_PASSWORD}@127.0.0.1:5432"
    name = f"histoflow_test_{os.urandom(4).hex()}"
    admin = sqlalchemy.create_engine(f"{server}/postgres", isolation_level="AUTOCOMMIT")
    with admin.connect() as connection:
        connection.execute(sqlalchemy.text(f'CREATE DATABASE "{name}"'))
    yield f"{server}/{name}"
    with admin.connect() as connection:
        owned = connection.execute(sqlalchemy.text("SELECT datname FROM pg_database WHERE starts_with(datname, :name)"),
                                   {"name": name}).scalars().all()
        for database in owned:  # FORCE: a killed worker's connections may linger
            connection.execute(sqlalchemy.text(f'DROP DATABASE "{database}" WITH (FORCE)'))
    admin.dispose()


def postgres_database(postgres_url: str, suffix: str) -> str:
    """Another database beside the session's, `<its name>_<suffix>` (dropped with it); returns its URL."""
    import sqlalchemy

    url = sqlalchemy.engine.make_url(postgres_url)
    name = f"{url.database}_{suffix}"
    engine = sqlalchemy.create_engine(url.set(database="postgres"), isolation_level="AUTOCOMMIT")
    with engine.connect() as connection:
        connection.execute(sqlalchemy.text(f'CREATE DATABASE "{name}"'))
    engine.dispose()
    return url.set(database=name).render_as_string(hide_password=False)
