"""Discovery of a dataset folder: every file decoded and hashed, against the checks remembered from an earlier run.

histoflow.data.file_checks keeps what checking each image found (its hash, or why it is skipped), keyed by the
file's size, times and inode; a later discovery of the same folder decodes only the files that changed. Each
row is one `discover` of the whole folder in this process, in a new checks store (first: nothing remembered)
and then again in the same store (every file remembered, once the files' times are RACY_SECONDS old, which
real datasets are): CPU seconds (threads included) and wall seconds, medians of `--repeats`, and the ratio
remembered / first.

    python bench/discovery_checks.py --data_dir ../shared/data/idc --data_dir ../shared/data/breakhis
"""

from __future__ import annotations

import argparse
import logging
import resource
import statistics
import tempfile
import time
from functools import partial
from pathlib import Path


def _timed(action) -> tuple[float, float, object]:
    before, start = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    result = action()
    after = resource.getrusage(resource.RUSAGE_SELF)
    return after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime, time.perf_counter() - start, result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data_dir", action="append", required=True)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    logging.disable(logging.INFO)  # the progress lines
    from histoflow.data.discovery import discover

    print(f"{'folder':<10} {'images':>7} {'first CPU s':>12} {'again CPU s':>12} {'ratio':>6} "
          f"{'first wall s':>13} {'again wall s':>13}")
    for data_dir in args.data_dir:
        first, again = [], []
        for _ in range(args.repeats):
            with tempfile.TemporaryDirectory() as folder:
                store = Path(folder) / "checks.sqlite"
                cpu, wall, dataset = _timed(partial(discover, data_dir, checks_store=store))
                first.append((cpu, wall))
                cpu, wall, repeated = _timed(partial(discover, data_dir, checks_store=store))
                assert repeated.remembered_checks == len(dataset.frame) + len(dataset.skipped)
                assert repeated.digest == dataset.digest
                again.append((cpu, wall))
        f_cpu, f_wall = (statistics.median(x) for x in zip(*first, strict=True))
        a_cpu, a_wall = (statistics.median(x) for x in zip(*again, strict=True))
        print(f"{Path(data_dir).name:<10} {len(dataset.frame):>7} {f_cpu:>12.2f} {a_cpu:>12.2f} {a_cpu / f_cpu:>6.2f} "
              f"{f_wall:>13.2f} {a_wall:>13.2f}")


if __name__ == "__main__":
    main()
