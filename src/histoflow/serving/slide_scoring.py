"""A whole slide scored tile by tile with a served model: its tissue tiles (histoflow.data.slides) streamed in
batches through the model's own preprocessing, stain normalisation, calibration and screening, one batch in
memory at a time. The result is the per-tile table: level-0 x, y, size, tissue share, and the model's columns
(label, model_label, positive_probability, threshold, flags); a tile that could not be read is flagged
`read_error` and not scored."""

from __future__ import annotations

import io
from collections.abc import Callable

import numpy as np
import pandas as pd
from PIL import Image

from histoflow.data.slides import Slide, read_tiles, tile_grid
from histoflow.progress import progress

READ_ERROR_FLAG = "read_error"
TILE_COLUMNS = ["x", "y", "size", "tissue"]
MODEL_COLUMNS = ["label", "model_label", "positive_class", "positive_probability", "threshold", "flags"]


def _scorer(model):
    """decoded tiles -> the model's rows: the served classifier's own method, or (a model logged before it had
    one) its predict on PNG bytes."""
    served = model.unwrap_python_model()
    if hasattr(served, "score_arrays"):
        return served.score_arrays

    def through_predict(images: list[np.ndarray]) -> pd.DataFrame:
        files = []
        for image in images:
            buffer = io.BytesIO()
            Image.fromarray(image).save(buffer, format="PNG")
            files.append(buffer.getvalue())
        return model.predict(pd.DataFrame({"image": files}))

    return through_predict


def score_slide(slide: Slide, model, tile_px: int, mpp: float, overlap: float = 0.0, min_tissue: float = 0.25,
                batch: int = 64, mask: tuple[np.ndarray, float] | None = None,
                on_batch: Callable[[int, int], None] | None = None) -> pd.DataFrame:
    """The per-tile table of a slide (see the module's docstring); empty, with its columns, for a slide without
    tissue. `model`: a loaded histoflow pyfunc; `mask`: the slide's tissue_mask when the caller has it; `on_batch`:
    called with (batches done, batches) after each, for a caller's own progress display (the page's)."""
    grid = tile_grid(slide, tile_px, mpp, overlap, min_tissue, mask=mask)
    score = _scorer(model)
    parts = []
    total = -(-len(grid) // batch)
    batches = read_tiles(slide, grid, tile_px, batch)
    for done, (rows, images) in enumerate(progress(batches, total=total, desc=f"scoring {slide.path}",
                                                   unit="batch"), start=1):
        read = [i for i, image in enumerate(images) if image is not None]
        scored = pd.DataFrame(index=range(len(rows)), columns=MODEL_COLUMNS)
        if read:
            rows_scored = score([images[i] for i in read]).reset_index(drop=True)
            scored.loc[read, MODEL_COLUMNS] = rows_scored[MODEL_COLUMNS].to_numpy()
        failed = [i for i, image in enumerate(images) if image is None]
        scored.loc[failed, "flags"] = READ_ERROR_FLAG
        parts.append(pd.concat([rows.reset_index(drop=True), scored], axis=1))
        if on_batch:
            on_batch(done, total)
    if not parts:
        return pd.DataFrame(columns=TILE_COLUMNS + MODEL_COLUMNS)
    table = pd.concat(parts, ignore_index=True)
    return table.astype({"positive_probability": float, "threshold": float})
