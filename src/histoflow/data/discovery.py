"""Dataset discovery: find the images under a folder, recognise its layout, parse labels and patients.

Three layouts are recognised:

- ``breakhis``: BreaKHis v1,
  ``.../<benign|malignant>/SOB/<subtype>/<patient>/<mag>X/SOB_<B|M>_<type>-<yy>-<slide>-<mag>-<seq>.png``;
- ``idc``: the IDC patches, ``<patient>/<0|1>/<patient>_idx5_x<X>_y<Y>_class<0|1>.png``;
- ``folders``: ``<class>/<file>`` or ``<train|valid|test>/<class>/<file>``, optionally with a ``groups.csv``.

Every selected file is decoded once here, or once until it changes (histoflow.data.file_checks): unreadable
ones are reported and skipped, and the content hashes give the dataset digest logged with every run.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from histoflow.data.file_checks import Check, CheckStore, file_stat
from histoflow.data.images import IMAGE_EXTENSIONS, decode_image
from histoflow.data.settings import LAYOUTS, MAGNIFICATIONS, normalise_magnification
from histoflow.errors import DataError, ImageDecodeError
from histoflow.progress import progress

log = logging.getLogger(__name__)


BREAKHIS_NAME = re.compile(
    r"^SOB_(?P<cls>[BM])_(?P<type>[A-Z]+)-(?P<year>\d+)-(?P<slide>[0-9A-Za-z]+)-(?P<mag>\d+)-(?P<seq>\d+)\.\w+$"
)
IDC_NAME = re.compile(r"^(?P<patient>\d+)_idx5_x(?P<x>\d+)_y(?P<y>\d+)_class(?P<cls>[01])\.\w+$")
BREAKHIS_SUBTYPES = {
    "A": "adenosis",
    "F": "fibroadenoma",
    "PT": "phyllodes_tumor",
    "TA": "tubular_adenoma",
    "DC": "ductal_carcinoma",
    "LC": "lobular_carcinoma",
    "MC": "mucinous_carcinoma",
    "PC": "papillary_carcinoma",
}
SPLIT_FOLDERS = {"train": "train", "training": "train", "valid": "val", "val": "val",
                 "validation": "val", "test": "test", "testing": "test"}
POSITIVE_NAMES = ("malignant", "idc", "cancer", "tumor", "tumour", "positive", "1", "yes")

COLUMNS = ["path", "relpath", "label", "class_name", "patient", "group", "subtype",
           "magnification", "source_split"]


@dataclass
class Dataset:
    """Images of one dataset: one row per usable image, plus what was skipped and why."""

    root: Path
    layout: str
    class_names: list[str]
    frame: pd.DataFrame
    skipped: pd.DataFrame = field(default_factory=lambda: pd.DataFrame(columns=["relpath", "reason"]))
    ignored_files: int = 0
    digest: str = ""
    remembered_checks: int = 0  # files not decoded again: unchanged since an earlier check (file_checks)

    @property
    def name(self) -> str:
        return self.root.name

    def report(self) -> dict:
        """Counts a reviewer needs to judge the data (logged as data_report.json)."""
        frame = self.frame
        return {
            "root": str(self.root),
            "layout": self.layout,
            "digest": self.digest,
            "class_names": self.class_names,
            "images": int(len(frame)),
            "patients": int(frame["patient"].nunique()),
            "patient_groups": int(frame["group"].nunique()),
            "images_per_class": {self.class_names[k]: int(v) for k, v in
                                 sorted(Counter(frame["label"]).items())},
            "patients_per_class": {
                self.class_names[k]: int(v) for k, v in
                sorted(frame.groupby("label")["patient"].nunique().items())
            },
            "magnifications": {str(k): int(v) for k, v in
                               sorted(Counter(frame["magnification"].fillna("")).items()) if k},
            "skipped": self.skipped.to_dict(orient="records"),
            "ignored_non_image_files": self.ignored_files,
        }


def _walk_images(root: Path) -> tuple[list[Path], int]:
    images, ignored = [], 0
    # Symlinked folders are followed: labs often assemble cohorts from links into a slide archive.
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            if name.startswith("."):
                continue
            if Path(name).suffix.lower() in IMAGE_EXTENSIONS:
                images.append(Path(dirpath) / name)
            else:
                ignored += 1
    return images, ignored


def detect_layout(paths: list[Path]) -> str:
    """The layout most files agree on (file names decide; folders are the fallback)."""
    if not paths:
        raise DataError("no image files found")
    names = [p.name for p in paths]
    breakhis = sum(bool(BREAKHIS_NAME.match(n)) for n in names)
    idc = sum(bool(IDC_NAME.match(n)) for n in names)
    if breakhis >= 0.5 * len(names):
        return "breakhis"
    if idc >= 0.5 * len(names):
        return "idc"
    return "folders"


def patient_from_name(name: str) -> str | None:
    """The patient a BreaKHis or IDC file name belongs to (None for other names). BreaKHis: the patient
    folder's name (SOB_<class>_<type>_<year>-<slide>); IDC: the patient number."""
    if match := BREAKHIS_NAME.match(name):
        return f"SOB_{match['cls']}_{match['type']}_{match['year']}-{match['slide']}"
    if match := IDC_NAME.match(name):
        return match["patient"]
    return None


def _parse_breakhis(root: Path, paths: list[Path]) -> tuple[pd.DataFrame, list[str]]:
    rows = []
    for path in paths:
        match = BREAKHIS_NAME.match(path.name)
        if not match:
            log.warning("not a BreaKHis file name, ignored: %s", path)
            continue
        label = 1 if match["cls"] == "M" else 0
        parent = path.parent.parent.name if re.fullmatch(r"\d+X", path.parent.name) else None
        # The patient folder (SOB_B_A_14-22549AB) is the patient; folders sharing year-slide
        # (14-22549AB, 14-22549CD) come from one person and must never be split apart.
        patient = parent or patient_from_name(path.name)
        slide_number = re.match(r"\d+", match["slide"])
        group = f"{match['year']}-{slide_number.group(0) if slide_number else match['slide']}"
        rows.append({
            "path": str(path), "relpath": str(path.relative_to(root)), "label": label,
            "patient": patient, "group": group,
            "subtype": BREAKHIS_SUBTYPES.get(match["type"], match["type"]),
            "magnification": match["mag"], "source_split": None,
        })
    return pd.DataFrame(rows, columns=[c for c in COLUMNS if c != "class_name"]), ["benign", "malignant"]


def _parse_idc(root: Path, paths: list[Path]) -> tuple[pd.DataFrame, list[str]]:
    rows = []
    for path in paths:
        match = IDC_NAME.match(path.name)
        if not match:
            log.warning("not an IDC patch file name, ignored: %s", path)
            continue
        label = int(match["cls"])
        rows.append({
            "path": str(path), "relpath": str(path.relative_to(root)), "label": label,
            "patient": patient_from_name(path.name), "group": match["patient"],
            "subtype": "IDC" if label else "non-IDC", "magnification": None, "source_split": None,
        })
    return pd.DataFrame(rows, columns=[c for c in COLUMNS if c != "class_name"]), ["non-IDC", "IDC"]


def _class_order(names: set[str]) -> list[str]:
    """Binary class order with the malignant-like class second (index 1 = positive)."""
    ordered = sorted(names)
    positives = [n for n in ordered if n.lower() in POSITIVE_NAMES]
    if len(ordered) == 2 and len(positives) == 1:
        ordered.remove(positives[0])
        ordered.append(positives[0])
    return ordered


def _parse_folders(root: Path, paths: list[Path]) -> tuple[pd.DataFrame, list[str]]:
    rows = []
    for path in paths:
        rel = path.relative_to(root)
        if len(rel.parts) < 2:
            continue
        class_name = rel.parts[-2]
        split = SPLIT_FOLDERS.get(rel.parts[-3].lower()) if len(rel.parts) >= 3 else None
        rows.append({"path": str(path), "relpath": str(rel), "class_name": class_name,
                     "source_split": split})
    loose = sum(len(p.relative_to(root).parts) < 2 for p in paths)
    if not rows:
        raise DataError(
            f"unknown layout under {root}: {loose} image files lie directly in the folder and none "
            "is in a class folder. Expected BreaKHis, IDC (<patient>/<0|1>/...) or <class>/<file>."
        )
    frame = pd.DataFrame(rows)
    classes = _class_order(set(frame["class_name"]))
    if len(classes) != 2:
        raise DataError(
            f"histoflow classifies two classes (benign vs malignant); found {len(classes)} class "
            f"folder(s) under {root}: {', '.join(classes)}"
        )
    frame["label"] = frame["class_name"].map({c: i for i, c in enumerate(classes)})
    groups = _read_groups(root)
    frame["patient"] = frame["relpath"].map(groups) if groups else None
    # Without patient information every image is its own group (documented as leaky-prone).
    frame["patient"] = frame["patient"].fillna(frame["relpath"])
    frame["group"] = frame["patient"]
    frame["subtype"] = frame["class_name"]
    frame["magnification"] = None
    return frame.drop(columns=["class_name"])[[c for c in COLUMNS if c != "class_name"]], classes


def _read_groups(root: Path) -> dict[str, str]:
    groups_file = root / "groups.csv"
    if not groups_file.exists():
        return {}
    table = pd.read_csv(groups_file, dtype=str)
    if not {"path", "group"} <= set(table.columns):
        raise DataError(f"{groups_file} must have the columns path,group; found {list(table.columns)}")
    return dict(zip(table["path"], table["group"], strict=True))


PARSERS = {"breakhis": _parse_breakhis, "idc": _parse_idc, "folders": _parse_folders}


def _check_file(path: str, remembered: dict[str, Check]) -> Check:
    """A readable image's sha256, or why the file is skipped; the remembered check while the file is as it was
    then."""
    try:
        stat = file_stat(os.stat(path))  # before reading: a change during the read shows next time
        earlier = remembered.get(path)
        if earlier is not None and earlier.stat == stat:
            return earlier
        with open(path, "rb") as fh:
            data = fh.read()
    except OSError as exc:
        return Check("", f"unreadable: {exc}", None)
    try:
        decode_image(data)
    except ImageDecodeError as exc:
        return Check("", str(exc), stat)
    return Check(hashlib.sha256(data).hexdigest(), None, stat)


def _validate(frame: pd.DataFrame, store: CheckStore, workers: int = 8
              ) -> tuple[pd.DataFrame, pd.DataFrame, list[str], int]:
    """(readable rows, skipped rows with reasons, their hashes, how many checks were remembered)."""
    paths = frame["path"].tolist()
    started = time.time_ns()
    remembered = store.recall(paths)
    with ThreadPoolExecutor(max_workers=workers) as pool:
        results = list(progress(pool.map(lambda p: _check_file(p, remembered), paths), total=len(frame),
                                desc=f"checking {len(frame)} images", unit="img"))
    recalled = [remembered.get(p) is r for p, r in zip(paths, results, strict=True)]
    store.remember(((p, r) for p, r, old in zip(paths, results, recalled, strict=True) if not old), started)
    bad = [r.reason is not None for r in results]
    skipped = pd.DataFrame({"relpath": frame["relpath"][bad].tolist(),
                            "reason": [r.reason for r in results if r.reason is not None]})
    for row in skipped.itertuples():
        log.warning("skipping %s: %s", row.relpath, row.reason)
    keep = [not b for b in bad]
    return (frame[keep].reset_index(drop=True), skipped,
            [r.sha256 for r, k in zip(results, keep, strict=True) if k], sum(recalled))


def _digest(frame: pd.DataFrame, hashes: list[str]) -> str:
    sha = hashlib.sha256()
    for rel, label, patient, h in sorted(zip(frame["relpath"], frame["label"], frame["patient"], hashes, strict=True)):
        sha.update(f"{rel}\t{label}\t{patient}\t{h}\n".encode())
    return sha.hexdigest()[:16]


def _quotas(counts: dict[int, int], total: int) -> dict[int, int]:
    """Images per label: `total` shared in proportion to the labels' counts (largest remainders), each >= 1."""
    n = sum(counts.values())
    exact = {label: total * count / n for label, count in counts.items()}
    quotas = {label: max(1, int(share)) for label, share in exact.items()}
    by_remainder = sorted(counts, key=lambda label: exact[label] - int(exact[label]), reverse=True)
    for label in by_remainder[:max(0, total - sum(quotas.values()))]:
        quotas[label] += 1
    return {label: min(quotas[label], counts[label]) for label in counts}


def _readable_subset(frame: pd.DataFrame, max_images: int, seed: int, store: CheckStore
                     ) -> tuple[pd.DataFrame, pd.DataFrame, list[str], int]:
    """A label-stratified random subset of `max_images` readable images (many patients, few images each,
    so splits stay possible): candidates are checked in a seeded random order until each label's quota
    is met, so unreadable files are replaced, not subtracted."""
    kept, skipped, hashes, reused = [], [], [], 0
    quotas = _quotas(frame["label"].value_counts().to_dict(), max_images)
    for label, part in frame.groupby("label"):
        order = part.sample(frac=1.0, random_state=seed)  # its first n rows are part.sample(n, random_state=seed)
        start, found = 0, 0
        while found < quotas[label] and start < len(order):
            chunk = order.iloc[start:start + quotas[label] - found]
            start += len(chunk)
            good, bad, good_hashes, chunk_reused = _validate(chunk, store)
            reused += chunk_reused
            kept.append(good)
            skipped.append(bad)
            hashes += good_hashes
            found += len(good)
    frame = pd.concat(kept)
    order = np.argsort(frame["relpath"].to_numpy(), kind="stable")
    return (frame.iloc[order].reset_index(drop=True), pd.concat(skipped, ignore_index=True),
            [hashes[i] for i in order], reused)


def discover(
    data_dir: str | os.PathLike,
    layout: str = "auto",
    magnification: str = "all",
    max_images: int = 0,
    seed: int = 42,
    checks_store: Path | None = None,
) -> Dataset:
    """Find, parse and check the images under data_dir. `checks_store`: the SQLite file of earlier checks
    (histoflow.data.file_checks; default: in histoflow's cache folder)."""
    root = Path(data_dir).expanduser().resolve()
    if layout not in LAYOUTS:
        raise DataError(f"layout must be one of {', '.join(LAYOUTS)}; got {layout!r}")
    magnification = normalise_magnification(magnification)
    if magnification not in MAGNIFICATIONS:
        raise DataError(f"magnification must be one of {', '.join(MAGNIFICATIONS)}; got {magnification!r}")
    if not root.is_dir():
        raise DataError(f"data_dir {root} does not exist or is not a folder")
    paths, ignored = _walk_images(root)
    if not paths:
        raise DataError(
            f"no image files ({', '.join(sorted(IMAGE_EXTENSIONS))}) under {root}; found {ignored} other files"
        )
    if layout == "auto":
        layout = detect_layout(paths)
    frame, class_names = PARSERS[layout](root, paths)
    if frame.empty:
        raise DataError(f"no file under {root} matches the {layout} layout ({len(paths)} image files found)")
    if magnification != "all":
        if layout != "breakhis":
            raise DataError(f"magnification={magnification} applies to BreaKHis only; this is {layout}")
        frame = frame[frame["magnification"] == magnification].reset_index(drop=True)
        if frame.empty:
            raise DataError(f"no BreaKHis image at {magnification}X under {root}")
    store = CheckStore(checks_store)
    if 0 < max_images < len(frame):
        frame, skipped, hashes, reused = _readable_subset(frame, int(max_images), seed, store)
    else:
        frame, skipped, hashes, reused = _validate(frame, store)
    log.info("%d images checked under %s, %d of them as remembered from an earlier check", len(frame) + len(skipped),
             root, reused)
    if frame.empty:
        raise DataError(
            f"no readable image under {root}: all {len(skipped)} image files were skipped "
            f"(first: {skipped.iloc[0].relpath}: {skipped.iloc[0].reason})"
        )
    frame["class_name"] = frame["label"].map(dict(enumerate(class_names)))
    counts = Counter(frame["class_name"])
    if len(counts) < 2:
        raise DataError(
            f"only one class in {root}: {dict(counts)}; a benign vs malignant classifier needs "
            f"images of both {class_names[0]!r} and {class_names[1]!r}"
        )
    frame = frame[COLUMNS]
    return Dataset(root=root, layout=layout, class_names=class_names, frame=frame, skipped=skipped,
                   ignored_files=ignored, digest=_digest(frame, hashes), remembered_checks=reused)
