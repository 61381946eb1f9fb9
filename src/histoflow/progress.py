"""Progress of long steps: tqdm's bar on a terminal, a log line every ~10 % otherwise.

One helper for every step that walks many items (discovery, caching, extraction, batch scoring,
download, the batches of a training epoch), so that a multi-minute step never runs silently and a log
file is not flooded with carriage-return bar updates. In a log the lines come at every tenth of the
items, however long an item takes: tqdm itself, once more than 10 s pass between two of its lines,
switches to a line per item (its monitor thread), which is what a log must not get.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Iterable, Iterator
from typing import TypeVar

from tqdm import tqdm

log = logging.getLogger("histoflow.progress")
T = TypeVar("T")
LOG_STEPS = 10  # lines per step in a log: one every ~10 %
UNKNOWN_TOTAL_STEP = 1000  # without a total: a line every this many items
LINE_FORMAT = "{desc}: {percentage:3.0f}% ({n_fmt}/{total_fmt}) {elapsed} elapsed, {remaining} left, {rate_fmt}"


def on_terminal() -> bool:
    return sys.stderr.isatty()


class LogProgress:
    """Progress as log lines: the start, every ~10 % of `total` items, and the end (`close`)."""

    def __init__(self, total: int | None, desc: str, unit: str = "it", emit=log.info, show_start: bool = True) -> None:
        self.total, self.desc, self.unit, self.emit = total, desc, unit, emit
        self.n = 0
        self.start = time.monotonic()
        self._shown = -1
        if show_start:
            self._show()

    def _show(self) -> None:
        line = tqdm.format_meter(self.n, self.total, time.monotonic() - self.start, prefix=self.desc, unit=self.unit,
                                 bar_format=LINE_FORMAT if self.total else "{desc}: {n_fmt} {unit} {elapsed} elapsed, "
                                                                         "{rate_fmt}")
        self.emit(line)
        self._shown = self.n

    def _tenth(self, n: int) -> int:
        """Which tenth of the items `n` is in (without a total: which block of UNKNOWN_TOTAL_STEP items)."""
        return n * LOG_STEPS // self.total if self.total else n // UNKNOWN_TOTAL_STEP

    def update(self, n: int = 1) -> None:
        before = self.n
        self.n += n
        # Not a line just short of the end (1230 of 1234 reads "100 %"): the last line comes with close().
        near_end = self.total is not None and self.total - self.n < self.total / LOG_STEPS / 2
        if self._tenth(self.n) > self._tenth(before) and not near_end:
            self._show()

    def close(self) -> None:
        """The last line: the count reached (100 % when all items came)."""
        if self._shown != self.n:
            self._show()


def progress(items: Iterable[T], total: int | None = None, desc: str = "", unit: str = "it") -> Iterator[T]:
    """Iterate over `items` showing progress: a bar on a terminal, ~10 log lines (and the last) otherwise."""
    if total is None:
        total = len(items) if hasattr(items, "__len__") else None
    if on_terminal():
        yield from tqdm(items, total=total, desc=desc, unit=unit, dynamic_ncols=True, leave=False)
        return
    lines = LogProgress(total, desc, unit)
    # The log's last line says the step is done, however the item count divides.
    try:
        for item in items:
            yield item
            lines.update()
    finally:
        lines.close()
