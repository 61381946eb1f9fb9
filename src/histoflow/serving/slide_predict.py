"""The `predict-slide` entry point: whole-slide images scored tile by tile with a registered model, as a run.

For each slide, a folder `<output_dir>/<slide name>/` with:
- tiles.csv: a row per tissue tile: level-0 x, y, size, tissue share, the model's label, model_label,
  positive_probability, threshold and flags (`read_error` for a tile that could not be read);
- heatmap.png: the slide's thumbnail with each tile coloured by its positive probability, and a colour key;
- tiles.geojson: the tiles as polygons with their probability, label and flags, and the regions of neighbouring
  scored tiles at or above the model's threshold merged into their outlines, in level-0 pixels: QuPath opens it
  over the slide;
- top_tiles.png: the scored tiles with the highest positive probability, with their coordinates;
- summary.json: tissue area (mm²), tiles scored and flagged, the positive tiles' share and area (mm²), the slide's
  call and the rule that made it.

Tiles: `tile_px` pixels (default: the model's input size) at `mpp` micrometres per pixel (default: the model's
input resolution, the training images' field of view over the input size, recorded when training had the data
setting mpp; a model without one: the slide's level 0, with a warning); summary.json says which.

Scored tiles are those not flagged (a flagged tile keeps its probability in tiles.csv but counts for nothing: its
image was not one the model can be trusted on). The slide's call: the positive class when at least
`positive_share` of its scored tiles, and at
least 2, are called positive by the model at its threshold; else the other class; `indeterminate` when no tile
could be scored (no tissue, or all flagged). A folder of slides: every slide, a slide that cannot be read reported
in summary.csv with its reason and the others scored. A slides.csv beside them (slide, patient, label) gives
metrics.json: slide-level ROC AUC (of the positive share), balanced accuracy, accuracy, sensitivity and
specificity of the calls, with 95 % bootstrap intervals resampling patients (a patient's slides together), and
the patient-level accuracy of the same rule as evaluation (the mean of a patient's slide scores).
"""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Callable
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd

from histoflow import tracking
from histoflow.data.slides import SLIDE_EXTENSIONS, Slide, open_slide, read_tile, thumbnail_and_mask
from histoflow.errors import ConfigError, DataError
from histoflow.modeling.screening import INDETERMINATE
from histoflow.serving.settings import SlideConfig
from histoflow.serving.slide_scoring import score_slide

log = logging.getLogger(__name__)
MIN_POSITIVE_TILES = 2
TOP_TILES = 8
FLAGGED_COLOUR = "#1f9bcf"  # a blue outside the heat map's inferno colours


def slide_files(source: str) -> list[Path]:
    path = Path(source)
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise DataError(f"{source}: no such slide or folder")
    files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in SLIDE_EXTENSIONS)
    if not files:
        raise DataError(f"{source}: no whole-slide images ({', '.join(sorted(SLIDE_EXTENSIONS))}) in this folder")
    return files


def scored_tiles(tiles: pd.DataFrame) -> pd.Series:
    """Which tiles count: read, scored and not flagged."""
    return tiles["label"].notna() & (tiles["label"] != INDETERMINATE)


def most_positive(tiles: pd.DataFrame, k: int = TOP_TILES) -> pd.DataFrame:
    """The k scored tiles of highest positive probability, highest first: those that drive the call."""
    return tiles[scored_tiles(tiles)].astype({"positive_probability": float}).nlargest(k, "positive_probability")


def slide_call(tiles: pd.DataFrame, classes: list[str], positive_share: float) -> tuple[str, float]:
    """The slide's call by the module's rule, and the positive tiles' share of the scored ones."""
    scored = tiles[scored_tiles(tiles)]
    if scored.empty:
        return INDETERMINATE, float("nan")
    positive = scored["model_label"] == classes[-1]
    share = float(positive.mean())
    called = share >= positive_share and int(positive.sum()) >= MIN_POSITIVE_TILES
    return classes[-1] if called else classes[0], share


def _regions(tiles: pd.DataFrame, threshold: float) -> list[dict]:
    """GeoJSON geometries of the tiles at or above the threshold merged (shapely's union): each connected group
    its outline, holes kept; groups that touch only at a corner stay apart."""
    from shapely import box, unary_union
    from shapely.geometry import mapping

    hot = tiles[tiles["positive_probability"] >= threshold]
    if hot.empty:
        return []
    merged = unary_union([box(x, y, x + size, y + size) for x, y, size in hot[["x", "y", "size"]].itertuples(
        index=False)])
    return [mapping(part) for part in getattr(merged, "geoms", [merged])]


def _square(x: int, y: int, size: int) -> list[list[list[int]]]:
    return [[[x, y], [x + size, y], [x + size, y + size], [x, y + size], [x, y]]]


def geojson(tiles: pd.DataFrame, threshold: float, positive_class: str) -> dict:
    features = [{"type": "Feature", "geometry": {"type": "Polygon", "coordinates": _square(x, y, size)},
                 "properties": {"objectType": "tile", "positive_probability": None if np.isnan(p) else float(p),
                                "label": label if isinstance(label, str) else None, "flags": flags or "",
                                "name": f"tile {x},{y}"}}
                for x, y, size, p, label, flags in tiles[["x", "y", "size", "positive_probability", "label",
                                                          "flags"]].fillna({"flags": ""}).itertuples(index=False)]
    features += [{"type": "Feature", "geometry": region,
                  "properties": {"objectType": "annotation", "classification": {"name": positive_class},
                                 "name": f"{positive_class} region {i + 1}"}}
                 for i, region in enumerate(_regions(tiles[scored_tiles(tiles)], threshold))]
    return {"type": "FeatureCollection", "features": features}


def heatmap(slide: Slide, thumbnail: np.ndarray, tiles: pd.DataFrame, threshold: float, path: Path) -> None:
    """The slide's thumbnail (RGB uint8) with the scored tiles' positive probability over it and a colour key;
    flagged and unread tiles in one flat colour outside the key's range (they count for nothing)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import ListedColormap
    from matplotlib.patches import Patch

    scale = thumbnail.shape[1] / slide.width
    figure, axes = plt.subplots(figsize=(10, 10 * thumbnail.shape[0] / thumbnail.shape[1] + 0.6))
    axes.imshow(thumbnail)
    heat, flagged = np.full(thumbnail.shape[:2], np.nan), np.full(thumbnail.shape[:2], np.nan)
    counted = scored_tiles(tiles).to_numpy()
    for (x, y, size, p), scored in zip(tiles[["x", "y", "size", "positive_probability"]].itertuples(index=False),
                                       counted, strict=True):
        top, left = int(y * scale), int(x * scale)
        area = np.s_[top:max(top + 1, int((y + size) * scale)), left:max(left + 1, int((x + size) * scale))]
        if scored:
            heat[area] = p
        else:
            flagged[area] = 1.0
    shown = axes.imshow(np.ma.masked_invalid(heat), cmap="inferno", vmin=0, vmax=1, alpha=0.55)
    axes.imshow(np.ma.masked_invalid(flagged), cmap=ListedColormap([FLAGGED_COLOUR]), vmin=0, vmax=1, alpha=0.7)
    key = figure.colorbar(shown, ax=axes, fraction=0.04, pad=0.02)
    key.set_label("positive probability")
    key.ax.axhline(threshold, color="cyan", linewidth=2)
    if not counted.all():
        axes.legend(handles=[Patch(color=FLAGGED_COLOUR, alpha=0.7, label="flagged or unread: not counted")],
                    loc="upper left", bbox_to_anchor=(0, 0), fontsize=9, frameon=False)
    axes.set_title(f"{Path(slide.path).name}: {int(counted.sum())} scored tiles, {int((~counted).sum())} flagged "
                   f"(threshold {threshold:.2f} on the key)", pad=12)
    axes.axis("off")
    figure.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(figure)


def top_tiles(slide: Slide, tiles: pd.DataFrame, tile_px: int, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    best = most_positive(tiles)
    figure, axes = plt.subplots(1, max(1, len(best)), figsize=(2.2 * max(1, len(best)), 2.6), squeeze=False)
    for ax, (x, y, size, p) in zip(axes[0], best[["x", "y", "size", "positive_probability"]].itertuples(index=False),
                                   strict=False):
        ax.imshow(read_tile(slide, x, y, size, tile_px))
        ax.set_title(f"p={p:.2f}\n({x}, {y})", fontsize=8)
    for ax in axes[0]:
        ax.axis("off")
    figure.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(figure)


def tile_resolution(given: float, model_mpp: float, slide_mpp: float) -> tuple[float, str]:
    """The tiles' micrometres per pixel and where it came from: mpp as given, else the model's training
    resolution, else (a model trained without the data's mpp) the slide's level 0, with a warning."""
    if given:
        return given, "mpp"
    if model_mpp:
        return model_mpp, "model"
    log.warning("the model records no training resolution (train it with the data setting mpp): tiles are cut "
                "at the slide's level 0 (%.3g um/px); give mpp to choose", slide_mpp)
    return slide_mpp, "slide level 0"


def predict_slide(path: Path, model, config: SlideConfig, out: Path,
                  on_batch: Callable[[int, int], None] | None = None) -> dict:
    """Score one slide into its output folder; its summary. `on_batch`: score_slide's progress callback."""
    slide = open_slide(path, config.slide_mpp or None)
    with slide:
        served = model.unwrap_python_model()
        tile_px = config.tile_px or int(served.image_size)
        mpp, mpp_source = tile_resolution(config.mpp, served.input_mpp, slide.mpp)
        thumbnail, mask, downsample = thumbnail_and_mask(slide)
        tiles = score_slide(slide, model, tile_px, mpp, config.overlap, config.min_tissue, config.batch,
                            mask=(mask, downsample), on_batch=on_batch)
        classes = list(served.class_names)
        threshold = float(served.calibration.threshold)
        call, share = slide_call(tiles, classes, config.positive_share)
        out.mkdir(parents=True, exist_ok=True)
        tiles.to_csv(out / "tiles.csv", index=False)
        (out / "tiles.geojson").write_text(json.dumps(geojson(tiles, threshold, classes[-1])))
        heatmap(slide, thumbnail, tiles, threshold, out / "heatmap.png")
        top_tiles(slide, tiles, tile_px, out / "top_tiles.png")
        mm2_per_pixel = (slide.mpp / 1000.0) ** 2
        scored = scored_tiles(tiles)
        positive = scored & (tiles["model_label"] == classes[-1])
        tile_area = float((tiles["size"].astype(float) ** 2).mean()) * mm2_per_pixel if len(tiles) else 0.0
        summary = {"slide": str(path), "width": slide.width, "height": slide.height, "slide_mpp": slide.mpp,
                   "tile_px": tile_px, "tile_mpp": mpp, "tile_mpp_source": mpp_source,
                   "tissue_area_mm2": float(mask.sum()) * downsample ** 2 * mm2_per_pixel,
                   "tiles": int(len(tiles)), "tiles_scored": int(scored.sum()),
                   "flagged_share": float(1 - scored.mean()) if len(tiles) else float("nan"),
                   "positive_tiles": int(positive.sum()), "positive_share": share,
                   "positive_area_mm2": float(positive.sum()) * tile_area * (1 - config.overlap) ** 2,
                   "threshold": threshold, "call": call,
                   "rule": f"{classes[-1]} when at least {config.positive_share:g} of the scored tiles (and at least "
                           f"{MIN_POSITIVE_TILES}) are {classes[-1]} at the model's threshold; {INDETERMINATE} "
                           "when no tile could be scored"}
        (out / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


LABELS_FILE = "slides.csv"  # beside the slides: slide (file name), patient, label (one of the model's classes)
SUMMARY_FILE = "summary.csv"  # in output_dir: a row per slide (never slides.csv: output_dir may be the slides' own)


def read_labels(folder: Path, classes: list[str]) -> pd.DataFrame | None:
    """The folder's slides.csv (slide, patient, label), indexed by slide file name; None without one."""
    path = folder / LABELS_FILE
    if not folder.is_dir() or not path.is_file():
        return None
    labels = pd.read_csv(path, dtype=str)
    missing = {"slide", "patient", "label"} - set(labels.columns)
    if missing:
        raise DataError(f"{path}: needs the columns slide, patient, label; missing {', '.join(sorted(missing))}")
    unknown = sorted(set(labels["label"]) - set(classes))
    if unknown:
        raise DataError(f"{path}: labels must be the model's classes ({', '.join(classes)}); got {unknown}")
    return labels.assign(slide=[Path(s).name for s in labels["slide"]]).set_index("slide")


def slide_scores(table: pd.DataFrame) -> np.ndarray:
    """Each slide's score for the metrics: its positive share when it has MIN_POSITIVE_TILES positive tiles, else 0,
    so that the call is exactly score >= positive_share."""
    return np.where(table["positive_tiles"] >= MIN_POSITIVE_TILES, table["positive_share"], 0.0)


def labelled_metrics(table: pd.DataFrame, labels: pd.DataFrame, classes: list[str], positive_share: float
                     ) -> dict[str, float]:
    """Slide-level metrics with 95 % bootstrap intervals over patients, and patient-level ones, of the slides that
    have a label and a call (an indeterminate slide is counted, not scored)."""
    from histoflow.modeling.metrics import binary_metrics, patient_bootstrap, patient_metrics

    table = table.assign(name=[Path(s).name for s in table["slide"]])
    known = table[table["name"].isin(labels.index) & table["call"].notna()]
    indeterminate = known["call"] == INDETERMINATE
    scored = known[~indeterminate]
    metrics = {"labelled_slides": float(len(known)), "indeterminate_slides": float(indeterminate.sum())}
    if scored.empty:
        return metrics
    y = (labels.loc[scored["name"], "label"] == classes[-1]).astype(int).to_numpy()
    patients = labels.loc[scored["name"], "patient"].to_numpy()
    score = slide_scores(scored)
    probabilities = np.column_stack([1 - score, score])
    found = binary_metrics(y, probabilities, positive_share)
    for name in ("roc_auc", "balanced_accuracy", "accuracy", "recall", "specificity"):
        metrics[f"slide_{name}"] = found[name]
    for name, (low, high) in patient_bootstrap(patients, y, probabilities, positive_share).items():
        metrics[f"slide_{name}_ci_low"], metrics[f"slide_{name}_ci_high"] = low, high
    metrics.update(patient_metrics(pd.Series(patients), y, probabilities, positive_share))
    return metrics


def _slide_task(item: tuple[str, str, str, SlideConfig]) -> dict:
    """A Spark task: one slide scored into its folder by an executor, with the model loaded there; its summary
    (or its problem)."""
    path, out, model_uri, config = item
    try:
        return predict_slide(Path(path), mlflow.pyfunc.load_model(model_uri), config, Path(out))
    except DataError as exc:
        return {"slide": path, "problem": str(exc)}


def _summaries_on_spark(targets: dict[Path, Path], config: SlideConfig) -> list[dict]:
    from histoflow.serving.spark_scoring import spark_session

    spark = spark_session(config.spark_master)
    tasks = [(str(f), str(out.resolve()), config.model_uri, config) for f, out in targets.items()]
    return spark.sparkContext.parallelize(tasks, numSlices=len(tasks)).map(_slide_task).collect()


def run(config: SlideConfig) -> pd.DataFrame:
    config.validate()
    tracking.configure()
    files = slide_files(config.slides)
    root = Path(config.output_dir)
    targets = {f: root / f.stem for f in files}
    existing = [str(t) for t in targets.values() if t.exists()]
    if existing and not config.overwrite:
        raise ConfigError(f"{existing[0]} exists (results of an earlier run): give another output_dir, or "
                          "overwrite=true to replace them")
    model = mlflow.pyfunc.load_model(config.model_uri)
    classes = list(model.unwrap_python_model().class_names)
    labels = read_labels(Path(config.slides), classes)
    rows = []
    with mlflow.start_run(run_name="predict-slide", nested=mlflow.active_run() is not None):
        mlflow.set_tag("histoflow.step", "predict-slide")
        tracking.log_new_params({"model_uri": config.model_uri, "slides": config.slides, "tile_px": config.tile_px,
                                 "mpp": config.mpp, "overlap": config.overlap, "min_tissue": config.min_tissue,
                                 "positive_share": config.positive_share})
        for out in targets.values():
            if out.exists():
                shutil.rmtree(out)
        spark = config.engine == "spark"
        summaries = iter(_summaries_on_spark(targets, config)) if spark else None
        for f, out in targets.items():
            try:
                rows.append(next(summaries) if spark else predict_slide(f, model, config, out))
            except DataError as exc:
                rows.append({"slide": str(f), "problem": str(exc)})
            if "problem" in rows[-1]:
                if len(files) == 1:
                    raise DataError(rows[-1]["problem"])
                print(f"skipped: {rows[-1]['problem']}")
                continue
            mlflow.log_artifacts(str(out), artifact_path=f"slides/{f.stem}")
            print(f"{f.name}: {rows[-1]['call']} ({rows[-1]['positive_tiles']} of {rows[-1]['tiles_scored']} tiles "
                  f"positive) -> {out}")
        table = pd.DataFrame(rows)
        root.mkdir(parents=True, exist_ok=True)
        table.to_csv(root / SUMMARY_FILE, index=False)
        mlflow.log_artifact(str(root / SUMMARY_FILE))
        if len(files) == 1 and "tiles" in table:
            mlflow.log_metrics({k: float(table[k].iloc[0]) for k in ("tissue_area_mm2", "tiles", "positive_share",
                                                                       "positive_area_mm2", "flagged_share")
                                if pd.notna(table[k].iloc[0])})
        if labels is not None and "call" in table:
            metrics = labelled_metrics(table, labels, classes, config.positive_share)
            (root / "metrics.json").write_text(json.dumps(metrics, indent=2))
            mlflow.log_artifact(str(root / "metrics.json"))
            mlflow.log_metrics({k: v for k, v in metrics.items() if np.isfinite(v)})
            print("slides with labels: " + ", ".join(f"{k} {v:.3f}" for k, v in metrics.items()
                                                     if not k.endswith(("_low", "_high"))))
    return table
