"""Bad input through the command line: a clear one-line error, exit status 2, nothing half-written.

`histoflow.cli.main` is called in-process (the process boundary is not what is checked here; the console
script itself runs in tests/test_resume.py and tests/test_distributed_training.py)."""

import socket
import time

import pytest

from conftest import BREAKHIS, new_sqlite_database
from histoflow.cli import main


def _cli(capsys, *args: str) -> tuple[int, str]:
    status = main(list(args))
    return status, capsys.readouterr().err


def test_empty_data_dir(tmp_path, capsys, monkeypatch):
    (tmp_path / "empty").mkdir()
    new_sqlite_database(tmp_path / "mlflow.db")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlflow.db")
    status, err = _cli(capsys, "train", "--variant", "baseline", "--data_dir", str(tmp_path / "empty"))
    assert status == 2
    assert "histoflow: error: data_dir" in err and "Traceback" not in err


def test_bad_parameter(capsys):
    status, err = _cli(capsys, "train", "--variant", "densenet", "--data_dir", str(BREAKHIS), "--dropout", "2")
    assert status == 2 and "dropout must be in [0, 1)" in err


COMMANDS_THAT_TRACK = {
    "train": ["--variant", "baseline", "--data_dir", str(BREAKHIS), "--max_images", "50"],
    "tune": ["--variant", "transfer", "--data_dir", str(BREAKHIS), "--max_images", "50"],
    "compare": [],
    "register": [],
    "promote": [],
}


@pytest.mark.parametrize("command", sorted(COMMANDS_THAT_TRACK))
def test_tracking_server_down_fails_at_once_naming_the_uri(command, capsys, monkeypatch):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    uri = f"http://127.0.0.1:{port}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    start = time.monotonic()
    status, err = _cli(capsys, command, *COMMANDS_THAT_TRACK[command])
    assert status == 2, err[-2000:]
    assert uri in err and "cannot reach" in err
    assert time.monotonic() - start < 30  # MLflow's own retries would take minutes


def test_the_command_ends_with_mains_status_and_everything_it_printed(tmp_path):
    """The console script leaves without Python's interpreter teardown (histoflow.cli.run): its status is still
    main's, its output and log lines all arrive, and the exit handlers of the libraries (here a temporary
    folder's clean-up, registered after the command's own) still run."""
    import subprocess
    import sys

    script = ("import atexit, shutil, sys, tempfile\n"
              "from histoflow import cli\n"
              "def main():\n"
              "    atexit.register(shutil.rmtree, tempfile.mkdtemp(dir=sys.argv[1]))\n"
              "    print('x' * 100000)\n"
              "    __import__('logging').getLogger('h').warning('last')\n"
              "    return 3\n"
              "cli.main = main\n"
              "cli.run()\n")
    done = subprocess.run([sys.executable, "-c", script, str(tmp_path)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 3
    assert done.stdout == "x" * 100000 + "\n" and "last" in done.stderr
    assert list(tmp_path.iterdir()) == []
    out_of_date = tmp_path / "MLproject"
    done = subprocess.run([sys.executable, "-m", "histoflow.cli", "mlproject", "--check", "--output", str(out_of_date)],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 1 and "out of date" in done.stdout
