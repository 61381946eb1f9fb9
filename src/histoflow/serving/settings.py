"""The serving entry points' settings (`predict`, `app`); a settings module: nothing heavy imported."""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from histoflow.config import setting
from histoflow.errors import ConfigError

ENGINES = ("local", "spark")
# The served model's runtimes: onnx (ONNX Runtime; no TensorFlow in the serving environment) or tensorflow.
RUNTIMES = ("onnx", "tensorflow")
DEFAULT_RUNTIME = "onnx"
RUNTIME_TAG = "histoflow.runtime"  # the logged model's tag (models logged before it: tensorflow)
DEFAULT_MODEL_URI = "models:/histoflow@champion"


def check_runtime(runtime: str) -> None:
    if runtime not in RUNTIMES:
        raise ConfigError(f"runtime must be one of {', '.join(RUNTIMES)}; got {runtime!r}")


def is_parquet_table(source: str) -> bool:
    """A `.parquet` path (a file or Spark's folder of parts) is a table of image bytes, not an image folder."""
    return source.rstrip("/").endswith(".parquet")


@dataclass(frozen=True)
class PredictConfig:
    data_dir: str = field(default="", metadata={"required": True, "help": "the folder of images to score (with "
                                                                        "engine=spark: or a Parquet table of their "
                                                                        "bytes)"})
    model_uri: str = setting(DEFAULT_MODEL_URI, "the model: a registered model's alias or version, or any MLflow "
                                                "model URI")
    output_dir: str = setting("outputs/predictions", "where predictions.csv and patients.csv are written")
    engine: str = setting("local", "local (in this process) or spark (mlflow.pyfunc.spark_udf, one task per "
                                   "partition)")
    spark_master: str = setting("", "with engine=spark: local[*] or a cluster's master URL (default: SPARK_MASTER, "
                                    "else local[*])")

    def validate(self) -> None:
        if not self.data_dir.strip():
            raise ConfigError("data_dir is required: the folder of images to score")
        if self.engine not in ENGINES:
            raise ConfigError(f"engine must be one of {', '.join(ENGINES)}; got {self.engine!r}")
        if is_parquet_table(self.data_dir) and self.engine != "spark":
            raise ConfigError("a Parquet table of images is scored with engine=spark")


@dataclass(frozen=True)
class SlideConfig:
    slides: str = field(default="", metadata={"required": True, "help": "a whole-slide image (.svs, .ndpi, .mrxs, "
                                                                       "tiled .tif, ...) or a folder of them"})
    model_uri: str = setting(DEFAULT_MODEL_URI, "the model: a registered model's alias or version, or any MLflow "
                                                "model URI")
    output_dir: str = setting("outputs/slides", "where each slide's tiles.csv, heatmap.png, tiles.geojson, "
                                                "top_tiles.png and summary.json are written (a folder per slide)")
    tile_px: int = setting(0, "tile side in pixels at mpp (0: the model's input size)")
    mpp: float = setting(0.0, "the tiles' resolution in micrometres per pixel (0: the model's training resolution, "
                              "recorded when it was trained with the data setting mpp; else the slide's level 0)")
    slide_mpp: float = setting(0.0, "the slides' level-0 resolution in micrometres per pixel, for slides whose "
                                    "files do not record it (0: from the file)")
    overlap: float = setting(0.0, "overlap of neighbouring tiles, as a share of a tile (0 to <1)")
    min_tissue: float = setting(0.25, "the share of a tile that must be tissue for it to be scored")
    positive_share: float = setting(0.01, "the slide is called positive when at least this share of its scored "
                                          "tiles (and at least 2) are positive")
    batch: int = setting(64, "tiles read and scored at a time (memory is bounded by it)")
    overwrite: bool = setting(False, "write into an output folder of the slide that already exists")
    engine: str = setting("local", "local (slide after slide in this process) or spark (a Spark task per slide; "
                                   "output_dir must be storage every executor can write)")
    spark_master: str = setting("", "with engine=spark: local[*] or a cluster's master URL (default: SPARK_MASTER, "
                                    "else local[*])")

    def validate(self) -> None:
        if self.engine not in ENGINES:
            raise ConfigError(f"engine must be one of {', '.join(ENGINES)}; got {self.engine!r}")
        if not self.slides.strip():
            raise ConfigError("slides is required: a whole-slide image or a folder of them")
        if self.tile_px < 0 or self.mpp < 0 or self.slide_mpp < 0:
            raise ConfigError(f"tile_px, mpp and slide_mpp must be >= 0 (0: the default); got {self.tile_px}, "
                              f"{self.mpp}, {self.slide_mpp}")
        if not 0.0 <= self.overlap < 1.0:
            raise ConfigError(f"overlap must be in [0, 1); got {self.overlap}")
        if not 0.0 <= self.min_tissue <= 1.0 or not 0.0 < self.positive_share <= 1.0:
            raise ConfigError(f"min_tissue must be in [0, 1] and positive_share in (0, 1]; got {self.min_tissue}, "
                              f"{self.positive_share}")
        if self.batch < 1:
            raise ConfigError(f"batch must be at least 1; got {self.batch}")


@dataclass(frozen=True)
class AppConfig:
    model_uri: str = setting(DEFAULT_MODEL_URI, "the model the page scores with, in its own process (unless "
                                                "scoring_url is given)")
    scoring_url: str = setting("", "a scoring server's /invocations to score through instead (mlflow models serve, "
                                   "the container, Cloud Run)")
    host: str = setting("127.0.0.1", "the address the page listens on (0.0.0.0 in a container)")
    port: int = setting(7860, "the page's port")
    slide_dir: str = setting("", "a folder of whole-slide images the page offers to open (read on the server; "
                                 "none: uploaded slides only)")

    def validate(self) -> None:
        if not self.model_uri and not self.scoring_url:
            raise ConfigError("give model_uri (a registered model) or scoring_url (a scoring server)")
        if self.scoring_url and not self.scoring_url.startswith(("http://", "https://")):
            raise ConfigError(f"scoring_url must be an http(s) URL; got {self.scoring_url!r}")
        if self.slide_dir and not os.path.isdir(self.slide_dir):
            raise ConfigError(f"slide_dir must be a folder; got {self.slide_dir!r}")
        if not 0 < self.port < 65536:
            raise ConfigError(f"port must be in 1..65535; got {self.port}")
