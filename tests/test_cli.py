"""Bad input through the command line: a clear one-line error, exit status 2, nothing half-written."""

import socket
import time

import pytest

from conftest import BREAKHIS, run_cli


def test_empty_data_dir(tmp_path):
    (tmp_path / "empty").mkdir()
    result = run_cli("train", "--variant", "baseline", "--data_dir", str(tmp_path / "empty"), cwd=tmp_path,
                     env={"MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path}/mlflow.db"})
    assert result.returncode == 2
    assert "histoflow: error: data_dir" in result.stderr and "Traceback" not in result.stderr


def test_bad_parameter(tmp_path):
    result = run_cli("train", "--variant", "densenet", "--data_dir", str(BREAKHIS), "--dropout", "2",
                     cwd=tmp_path)
    assert result.returncode == 2 and "dropout must be in [0, 1)" in result.stderr


COMMANDS_THAT_TRACK = {
    "train": ["--variant", "baseline", "--data_dir", str(BREAKHIS), "--max_images", "50"],
    "tune": ["--variant", "transfer", "--data_dir", str(BREAKHIS), "--max_images", "50"],
    "compare": [],
    "register": [],
    "promote": [],
}


@pytest.mark.parametrize("command", sorted(COMMANDS_THAT_TRACK))
def test_tracking_server_down_fails_at_once_naming_the_uri(command, tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    uri = f"http://127.0.0.1:{port}"
    start = time.monotonic()
    result = run_cli(command, *COMMANDS_THAT_TRACK[command], cwd=tmp_path, env={"MLFLOW_TRACKING_URI": uri})
    assert result.returncode == 2, result.stderr[-2000:]
    assert uri in result.stderr and "cannot reach" in result.stderr
    assert time.monotonic() - start < 60  # imports included; MLflow's own retries would take minutes
