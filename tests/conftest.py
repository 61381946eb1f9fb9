"""Shared fixtures: real data from ../shared, an isolated MLflow store and a seeded Keras cache.

Trained models that many test files use are trained once per test run, whichever pytest-xdist worker asks
first (`build_once`: a file lock in the run's shared temporary folder), and each worker works on its own copy
of their MLflow store.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from histoflow.cli import collect_garbage_less

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("HISTOFLOW_SHARED", REPO.parent / "shared"))
IDC = SHARED / "data" / "idc"
BREAKHIS = SHARED / "data" / "breakhis"
KERAS_WEIGHTS = SHARED / "keras-weights"
# Pretrained DenseNet121 without its top, passed by path (its bytes are not Keras's download, whose MD5 Keras
# checks in its cache): what every DenseNet run on these machines uses (../shared/keras-weights/README.md).
DENSENET_WEIGHTS = KERAS_WEIGHTS / "densenet121_weights_tf_dim_ordering_tf_kernels_notop.h5"

if not IDC.is_dir() or not BREAKHIS.is_dir():
    raise RuntimeError(f"the real test data is missing: expected {IDC} and {BREAKHIS}")


def _seed_keras_home() -> Path:
    """$KERAS_HOME with the offline ImageNet weights in models/, so nothing downloads: MobileNet's, which Keras
    takes by name; not DenseNet121's, whose bytes fail the MD5 Keras checks in its cache (it is passed by path).

    Keras reads KERAS_HOME once, at import, so this runs before any test module imports it; the
    subprocesses (mlflow run) inherit it.
    """
    home = Path(tempfile.mkdtemp(prefix="histoflow-keras-home-"))
    (home / "models").mkdir()
    for weights in KERAS_WEIGHTS.glob("*.h5"):
        if weights != DENSENET_WEIGHTS:
            (home / "models" / weights.name).symlink_to(weights)
    os.environ["KERAS_HOME"] = str(home)
    return home


KERAS_HOME = _seed_keras_home()
# histoflow's cache (decoded images, checkpoints, features, remembered image checks) of the test run and the
# processes it starts: never the user's, never the working tree. One for the whole run: pytest-xdist's workers
# inherit the controller's (its writes are atomic renames and a SQLite store, as for a user's processes), so each
# real dataset's files are checked once per run, not once per worker.
TEST_CACHE_ENV = "HISTOFLOW_TEST_RUN_CACHE"
if not (os.environ.get("PYTEST_XDIST_WORKER") and os.environ.get(TEST_CACHE_ENV)):
    os.environ[TEST_CACHE_ENV] = tempfile.mkdtemp(prefix="histoflow-cache-")
os.environ["HISTOFLOW_CACHE"] = os.environ[TEST_CACHE_ENV]

# The suite's pytest-xdist workers share the machine's cores: one TensorFlow thread per pool in each process
# (and in the processes they start), not pools as large as the machine in every process fighting over it
# (measured on 2 cores: 9 % less wall time, 8 % less CPU). A developer's own setting is kept.
for _threads in ("TF_NUM_INTRAOP_THREADS", "TF_NUM_INTEROP_THREADS", "OMP_NUM_THREADS"):
    os.environ.setdefault(_threads, "1")
# The tests' own processes collect garbage as the `histoflow` command does: they train and trace models in-process
# too.
collect_garbage_less()
# Every `mlflow server` the tests start runs as docs/team-server.md starts a team's: MLflow 3.17's server otherwise
# starts its GenAI job runners (a Huey consumer per kind of job, ~10 processes) that histoflow never uses: ~45 s of
# CPU and ~1.9 GB more at each start (bench/tracking_server.py).
os.environ.setdefault("MLFLOW_SERVER_ENABLE_JOB_EXECUTION", "false")

# The files of the working tree that git does not track (ignored ones included), less what Python and pytest
# write: taken when the run starts and again when it ends, so that a test that writes into the repository fails
# the run (a developer's edits of tracked files during the run are not its doing).
TREE_NOISE = ("__pycache__", ".pytest_cache", ".venv", ".egg-info", ".ruff_cache")


def working_tree_state(root: Path = REPO) -> set[str]:
    """`git status` lines of everything changed, untracked or ignored under `root`."""
    out = subprocess.run(["git", "status", "--porcelain", "--ignored", "--untracked-files=all"], cwd=root,
                         capture_output=True, text=True, timeout=60)
    return {line for line in out.stdout.splitlines() if not any(noise in line for noise in TREE_NOISE)}


def untracked_files(root: Path = REPO) -> set[str]:
    return {line for line in working_tree_state(root) if line.startswith(("??", "!!"))}


def _is_controller(config) -> bool:
    return not hasattr(config, "workerinput")


def pytest_configure(config) -> None:
    if _is_controller(config) and (REPO / ".git").exists():
        config.stash[_TREE_KEY] = untracked_files()


def pytest_sessionfinish(session, exitstatus) -> None:
    if not _is_controller(session.config) or _TREE_KEY not in session.config.stash:
        return
    written = untracked_files() - session.config.stash[_TREE_KEY]
    if written:
        session.config.get_terminal_writer().line(
            "the tests wrote into the working tree:\n  " + "\n  ".join(sorted(written)), red=True)
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


_TREE_KEY = pytest.StashKey[set]()


# The test files that take longest, longest first: pytest-xdist hands files to its workers in this order, so
# that no worker is left with a long file at the end (the others, after these, in name order).
LONGEST_FIRST = ("test_project.py", "test_resume.py", "test_team_server.py", "test_onnx_serving.py", "test_tuning.py",
                 "test_app.py", "test_screening.py", "test_training_run.py", "test_cross_validation.py",
                 "test_spark_predict.py", "test_distributed_training.py", "test_slides.py", "test_registry.py",
                 "test_architectures.py", "test_serving.py", "test_docker.py")


def pytest_collection_modifyitems(config, items) -> None:
    rank = {name: k for k, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: (rank.get(item.path.name, len(rank)), item.path.name))


# Test files that go to the same worker, as one unit, because they share a session fixture that costs a process:
# the tiny model's scoring server (one TensorFlow process instead of one per worker).
SAME_WORKER = {"test_app.py": "scoring-server", "test_serving.py": "scoring-server"}


@pytest.hookimpl(optionalhook=True)  # a hook of pytest-xdist: unknown where it is not loaded (-p no:xdist)
def pytest_xdist_make_scheduler(config, log):
    """pytest-xdist's `--dist loadfile` (a file at a time per worker), with SAME_WORKER's files one unit."""
    if config.getvalue("dist") != "loadfile":
        return None
    from xdist.scheduler import LoadFileScheduling

    class FilesTogether(LoadFileScheduling):
        def _split_scope(self, nodeid: str) -> str:
            scope = super()._split_scope(nodeid)
            return SAME_WORKER.get(Path(scope).name, scope)

    return FilesTogether(config, log)


def shared_folder(tmp_path_factory) -> Path:
    """The temporary folder of the whole run: every xdist worker's base folder is inside it."""
    base = tmp_path_factory.getbasetemp()
    return base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base


def build_once(tmp_path_factory, name: str, build: Callable[[Path], Any]) -> tuple[Path, Any]:
    """`build(folder)` run once for the whole test run, by the first worker that asks, under a file lock; the
    others wait and read its result (JSON). A failed build fails every test that asks, with its error."""
    from filelock import FileLock

    folder = shared_folder(tmp_path_factory) / name
    result, failure = folder / "result.json", folder / "failure.txt"
    with FileLock(f"{folder}.lock"):
        if failure.is_file():
            pytest.fail(f"building {name} failed in another worker:\n{failure.read_text()}")
        if not result.is_file():
            folder.mkdir(parents=True, exist_ok=True)
            try:
                value = build(folder)
            except BaseException as exc:
                failure.write_text(f"{type(exc).__name__}: {exc}")
                raise
            result.write_text(json.dumps(value))
    return folder, json.loads(result.read_text())


@pytest.fixture(scope="session", autouse=True)
def _outside_the_working_tree(tmp_path_factory) -> None:
    """Fixtures of wider scope start in a folder of their own, not in the working tree (after collection,
    which resolves the test paths against the invocation folder)."""
    os.chdir(tmp_path_factory.mktemp("cwd"))


def _empty_store(folder: Path) -> str:
    from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore

    SqlAlchemyStore(f"sqlite:///{folder / 'mlflow.db'}", str(folder / "mlruns")).engine.dispose()
    return str(folder / "mlflow.db")


@pytest.fixture(scope="session", autouse=True)
def _run_folders(tmp_path_factory) -> None:
    """For new_sqlite_database, which plain functions call: where the run's shared results are."""
    _RUN_FOLDERS.append(tmp_path_factory)


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


_RUN_FOLDERS: list = []  # this run's tmp_path_factory


def new_sqlite_database(path: Path) -> None:
    """An empty MLflow SQLite database at `path`: a copy of one made once for the whole run (MLflow creates and
    migrates the tables of a new database for ~5 s of CPU), its Default experiment's artifacts in `path`'s
    folder."""
    import sqlite3

    _, template = build_once(_RUN_FOLDERS[0], "empty-store", _empty_store)
    shutil.copy(template, path)
    with contextlib.closing(sqlite3.connect(path)) as db, db:
        db.execute("UPDATE experiments SET artifact_location = ? WHERE experiment_id = 0",
                   (str(path.parent / "mlruns" / "0"),))


@contextlib.contextmanager
def sqlite_store(root: Path) -> Iterator[str]:
    """MLflow pointed at a SQLite store in `root` (a new one unless there is one), which is also the working
    folder, until the block ends (for fixtures wider than a test, which cannot use `monkeypatch`); yields the
    store's URI."""
    import mlflow

    if not (root / "mlflow.db").exists():
        new_sqlite_database(root / "mlflow.db")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    previous = mlflow.get_tracking_uri()
    mp = pytest.MonkeyPatch()
    mp.setenv("MLFLOW_TRACKING_URI", uri)
    mp.chdir(root)
    mlflow.set_tracking_uri(uri)
    try:
        yield uri
    finally:
        mp.undo()
        mlflow.set_tracking_uri(previous)


# The small trained models of the registry, serving, page, container and Spark tests (BreakHis, 60 images, 32 px):
# the baseline with a Youden threshold, dihedral test-time augmentation and Macenko stain normalisation (so that
# the served decision is neither the argmax nor a single view of the raw colours), 2 epochs; the augmented CNN
# and the CNN + LSTM as the reports trained them, 1 epoch; the augmented CNN's data with a resolution (mpp, a test
# value: the shared data's README gives none), which its served model carries to predict-slide. test_project checks
# their runs as it checks the `mlflow run` ones.
TINY_SETTINGS = {"data_dir": str(BREAKHIS), "max_images": 60, "image_size": 32, "batch_size": 16,
                 "gradcam_per_class": 1, "experiment": "tiny", "bootstrap": 200}
TINY_RUNS = {"baseline": {"epochs": 2, "threshold_policy": "youden", "tta": "dihedral8", "stain_norm": "macenko"},
             "augmented": {"epochs": 1, "mpp": 0.5}, "cnn_lstm": {"epochs": 1}}


def _train_tiny_store(folder: Path) -> dict[str, str]:
    import mlflow

    from histoflow.modeling import training_run
    from histoflow.modeling.variants import make_train_config
    from histoflow.registry.selection import classifier_uri

    runs = {}
    with sqlite_store(folder):
        for variant, settings in TINY_RUNS.items():
            runs[variant] = training_run.run(make_train_config(variant, **TINY_SETTINGS, **settings))
            classifier_uri(mlflow.get_run(runs[variant]))  # the serving model, logged once for every worker
    forget_experiment()
    return runs


@pytest.fixture(scope="session")
def tiny_store(tmp_path_factory):
    """The tiny models' SQLite store: trained once per test run; this worker's own copy of its database (the
    artifacts stay shared: runs and models added here get artifact folders of their own).

    Returns (root, uri, {variant: run id}); root is this worker's folder, also the store's working folder."""
    folder, runs = build_once(tmp_path_factory, "tiny-store", _train_tiny_store)
    root = tmp_path_factory.mktemp("registry-store")
    shutil.copy(folder / "mlflow.db", root / "mlflow.db")
    return root, f"sqlite:///{root / 'mlflow.db'}", runs


@pytest.fixture
def use_store(tiny_store, monkeypatch):
    """The tiny store as the tracking store and `tiny` as the experiment, for one test (the previous tracking
    URI back afterwards: a module's own store stays its own)."""
    root, uri, runs = tiny_store
    import mlflow

    previous = mlflow.get_tracking_uri()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "tiny")
    mlflow.set_tracking_uri(uri)
    mlflow.set_experiment("tiny")
    yield tiny_store
    mlflow.set_tracking_uri(previous)


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


@pytest.fixture(scope="session")
def scoring_server(classifier, tiny_store):
    """`mlflow models serve` of the tiny baseline's serving model, as a user starts it (one worker), for every
    test of this process that scores over HTTP; its URL."""
    import signal

    model_dir, _ = classifier
    port = free_port()
    process = start_server(
        [sys.executable, "-m", "mlflow", "models", "serve", "-m", model_dir, "--env-manager", "local",
         "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
        env={**os.environ, "MLFLOW_TRACKING_URI": tiny_store[1]})
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for(f"{url}/ping", process)
        yield url
    finally:
        os.killpg(process.pid, signal.SIGTERM)  # the server and its uvicorn workers
        process.wait(timeout=30)


def start_server(command: list[str], env: dict | None = None) -> subprocess.Popen:
    """A server process in its own session, its stderr in a file: a pipe nobody reads blocks the server once it
    holds 64 KB (MLflow prints a progress line per model file as it starts; uvicorn logs every request)."""
    log = tempfile.NamedTemporaryFile(prefix="histoflow-server-", suffix=".log", delete=False)  # noqa: SIM115
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=log, start_new_session=True)
    process.log_path = Path(log.name)
    log.close()
    return process


def wait_for(url: str, process, timeout: float = 120.0) -> None:
    import time
    import urllib.request

    deadline = time.time() + timeout
    while time.time() < deadline:
        if process.poll() is not None:
            log = getattr(process, "log_path", None)
            said = log.read_text(errors="replace")[-3000:] if log else (process.stderr.read()[-3000:]
                                                                           if process.stderr else "")
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
    admin.dispose()
    for database in owned:  # FORCE: a killed worker's connections, or autovacuum's, may linger (superuser only)
        _postgres_superuser(f'DROP DATABASE "{database}" WITH (FORCE)')


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
