"""Fetch the public archives (BreaKHis v1, IDC patches), verify them and extract them safely."""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import sys
import tarfile
import time
import urllib.error
import urllib.request
import zipfile
from dataclasses import dataclass
from pathlib import Path

from histoflow.data.discovery import discover
from histoflow.data.settings import DATASET_DIRS, DownloadConfig
from histoflow.errors import DataError
from histoflow.progress import progress

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Archive:
    name: str
    url: str
    filename: str
    default_dir: str
    layout: str
    homepage: str


ARCHIVES: dict[str, Archive] = {
    "breakhis": Archive(
        "breakhis", "http://www.inf.ufpr.br/vri/databases/BreaKHis_v1.tar.gz", "BreaKHis_v1.tar.gz",
        DATASET_DIRS["breakhis"], "breakhis",
        "https://web.inf.ufpr.br/vri/databases/breast-cancer-histopathological-database-breakhis/"),
    "idc": Archive(
        "idc", "http://andrewjanowczyk.com/wp-static/IDC_regular_ps50_idx5.zip", "IDC_regular_ps50_idx5.zip",
        DATASET_DIRS["idc"], "idc", "https://www.kaggle.com/datasets/paultimothymooney/breast-histopathology-images"),
}
CONNECT_TIMEOUT_S = 20
# data_dir=sample: the IDC patches shipped in the package (samples/README.md), for a first run without a download.
SAMPLE = "sample"


def sample_dir() -> Path:
    return Path(__file__).parent / "samples" / "idc-sample"


def archive_url(name: str) -> str:
    """The archive's URL; HISTOFLOW_<NAME>_URL overrides it (mirrors, tests)."""
    return os.environ.get(f"HISTOFLOW_{name.upper()}_URL") or ARCHIVES[name].url


CHUNK_BYTES = 1 << 20


def _fetch(url: str, target: Path) -> str:
    """Stream url to target; returns the SHA-256 of what was written."""
    partial = target.with_name(target.name + ".partial")
    sha = hashlib.sha256()
    try:
        with urllib.request.urlopen(url, timeout=CONNECT_TIMEOUT_S) as response, open(partial, "wb") as out:
            total = int(response.headers.get("Content-Length") or 0)
            done = 0
            chunks = iter(lambda: response.read(CHUNK_BYTES), b"")
            for chunk in progress(chunks, total=-(-total // CHUNK_BYTES) if total else None,
                                  desc=f"downloading {url.rsplit('/', 1)[-1]}", unit="MiB"):
                out.write(chunk)
                sha.update(chunk)
                done += len(chunk)
            if total and done != total:
                raise DataError(f"download of {url} stopped at {done} of {total} bytes; run it again")
    except (urllib.error.URLError, OSError) as exc:
        partial.unlink(missing_ok=True)
        raise DataError(f"could not download {url}: {getattr(exc, 'reason', exc)}") from None
    partial.replace(target)
    return sha.hexdigest()


def _extract(archive: Path, dest: Path) -> None:
    dest.mkdir(parents=True, exist_ok=True)
    if zipfile.is_zipfile(archive):
        with zipfile.ZipFile(archive) as zf:
            bad = zf.testzip()
            if bad:
                raise DataError(f"{archive} is corrupt (first bad member: {bad}); delete it and download again")
            root = dest.resolve()
            members = zf.namelist()
            for member in members:
                if not (root / member).resolve().is_relative_to(root):
                    raise DataError(f"{archive} has a member outside the target folder: {member}")
            for member in progress(members, desc=f"extracting {archive.name}", unit="file"):
                zf.extract(member, dest)
    elif tarfile.is_tarfile(archive):
        try:
            with tarfile.open(archive) as tf:
                members = tf.getmembers()
                for member in progress(members, desc=f"extracting {archive.name}", unit="file"):
                    tf.extract(member, dest, filter="data")  # refuses absolute paths, links out, devices
        except (tarfile.TarError, EOFError, OSError) as exc:
            raise DataError(f"{archive} is corrupt or truncated ({exc}); delete it and download again") from None
    else:
        raise DataError(f"{archive} is neither a zip nor a tar archive")


MARKER = ".histoflow-download.json"  # in the destination: "incomplete" from the first byte, "complete" at the end


def download_state(dest: Path) -> dict | None:
    """What histoflow's download left in dest: {"state": "incomplete" | "complete", ...}, or None (not ours)."""
    try:
        return json.loads((dest / MARKER).read_text())
    except (OSError, ValueError):
        return None


def _mark(dest: Path, **record: object) -> None:
    (dest / MARKER).write_text(json.dumps(record, indent=2))


def _clear(dest: Path) -> None:
    """Remove what an interrupted download left (only ever called on a folder marked as ours)."""
    for child in dest.iterdir():
        if child.is_dir() and not child.is_symlink():
            shutil.rmtree(child)
        else:
            child.unlink()


def download(name: str, dest: str | os.PathLike | None = None, url: str = "", sha256: str = "",
             keep_archive: bool = False) -> Path:
    """Download, verify and extract one dataset into dest; returns dest.

    dest is marked incomplete before the first byte and complete only after the extracted images
    were checked, so an interrupted download (a killed process, a full disk) is recognised and
    redone instead of being taken for the dataset. A folder with other content is never written to.
    """
    if name not in ARCHIVES:
        raise DataError(f"dataset must be one of {', '.join(ARCHIVES)}; got {name!r}")
    spec = ARCHIVES[name]
    dest = Path(dest or spec.default_dir)
    url = url or archive_url(name)
    state = download_state(dest)
    if state and state.get("state") == "complete":
        print(f"{spec.name} is already in {dest} (downloaded from {state.get('url')}); delete the folder to "
              "download again", file=sys.stderr)
        return dest
    if state is None and dest.is_dir() and any(dest.iterdir()):
        raise DataError(f"{dest} is not empty and holds no download of histoflow's: download into a new or "
                        "empty folder (-P dest=...)")
    created = not dest.exists()
    dest.mkdir(parents=True, exist_ok=True)
    if state is not None:
        print(f"{dest} holds an interrupted download: removing it and starting again", file=sys.stderr)
        _clear(dest)
    _mark(dest, state="incomplete", dataset=name, url=url, started=time.time())
    try:
        target = dest / spec.filename
        print(f"downloading {spec.name} from {url} into {dest}", file=sys.stderr, flush=True)
        digest = _fetch(url, target)
        if sha256 and digest != sha256.lower():
            raise DataError(f"{target.name}: SHA-256 {digest} does not match the expected {sha256}")
        _extract(target, dest)
        if not keep_archive:
            target.unlink()
        # The archive is only accepted if it holds the expected layout with both classes.
        dataset = discover(dest, layout=spec.layout)
    except BaseException:
        shutil.rmtree(dest, ignore_errors=True)
        if not created:
            dest.mkdir()  # the empty folder the user gave
        raise
    patients = int(dataset.frame["patient"].nunique())
    _mark(dest, state="complete", dataset=name, url=url, archive_sha256=digest, images=len(dataset.frame),
          patients=patients, finished=time.time())
    print(f"{spec.name}: {len(dataset.frame)} images of {patients} patients in {dest} (sha256 of the archive "
          f"{digest})", file=sys.stderr)
    return dest


def ensure_dataset(data_dir: str | os.PathLike) -> Path:
    """data_dir, ready to read: a finished download or a folder of the user's as it is; an interrupted
    download is redone, and the default folders (data/breakhis, data/idc) are downloaded when missing;
    `sample` is the IDC sample shipped in the package."""
    if str(data_dir).strip() == SAMPLE:
        return sample_dir()
    path = Path(data_dir)
    state = download_state(path)
    if state is not None and state.get("state") == "complete":
        return path
    if state is None and path.is_dir() and any(path.iterdir()):
        return path  # the user's own folder: discovery checks what is in it
    name = state.get("dataset") if state else next(
        (spec.name for spec in ARCHIVES.values()
         if os.path.normpath(str(data_dir)) == os.path.normpath(spec.default_dir)), None)
    if name not in ARCHIVES:
        raise DataError(f"data_dir {path} does not exist (or is empty)")
    spec = ARCHIVES[name]
    try:
        return download(name, path, url=(state or {}).get("url", ""))
    except DataError as exc:
        for folder in (path, path.parent):  # the empty folder a failed download leaves, and data/ if now empty
            with contextlib.suppress(OSError):
                folder.rmdir()
        raise DataError(
            f"{exc}. {spec.name} is not in {path} and could not be downloaded: fetch "
            f"{spec.filename} from {spec.homepage}, extract it into {path}, or pass -P data_dir=<folder>"
        ) from None


def run(config: DownloadConfig) -> Path:
    """The `download` entry point."""
    return download(config.dataset, config.dest or None, config.url, config.sha256)
