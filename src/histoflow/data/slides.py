"""Whole-slide images: opened through OpenSlide (Aperio SVS, Hamamatsu NDPI, MIRAX, generic tiled TIFF, ...), their
tissue found on a low-resolution thumbnail, and the tissue cut into a grid of tiles at a chosen resolution in
micrometres per pixel, read one batch at a time so that memory stays bounded whatever the slide's size.

Tissue: Otsu's threshold on the HSV saturation of a low-resolution level (the pyramid's nearest to THUMBNAIL_SIDE
pixels a side), never below
quality.TISSUE_SATURATION (glass, background and a blank slide are unsaturated: a slide without tissue gets no
tiles, not tiles of noise), dark pixels (pen marks' black, the scanner's border) excluded as in quality.tissue_fraction.
Pathology tools find tissue the same way (slideflow, histolab, CLAM: Otsu on saturation).

Tiles: `tile_px` pixels at `mpp` micrometres per pixel, i.e. tile_px * mpp / slide_mpp pixels of level 0, read at
the pyramid level that holds at least that resolution and resized to tile_px (the same resize as training's);
a stride of (1 - overlap) tiles; a tile is kept when at least `min_tissue` of its area is tissue on the mask.
Coordinates are level-0 pixels, as QuPath and OpenSlide count them.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from histoflow.data.images import resize
from histoflow.data.quality import BLACK_LEVEL, TISSUE_SATURATION
from histoflow.errors import DataError

SLIDE_EXTENSIONS = frozenset({".svs", ".tif", ".tiff", ".ndpi", ".vms", ".vmu", ".scn", ".mrxs", ".svslide", ".bif"})
THUMBNAIL_SIDE = 2048  # the tissue mask's side: a 100,000-px slide at ~50 level-0 pixels a mask pixel
MPP_PROPERTY = "openslide.mpp-x"
GRID_ROWS = 256  # rows of tile positions whose tissue share is computed at once


@dataclass
class Slide:
    """An open slide: its path, OpenSlide handle, level-0 size and resolution (micrometres per pixel)."""

    path: str
    handle: object
    width: int
    height: int
    mpp: float

    def close(self) -> None:
        self.handle.close()

    def __enter__(self) -> Slide:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def open_slide(path: str | Path, mpp: float | None = None) -> Slide:
    """Open a whole-slide image; `mpp` overrides (or supplies) its level-0 resolution. DataError, saying what is
    wrong, for a file that is not a slide, a truncated one, or a slide without resolution metadata and no `mpp`."""
    import openslide

    path = str(path)
    if not Path(path).is_file():
        raise DataError(f"{path}: no such slide file")
    try:
        handle = openslide.OpenSlide(path)
    except openslide.OpenSlideUnsupportedFormatError:
        raise DataError(f"{path}: not a whole-slide image OpenSlide can read (Aperio .svs, Hamamatsu .ndpi, "
                        "MIRAX .mrxs, Leica .scn, Ventana .bif, a tiled pyramidal TIFF, ...)") from None
    except openslide.OpenSlideError as exc:
        raise DataError(f"{path}: the slide cannot be read (truncated or corrupt?): {exc}") from None
    width, height = handle.dimensions
    resolution = mpp if mpp else _metadata_mpp(handle)
    if not resolution:
        handle.close()
        raise DataError(f"{path}: the slide has no resolution metadata ({MPP_PROPERTY}); give its micrometres per "
                        "pixel at level 0 with mpp (e.g. 0.25 for a 40x scan, 0.5 for 20x)")
    if resolution <= 0:
        handle.close()
        raise DataError(f"{path}: mpp must be positive; got {resolution}")
    return Slide(path, handle, int(width), int(height), float(resolution))


def _metadata_mpp(handle) -> float | None:
    try:
        return float(handle.properties[MPP_PROPERTY])
    except (KeyError, ValueError):
        return None


def otsu_threshold(values: np.ndarray, bins: int = 256) -> float:
    """Otsu's threshold of values in [0, 1]: the cut that maximises the between-class variance."""
    counts, edges = np.histogram(values, bins=bins, range=(0.0, 1.0))
    centres = (edges[:-1] + edges[1:]) / 2
    weight_low = np.cumsum(counts)
    weight_high = weight_low[-1] - weight_low
    sum_low = np.cumsum(counts * centres)
    with np.errstate(divide="ignore", invalid="ignore"):
        mean_low = sum_low / weight_low
        mean_high = (sum_low[-1] - sum_low) / weight_high
        between = weight_low * weight_high * (mean_low - mean_high) ** 2
    return float(centres[int(np.nanargmax(np.nan_to_num(between, nan=-1.0)))])


def tissue_mask(slide: Slide, side: int = THUMBNAIL_SIDE) -> tuple[np.ndarray, float]:
    """Boolean tissue mask at most `side` pixels a side, and level-0 pixels per mask pixel (thumbnail_and_mask)."""
    _, mask, downsample = thumbnail_and_mask(slide, side)
    return mask, downsample


def thumbnail_and_mask(slide: Slide, side: int = THUMBNAIL_SIDE) -> tuple[np.ndarray, np.ndarray, float]:
    """The slide's RGB thumbnail at most `side` pixels a side, from the pyramid level nearest that (or, when that
    level cannot be read, the next coarser one that can), its boolean tissue mask, and level-0 pixels per pixel
    of both: one read of the pyramid for the mask and any figure drawn over the slide."""
    import openslide

    first = slide.handle.get_best_level_for_downsample(max(slide.width, slide.height) / side)
    for level in range(first, slide.handle.level_count):
        try:
            region = slide.handle.read_region((0, 0), level, slide.handle.level_dimensions[level])
            region.thumbnail((side, side), Image.Resampling.BOX)  # a level may be up to 4x the side
            pixels = _rgb(region)
            break
        except openslide.OpenSlideError:
            _reopen(slide)
    else:
        raise DataError(f"{slide.path}: no level of the slide can be read to find its tissue")
    thumbnail = pixels.astype(np.float32) / 255.0
    brightest, darkest = thumbnail.max(axis=-1), thumbnail.min(axis=-1)
    saturation = (brightest - darkest) / np.maximum(brightest, 1e-6)
    lit = brightest > BLACK_LEVEL
    cut = max(otsu_threshold(saturation[lit]), TISSUE_SATURATION) if lit.any() else 1.0
    downsample = slide.width / thumbnail.shape[1]
    return pixels, lit & (saturation > cut), float(downsample)


def tile_grid(slide: Slide, tile_px: int, mpp: float, overlap: float = 0.0, min_tissue: float = 0.25,
              mask: tuple[np.ndarray, float] | None = None) -> pd.DataFrame:
    """The tiles over tissue: level-0 x, y, size (pixels) and the tissue share of each on the mask."""
    if tile_px <= 0 or mpp <= 0 or not 0.0 <= overlap < 1.0 or not 0.0 <= min_tissue <= 1.0:
        raise DataError(f"tiles need tile_px > 0, mpp > 0, 0 <= overlap < 1 and 0 <= min_tissue <= 1; got "
                        f"tile_px={tile_px}, mpp={mpp}, overlap={overlap}, min_tissue={min_tissue}")
    size = max(1, round(tile_px * mpp / slide.mpp))
    stride = max(1, round(size * (1.0 - overlap)))
    tissue, downsample = mask if mask is not None else tissue_mask(slide)
    xs = np.arange(0, slide.width - size + 1, stride)
    ys = np.arange(0, slide.height - size + 1, stride)
    # The mask's integral image: the tissue share of every tile at once, in four lookups each (a 100,000-px slide
    # has 4 million 50-px positions).
    integral = np.pad(tissue.astype(np.float64).cumsum(0).cumsum(1), ((1, 0), (1, 0)))
    left, right = _mask_spans(xs, size, downsample, tissue.shape[1])
    parts = []
    for chunk in range(0, len(ys), GRID_ROWS):  # a band of rows at a time: memory bounded for any slide
        band = ys[chunk:chunk + GRID_ROWS]
        top, bottom = _mask_spans(band, size, downsample, tissue.shape[0])
        area = (bottom - top)[:, None] * (right - left)[None, :]
        share = (integral[bottom[:, None], right[None, :]] - integral[top[:, None], right[None, :]]
                 - integral[bottom[:, None], left[None, :]] + integral[top[:, None], left[None, :]]) / area
        rows, columns = np.nonzero((share >= min_tissue) & (share > 0))
        parts.append(pd.DataFrame({"x": xs[columns].astype(int), "y": band[rows].astype(int),
                                   "size": np.full(len(rows), size, dtype=int), "tissue": share[rows, columns]}))
    if not parts:
        return pd.DataFrame({"x": [], "y": [], "size": [], "tissue": []}).astype(
            {"x": int, "y": int, "size": int, "tissue": float})
    return pd.concat(parts, ignore_index=True)


def _mask_spans(starts: np.ndarray, size: int, downsample: float, limit: int) -> tuple[np.ndarray, np.ndarray]:
    """The mask rows (or columns) each tile covers: [first, last) with at least one."""
    first = np.minimum((starts / downsample).astype(int), limit - 1)
    last = np.maximum(first + 1, np.minimum(np.ceil((starts + size) / downsample).astype(int), limit))
    return first, last


def read_tile(slide: Slide, x: int, y: int, size: int, tile_px: int) -> np.ndarray:
    """The tile at level-0 (x, y) of `size` level-0 pixels, as tile_px x tile_px RGB uint8, read from the level
    that holds at least tile_px pixels across it."""
    # 1 % of slack: a level of 337 rows under 1,350 is a 4.006x level, and serves a 4x tile.
    level = slide.handle.get_best_level_for_downsample(size / tile_px * 1.01)
    downsample = slide.handle.level_downsamples[level]
    while level > 0 and round(size / downsample) < tile_px:  # never read coarser than the tile needs
        level -= 1
        downsample = slide.handle.level_downsamples[level]
    span = max(1, round(size / downsample))
    return resize(_rgb(slide.handle.read_region((int(x), int(y)), level, (span, span))), tile_px)


def _rgb(region) -> np.ndarray:
    """OpenSlide's RGBA region as RGB uint8; transparent (outside the scanned area) is white, as the glass."""
    rgba = np.asarray(region, dtype=np.uint8)
    alpha = rgba[..., 3:4].astype(np.float32) / 255.0
    return np.round(rgba[..., :3] * alpha + 255.0 * (1.0 - alpha)).astype(np.uint8)


def _reopen(slide: Slide) -> None:
    """A new handle: OpenSlide refuses every read after an error."""
    import openslide

    slide.handle.close()
    slide.handle = openslide.OpenSlide(slide.path)


def read_tiles(slide: Slide, grid: pd.DataFrame, tile_px: int, batch: int = 64) -> Iterator[tuple[pd.DataFrame,
                                                                                              list[np.ndarray]]]:
    """The grid's tiles in batches (its rows and their images): one batch in memory at a time. A tile that fails
    to read is None in its batch (the caller flags it), the others are read."""
    import openslide

    for start in range(0, len(grid), batch):
        rows = grid.iloc[start:start + batch]
        images = []
        for x, y, size in rows[["x", "y", "size"]].itertuples(index=False):
            try:
                images.append(read_tile(slide, x, y, size, tile_px))
            except openslide.OpenSlideError:
                images.append(None)
                _reopen(slide)
        yield rows, images
