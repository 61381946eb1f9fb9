"""Whole-slide scoring at scale: a synthetic 100,000 x 100,000-pixel pyramidal TIFF, white glass with a few islands
of real tissue (IDC patches tiled into squares), scored by `predict-slide`'s scoring (histoflow.serving.slide_scoring)
with a served model; against the same tiles scored as a folder of images (`predict`'s way: PNG files, base64,
decoded again) in the same run.

Reported: the slide's size, tissue tiles, seconds and tiles/s of each way, and the peak RSS of the process that
scores the slide (VmHWM, read in a child process that does only that; also its VmHWM once the model is loaded,
before the slide is opened), against a small slide with the same islands: memory and time follow the tissue, not
the slide. A third slide has only level 0 (no pyramid, as some exports and scanners write): its tissue mask must
not read that level whole.

    python bench/slide_scale.py --side 100000 --islands 4 --flat_side 20000
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_store import absolute, temporary_store  # noqa: E402

TILE = 512  # the TIFF's own tiles
PATCH = 50
MPP = 4.0
ISLAND = 20  # patches a side: 1,000 x 1,000 pixels of tissue an island


def island(patches: list[Path], rng: np.random.Generator) -> np.ndarray:
    from histoflow.data.images import read_image

    side = ISLAND * PATCH
    block = np.full((side, side, 3), 255, np.uint8)
    for row in range(ISLAND):
        for col in range(ISLAND):
            image = read_image(str(patches[rng.integers(len(patches))]))[:PATCH, :PATCH]
            block[row * PATCH:row * PATCH + image.shape[0], col * PATCH:col * PATCH + image.shape[1]] = image
    return block


def write_slide(path: Path, side: int, islands: dict[tuple[int, int], np.ndarray], flat: bool = False) -> None:
    """A pyramid (each level a quarter; only level 0 when flat) written tile by tile: only the tiles over islands
    hold anything but white."""
    import tifffile

    def tiles(level_side: int, down: int):
        white = np.full((TILE, TILE, 3), 255, np.uint8)
        for y in range(0, level_side, TILE):
            for x in range(0, level_side, TILE):
                tile = white
                for (ix, iy), block in islands.items():
                    bx, by, bs = ix // down, iy // down, block.shape[0] // down
                    if bx < x + TILE and bx + bs > x and by < y + TILE and by + bs > y:
                        if tile is white:
                            tile = white.copy()
                        small = block[::down, ::down][:bs, :bs]
                        top, left = max(by, y), max(bx, x)
                        bottom, right = min(by + bs, y + TILE), min(bx + bs, x + TILE)
                        tile[top - y:bottom - y, left - x:right - x] = small[top - by:bottom - by, left - bx:right - bx]
                yield tile

    with tifffile.TiffWriter(path, bigtiff=True) as tiff:
        level, down = 0, 1
        while side // down >= TILE and not (flat and level):
            level_side = side // down
            tiff.write(tiles(level_side, down), shape=(level_side, level_side, 3), dtype=np.uint8,
                       tile=(TILE, TILE), photometric="rgb", compression="deflate",
                       resolution=(1e4 / (MPP * down),) * 2, resolutionunit="CENTIMETER",
                       subfiletype=0 if level == 0 else 1)
            level, down = level + 1, down * 4


def score_in_child(slide: Path, model_uri: str) -> dict:
    """Score the slide in a child process; its seconds, tiles, and peak RSS once the model is loaded and at the end.
    VmHWM, not ru_maxrss: Linux carries a process's ru_maxrss across fork and exec, so a child's would be at least
    this process's RSS when it started the child (TensorFlow and the model built: about 1 GiB)."""
    code = (
        "import json, sys, time, mlflow\n"
        "from histoflow.data.slides import open_slide\n"
        "from histoflow.serving.slide_scoring import score_slide\n"
        "def peak():\n"
        "    return next(int(l.split()[1]) / 1024 for l in open('/proc/self/status') if l.startswith('VmHWM'))\n"
        f"model = mlflow.pyfunc.load_model({model_uri!r})\n"
        "loaded = peak()\n"
        "t = time.perf_counter()\n"
        f"with open_slide({str(slide)!r}) as s:\n"
        f"    tiles = score_slide(s, model, {PATCH}, {MPP}, batch=64)\n"
        "print(json.dumps({'seconds': time.perf_counter() - t, 'tiles': len(tiles), "
        "'loaded_mib': loaded, 'rss_mib': peak()}))\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    import json

    return json.loads(done.stdout.strip().splitlines()[-1])


def score_as_folder(slide: Path, model_uri: str, folder: Path) -> dict:
    """The same tiles written as PNG files and scored as predict scores a folder."""
    import mlflow
    import pandas as pd
    from PIL import Image

    from histoflow.data.slides import open_slide, read_tiles, tile_grid
    from histoflow.serving.requests import MAX_IMAGES_PER_REQUEST, encode_file

    folder.mkdir()
    with open_slide(slide) as s:
        grid = tile_grid(s, PATCH, MPP)
        paths = []
        for rows, images in read_tiles(s, grid, PATCH):
            for (x, y), image in zip(rows[["x", "y"]].itertuples(index=False), images, strict=True):
                paths.append(folder / f"tile_x{x}_y{y}.png")
                Image.fromarray(image).save(paths[-1])
    model = mlflow.pyfunc.load_model(model_uri)
    began = time.perf_counter()
    for start in range(0, len(paths), MAX_IMAGES_PER_REQUEST):
        model.predict(pd.DataFrame({"image": [encode_file(p) for p in paths[start:start + MAX_IMAGES_PER_REQUEST]]}))
    return {"seconds": time.perf_counter() - began, "tiles": len(paths)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data_dir", default="../shared/data/idc")
    parser.add_argument("--side", type=int, default=100_000)
    parser.add_argument("--islands", type=int, default=4)
    parser.add_argument("--flat_side", type=int, default=20_000, help="the single-level slide's side; 0: none")
    args = parser.parse_args()
    data_dir = Path(absolute(args.data_dir))
    tmp = temporary_store("histoflow-bench-slides-")
    import mlflow

    from histoflow.modeling.architectures import build_baseline
    from histoflow.serving.packaging import log_classifier

    patches = sorted(data_dir.glob("*/*/*.png"))
    rng = np.random.default_rng(0)
    blocks = [island(patches, rng) for _ in range(args.islands)]
    build_baseline(64).save(tmp / "baseline.keras")
    with mlflow.start_run():
        uri = log_classifier([tmp / "baseline.keras"], ["non-IDC", "IDC"], 64, str(patches[0])).model_uri
    model_dir = mlflow.artifacts.download_artifacts(uri, dst_path=str(tmp / "model"))
    rows = []
    slides = [("small", ISLAND * PATCH * (args.islands + 1) * 2, False), ("large", args.side, False)]
    for name, side, flat in slides + ([("level 0 only", args.flat_side, True)] if args.flat_side else []):
        step = side // (args.islands + 1)
        placed = {((i + 1) * step // TILE * TILE, (i + 1) * step // TILE * TILE): block
                  for i, block in enumerate(blocks)}
        path = tmp / f"{name.replace(' ', '-')}.tiff"
        began = time.perf_counter()
        write_slide(path, side, placed, flat)
        print(f"{name}: {side:,} px a side written in {time.perf_counter() - began:.0f} s "
              f"({path.stat().st_size / 2**20:.0f} MiB)", flush=True)
        slide = score_in_child(path, model_dir)
        print(f"{name}: slide {slide}", flush=True)
        folder = score_as_folder(path, model_dir, tmp / f"{path.stem}-tiles")
        print(f"{name}: folder {folder}", flush=True)
        rows.append((name, side, slide, folder))
    print("\nbaseline CNN at 64 px, 50-px tiles at 4 um, islands of 20 x 20 IDC patches on white glass")
    print("| slide | side px | tissue tiles | slide s | slide tiles/s | model loaded MiB | peak RSS MiB | folder s "
          "| folder tiles/s | slide ÷ folder tiles/s |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for name, side, slide, folder in rows:
        ours, theirs = slide["tiles"] / slide["seconds"], folder["tiles"] / folder["seconds"]
        print(f"| {name} | {side:,} | {slide['tiles']:,} | {slide['seconds']:.1f} | {ours:.0f} | "
              f"{slide['loaded_mib']:.0f} | {slide['rss_mib']:.0f} | {folder['seconds']:.1f} | {theirs:.0f} | "
              f"{ours / theirs:.2f} |")


if __name__ == "__main__":
    main()
