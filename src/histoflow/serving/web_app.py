"""The pathologist's page (`histoflow app`): upload images, see each one's call, probability, flags and
Grad-CAM overlay, a per-patient summary, and download the results as CSV.

Built with Gradio. The page scores through the registered model in-process (`model_uri`, default
models:/histoflow@champion) or through a running scoring server (`scoring_url`, e.g. the Cloud Run
service), always with `explain`. Every file is checked on its own before scoring: one that is not an
image, is corrupt or too large gets its message in its row, and the others are scored.
"""

from __future__ import annotations

import base64
import io
import logging
import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from histoflow import tracking
from histoflow.data.discovery import patient_from_name
from histoflow.data.images import MAX_PIXELS, decode_image
from histoflow.data.slides import SLIDE_EXTENSIONS
from histoflow.errors import ConfigError, DataError, HistoflowError, ImageDecodeError
from histoflow.modeling.metrics import patient_table
from histoflow.modeling.screening import INDETERMINATE
from histoflow.serving.requests import INPUT_COLUMN, MAX_IMAGES_PER_REQUEST, MAX_REQUEST_CHARS
from histoflow.serving.settings import AppConfig

log = logging.getLogger(__name__)
MAX_FILE_BYTES = MAX_REQUEST_CHARS // 4 * 3  # the largest file one scoring request can carry
# The problem beside the label: a reader of a bad file's row sees why without scrolling the table sideways.
RESULT_COLUMNS = ["file", "patient", "label", "problem", "probability", "threshold", "flags", "model_label",
                  "tissue_fraction", "focus", "ood_score", "colour_score"]
PATIENT_COLUMNS = ["patient", "images", "flagged", "mean_probability", "call"]
DISPLAY_PX = 160  # the height of an image | overlay pair in the gallery
GAP_PX = 4
PAGE_TITLE = "histoflow: breast histopathology scoring"
INTRO = """Upload image files (PNG, JPEG, TIFF, BMP) or a folder. Each image gets the model's call, its
calibrated probability, quality flags and a Grad-CAM overlay (where the network looked). A flagged image
is **indeterminate**: the model answered, but the image is blank, out of focus or unlike the training
images. Patient ids come from BreaKHis and IDC file names, or from the box (one `file,patient` per line).
A research tool: not a diagnostic device."""

SLIDE_INTRO = """Open a whole-slide image (Aperio .svs, Hamamatsu .ndpi, MIRAX .mrxs, tiled TIFF, ...) from the
server's slide folder, or upload a small one. Its tissue is cut into tiles at the model's training resolution and
each tile scored: the heat map shows the positive probability over the slide (the threshold marked on the key),
the summary gives the slide's call by its rule, and the most positive tiles come with their Grad-CAM. The same
as `histoflow predict-slide`, for one slide."""
SLIDES_NEED_MODEL = ("Whole slides are scored with the model in the page's own process: start the page with "
                     "`--model_uri` (through a scoring server it sends single images), or score slides with "
                     "`histoflow predict-slide`.")
MAX_SLIDE_UPLOAD_BYTES = 512 * 2**20

Scorer = Callable[[list[str]], pd.DataFrame]  # base64 image files -> the served model's rows, with gradcam


class ScoringError(HistoflowError):
    """The scoring server refused a request or could not be reached."""


def model_scorer(model) -> Scorer:
    """A loaded histoflow pyfunc as the page's scorer (always with explain)."""
    return lambda items: model.predict(pd.DataFrame({INPUT_COLUMN: items}), params={"explain": True})


def local_scorer(model_uri: str) -> Scorer:
    import mlflow

    return model_scorer(mlflow.pyfunc.load_model(model_uri))


def _identity_token(audience: str) -> str | None:
    """On Cloud Run, an identity token for a private scoring service (from the metadata server)."""
    import requests

    if not os.environ.get("K_SERVICE") or not audience.startswith("https://"):
        return None
    response = requests.get("http://metadata.google.internal/computeMetadata/v1/instance/service-accounts/"
                            "default/identity", params={"audience": audience.split("/invocations")[0]},
                            headers={"Metadata-Flavor": "Google"}, timeout=5)
    response.raise_for_status()
    return response.text


def remote_scorer(url: str) -> Scorer:
    import requests

    def score(items: list[str]) -> pd.DataFrame:
        token = _identity_token(url)
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        try:
            response = requests.post(url, json={"inputs": {INPUT_COLUMN: items}, "params": {"explain": True}},
                                     headers=headers, timeout=300)
        except requests.RequestException as exc:
            raise ScoringError(f"the scoring server {url} cannot be reached ({type(exc).__name__})") from None
        if not response.ok:
            try:
                message = response.json().get("message", response.text)
            except ValueError:
                message = response.text
            raise ScoringError(f"the scoring server answered {response.status_code}: {message[:300]}")
        return pd.DataFrame(response.json()["predictions"])

    return score


def parse_patients(text: str) -> dict[str, str]:
    """`file,patient` lines (comma, semicolon or tab) -> {file name: patient}; blank lines ignored."""
    patients = {}
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        parts = [p.strip() for p in line.replace("\t", ",").replace(";", ",").split(",")]
        if len(parts) != 2 or not all(parts):
            raise ConfigError(f"patient ids, line {number}: expected `file,patient`; got {line.strip()!r}")
        patients[Path(parts[0]).name] = parts[1]
    return patients


def _check_file(path: Path) -> str:
    """'' when the file is an image the model can take, else what is wrong with it."""
    size = path.stat().st_size
    if size > MAX_FILE_BYTES:
        return f"too large: {size / 2**20:.1f} MiB, the limit is {MAX_FILE_BYTES / 2**20:.0f} MiB per file"
    try:
        decode_image(path.read_bytes(), MAX_PIXELS)
    except ImageDecodeError as exc:
        return str(exc)
    return ""


def _score_all(paths: list[Path], scorer: Scorer) -> tuple[dict[Path, dict], dict[Path, str]]:
    """The served row of each file, MAX_IMAGES_PER_REQUEST per request, and what went wrong for the others:
    a request that fails is scored again file by file, so that one bad file costs only its own row."""
    from mlflow.exceptions import MlflowException

    rows, problems = {}, {}
    for start in range(0, len(paths), MAX_IMAGES_PER_REQUEST):
        chunk = paths[start:start + MAX_IMAGES_PER_REQUEST]
        try:
            out = scorer([base64.b64encode(p.read_bytes()).decode("ascii") for p in chunk])
            rows.update(zip(chunk, out.to_dict("records"), strict=True))
        except (ScoringError, MlflowException, HistoflowError) as exc:
            if len(chunk) == 1:
                problems[chunk[0]] = getattr(exc, "message", str(exc))
                continue
            for path in chunk:
                found, failed = _score_all([path], scorer)
                rows.update(found)
                problems.update(failed)
    return rows, problems


def side_by_side(image: np.ndarray, overlay_b64: str, height: int = DISPLAY_PX) -> Image.Image:
    """The image next to its Grad-CAM overlay, both `height` pixels high at the image's own aspect ratio: the
    network saw the image squashed to its square input, and its overlay is stretched back to the image's shape
    (a 700x460 BreaKHis image stays 700x460, not a square)."""
    width = max(1, round(height * image.shape[1] / image.shape[0]))
    shown = Image.fromarray(image).resize((width, height), Image.LANCZOS)
    heat = Image.open(io.BytesIO(base64.b64decode(overlay_b64))).convert("RGB").resize((width, height),
                                                                                     Image.BILINEAR)
    both = Image.new("RGB", (width * 2 + GAP_PX, height), "white")
    both.paste(shown, (0, 0))
    both.paste(heat, (width + GAP_PX, 0))
    return both


def caption(name: str, row: dict, positive: str) -> str:
    """The call first (a narrow tile shows it whole), then the file."""
    flags = f" [{row['flags']}]" if row["flags"] else ""
    return f"{row['label']} (p {positive} {row['probabilities'][positive]:.2f}){flags} · {name}"


def colour_key() -> str:
    """HTML: the Grad-CAM overlay's colour scale, low to high attention, as a small image with its labels."""
    import matplotlib

    from histoflow.modeling.overlay import OVERLAY_COLORMAP

    ramp = matplotlib.colormaps[OVERLAY_COLORMAP](np.linspace(0.0, 1.0, 256))[None, :, :3]
    buffer = io.BytesIO()
    Image.fromarray(np.repeat(np.rint(ramp * 255).astype(np.uint8), 12, axis=0)).save(buffer, format="PNG")
    ramp_b64 = base64.b64encode(buffer.getvalue()).decode("ascii")
    return (f'<div id="gradcam-key-scale" style="display:flex;align-items:center;gap:8px;font-size:0.9em">'
            f'<span>Grad-CAM overlay: where the network looked, low</span>'
            f'<img alt="colour key" src="data:image/png;base64,{ramp_b64}" style="width:256px;height:12px">'
            f'<span>high</span></div>')


@dataclass
class Results:
    table: pd.DataFrame  # RESULT_COLUMNS, one row per file
    gallery: list[tuple[Image.Image, str]]  # (image | overlay, caption) per scored file
    patients: pd.DataFrame  # per patient: images, flagged, mean probability, call
    classes: list[str]  # the model's, the positive one (whose probability is shown) last


def score_files(files: list[str | Path], scorer: Scorer, patients: dict[str, str] | None = None) -> Results:
    """Every file checked, the good ones scored; one result row per file, in the order given."""
    paths = [Path(f) for f in files]
    problems = {p: _check_file(p) for p in paths}
    good = [p for p in paths if not problems[p]]
    served, failed = _score_all(good, scorer)
    problems.update(failed)
    classes = list(next(iter(served.values()))["probabilities"]) if served else ["negative", "positive"]
    positive = classes[-1]
    rows, gallery = [], []
    for path in paths:
        patient = (patients or {}).get(path.name) or patient_from_name(path.name) or ""
        row = served.get(path)
        if row is None:
            rows.append({"file": path.name, "patient": patient, "label": "error", "problem": problems[path]})
            continue
        quality = row.get("quality") or {}
        rows.append({"file": path.name, "patient": patient, "label": row["label"], "model_label": row["model_label"],
                     "probability": row["probabilities"][positive], "threshold": row["threshold"],
                     "flags": row["flags"], **quality, "problem": ""})
        gallery.append((side_by_side(decode_image(path.read_bytes()), row["gradcam"]),
                        caption(path.name, row, positive)))
    # Rounded as a reader compares them; the served values keep full precision.
    table = pd.DataFrame(rows).reindex(columns=RESULT_COLUMNS).round(
        {"probability": 4, "threshold": 4, "tissue_fraction": 3, "focus": 3, "ood_score": 3, "colour_score": 3})
    return Results(table, gallery, _patient_summary(table, classes), classes)


def _patient_summary(table: pd.DataFrame, classes: list[str]) -> pd.DataFrame:
    """Per patient with a scored image: the mean probability of its trusted (not flagged) images and the call at
    the model's threshold (the rule of evaluation and batch prediction), and how many images were flagged. A
    patient whose every image was flagged is listed too: no probability, call indeterminate."""
    scored = table[(table["label"] != "error") & (table["patient"] != "")]
    if scored.empty:
        return pd.DataFrame(columns=PATIENT_COLUMNS)
    flagged = scored["label"] == INDETERMINATE
    counts = scored.assign(flagged=flagged).groupby("patient").agg(images=("file", "size"),
                                                                    flagged=("flagged", "sum"))
    trusted = scored[~flagged]
    if trusted.empty:
        calls = pd.DataFrame(columns=["patient", "mean_probability", "call"])
    else:
        calls = patient_table(trusted["patient"], trusted["probability"].to_numpy(),
                              threshold=float(trusted["threshold"].iloc[0]))
        calls = calls.assign(call=[classes[int(p)] for p in calls["predicted"]]).rename(
            columns={"mean_p": "mean_probability"})[["patient", "mean_probability", "call"]]
    summary = counts.reset_index().merge(calls, on="patient", how="left")
    summary["call"] = summary["call"].fillna(INDETERMINATE)
    return summary.astype({"images": int, "flagged": int}).round({"mean_probability": 4})[PATIENT_COLUMNS]


@dataclass
class SlideResults:
    summary: dict  # the slide's summary.json
    heatmap: Path  # the probabilities over the thumbnail, with the colour key
    top: list[tuple[Image.Image, str]]  # (tile | Grad-CAM overlay, caption) of the most positive tiles
    files: list[Path]  # tiles.csv, tiles.geojson, summary.json, heatmap.png: the downloads


def score_slide_file(path: str | Path, model, scorer: Scorer, slide_mpp: float = 0.0,
                     on_batch: Callable[[int, int], None] | None = None) -> SlideResults:
    """A whole slide through predict-slide's scoring (histoflow.serving.slide_predict) into a temporary folder, and
    its most positive scored tiles (most_positive) scored again with their Grad-CAM. `on_batch`: (batches done,
    batches)."""
    from histoflow.data.slides import open_slide, read_tile
    from histoflow.serving.settings import SlideConfig
    from histoflow.serving.slide_predict import most_positive, predict_slide

    path = Path(path)
    out = Path(tempfile.mkdtemp(prefix="histoflow-slide-")) / path.stem
    summary = predict_slide(path, model, SlideConfig(slides=str(path), slide_mpp=slide_mpp), out, on_batch)
    best = most_positive(pd.read_csv(out / "tiles.csv"))
    top = []
    if len(best):
        with open_slide(path, slide_mpp or None) as slide:
            images = [read_tile(slide, x, y, size, summary["tile_px"])
                      for x, y, size in best[["x", "y", "size"]].itertuples(index=False)]
        rows = scorer([png_b64(image) for image in images]).to_dict("records")
        positive = list(rows[0]["probabilities"])[-1]
        top = [(side_by_side(image, row["gradcam"]), caption(f"tile {x},{y}", row, positive))
               for image, row, x, y in zip(images, rows, best["x"], best["y"], strict=True)]
    return SlideResults(summary, out / "heatmap.png", top,
                        [out / name for name in ("tiles.csv", "tiles.geojson", "summary.json", "heatmap.png")])


def png_b64(image: np.ndarray) -> str:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def slide_summary_text(summary: dict) -> str:
    """The slide's summary for a reader: the call and its rule first."""
    share = summary["positive_share"]
    return (f"**{Path(summary['slide']).name}: {summary['call']}**. {summary['positive_tiles']} of "
            f"{summary['tiles_scored']} scored tiles positive" + (f" ({share:.1%})" if share == share else "")
            + f"; {summary['tiles']} tissue tiles"
            + (f", {summary['flagged_share']:.1%} flagged" if summary["tiles"] else " (no tissue found)") + ".\n\n"
            f"Tissue {summary['tissue_area_mm2']:.2f} mm², positive area about "
            f"{summary['positive_area_mm2']:.3f} mm². Tiles of {summary['tile_px']} px at "
            f"{summary['tile_mpp']:.3g} µm/px ({summary['tile_mpp_source']}); threshold "
            f"{summary['threshold']:.2f}.\n\nRule: {summary['rule']}.")


def offered_slides(slide_dir: str) -> list[str]:
    """The slides in the page's slide folder (none when it has no folder or no slides there)."""
    from histoflow.serving.slide_predict import slide_files

    if not slide_dir:
        return []
    try:
        return [str(p) for p in slide_files(slide_dir)]
    except DataError:
        return []


# Gradio cuts a gallery caption to one line with an ellipsis: ours wrap, whole, over the letterbox under the image.
PAGE_CSS = """
#gallery .caption-label, #slide-top .caption-label {white-space: normal; overflow-wrap: anywhere; text-overflow: clip;
  max-width: calc(100% - 8px); left: 4px; right: auto; opacity: 1}
"""


def build_page(scorer: Scorer, title: str = PAGE_TITLE, model=None, slide_dir: str = ""):
    """The Gradio page: uploads in, gallery, tables and a CSV out; a tab for a whole slide (`model`: the loaded
    pyfunc the slide's tiles are scored with; None, through a scoring server: that tab says what it needs)."""
    import gradio as gr

    def run(files: list[str] | None, folder: list[str] | None, patient_text: str):
        chosen = [*(files or []), *(folder or [])]
        if not chosen:
            raise gr.Error("Upload at least one image file or a folder.")
        try:
            results = score_files(chosen, scorer, parse_patients(patient_text or ""))
        except (ConfigError, ScoringError) as exc:
            raise gr.Error(str(exc)) from None
        out = Path(tempfile.mkdtemp(prefix="histoflow-app-")) / "histoflow_results.csv"
        results.table.to_csv(out, index=False)
        bad = results.table[results.table["label"] == "error"]
        notes = "\n".join(f"- **{r.file}**: {r.problem}" for r in bad.itertuples())
        flagged = int((results.table["label"] == INDETERMINATE).sum())
        summary = (f"Scored {len(results.table) - len(bad)} of {len(results.table)} files; {flagged} "
                   f"indeterminate. Probability shown: {results.classes[-1]}."
                   + (f"\n\nNot scored:\n{notes}" if notes else ""))
        return results.gallery, results.table, results.patients, str(out), summary

    offered = offered_slides(slide_dir)

    def run_slide(chosen: str | None, uploaded: str | None, slide_mpp: float | None,
                  progress=gr.Progress()):  # noqa: B008 - Gradio's way to show the tiles' bar
        if model is None:
            raise gr.Error(SLIDES_NEED_MODEL)
        path = uploaded or chosen
        if not path:
            raise gr.Error("Choose a slide from the server's folder or upload one.")
        if not uploaded and path not in offered:
            raise gr.Error(f"{path} is not one of the slides this page offers")
        try:
            progress(0.0, desc="finding the tissue")
            results = score_slide_file(path, model, scorer, float(slide_mpp or 0.0),
                                       lambda done, total: progress((done, total), desc="scoring tiles", unit="batch"))
        except (HistoflowError, ScoringError) as exc:
            raise gr.Error(str(exc)) from None
        return (str(results.heatmap), slide_summary_text(results.summary), results.top,
                [str(f) for f in results.files])

    with gr.Blocks(title=title) as page:
        gr.Markdown(f"# {title}\n\n{INTRO}")
        with gr.Tab("Images"):
            with gr.Row():
                files = gr.File(file_count="multiple", label="Images (drag and drop)", elem_id="files")
                folder = gr.File(file_count="directory", label="or a folder", elem_id="folder")
            patient_text = gr.Textbox(label="Patient ids (optional): file,patient per line", lines=2,
                                      elem_id="patients")
            button = gr.Button("Score", variant="primary", elem_id="score")
            summary = gr.Markdown(elem_id="summary")
            gallery = gr.Gallery(label="Image | Grad-CAM overlay", columns=3, format="png", object_fit="contain",
                                 elem_id="gallery")
            gr.HTML(colour_key(), elem_id="gradcam-key")
            table = gr.Dataframe(label="Results", interactive=False, elem_id="results")
            patients = gr.Dataframe(label="Per patient", interactive=False, elem_id="patient-summary")
            download = gr.File(label="Download results (CSV)", elem_id="download")
            button.click(run, [files, folder, patient_text], [gallery, table, patients, download, summary])
        with gr.Tab("Whole slide", elem_id="slide-tab"):
            gr.Markdown(SLIDE_INTRO if model is not None else SLIDES_NEED_MODEL)
            with gr.Row():
                chosen = gr.Dropdown(offered, value=None, elem_id="slide-choice",
                                     label=f"A slide in {slide_dir or 'the server folder (none set)'}")
                uploaded = gr.File(label="or upload a small slide", file_types=sorted(SLIDE_EXTENSIONS),
                                   elem_id="slide-upload")
            slide_mpp = gr.Number(0, label="The slide's µm per pixel, when its file does not say (0: from the file)",
                                  elem_id="slide-mpp")
            slide_button = gr.Button("Score the slide", variant="primary", elem_id="score-slide")
            slide_text = gr.Markdown(elem_id="slide-summary")
            # The heading outside the image: Gradio's label badge sits over the image's top, where the figure's
            # title is.
            gr.Markdown("#### Positive probability over the slide (threshold marked on the key; flagged tiles in "
                        "blue, not counted)", elem_id="slide-heatmap-heading")
            heat = gr.Image(show_label=False, type="filepath", elem_id="slide-heatmap")
            top = gr.Gallery(label="Most positive tiles | Grad-CAM overlay", columns=4, format="png",
                             object_fit="contain", elem_id="slide-top")
            slide_files_out = gr.File(label="Download: tiles.csv, tiles.geojson (QuPath), summary.json, heatmap.png",
                                      file_count="multiple", elem_id="slide-download")
            slide_button.click(run_slide, [chosen, uploaded, slide_mpp], [heat, slide_text, top, slide_files_out])
    return page


def configured_scorer(config: AppConfig) -> tuple[Scorer, str, object | None]:
    """The page's scorer, what it scores with, and the loaded model (None through a scoring server): the scoring
    server where one is given, else the model in the page's process."""
    import mlflow

    if config.scoring_url:
        return remote_scorer(config.scoring_url), config.scoring_url, None
    tracking.configure()
    model = mlflow.pyfunc.load_model(config.model_uri)
    return model_scorer(model), config.model_uri, model


def run(config: AppConfig) -> None:
    """Start the page (blocks until stopped)."""
    import gradio as gr

    config.validate()
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    scorer, source, model = configured_scorer(config)
    print(f"histoflow app: scoring with {source} at http://{config.host}:{config.port}", flush=True)
    # System fonts: the page works offline (Gradio's default theme would fetch Google fonts).
    theme = gr.themes.Soft(font=["ui-sans-serif", "system-ui", "sans-serif"],
                           font_mono=["ui-monospace", "monospace"])
    # The page's uploaded slides may be larger than one image; beyond this, slides are read from slide_dir.
    allowed = [config.slide_dir] if config.slide_dir else []
    build_page(scorer, model=model, slide_dir=config.slide_dir).launch(
        server_name=config.host, server_port=config.port, theme=theme, css=PAGE_CSS, ssr_mode=False,
        max_file_size=MAX_SLIDE_UPLOAD_BYTES, footer_links=[], show_error=True, allowed_paths=allowed)
