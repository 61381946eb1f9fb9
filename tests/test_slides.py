"""Whole-slide images (histoflow.data.slides) on real tissue: pyramidal tiled TIFFs written with tifffile from the
IDC patches of two patients, each patch at its file-name position on white glass (as the patches were cut from
their slides), read back through OpenSlide; the same mosaic as an Aperio SVS, a single-level TIFF, and a full-size
BreaKHis image as a small slide."""

from __future__ import annotations

import dataclasses
import re
import tracemalloc
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from conftest import BREAKHIS, IDC
from histoflow.data import slides as slides_module
from histoflow.data.images import read_image
from histoflow.data.quality import tissue_fraction
from histoflow.data.slides import (
    MASK_READ_SIDE,
    THUMBNAIL_SIDE,
    open_slide,
    read_tile,
    read_tiles,
    thumbnail_and_mask,
    tile_grid,
    tissue_mask,
)
from histoflow.errors import DataError

tifffile = pytest.importorskip("tifffile")

PATCH = 50
IDC_MPP = 4.0  # the IDC patches: 2.5x magnification, ~4 micrometres a pixel
POSITION = re.compile(r"_x(\d+)_y(\d+)_class(\d)")
# A full-size BreaKHis original (700 x 460, 200X, ductal carcinoma: tissue almost everywhere).
BREAKHIS_ORIGINAL = (BREAKHIS / "BreaKHis_v1/histology_slides/breast/malignant/SOB/ductal_carcinoma/SOB_M_DC_14-3909"
                     / "200X/SOB_M_DC-14-3909-200-018.png")
# A test value, not BreaKHis's: its resolution is not in the shared data's README (200X is often quoted as about
# 0.5 micrometres a pixel); the test only needs the slide to carry one.
BREAKHIS_TEST_MPP = 0.5


def shrunk(image: np.ndarray, down: int) -> np.ndarray:
    """The image a `down`-th of its size (box filter), at least a pixel a side."""
    if down == 1:
        return image
    return np.asarray(Image.fromarray(image).resize(
        (max(1, image.shape[1] // down), max(1, image.shape[0] // down)), Image.Resampling.BOX))


def write_pyramid(path: Path, image: np.ndarray, mpp: float | None, levels: int = 3) -> None:
    """A tiled pyramidal TIFF (each level a quarter of the one before), with resolution tags when mpp is given."""
    with tifffile.TiffWriter(path) as tiff:
        for level in range(levels):
            down = 4 ** level
            extra = {} if mpp is None else {"resolution": (1e4 / (mpp * down),) * 2, "resolutionunit": "CENTIMETER"}
            tiff.write(shrunk(image, down), tile=(128, 128), photometric="rgb", compression="deflate",
                       subfiletype=0 if level == 0 else 1, **extra)


def write_svs(path: Path, image: np.ndarray, mpp: float) -> None:
    """An Aperio SVS as OpenSlide's Aperio driver reads it (openslide.org/formats/aperio): a tiled TIFF whose first
    ImageDescription starts with "Aperio" and holds `|`-separated "key = value" pairs (MPP, AppMag); then a
    stripped thumbnail, the tiled lower levels, and a stripped label named on its description's second line.
    Deflate tiles (lossless; the driver takes any compression its libtiff has, Aperio's scanners write JPEG or
    JPEG 2000); no TIFF resolution tags, so the MPP can only come from the description."""
    height, width = image.shape[:2]
    description = (f"Aperio Image Library v12.0.15 \n{width}x{height} [0,0 {width}x{height}] (128x128) Deflate"
                   f"|AppMag = 2.5|MPP = {mpp:.4f}")
    tiled = {"tile": (128, 128), "photometric": "rgb", "compression": "deflate", "metadata": None}
    stripped = {"photometric": "rgb", "compression": "deflate", "metadata": None, "subfiletype": 1}
    with tifffile.TiffWriter(path) as tiff:
        tiff.write(image, description=description, **tiled)
        tiff.write(shrunk(image, 8), description="Aperio Image Library v12.0.15 \nthumbnail", **stripped)
        tiff.write(shrunk(image, 4), subfiletype=1, **tiled)
        tiff.write(np.full((100, 120, 3), 230, np.uint8), description="Aperio Image Library v12.0.15 \nlabel 120x100",
                   **stripped)


def mosaic(patients: list[str]) -> tuple[np.ndarray, dict[tuple[int, int], Path]]:
    """The patients' patches side by side (each patient's slide translated to start at a multiple of PATCH),
    white elsewhere; {(x, y): patch file} in the mosaic's pixels."""
    placed: dict[tuple[int, int], Path] = {}
    offset = 0
    for patient in patients:
        files = sorted((IDC / patient).glob("*/*.png"))
        positions = [tuple(map(int, POSITION.search(f.name).groups()[:2])) for f in files]
        x0, y0 = min(x for x, _ in positions), min(y for _, y in positions)
        for f, (x, y) in zip(files, positions, strict=True):
            placed[(offset + x - x0, y - y0)] = f
        offset = max(x for x, _ in placed) + 3 * PATCH
    width = max(x for x, _ in placed) + PATCH
    height = max(y for _, y in placed) + PATCH
    canvas = np.full((height, width, 3), 255, np.uint8)
    for (x, y), f in placed.items():
        canvas[y:y + PATCH, x:x + PATCH] = read_image(str(f))
    return canvas, placed


@pytest.fixture(scope="module")
def idc_slide(tmp_path_factory):
    patients = sorted(p.name for p in IDC.iterdir() if p.is_dir())[:2]
    canvas, placed = mosaic(patients)
    path = tmp_path_factory.mktemp("slides") / "idc-mosaic.tiff"
    write_pyramid(path, canvas, IDC_MPP)
    return path, canvas, placed


def assert_the_grid_recovers_the_patches(slide, placed: dict[tuple[int, int], Path]) -> None:
    grid = tile_grid(slide, PATCH, IDC_MPP, min_tissue=0.25)
    tiles = set(zip(grid["x"], grid["y"], strict=True))
    # Every tile lies on a patch: none is read from the glass between them.
    assert tiles and tiles <= set(placed), sorted(tiles - set(placed))[:5]
    # Every patch that is mostly tissue is a tile.
    stained = {xy for xy, f in placed.items() if tissue_fraction(read_image(str(f))) >= 0.5}
    assert stained <= tiles, sorted(stained - tiles)[:5]
    for x, y in sorted(tiles)[:10]:
        np.testing.assert_array_equal(read_tile(slide, x, y, PATCH, PATCH), read_image(str(placed[(x, y)])))
    batches = list(read_tiles(slide, grid, PATCH, batch=16))
    assert sum(len(rows) for rows, _ in batches) == len(grid) and max(len(rows) for rows, _ in batches) <= 16


def test_the_tile_grid_recovers_the_patches_pixel_for_pixel(idc_slide):
    path, canvas, placed = idc_slide
    with open_slide(path) as slide:
        assert (slide.width, slide.height, slide.mpp) == (canvas.shape[1], canvas.shape[0], IDC_MPP)
        assert_the_grid_recovers_the_patches(slide, placed)


def test_an_aperio_svs_gives_its_vendor_its_description_s_mpp_and_the_patches(idc_slide, tmp_path):
    """The IDC mosaic written as an Aperio SVS (write_svs): OpenSlide's Aperio driver opens it, the resolution is
    the description's MPP, and the grid recovers the patches as from the generic TIFF."""
    _, canvas, placed = idc_slide
    path = tmp_path / "idc-mosaic.svs"
    write_svs(path, canvas, IDC_MPP)
    with open_slide(path) as slide:
        properties = slide.handle.properties
        assert properties["openslide.vendor"] == "aperio" and properties["aperio.MPP"] == f"{IDC_MPP:.4f}"
        assert (slide.width, slide.height, slide.mpp) == (canvas.shape[1], canvas.shape[0], IDC_MPP)
        # The stripped pages are associated images, not levels.
        assert slide.handle.level_count == 2 and set(slide.handle.associated_images) == {"thumbnail", "label"}
        assert_the_grid_recovers_the_patches(slide, placed)


def test_a_breakhis_image_as_a_small_slide_is_tissue_and_its_tiles_are_its_pixels(tmp_path):
    """A full-size BreaKHis original (700 x 460) as a two-level pyramid at a test resolution: the slide has that
    mpp, most of the grid is tissue, and the level-0 tiles are the image's pixels and cover it."""
    image = read_image(str(BREAKHIS_ORIGINAL))
    assert image.shape == (460, 700, 3)
    path = tmp_path / "breakhis.tiff"
    write_pyramid(path, image, BREAKHIS_TEST_MPP, levels=2)
    with open_slide(path) as slide:
        assert (slide.width, slide.height, slide.mpp) == (700, 460, BREAKHIS_TEST_MPP)
        # 100-px tiles at level 0: 7 x 4 positions. Without glass, Otsu's cut falls inside the tissue (the mask
        # covers 58 % of this image, quality.tissue_fraction finds 77 %), but a tile needs only 25 % of mask.
        grid = tile_grid(slide, 100, BREAKHIS_TEST_MPP)
        assert len(grid) >= 0.9 * 7 * 4
        np.testing.assert_array_equal(read_tile(slide, 0, 0, 100, 100), image[:100, :100])
        # Tiles of 20 px (the sides' common divisor) at any tissue: they reach both edges, and put back they are
        # the image wherever they are.
        side = 20
        fine = tile_grid(slide, side, BREAKHIS_TEST_MPP, min_tissue=0.0)
        assert (fine["x"].max() + side, fine["y"].max() + side) == (700, 460)
        assert len(fine) >= 0.95 * (700 // side) * (460 // side)
        for rows, tiles in read_tiles(slide, fine, side, batch=256):
            for x, y, tile in zip(rows["x"], rows["y"], tiles, strict=True):
                np.testing.assert_array_equal(tile, image[y:y + side, x:x + side])


def test_a_slide_with_only_level_0_gets_its_mask_without_reading_the_level_whole(tmp_path):
    """A 6,000-px single-level TIFF (no pyramid: the mask's level is the slide), white glass with an island of
    IDC patches: the mask is read in regions of at most MASK_READ_SIDE + 1 pixels a side, its Python memory stays
    far below the level's RGBA, and the island's patches are the grid."""
    side = 6000
    files = sorted(IDC.glob("*/1/*.png"))[:100]
    canvas = np.full((side, side, 3), 255, np.uint8)
    island = {}
    for i, f in enumerate(files):  # 10 x 10 patches at (2500, 3000)
        x, y = 2500 + (i % 10) * PATCH, 3000 + (i // 10) * PATCH
        patch = read_image(str(f))
        canvas[y:y + patch.shape[0], x:x + patch.shape[1]] = patch
        island[(x, y)] = f
    path = tmp_path / "flat.tiff"
    write_pyramid(path, canvas, IDC_MPP, levels=1)
    del canvas
    with open_slide(path) as slide:
        assert slide.handle.level_count == 1
        reads = []
        original = slide.handle.read_region
        slide.handle.read_region = lambda *a: (reads.append(a[1:]), original(*a))[1]
        tracemalloc.start()
        try:
            _, mask, downsample = thumbnail_and_mask(slide)
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        slide.handle.read_region = original
        assert {level for level, _ in reads} == {0}
        assert max(max(size) for _, size in reads) <= MASK_READ_SIDE + 1
        # OpenSlide's own buffers are not traced (a read's size is bounded above), numpy's are: a byte a level
        # pixel at most, a quarter of the level's RGBA (the thumbnail's bytes: about 22 MiB).
        assert peak < side * side, f"{peak / 2**20:.0f} MiB"
        grid = tile_grid(slide, PATCH, IDC_MPP, mask=(mask, downsample))
        tiles = set(zip(grid["x"], grid["y"], strict=True))
        stained = {xy for xy, f in island.items() if tissue_fraction(read_image(str(f))) >= 0.5}
        assert stained <= tiles <= set(island), (sorted(stained - tiles)[:5], sorted(tiles - set(island))[:5])


def test_the_mask_is_the_same_whichever_regions_it_is_read_in(idc_slide, monkeypatch):
    """The thumbnail read in regions of 97 pixels is the one read in regions of MASK_READ_SIDE and Pillow's
    thumbnail (box filter) of the whole level, read at once, and so is the mask."""
    path, _, _ = idc_slide
    with open_slide(path) as slide:
        thumbnail, mask, downsample = thumbnail_and_mask(slide)
        monkeypatch.setattr(slides_module, "MASK_READ_SIDE", 97)
        small_reads = thumbnail_and_mask(slide)
        whole = slide.handle.read_region((0, 0), 0, (slide.width, slide.height))  # 3,200 px: the mask's level
    whole.thumbnail((THUMBNAIL_SIDE, THUMBNAIL_SIDE), Image.Resampling.BOX)
    np.testing.assert_array_equal(thumbnail, np.asarray(whole)[..., :3])
    np.testing.assert_array_equal(small_reads[0], thumbnail)
    np.testing.assert_array_equal(small_reads[1], mask)
    assert small_reads[2] == downsample


def test_tiles_at_a_coarser_resolution_are_read_from_the_pyramid_and_resized(idc_slide):
    path, canvas, _ = idc_slide
    with open_slide(path) as slide:
        grid = tile_grid(slide, PATCH, IDC_MPP * 4, min_tissue=0.1)  # 200 level-0 pixels a tile
        assert (grid["size"] == 4 * PATCH).all() and len(grid)
        x, y = int(grid["x"].iloc[0]), int(grid["y"].iloc[0])
        reads = []
        original = slide.handle.read_region
        slide.handle.read_region = lambda *a: (reads.append(a[1:]), original(*a))[1]
        tile = read_tile(slide, x, y, 4 * PATCH, PATCH)
        assert reads == [(1, (PATCH, PATCH))]  # 50 x 50 pixels of level 1, not 200 x 200 of level 0
        assert tile.shape == (PATCH, PATCH, 3)
        expected = np.asarray(Image.fromarray(canvas[y:y + 4 * PATCH, x:x + 4 * PATCH]).resize(
            (PATCH, PATCH), Image.Resampling.BOX), dtype=np.float32)
        assert np.abs(tile.astype(np.float32) - expected).mean() < 3  # read from the 4x level


def test_overlap_and_the_resolution_set_the_grid(idc_slide):
    path, _, _ = idc_slide
    with open_slide(path, mpp=2.0) as slide:  # mpp overrides the metadata
        assert slide.mpp == 2.0
        grid = tile_grid(slide, PATCH, IDC_MPP, overlap=0.5, min_tissue=0.25)
        assert (grid["size"] == 2 * PATCH).all()
        steps = np.diff(np.unique(grid["x"]))
        assert steps.min() == PATCH  # half of a 100-pixel tile


def test_a_slide_without_tissue_has_no_tiles(tmp_path):
    path = tmp_path / "blank.tiff"
    write_pyramid(path, np.full((600, 800, 3), 245, np.uint8), 0.5)
    with open_slide(path) as slide:
        mask, _ = tissue_mask(slide)
        assert not mask.any()
        assert tile_grid(slide, 64, 0.5).empty


def test_bad_slides_are_refused_with_a_reason(tmp_path, idc_slide):
    unresolved = tmp_path / "no-resolution.tiff"
    write_pyramid(unresolved, np.full((300, 300, 3), 200, np.uint8), None)
    with pytest.raises(DataError, match="no resolution metadata .*give .* mpp"):
        open_slide(unresolved)
    assert open_slide(unresolved, mpp=0.25).mpp == 0.25
    text = tmp_path / "notes.txt"
    text.write_text("not a slide")
    with pytest.raises(DataError, match="not a whole-slide image"):
        open_slide(text)
    truncated = tmp_path / "truncated.tiff"
    truncated.write_bytes(idc_slide[0].read_bytes()[:2000])
    with pytest.raises(DataError, match="truncated|not a whole-slide image"):
        open_slide(truncated)
    with pytest.raises(DataError, match="no such slide"):
        open_slide(tmp_path / "missing.svs")
    with open_slide(idc_slide[0]) as slide, pytest.raises(DataError, match="tile_px > 0"):
        tile_grid(slide, 0, 1.0)


def test_a_slide_s_tiles_get_the_predictions_of_the_same_patches(idc_slide, classifier):
    """Per-tile probabilities, labels and flags equal the served model's predict on the patch files the tiles
    cover (the same pixels), and so the tile-level ROC AUC equals the patch-level AUC of those patches."""
    import mlflow
    import pandas as pd
    from sklearn.metrics import roc_auc_score

    from histoflow.serving.requests import encode_file
    from histoflow.serving.slide_scoring import score_slide

    path, _, placed = idc_slide
    model = mlflow.pyfunc.load_model(classifier[0])
    with open_slide(path) as slide:
        tiles = score_slide(slide, model, PATCH, IDC_MPP, batch=8)
    assert len(tiles) and not tiles["positive_probability"].isna().any()
    files = [placed[(x, y)] for x, y in zip(tiles["x"], tiles["y"], strict=True)]
    patches = model.predict(pd.DataFrame({"image": [encode_file(f) for f in files]}))
    np.testing.assert_allclose(tiles["positive_probability"], patches["positive_probability"], atol=1e-6)
    assert tiles["label"].tolist() == patches["label"].tolist()
    assert tiles["flags"].tolist() == patches["flags"].tolist()
    truth = [int(POSITION.search(f.name).group(3)) for f in files]
    assert set(truth) == {0, 1}  # the mosaic holds both classes: the AUC is defined
    assert roc_auc_score(truth, tiles["positive_probability"]) == pytest.approx(
        roc_auc_score(truth, patches["positive_probability"]), abs=1e-9)


def test_a_slide_without_tissue_scores_to_an_empty_table(tmp_path, classifier):
    import mlflow

    from histoflow.serving.slide_scoring import MODEL_COLUMNS, TILE_COLUMNS, score_slide

    path = tmp_path / "blank.tiff"
    write_pyramid(path, np.full((400, 400, 3), 250, np.uint8), 0.5)
    with open_slide(path) as slide:
        table = score_slide(slide, mlflow.pyfunc.load_model(classifier[0]), 64, 0.5)
    assert table.empty and list(table.columns) == TILE_COLUMNS + MODEL_COLUMNS


def test_a_tile_that_cannot_be_read_is_flagged_and_the_others_are_scored(idc_slide, classifier, tmp_path):
    """A level-0 tile of the TIFF whose compressed bytes are damaged: OpenSlide fails on the tiles over it, those
    are flagged read_error (no probability), every other tile gets its score."""
    import mlflow

    from histoflow.serving.slide_scoring import READ_ERROR_FLAG, score_slide

    path, _, placed = idc_slide
    damaged = tmp_path / "damaged.tiff"
    data = bytearray(path.read_bytes())
    with tifffile.TiffFile(path) as tiff:
        page = tiff.pages[0]
        tiles_across = -(-page.imagewidth // page.tilewidth)
        x, y = sorted(placed)[len(placed) // 2]
        index = (y // page.tilelength) * tiles_across + x // page.tilewidth
        offset, count = page.dataoffsets[index], page.databytecounts[index]
    data[offset:offset + count] = bytes(count)  # zeros: not a deflate stream
    damaged.write_bytes(bytes(data))
    model = mlflow.pyfunc.load_model(classifier[0])
    with open_slide(damaged) as slide:
        table = score_slide(slide, model, PATCH, IDC_MPP, batch=8)
    with open_slide(path) as slide:
        intact = score_slide(slide, model, PATCH, IDC_MPP, batch=8)
    failed = table["flags"] == READ_ERROR_FLAG
    assert failed.any() and table.loc[failed, "positive_probability"].isna().all()
    assert (x, y) in set(zip(table.loc[failed, "x"], table.loc[failed, "y"], strict=True))
    # The tissue mask came from the next level (level 0 holds the damage): the grid may differ at its edges.
    both = table[~failed].merge(intact, on=["x", "y"], suffixes=("", "_intact"))
    assert len(both) >= len(table) - failed.sum() - 5
    np.testing.assert_allclose(both["positive_probability"], both["positive_probability_intact"], atol=1e-6)


def test_flagged_tiles_count_for_nothing_in_the_top_tiles_the_regions_or_the_call():
    """The most positive tile is flagged (its image is one the model cannot be trusted on) and another unread:
    the top tiles, the GeoJSON's positive regions and the slide's call are made of the scored tiles only."""
    from histoflow.modeling.screening import INDETERMINATE
    from histoflow.serving.slide_predict import geojson, most_positive, slide_call
    from histoflow.serving.slide_scoring import READ_ERROR_FLAG

    tiles = pd.DataFrame({"x": [0, 50, 100, 150, 200], "y": 0, "size": 50,
                          "positive_probability": [0.99, 0.8, 0.7, 0.2, np.nan],
                          "label": [INDETERMINATE, "malignant", "malignant", "benign", np.nan],
                          "model_label": ["malignant", "malignant", "malignant", "benign", np.nan],
                          "flags": ["out_of_focus", "", "", "", READ_ERROR_FLAG]})
    assert most_positive(tiles, 2)["x"].tolist() == [50, 100]
    assert most_positive(tiles)["x"].tolist() == [50, 100, 150]
    regions = [f for f in geojson(tiles, 0.5, "malignant")["features"] if f["properties"]["objectType"] == "annotation"]
    assert len(regions) == 1  # the two scored positive tiles side by side; the flagged one beside them left out
    xs = [x for ring in regions[0]["geometry"]["coordinates"] for x, _ in ring]
    assert (min(xs), max(xs)) == (50, 150)
    assert slide_call(tiles, ["benign", "malignant"], 0.5) == ("malignant", pytest.approx(2 / 3))
    assert slide_call(tiles, ["benign", "malignant"], 0.7) == ("benign", pytest.approx(2 / 3))


def test_predict_slide_writes_the_tiles_heatmap_geojson_and_summary_of_each_slide(idc_slide, classifier, tmp_path):
    """`histoflow predict-slide` on a folder holding the IDC mosaic and a file that is not a slide: the mosaic's
    outputs (its tiles, a GeoJSON whose regions cover every scored tile at or above the threshold, a heatmap, a summary
    with the call), the other file reported in summary.csv; a second run into the same folder is refused unless
    overwrite=true."""
    import json as json_

    from shapely.geometry import Point, shape

    from conftest import run_cli, sqlite_store
    from histoflow.data.slides import tile_grid as grid_of

    path, _, _ = idc_slide
    folder = tmp_path / "slides"
    folder.mkdir()
    (folder / path.name).symlink_to(path)
    (folder / "broken.svs").write_text("not a slide")
    out = tmp_path / "out"
    args = ["predict-slide", "--slides", str(folder), "--model_uri", classifier[0], "--output_dir", str(out),
            "--tile_px", str(PATCH), "--mpp", str(IDC_MPP), "--batch", "8"]
    (tmp_path / "store").mkdir()
    with sqlite_store(tmp_path / "store") as uri:
        done = run_cli(*args, env={"MLFLOW_TRACKING_URI": uri}, cwd=tmp_path)
        assert done.returncode == 0, done.stderr[-3000:]
        slides = pd.read_csv(out / "summary.csv")
        assert slides.loc[slides["slide"].str.endswith("broken.svs"), "problem"].str.contains(
            "not a whole-slide image").all()
        result = out / path.stem
        tiles = pd.read_csv(result / "tiles.csv")
        with open_slide(path) as slide:
            assert len(tiles) == len(grid_of(slide, PATCH, IDC_MPP))
        summary = json_.loads((result / "summary.json").read_text())
        assert summary["tiles"] == len(tiles) and summary["call"] in ("benign", "malignant", "indeterminate")
        assert summary["tissue_area_mm2"] > 0 and 0 <= summary["positive_share"] <= 1
        features = json_.loads((result / "tiles.geojson").read_text())["features"]
        assert sum(f["properties"]["objectType"] == "tile" for f in features) == len(tiles)
        regions = [shape(f["geometry"]) for f in features if f["properties"]["objectType"] == "annotation"]
        scored = tiles["label"].isin(["benign", "malignant"])  # neither flagged nor unread
        hot = scored & (tiles["positive_probability"] >= summary["threshold"])
        assert all(r.is_valid for r in regions)
        for (x, y, size), is_hot in zip(tiles[["x", "y", "size"]].itertuples(index=False), hot, strict=True):
            inside = any(r.contains(Point(x + size / 2, y + size / 2)) for r in regions)
            assert inside == is_hot, (x, y)  # every positive tile in a region, no other tile
        assert sum(r.area for r in regions) == pytest.approx(float((tiles.loc[hot, "size"] ** 2).sum()))
        shown = np.asarray(Image.open(result / "heatmap.png").convert("RGB")).astype(int)
        assert shown.shape[1] > 500 and (result / "top_tiles.png").is_file()
        # The flagged tiles (IDC's 50-px patches are out of focus for this model) in blue, which neither the
        # stains nor the heat map's colours hold; not drawn where all tiles were scored.
        assert (~scored).any()
        blue = (shown[..., 2] > shown[..., 0] + 60) & (shown[..., 1] > shown[..., 0] + 30)
        assert blue.sum() > (~scored).sum() * 10
        again = run_cli(*args, env={"MLFLOW_TRACKING_URI": uri}, cwd=tmp_path)
        assert again.returncode != 0 and "overwrite=true" in again.stderr
        assert run_cli(*args, "--overwrite", "true", env={"MLFLOW_TRACKING_URI": uri}, cwd=tmp_path).returncode == 0


def test_labelled_slides_give_slide_and_patient_metrics_with_intervals(classifier, tracking_uri, tmp_path):
    """A folder of four slides (each one patient's patches of one class) with slides.csv: metrics.json holds the
    slide-level AUC of the slides' scores and the calls' balanced accuracy, with bootstrap intervals around them,
    and the patient-level accuracy; a label that is not one of the model's classes is refused."""
    import json as json_

    from sklearn.metrics import balanced_accuracy_score, roc_auc_score

    from histoflow.serving.settings import SlideConfig
    from histoflow.serving.slide_predict import run, slide_scores

    folder = tmp_path / "labelled"
    folder.mkdir()
    rows = []
    for patient in sorted(p.name for p in IDC.iterdir() if p.is_dir())[:2]:
        for cls, label in (("0", "benign"), ("1", "malignant")):
            files = sorted((IDC / patient / cls).glob("*.png"))[:16]
            canvas = np.full((4 * PATCH, 4 * PATCH, 3), 255, np.uint8)
            for i, f in enumerate(files):
                image = read_image(str(f))[:PATCH, :PATCH]
                canvas[(i // 4) * PATCH:(i // 4) * PATCH + image.shape[0],
                       (i % 4) * PATCH:(i % 4) * PATCH + image.shape[1]] = image
            name = f"{patient}-{label}.tiff"
            write_pyramid(folder / name, canvas, IDC_MPP, levels=1)
            rows.append({"slide": name, "patient": patient, "label": label})
    pd.DataFrame(rows).to_csv(folder / "slides.csv", index=False)
    config = SlideConfig(slides=str(folder), model_uri=classifier[0], output_dir=str(tmp_path / "out"),
                         tile_px=PATCH, mpp=IDC_MPP, positive_share=0.2, batch=16)
    summary = run(config)
    metrics = json_.loads((tmp_path / "out" / "metrics.json").read_text())
    assert metrics["labelled_slides"] == 4
    scored = summary[summary["call"] != "indeterminate"]
    truth = [int(row["label"] == "malignant") for row in rows
             if row["slide"] in {Path(s).name for s in scored["slide"]}]
    calls = (scored["call"] == "malignant").astype(int)
    assert metrics["slide_balanced_accuracy"] == pytest.approx(balanced_accuracy_score(truth, calls))
    if len(set(truth)) == 2:
        assert metrics["slide_roc_auc"] == pytest.approx(roc_auc_score(truth, slide_scores(scored)))
    for name in ("roc_auc", "balanced_accuracy"):
        low, high = metrics[f"slide_{name}_ci_low"], metrics[f"slide_{name}_ci_high"]
        assert not np.isfinite(low) or low <= metrics[f"slide_{name}"] + 1e-9 <= high + 2e-9
    assert 0 <= metrics["patient_accuracy"] <= 1 and metrics["patients"] == 2
    pd.DataFrame(rows).assign(label="tumour").to_csv(folder / "slides.csv", index=False)
    with pytest.raises(DataError, match="labels must be the model's classes"):
        run(dataclasses.replace(config, output_dir=str(tmp_path / "again")))


def test_the_training_resolution_travels_from_the_data_setting_to_predict_slide(idc_slide, tiny_store, classifier,
                                                                               tmp_path, caplog):
    """The tiny augmented CNN was trained on BreaKHis with mpp 0.5 (a test value): its run logs the field of view of
    its training images, its served model the resolution of its input, and predict-slide cuts tiles at that
    resolution unless told otherwise. The baseline, trained without mpp, cuts at the slide's level 0 and warns."""
    import mlflow

    from histoflow.registry.selection import classifier_uri, run_split
    from histoflow.serving.settings import SlideConfig
    from histoflow.serving.slide_predict import predict_slide

    _, uri, runs = tiny_store
    mlflow.set_tracking_uri(uri)
    run = mlflow.get_run(runs["augmented"])
    _, split, _ = run_split(run)
    sides = [np.sqrt(np.prod(Image.open(p).size)) for p in split.loc[split["split"] == "train", "path"]]
    field = 0.5 * float(np.median(sides))
    assert float(run.data.params["field_um"]) == pytest.approx(field, abs=1e-3)
    assert field == 0.5 * 224  # most of the shared BreaKHis images are 224x224 (resized from 700x460 originals)
    model = mlflow.pyfunc.load_model(classifier_uri(run))
    assert model.metadata.metadata["input_mpp"] == pytest.approx(field / 32)  # 32 px: the tiny models' input
    path, _, _ = idc_slide
    summary = predict_slide(path, model, SlideConfig(slides=str(path)), tmp_path / "model")
    assert (summary["tile_px"], summary["tile_mpp_source"]) == (32, "model")
    assert summary["tile_mpp"] == pytest.approx(field / 32)
    with open_slide(path) as slide:
        size = round(32 * field / 32 / IDC_MPP)  # level-0 pixels a tile: the training image's field of view
        assert len(pd.read_csv(tmp_path / "model" / "tiles.csv")) == len(tile_grid(slide, 32, field / 32))
        assert set(pd.read_csv(tmp_path / "model" / "tiles.csv")["size"]) == {size}
    given = predict_slide(path, model, SlideConfig(slides=str(path), mpp=IDC_MPP), tmp_path / "given")
    assert (given["tile_mpp"], given["tile_mpp_source"]) == (IDC_MPP, "mpp")
    baseline = mlflow.pyfunc.load_model(classifier[0])
    with caplog.at_level("WARNING"):
        unknown = predict_slide(path, baseline, SlideConfig(slides=str(path)), tmp_path / "unknown")
    assert (unknown["tile_mpp"], unknown["tile_mpp_source"]) == (IDC_MPP, "slide level 0")
    assert "records no training resolution" in caplog.text
