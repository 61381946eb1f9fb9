"""Make the IDC sample shipped in the package (`data_dir=sample`): ~1,000 patches of 40 patients, chosen at
random with a fixed seed from a copy of the IDC patch set, each patient's class mix kept.

The IDC patches are CC0 1.0 (public domain); the sample keeps every file byte for byte under its original
name, in the dataset's own layout (`<patient>/<0|1>/<patient>_idx5_x<X>_y<Y>_class<C>.png`), and writes a
provenance table of the files it took (the source's `patients.csv` rows, if it has one).

    python docs/make_idc_sample.py ../shared/data/idc src/histoflow/data/samples
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import numpy as np
import pandas as pd

SEED = 20261202
PATIENTS = 40
PER_PATIENT = 25
MIN_PATCHES = 15  # patients with fewer are left out: a 25-patch sample would be the whole patient or less


def _files(source: Path) -> pd.DataFrame:
    table = source / "patients.csv"
    if table.is_file():
        return pd.read_csv(table, dtype={"patient": str})
    paths = sorted(p.relative_to(source).as_posix() for p in source.glob("*/[01]/*.png"))
    return pd.DataFrame({"path": paths, "patient": [p.split("/")[0] for p in paths],
                         "class": [int(p.split("/")[1]) for p in paths]})


def _take(rows: pd.DataFrame, n: int, rng: np.random.Generator) -> pd.DataFrame:
    """n patches of one patient (all of a smaller one), its classes in proportion (each keeps at least one)."""
    counts = rows["class"].value_counts().sort_index()
    n = min(n, int(counts.sum()))
    share = np.maximum(1, np.round(counts / counts.sum() * n).astype(int))
    share[share.idxmax()] -= share.sum() - n  # rounding: the larger class gives or takes the difference
    parts = [rows[rows["class"] == c].sample(int(k), random_state=rng) for c, k in share.items()]
    return pd.concat(parts)


def select(files: pd.DataFrame, rng: np.random.Generator) -> pd.DataFrame:
    per_patient = files.groupby("patient")["class"].agg(["count", "mean"])
    eligible = per_patient[(per_patient["count"] >= MIN_PATCHES) & per_patient["mean"].between(0, 1, "neither")]
    chosen = rng.choice(np.sort(eligible.index.to_numpy()), PATIENTS, replace=False)
    return pd.concat([_take(files[files["patient"] == p], PER_PATIENT, rng) for p in sorted(chosen)])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("source", type=Path, help="a folder of IDC patches in the dataset's layout")
    parser.add_argument("target", type=Path, help="where idc-sample/ and idc-sample.csv are written")
    args = parser.parse_args()
    sample = select(_files(args.source), np.random.default_rng(SEED)).sort_values("path")
    folder = args.target / "idc-sample"
    if folder.exists():
        shutil.rmtree(folder)
    for path in sample["path"]:
        (folder / path).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(args.source / path, folder / path)
    sample.to_csv(args.target / "idc-sample.csv", index=False)
    size = sum(f.stat().st_size for f in folder.rglob("*.png"))
    print(f"{len(sample)} patches of {sample['patient'].nunique()} patients, {sample['class'].mean():.1%} IDC "
          f"(source {_files(args.source)['class'].mean():.1%}), {size / 2**20:.1f} MiB in {folder}")


if __name__ == "__main__":
    main()
