"""Decoded images on disk: every image decoded, stain-normalised and resized once, stored as uint8.

A training run reads its training and validation images every epoch. Holding them in memory as
float32 grows with the dataset (the full IDC set at 128 px is ~54 GB); here they are written once to
one flat file of fixed-size uint8 records (a quarter of float32's bytes, on disk) and read back a
batch at a time with ``os.preadv``, so that memory stays flat in the dataset's size. Reads go through
the page cache, not a memory map, so the process's resident memory does not grow with the file.

The file's name is a digest of what it holds: every image's path, size and modification time, the
image size and the stain reference. A folder that changes (files added, removed or rewritten) gives
another name, never a stale cache. The file is written under a temporary name and renamed only when
complete, with its manifest written last: a killed process or a full disk leaves nothing a later run
would trust.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from histoflow.errors import DataError
from histoflow.progress import progress

log = logging.getLogger(__name__)
CACHE_VERSION = 2  # 2: resized by Pillow (was tf.image.resize: within one grey level)
CHUNK = 64  # images decoded and written per step


def file_bytes(count: int, image_size: int) -> int:
    """Bytes of a cache file of `count` images: fixed-size uint8 RGB records."""
    return count * image_size * image_size * 3


def cache_key(paths: Sequence[str], image_size: int, stain_reference: dict[str, Any]) -> str:
    sha = hashlib.sha256(f"v{CACHE_VERSION}\t{image_size}\t{json.dumps(stain_reference, sort_keys=True)}\n".encode())
    for path in paths:
        try:
            st = os.stat(path)
        except OSError as exc:
            raise DataError(f"cannot cache {path}: {exc.strerror}") from None
        sha.update(f"{path}\t{st.st_size}\t{st.st_mtime_ns}\n".encode())
    return sha.hexdigest()[:32]


@dataclass(frozen=True)
class CachedImages:
    """A complete cache file: `count` images of image_size x image_size x 3 uint8, in the given order."""

    path: Path
    count: int
    image_size: int
    fallbacks: int  # images left unnormalised (too little tissue) when the cache was written
    hit: bool

    @property
    def record_bytes(self) -> int:
        return file_bytes(1, self.image_size)

    def read(self, indices: np.ndarray) -> np.ndarray:
        """The images at `indices` (any order, repeats allowed) as one (n, size, size, 3) uint8 array."""
        out = np.empty((len(indices), self.image_size, self.image_size, 3), np.uint8)
        fd = os.open(self.path, os.O_RDONLY)
        try:
            for row, index in enumerate(np.asarray(indices, dtype=np.int64)):
                got = os.preadv(fd, [out[row]], int(index) * self.record_bytes)
                if got != self.record_bytes:
                    raise DataError(f"image cache {self.path} is truncated (record {index}); delete it to rebuild")
        finally:
            os.close(fd)
        return out


def _manifest_path(data_path: Path) -> Path:
    return data_path.with_suffix(".json")


def _existing(data_path: Path, count: int, image_size: int) -> CachedImages | None:
    manifest = _manifest_path(data_path)
    if not (data_path.is_file() and manifest.is_file()):
        return None
    try:
        meta = json.loads(manifest.read_text())
    except (OSError, ValueError):
        return None
    if meta.get("count") != count or data_path.stat().st_size != file_bytes(count, image_size):
        log.warning("ignoring the inconsistent image cache %s", data_path)
        return None
    return CachedImages(data_path, count, image_size, int(meta.get("fallbacks", 0)), hit=True)


def _write(data_path: Path, batches, count: int, image_size: int, desc: str) -> None:
    data_path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=data_path.parent, prefix=f".{data_path.stem}.", suffix=".partial")
    try:
        with os.fdopen(fd, "wb") as out:
            for batch in progress(batches, total=-(-count // CHUNK), desc=desc, unit="batch"):
                out.write(np.ascontiguousarray(batch, dtype=np.uint8).tobytes())
            out.flush()
            os.fsync(out.fileno())
        if os.path.getsize(tmp) != file_bytes(count, image_size):
            raise DataError(f"image cache for {count} images came out with a wrong size")
        os.replace(tmp, data_path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _write_manifest(data_path: Path, meta: dict[str, Any]) -> None:
    fd, tmp = tempfile.mkstemp(dir=data_path.parent, prefix=f".{data_path.stem}.", suffix=".json.partial")
    with os.fdopen(fd, "w") as out:
        json.dump(meta, out)
    os.replace(tmp, _manifest_path(data_path))


def ensure_cached(paths: Sequence[str], image_size: int, cache_dir: str | os.PathLike, batches_of,
                  stain_reference: dict[str, Any], fallbacks_of) -> CachedImages:
    """The cache of these images at this size, written first when absent.

    `batches_of(paths)` yields the images' uint8 arrays in chunks of CHUNK (the input pipeline's own
    decoding); `fallbacks_of()` says how many of them the stain normaliser left unchanged so far.
    """
    paths = [str(p) for p in paths]
    data_path = Path(cache_dir).expanduser() / f"{cache_key(paths, image_size, stain_reference)}.u8"
    cached = _existing(data_path, len(paths), image_size)
    if cached is not None:
        return cached
    folder = os.path.commonpath(paths) if paths else str(cache_dir)
    before = fallbacks_of()
    desc = f"caching {len(paths)} images at {image_size} px"
    try:
        _write(data_path, batches_of(paths), len(paths), image_size, desc)
        fallbacks = fallbacks_of() - before
        _write_manifest(data_path, {"count": len(paths), "image_size": image_size, "folder": folder,
                                    "stain": stain_reference.get("method", "none"),
                                    "fallbacks": fallbacks, "version": CACHE_VERSION})
    except OSError as exc:
        _manifest_path(data_path).unlink(missing_ok=True)
        data_path.unlink(missing_ok=True)
        need = file_bytes(len(paths), image_size) / 2**20
        raise DataError(
            f"could not cache the {len(paths)} images of {folder} ({need:,.1f} MiB at {image_size} px) in "
            f"{data_path.parent}: {exc.strerror or exc}. Free space there, point image_cache at another "
            "folder, or set image_cache=none to decode the images every epoch instead"
        ) from None
    log.info("cached %d images of %s in %s", len(paths), folder, data_path)
    return CachedImages(data_path, len(paths), image_size, fallbacks, hit=False)
