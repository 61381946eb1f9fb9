"""What checking an image file found (its content hash, or why it cannot be decoded), remembered across runs.

Discovery decodes and hashes every selected file, on every run: 7 s of CPU for the 10,203 IDC patches, minutes
for a full-size BreaKHis, the same answer each time for files nobody touched. A file is checked again when its
size, modification time, status-change time or inode differ from those it had when it was checked (what git's
index and DVC's state cache compare), or when another Pillow decodes. A file modified within RACY_SECONDS of its
check is not remembered: a change right after it could leave its time stamps as they were. Files that could not
be read (no permission, gone) are not remembered either: that can pass.

The store is one SQLite file in histoflow's cache folder, shared by the processes of a user (tuning workers,
the steps of `main`). When it cannot be used (a read-only cache, a damaged file) every file is checked, as
before, after one warning.
"""

from __future__ import annotations

import logging
import os
import sqlite3
from collections.abc import Iterable, Sequence
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import PIL

from histoflow.config import cache_root

log = logging.getLogger(__name__)

STORE_NAME = "checked-images.sqlite"
RACY_SECONDS = 2.0
_QUERY_CHUNK = 500  # SQLite's default limit on a statement's parameters is 999
_SCHEMA = """CREATE TABLE IF NOT EXISTS checks (
    path TEXT PRIMARY KEY, size INTEGER, mtime_ns INTEGER, ctime_ns INTEGER, inode INTEGER, pillow TEXT,
    sha256 TEXT, reason TEXT)"""


class FileStat(NamedTuple):
    """What a file's check is remembered by."""

    size: int
    mtime_ns: int
    ctime_ns: int
    inode: int


@dataclass(frozen=True)
class Check:
    """A file's check: its content's sha256 (readable image) or the reason it is skipped, and the file's stat
    when it was read (None: it could not be)."""

    sha256: str
    reason: str | None
    stat: FileStat | None


def file_stat(status: os.stat_result) -> FileStat:
    return FileStat(status.st_size, status.st_mtime_ns, status.st_ctime_ns, status.st_ino)


class CheckStore:
    """The remembered checks in a SQLite file (default: <cache root>/checked-images.sqlite)."""

    def __init__(self, path: Path | None = None) -> None:
        self.path = path
        self._broken = False

    def _connect(self) -> sqlite3.Connection:
        path = self.path or cache_root() / STORE_NAME
        path.parent.mkdir(parents=True, exist_ok=True)
        connection = sqlite3.connect(path, timeout=30)  # another process writing: wait for it
        connection.execute(_SCHEMA)
        return connection

    def _failed(self, exc: Exception) -> None:
        if not self._broken:
            log.warning("every image is checked again: the store of earlier checks cannot be used (%s: %s)",
                        type(exc).__name__, exc)
        self._broken = True

    def recall(self, paths: Sequence[str]) -> dict[str, Check]:
        """The remembered checks of these paths (those this Pillow made), to be used where the stat matches."""
        if self._broken or not paths:
            return {}
        found: dict[str, Check] = {}
        try:
            with closing(self._connect()) as connection:
                for start in range(0, len(paths), _QUERY_CHUNK):
                    chunk = list(paths[start:start + _QUERY_CHUNK])
                    rows = connection.execute(
                        "SELECT path, size, mtime_ns, ctime_ns, inode, sha256, reason FROM checks "
                        f"WHERE pillow = ? AND path IN ({','.join('?' * len(chunk))})", [PIL.__version__, *chunk])
                    for path, size, mtime, ctime, inode, sha256, reason in rows:
                        found[path] = Check(sha256, reason, FileStat(size, mtime, ctime, inode))
        except (sqlite3.Error, OSError) as exc:
            self._failed(exc)
            return {}
        return found

    def remember(self, checks: Iterable[tuple[str, Check]], checked_from_ns: int) -> None:
        """Store the checks of files that were read and then left alone for RACY_SECONDS before the checking
        began (at time.time_ns() = checked_from_ns)."""
        if self._broken:
            return
        settled = checked_from_ns - int(RACY_SECONDS * 1e9)
        rows = [(path, *check.stat, PIL.__version__, check.sha256, check.reason) for path, check in checks
                if check.stat is not None and max(check.stat.mtime_ns, check.stat.ctime_ns) < settled]
        if not rows:
            return
        try:
            with closing(self._connect()) as connection, connection:
                connection.executemany("INSERT OR REPLACE INTO checks VALUES (?, ?, ?, ?, ?, ?, ?, ?)", rows)
        except (sqlite3.Error, OSError) as exc:
            self._failed(exc)
