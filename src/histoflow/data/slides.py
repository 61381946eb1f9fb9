"""Whole-slide images: opened through OpenSlide (Aperio SVS, Hamamatsu NDPI, MIRAX, generic tiled TIFF, ...), their
tissue found on a low-resolution thumbnail, and the tissue cut into a grid of tiles at a chosen resolution in
micrometres per pixel, read one batch at a time so that memory stays bounded whatever the slide's size.

Tissue: Otsu's threshold on the HSV saturation of a low-resolution level (the pyramid's nearest to THUMBNAIL_SIDE
pixels a side, shrunk to at most that, read in regions of at most MASK_READ_SIDE pixels a side so that a pyramid
without such a level, e.g. a single-level TIFF, is never read whole), never below
quality.TISSUE_SATURATION (glass, background and a blank slide are unsaturated: a slide without tissue gets no
tiles, not tiles of noise), dark pixels (pen marks' black, the scanner's border) excluded as in quality.tissue_fraction.
Pathology tools find tissue the same way (slideflow, histolab, CLAM: Otsu on saturation).

Tiles: `tile_px` pixels at `mpp` micrometres per pixel, i.e. tile_px * mpp / slide_mpp pixels of level 0, read at
the pyramid level that holds at least that resolution and resized to tile_px (the same resize as training's);
a stride of (1 - overlap) tiles; a tile is kept when at least `min_tissue` of its area is tissue on the mask.
Coordinates are level-0 pixels, as QuPath and OpenSlide count them.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from histoflow.data.images import resize
from histoflow.data.quality import BLACK_LEVEL, TISSUE_SATURATION
from histoflow.errors import DataError

SLIDE_EXTENSIONS = frozenset({".svs", ".tif", ".tiff", ".ndpi", ".vms", ".vmu", ".scn", ".mrxs", ".svslide", ".bif"})
THUMBNAIL_SIDE = 2048  # the tissue mask's side: a 100,000-px slide at ~50 level-0 pixels a mask pixel
MPP_PROPERTY = "openslide.mpp-x"
GRID_ROWS = 256  # rows of tile positions whose tissue share is computed at once
# Level pixels a side of each region read for the mask: 1 MiB of RGBA a read, whatever the level's size (1,024 read
# no faster and added 10 MiB to the mask's peak).
MASK_READ_SIDE = 512


def _code_tables() -> tuple[np.ndarray, np.ndarray]:
    """For every code brightest * 256 + darkest of a pixel's channels (0..255): its HSV saturation and whether it
    is lit (brightest over BLACK_LEVEL), computed once in float32: the mask is then a count and a lookup of 2-byte
    codes, not float copies of the whole thumbnail."""
    brightest = np.arange(256, dtype=np.float32)[:, None] / 255.0
    darkest = np.arange(256, dtype=np.float32)[None, :] / 255.0
    saturation = (brightest - darkest) / np.maximum(brightest, 1e-6)
    return saturation.ravel(), np.broadcast_to(brightest > BLACK_LEVEL, saturation.shape).ravel()


SATURATION, LIT = _code_tables()


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


def otsu_threshold(values: np.ndarray, bins: int = 256, weights: np.ndarray | None = None) -> float:
    """Otsu's threshold of values in [0, 1] (each counted `weights` times when given): the cut that maximises the
    between-class variance."""
    counts, edges = np.histogram(values, bins=bins, range=(0.0, 1.0), weights=weights)
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
            pixels = _shrunk_level(slide.handle, level, side)
            break
        except openslide.OpenSlideError:
            _reopen(slide)
    else:
        raise DataError(f"{slide.path}: no level of the slide can be read to find its tissue")
    # A band of rows at a time: bincount copies its input as 8-byte integers.
    bands = range(0, pixels.shape[0], GRID_ROWS)
    counts = sum(np.bincount(_codes(pixels[top:top + GRID_ROWS]), minlength=SATURATION.size) for top in bands)
    counts *= LIT  # the lit pixels of each code
    cut = max(otsu_threshold(SATURATION, weights=counts), TISSUE_SATURATION) if counts.any() else 1.0
    stained = LIT & (cut < SATURATION)
    mask = np.concatenate([stained.take(_codes(pixels[top:top + GRID_ROWS])) for top in bands])
    return pixels, mask.reshape(pixels.shape[:2]), float(slide.width / pixels.shape[1])


def _codes(pixels: np.ndarray) -> np.ndarray:
    """Each RGB pixel's code, brightest * 256 + darkest channel (the index of SATURATION and LIT), flat."""
    codes = pixels.max(axis=-1).astype(np.uint16).ravel()
    codes <<= 8
    codes |= pixels.min(axis=-1).ravel()
    return codes


def _shrunk_level(handle, level: int, side: int) -> np.ndarray:
    """A pyramid level as RGB uint8 at Image.thumbnail's size for `side`: the bytes of Pillow's Image.resize(BOX) of
    the whole level, but read in regions of at most MASK_READ_SIDE + 1 pixels a side, each shrunk into its part of
    the thumbnail. The memory is bounded by `side`, not by the level, which is the slide itself in a pyramid
    without lower levels (a single-level 6,000-px TIFF read whole: 137 MiB of RGBA, and float copies of it)."""
    width, height = handle.level_dimensions[level]
    downsample = handle.level_downsamples[level]
    out_width, out_height = _thumbnail_size(width, height, side)
    columns, rows = _box_starts(width, out_width), _box_starts(height, out_height)
    step_x, step_y = max(1, MASK_READ_SIDE * out_width // width), max(1, MASK_READ_SIDE * out_height // height)
    pixels = np.empty((out_height, out_width, 3), np.uint8)
    for top in range(0, out_height, step_y):
        bottom = min(top + step_y, out_height)
        y0, y1 = int(rows[top]), int(rows[bottom])
        for left in range(0, out_width, step_x):
            right = min(left + step_x, out_width)
            x0, x1 = int(columns[left]), int(columns[right])
            region = _rgb(handle.read_region((round(x0 * downsample), round(y0 * downsample)), level,
                                             (x1 - x0, y1 - y0)))
            across = _box_mean(region, columns[left:right + 1] - x0, axis=1)
            pixels[top:bottom, left:right] = _box_mean(across, rows[top:bottom + 1] - y0, axis=0)
    return pixels


def _box_starts(size: int, out: int) -> np.ndarray:
    """The first of `size` pixels under each of `out` box-filtered ones, then `size`. Pillow's box filter averages
    the pixels whose centres lie in an output pixel's footprint: pixel i goes to the j with
    2 j size < (2 i + 1) out <= 2 (j + 1) size. Computed in integers, so that a region's pixels go where they go in
    the whole level (Pillow's floating point decides a centre exactly on an edge either way, and differently
    at different offsets)."""
    return (2 * np.arange(out + 1, dtype=np.int64) * size - out) // (2 * out) + 1


def _box_mean(pixels: np.ndarray, starts: np.ndarray, axis: int) -> np.ndarray:
    """The means of the runs [starts[j], starts[j + 1]) of uint8 pixels along `axis`, rounded in Pillow's fixed
    point (weights 1 / n in 22 bits, half added, shifted back): Image.resize(BOX)'s bytes for the same runs."""
    shape = [1] * pixels.ndim
    shape[axis] = -1
    weights = np.floor(0.5 + (1.0 / np.diff(starts)) * (1 << 22)).astype(np.uint32).reshape(shape)
    sums = np.add.reduceat(pixels, starts[:-1], axis=axis, dtype=np.uint32)
    sums *= weights  # at most 255 n x 2^22 / n: no overflow; in place, as the next two
    sums += 1 << 21
    sums >>= 22
    return np.minimum(sums, 255, out=sums).astype(np.uint8)


def _thumbnail_size(width: int, height: int, side: int) -> tuple[int, int]:
    """Image.thumbnail((side, side))'s size for a width x height image (Pillow 10-12): never enlarged, the aspect
    ratio kept by the nearer of floor and ceil. Computed here: Pillow's needs the image in memory."""
    if width <= side and height <= side:
        return width, height
    aspect = width / height
    if aspect <= 1:
        candidates = (math.floor(side * aspect), math.ceil(side * aspect))
        return max(min(candidates, key=lambda n: abs(aspect - n / side)), 1), side
    candidates = (math.floor(side / aspect), math.ceil(side / aspect))
    return side, max(min(candidates, key=lambda n: 0 if n == 0 else abs(aspect - side / n)), 1)


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
    # has 4 million 50-px positions); summed in place in integers: one 8-byte copy of the mask, not four.
    integral = np.zeros((tissue.shape[0] + 1, tissue.shape[1] + 1), np.int64)
    sums = integral[1:, 1:]
    sums[...] = tissue  # cumsum from the bool mask into this would make another 8-byte copy
    np.cumsum(sums, axis=0, out=sums)
    np.cumsum(sums, axis=1, out=sums)
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
    if rgba[..., 3].min(initial=255) == 255:  # opaque (a scanned area): no arithmetic, one copy
        return np.ascontiguousarray(rgba[..., :3])
    # round(c * a / 255 + 255 * (1 - a / 255)) in integers (2 bytes a channel, not float32): never a tie, so the
    # same value as in floats for every (c, a).
    alpha = rgba[..., 3:4].astype(np.uint16)
    return (255 - ((255 - rgba[..., :3]) * alpha + 127) // 255).astype(np.uint8)


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
