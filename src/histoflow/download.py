"""Fetch the public archives (BreaKHis v1, IDC patches), verify them and extract them safely."""

from __future__ import annotations

import contextlib
import hashlib
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

from histoflow.datasets import discover
from histoflow.errors import DataError

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
        "data/breakhis", "breakhis",
        "https://web.inf.ufpr.br/vri/databases/breast-cancer-histopathological-database-breakhis/"),
    "idc": Archive(
        "idc", "http://andrewjanowczyk.com/wp-static/IDC_regular_ps50_idx5.zip", "IDC_regular_ps50_idx5.zip",
        "data/idc", "idc", "https://www.kaggle.com/datasets/paultimothymooney/breast-histopathology-images"),
}
CONNECT_TIMEOUT_S = 20


def archive_url(name: str) -> str:
    """The archive's URL; HISTOFLOW_<NAME>_URL overrides it (mirrors, tests)."""
    return os.environ.get(f"HISTOFLOW_{name.upper()}_URL") or ARCHIVES[name].url


def _fetch(url: str, target: Path) -> str:
    """Stream url to target; returns the SHA-256 of what was written."""
    partial = target.with_name(target.name + ".partial")
    sha = hashlib.sha256()
    try:
        with urllib.request.urlopen(url, timeout=CONNECT_TIMEOUT_S) as response, open(partial, "wb") as out:
            total = int(response.headers.get("Content-Length") or 0)
            done, last = 0, 0.0
            while chunk := response.read(1 << 20):
                out.write(chunk)
                sha.update(chunk)
                done += len(chunk)
                if time.monotonic() - last > 5:
                    last = time.monotonic()
                    share = f" ({done / total:.0%})" if total else ""
                    print(f"  {done / 2**20:,.0f} MiB{share}", file=sys.stderr, flush=True)
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
            for member in zf.namelist():
                if not (root / member).resolve().is_relative_to(root):
                    raise DataError(f"{archive} has a member outside the target folder: {member}")
            zf.extractall(dest)
    elif tarfile.is_tarfile(archive):
        try:
            with tarfile.open(archive) as tf:
                tf.extractall(dest, filter="data")  # refuses absolute paths, links out, devices
        except (tarfile.TarError, EOFError, OSError) as exc:
            raise DataError(f"{archive} is corrupt or truncated ({exc}); delete it and download again") from None
    else:
        raise DataError(f"{archive} is neither a zip nor a tar archive")


def download(name: str, dest: str | os.PathLike | None = None, url: str = "", sha256: str = "",
             keep_archive: bool = False) -> Path:
    """Download, verify and extract one dataset into dest; returns dest."""
    if name not in ARCHIVES:
        raise DataError(f"dataset must be one of {', '.join(ARCHIVES)}; got {name!r}")
    spec = ARCHIVES[name]
    dest = Path(dest or spec.default_dir)
    url = url or archive_url(name)
    dest.mkdir(parents=True, exist_ok=True)
    target = dest / spec.filename
    print(f"downloading {spec.name} from {url} into {dest}", file=sys.stderr, flush=True)
    digest = _fetch(url, target)
    if sha256 and digest != sha256.lower():
        target.unlink()
        raise DataError(f"{target.name}: SHA-256 {digest} does not match the expected {sha256}")
    _extract(target, dest)
    if not keep_archive:
        target.unlink()
    # The archive is only accepted if it holds the expected layout with both classes.
    dataset = discover(dest, layout=spec.layout)
    print(f"{spec.name}: {len(dataset.frame)} images of {dataset.frame['patient'].nunique()} patients "
          f"in {dest} (sha256 of the archive {digest})", file=sys.stderr)
    return dest


def ensure_dataset(data_dir: str | os.PathLike) -> Path:
    """data_dir itself if it exists; the default folders are downloaded when missing."""
    path = Path(data_dir)
    if path.is_dir() and any(path.iterdir()):
        return path
    for spec in ARCHIVES.values():
        if os.path.normpath(str(data_dir)) == os.path.normpath(spec.default_dir):
            try:
                return download(spec.name, path)
            except DataError as exc:
                shutil.rmtree(path, ignore_errors=True)
                with contextlib.suppress(OSError):
                    path.parent.rmdir()  # data/ too, when the failed download left it empty
                raise DataError(
                    f"{exc}. {spec.name} is not in {path} and could not be downloaded: fetch "
                    f"{spec.filename} from {spec.homepage}, extract it into {path}, or pass -P data_dir=<folder>"
                ) from None
    raise DataError(f"data_dir {path} does not exist (or is empty)")
