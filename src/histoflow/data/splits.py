"""Train/validation/test splits: patient-disjoint and label-stratified by default.

``patient``: scikit-learn's StratifiedGroupKFold twice (test fold, then validation fold of the rest),
so no patient group is in two splits. ``image``: the random image-level split of the published
reports, which puts one patient's images in train and test (leaky; kept for comparison only).
``predefined``: the train/valid/test folders of a folders-layout dataset. ``cv_folds``: the folds of
patient-level cross-validation, each with its inner validation split.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
from sklearn.model_selection import StratifiedGroupKFold, train_test_split

from histoflow.data.settings import SPLIT_MODES
from histoflow.errors import ConfigError, DataError

SPLITS = ("train", "val", "test")
LEAKY_MODES = frozenset({"image"})


def _fold_count(fraction: float) -> int:
    if not 0.0 < fraction < 0.5:
        raise ConfigError(f"split fractions must be in (0, 0.5); got {fraction}")
    return max(2, round(1.0 / fraction))


def _group_fold(frame: pd.DataFrame, fraction: float, seed: int, what: str) -> np.ndarray:
    """Boolean mask of one stratified, group-disjoint fold of about `fraction` of the rows."""
    n_splits = _fold_count(fraction)
    n_groups = frame["group"].nunique()
    if n_groups < n_splits:
        raise DataError(
            f"cannot make a patient-disjoint {what} split of {fraction:.0%}: only {n_groups} patient "
            f"groups (need at least {n_splits}); add patients or use split=image (leaky)"
        )
    splitter = StratifiedGroupKFold(n_splits=n_splits, shuffle=True, random_state=seed)
    _, fold = next(splitter.split(frame, frame["label"], frame["group"]))
    mask = np.zeros(len(frame), dtype=bool)
    mask[fold] = True
    return mask


def split_dataset(
    frame: pd.DataFrame,
    mode: str = "patient",
    val_fraction: float = 0.2,
    test_fraction: float = 0.2,
    seed: int = 42,
) -> pd.DataFrame:
    """Return a copy of frame with a ``split`` column (train, val, test)."""
    if mode not in SPLIT_MODES:
        raise ConfigError(f"split must be one of {', '.join(SPLIT_MODES)}; got {mode!r}")
    frame = frame.reset_index(drop=True).copy()
    if mode == "patient":
        test = _group_fold(frame, test_fraction, seed, "test")
        rest = frame[~test]
        val_share = val_fraction / (1.0 - test_fraction)
        val_in_rest = _group_fold(rest, val_share, seed + 1, "validation")
        split = np.full(len(frame), "train", dtype=object)
        split[test] = "test"
        split[rest.index[val_in_rest]] = "val"
    elif mode == "image":
        idx = np.arange(len(frame))
        rest, test = train_test_split(idx, test_size=test_fraction, stratify=frame["label"],
                                      random_state=seed)
        train, val = train_test_split(rest, test_size=val_fraction / (1.0 - test_fraction),
                                      stratify=frame["label"].iloc[rest], random_state=seed)
        split = np.empty(len(frame), dtype=object)
        split[train], split[val], split[test] = "train", "val", "test"
    else:
        if frame["source_split"].isna().all():
            raise DataError("split=predefined needs train/valid/test folders; this dataset has none")
        split = frame["source_split"].fillna("train").to_numpy()
    frame["split"] = split
    check_split(frame)
    return frame


def check_split(frame: pd.DataFrame) -> None:
    """Every split must hold both classes, or its metrics (AUC, recall) are undefined."""
    for name in SPLITS:
        part = frame[frame["split"] == name]
        if part.empty:
            raise DataError(f"the {name} split is empty ({len(frame)} images in all)")
        if part["label"].nunique() < 2:
            raise DataError(
                f"the {name} split holds only one class ({len(part)} images of label "
                f"{part['label'].iloc[0]}); use more images or patients, or another seed"
            )


def patient_overlap(frame: pd.DataFrame) -> set[str]:
    """Patient groups that occur in more than one split (empty for a patient split)."""
    splits_per_group = frame.groupby("group")["split"].nunique()
    return set(splits_per_group[splits_per_group > 1].index)


@dataclass(frozen=True)
class Fold:
    repeat: int
    fold: int
    frame: pd.DataFrame  # every image, with its split in this fold: train, val (inner, by patient), test (held out)


def cv_folds(frame: pd.DataFrame, folds: int, repeats: int, val_fraction: float, seed: int,
             class_names: list[str]) -> list[Fold]:
    """Patient-level cross-validation: StratifiedGroupKFold per repeat (seed + repeat), each fold held out
    once; in the rest, a patient-disjoint validation part of about `val_fraction` of all images."""
    groups_per_class = frame.groupby("label")["group"].nunique()
    for label, count in groups_per_class.items():
        if count < folds:
            raise DataError(f"class {class_names[label]!r} has {count} patient groups for {folds} folds: every "
                            f"held-out fold needs one; use at most {count} folds, or add patients")
    frame = frame.reset_index(drop=True)
    out = []
    for repeat in range(repeats):
        splitter = StratifiedGroupKFold(n_splits=folds, shuffle=True, random_state=seed + repeat)
        for k, (rest_index, held_out) in enumerate(splitter.split(frame, frame["label"], frame["group"])):
            rest = frame.iloc[rest_index]
            val = _group_fold(rest, val_fraction * folds / (folds - 1), seed + repeat + 1, "validation")
            split = np.full(len(frame), "train", dtype=object)
            split[held_out] = "test"
            split[rest.index[val]] = "val"
            fold = frame.assign(split=split)
            check_split(fold)
            out.append(Fold(repeat, k, fold))
    return out
