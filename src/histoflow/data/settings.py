"""The data step's settings: which images, and how they are split. Shared by every step that reads data."""

from __future__ import annotations

from dataclasses import dataclass, fields

from histoflow.config import require
from histoflow.data.discovery import LAYOUTS, MAGNIFICATIONS, normalise_magnification
from histoflow.data.download import ARCHIVES
from histoflow.data.splits import SPLIT_MODES

DEFAULT_DATA_DIR = ARCHIVES["breakhis"].default_dir


@dataclass(frozen=True)
class DataConfig:
    data_dir: str = DEFAULT_DATA_DIR
    layout: str = "auto"
    magnification: str = "all"
    max_images: int = 0  # 0 = all
    split: str = "patient"
    val_fraction: float = 0.2
    test_fraction: float = 0.2
    seed: int = 42

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
        ]
        require(checks)
