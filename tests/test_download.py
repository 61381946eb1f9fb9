"""The download entry point against a real HTTP server on 127.0.0.1 serving archives made from ../shared/data."""

from __future__ import annotations

import functools
import http.server
import json
import socket
import tarfile
import threading
import time
import zipfile

import pytest

from conftest import BREAKHIS, IDC, idc_patient_dirs
from histoflow.data.discovery import discover
from histoflow.data.download import MARKER, download, download_state, ensure_dataset
from histoflow.errors import DataError


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("www")
    with tarfile.open(root / "BreaKHis_v1.tar.gz", "w:gz") as tar:
        for f in sorted(BREAKHIS.rglob("*.png"))[::25]:
            tar.add(f, arcname=str(f.relative_to(BREAKHIS)))
    with zipfile.ZipFile(root / "IDC_regular_ps50_idx5.zip", "w") as zf:
        for patient in idc_patient_dirs(4):
            for f in sorted(patient.rglob("*.png")):
                zf.write(f, arcname=str(f.relative_to(IDC)))
    data = (root / "BreaKHis_v1.tar.gz").read_bytes()
    (root / "truncated.tar.gz").write_bytes(data[: len(data) // 2])
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(root))
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_download_entry_point_fetches_verifies_and_extracts(server, tmp_path):
    from histoflow.cli import main

    dest = tmp_path / "breakhis"
    assert main(["download", "--dataset", "breakhis", "--url", f"{server}/BreaKHis_v1.tar.gz",
                 "--dest", str(dest)]) == 0
    assert not (dest / "BreaKHis_v1.tar.gz").exists()  # the archive is removed after extraction
    ds = discover(dest)
    assert ds.layout == "breakhis" and len(ds.frame) == len(sorted(BREAKHIS.rglob("*.png"))[::25])


def test_idc_zip_and_checksum(server, tmp_path):
    import hashlib
    import urllib.request

    blob = urllib.request.urlopen(f"{server}/IDC_regular_ps50_idx5.zip").read()
    with pytest.raises(DataError, match="does not match"):
        download("idc", tmp_path / "bad", url=f"{server}/IDC_regular_ps50_idx5.zip", sha256="0" * 64)
    dest = download("idc", tmp_path / "idc", url=f"{server}/IDC_regular_ps50_idx5.zip",
                    sha256=hashlib.sha256(blob).hexdigest())
    assert discover(dest).frame["patient"].nunique() == 4


def test_training_default_data_dir_is_downloaded_when_missing(server, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HISTOFLOW_BREAKHIS_URL", f"{server}/BreaKHis_v1.tar.gz")
    path = ensure_dataset("data/breakhis")
    assert discover(path).layout == "breakhis"
    assert ensure_dataset("data/breakhis") == path  # present now: no second download


def test_offline_fails_at_once_saying_where_to_put_the_data(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HISTOFLOW_IDC_URL", f"http://127.0.0.1:{_closed_port()}/IDC_regular_ps50_idx5.zip")
    start = time.monotonic()
    with pytest.raises(DataError) as err:
        ensure_dataset("data/idc")
    assert time.monotonic() - start < 10
    assert "IDC_regular_ps50_idx5.zip" in str(err.value) and "data/idc" in str(err.value)
    assert not (tmp_path / "data").exists()  # nothing half-written is left behind
    with pytest.raises(DataError, match="does not exist"):
        ensure_dataset("somewhere/else")


def test_truncated_archive_is_rejected(server, tmp_path):
    with pytest.raises(DataError, match="corrupt or truncated"):
        download("breakhis", tmp_path / "b", url=f"{server}/truncated.tar.gz")


def test_an_interrupted_download_is_redone_not_trained_on(server, tmp_path, monkeypatch):
    """A killed download leaves part of the archive or of the images; the next run must not take that for
    the dataset (nor trip over the leftover partial file), but download again."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HISTOFLOW_BREAKHIS_URL", f"{server}/BreaKHis_v1.tar.gz")
    complete = ensure_dataset("data/breakhis")
    expected = sorted(str(p.relative_to(complete)) for p in complete.rglob("*.png"))
    # As a process killed half-way through extraction leaves it: half the images, the marker still
    # saying incomplete, and a partial archive.
    for image in sorted(complete.rglob("*.png"))[::2]:
        image.unlink()
    (complete / MARKER).write_text(json.dumps({"state": "incomplete", "dataset": "breakhis"}))
    (complete / "BreaKHis_v1.tar.gz.partial").write_bytes(b"\x1f\x8b half an archive")
    again = ensure_dataset("data/breakhis")
    assert sorted(str(p.relative_to(again)) for p in again.rglob("*.png")) == expected
    assert not list(again.glob("*.partial")) and download_state(again)["state"] == "complete"
    assert download_state(again)["images"] == len(expected)


def test_download_never_writes_into_a_folder_of_someone_elses(server, tmp_path):
    mine = tmp_path / "slides"
    mine.mkdir()
    (mine / "notes.txt").write_text("my own files\n")
    with pytest.raises(DataError, match="is not empty and holds no download of histoflow's"):
        download("breakhis", mine, url=f"{server}/BreaKHis_v1.tar.gz")
    assert [p.name for p in mine.iterdir()] == ["notes.txt"]
    # A folder the user filled by hand (no marker) is used as it is, never downloaded over.
    assert ensure_dataset(mine) == mine


def test_the_readme_names_the_archives_download_fetches():
    from conftest import REPO
    from histoflow.data.download import ARCHIVES

    readme = (REPO / "README.md").read_text()
    for archive in ARCHIVES.values():
        assert f"`{archive.url}`" in readme and archive.homepage in readme
