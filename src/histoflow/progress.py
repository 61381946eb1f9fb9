"""Progress of long steps: tqdm's bar on a terminal, a log line every ~10 % otherwise.

One helper for every step that walks many items (discovery, caching, extraction, batch scoring,
download), so that a multi-minute step never runs silently and a log file is not flooded with
carriage-return bar updates.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterable, Iterator
from typing import TypeVar

from tqdm import tqdm

log = logging.getLogger("histoflow.progress")
T = TypeVar("T")
LOG_STEPS = 10  # lines per step in a log: one every ~10 %


class _LogStream:
    """A file-like target for tqdm that turns its redraws into log lines."""

    def write(self, text: str) -> None:
        line = text.strip("\r\n ")
        if line:
            log.info(line)

    def flush(self) -> None:
        return None


def on_terminal() -> bool:
    return sys.stderr.isatty()


def progress(items: Iterable[T], total: int | None = None, desc: str = "", unit: str = "it") -> Iterator[T]:
    """Iterate over `items` showing progress: a bar on a terminal, ~10 log lines (and the last) otherwise."""
    if total is None:
        total = len(items) if hasattr(items, "__len__") else None
    if on_terminal():
        yield from tqdm(items, total=total, desc=desc, unit=unit, dynamic_ncols=True, leave=False)
        return
    step = max(1, (total or 0) // LOG_STEPS) if total else 1000
    bar = tqdm(items, total=total, desc=desc, unit=unit, file=_LogStream(), mininterval=0, miniters=step,
               bar_format="{desc}: {percentage:3.0f}% ({n_fmt}/{total_fmt}) {elapsed} elapsed, {remaining} left, "
                          "{rate_fmt}")
    # The log's last line says the step is done, however the item count divides.
    try:
        yield from bar
    finally:
        bar.close()
