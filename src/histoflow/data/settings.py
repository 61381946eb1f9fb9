"""The data steps' settings: which images, how they are split, and what a dataset download takes; with the
choices they allow. Shared by every step that reads data.

Settings modules import nothing heavier than the standard library: the command line builds its help from
them without loading TensorFlow, MLflow or pandas.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

from histoflow.config import RunTarget, require, setting

LAYOUTS = ("auto", "breakhis", "idc", "folders")
MAGNIFICATIONS = ("all", "40", "100", "200", "400")
SPLIT_MODES = ("patient", "image", "predefined")
# Where `download` puts each public dataset unless told otherwise.
DATASET_DIRS = {"breakhis": "data/breakhis", "idc": "data/idc"}
DEFAULT_DATA_DIR = DATASET_DIRS["breakhis"]
# Training augmentations and stain normalisations (histoflow.data.pipeline, histoflow.data.stain).
AUGMENTATIONS = ("none", "seed", "random", "hed")
STAIN_METHODS = ("none", "macenko", "reinhard")


def normalise_magnification(value: str | int) -> str:
    """'200X', '200x', 200 -> '200'; 'ALL' -> 'all'."""
    return str(value).strip().upper().rstrip("X").lower()


@dataclass(frozen=True)
class DataConfig:
    data_dir: str = setting(DEFAULT_DATA_DIR, "the dataset folder (data/breakhis and data/idc are downloaded when "
                                              "missing), or sample: 970 IDC patches of 40 patients shipped "
                                              "with histoflow, for a first run")
    layout: str = setting("auto", f"how labels and patients are read: {', '.join(LAYOUTS)}")
    magnification: str = setting("all", "BreaKHis only: 40, 100, 200, 400 or all")
    max_images: int = setting(0, "a label-stratified random subset of this many images, for quick runs (0: all)")
    split: str = setting("patient", "patient (no patient in two splits), image (the reports' leaky split) or "
                                    "predefined (train/valid/test folders)")
    val_fraction: float = setting(0.2, "share of the images (by patient) for validation: early stopping, "
                                       "calibration, selection")
    test_fraction: float = setting(0.2, "share of the images (by patient) held out for the reported test metrics")
    seed: int = setting(42, "seed of the split, the subset, and of Python, NumPy and TensorFlow")
    mpp: float = setting(0.0, "micrometres per pixel of the images as stored (e.g. 0.25 for a 40x scan; 0: not "
                              "known). Recorded with the model: predict-slide cuts slides to the training images' "
                              "field of view")

    def data_config(self) -> DataConfig:
        """The data settings alone (of a subclass's settings, e.g. a training run's)."""
        return DataConfig(**{f.name: getattr(self, f.name) for f in fields(DataConfig)})

    def validate(self) -> None:
        checks = [
            (self.layout in LAYOUTS, f"layout must be one of {', '.join(LAYOUTS)}; got {self.layout!r}"),
            (normalise_magnification(self.magnification) in MAGNIFICATIONS,
             f"magnification must be one of {', '.join(MAGNIFICATIONS)}; got {self.magnification!r}"),
            (self.split in SPLIT_MODES, f"split must be one of {', '.join(SPLIT_MODES)}; got {self.split!r}"),
            (self.max_images >= 0, "max_images must be >= 0 (0 = all)"),
            (0.0 < self.val_fraction < 0.5 and 0.0 < self.test_fraction < 0.5,
             "val_fraction and test_fraction must be in (0, 0.5)"),
            (bool(str(self.data_dir).strip()), "data_dir must be a folder"),
            (self.mpp >= 0.0, f"mpp must be >= 0 (0: not known); got {self.mpp}"),
        ]
        require(checks)


@dataclass(frozen=True)
class DataStepConfig(DataConfig, RunTarget):
    """The `data` entry point: the data settings, and where its run goes."""


@dataclass(frozen=True)
class DownloadConfig:
    """The `download` entry point."""

    dataset: str = setting("breakhis", f"the public dataset: {' or '.join(DATASET_DIRS)}")
    dest: str = setting("", "the folder to extract it into (default: data/<dataset>)")
    url: str = setting("", "where to fetch the archive (default: its public address, or HISTOFLOW_<DATASET>_URL)")
    sha256: str = setting("", "the archive's expected SHA-256, checked before extraction (default: not checked)")
