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

import pandas as pd
from PIL import Image

from histoflow import tracking
from histoflow.data.discovery import patient_from_name
from histoflow.data.images import MAX_PIXELS, decode_image
from histoflow.errors import ConfigError, HistoflowError, ImageDecodeError
from histoflow.modeling.metrics import patient_table
from histoflow.modeling.screening import INDETERMINATE
from histoflow.serving.requests import INPUT_COLUMN, MAX_IMAGES_PER_REQUEST, MAX_REQUEST_CHARS
from histoflow.serving.settings import AppConfig

log = logging.getLogger(__name__)
MAX_FILE_BYTES = MAX_REQUEST_CHARS // 4 * 3  # the largest file one scoring request can carry
RESULT_COLUMNS = ["file", "patient", "label", "model_label", "probability", "threshold", "flags",
                  "tissue_fraction", "focus", "ood_score", "colour_score", "problem"]
PAGE_TITLE = "histoflow: breast histopathology scoring"
INTRO = """Upload image files (PNG, JPEG, TIFF, BMP) or a folder. Each image gets the model's call, its
calibrated probability, quality flags and a Grad-CAM overlay (where the network looked). A flagged image
is **indeterminate**: the model answered, but the image is blank, out of focus or unlike the training
images. Patient ids come from BreaKHis and IDC file names, or from the box (one `file,patient` per line).
A research tool: not a diagnostic device."""

Scorer = Callable[[list[str]], pd.DataFrame]  # base64 image files -> the served model's rows, with gradcam


class ScoringError(HistoflowError):
    """The scoring server refused a request or could not be reached."""


def local_scorer(model_uri: str) -> Scorer:
    import mlflow

    model = mlflow.pyfunc.load_model(model_uri)
    return lambda items: model.predict(pd.DataFrame({INPUT_COLUMN: items}), params={"explain": True})


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


def _side_by_side(path: Path, overlay_b64: str) -> Image.Image:
    """The image (resized to the overlay's size) next to its Grad-CAM overlay."""
    overlay = Image.open(io.BytesIO(base64.b64decode(overlay_b64))).convert("RGB")
    original = Image.fromarray(decode_image(path.read_bytes())).resize(overlay.size, Image.BILINEAR)
    both = Image.new("RGB", (overlay.width * 2 + 4, overlay.height), "white")
    both.paste(original, (0, 0))
    both.paste(overlay, (overlay.width + 4, 0))
    return both


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
        caption = f"{path.name}: {row['label']} (p {positive} {row['probabilities'][positive]:.2f})"
        gallery.append((_side_by_side(path, row["gradcam"]), caption + (f" [{row['flags']}]" if row["flags"] else "")))
    # Rounded as a reader compares them; the served values keep full precision.
    table = pd.DataFrame(rows).reindex(columns=RESULT_COLUMNS).round(
        {"probability": 4, "threshold": 4, "tissue_fraction": 3, "focus": 3, "ood_score": 3, "colour_score": 3})
    return Results(table, gallery, _patient_summary(table, classes), classes)


def _patient_summary(table: pd.DataFrame, classes: list[str]) -> pd.DataFrame:
    """Per patient, from its scored and trusted images: the mean probability and the call at the model's
    threshold (the rule of evaluation and batch prediction), and how many images were flagged."""
    scored = table[(table["label"] != "error") & (table["patient"] != "")]
    trusted = scored[scored["label"] != INDETERMINATE]
    if trusted.empty:
        return pd.DataFrame(columns=["patient", "images", "flagged", "mean_probability", "call"])
    threshold = float(trusted["threshold"].iloc[0])
    summary = patient_table(trusted["patient"], trusted["probability"].to_numpy(), threshold=threshold)
    summary["call"] = [classes[int(p)] for p in summary.pop("predicted")]
    flagged = scored.groupby("patient")["label"].apply(lambda s: int((s == INDETERMINATE).sum()))
    summary["flagged"] = summary["patient"].map(flagged).fillna(0).astype(int)
    return summary.rename(columns={"mean_p": "mean_probability"})[
        ["patient", "images", "flagged", "mean_probability", "call"]]


def build_page(scorer: Scorer, title: str = PAGE_TITLE):
    """The Gradio page: uploads in, gallery, tables and a CSV out."""
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

    with gr.Blocks(title=title) as page:
        gr.Markdown(f"# {title}\n\n{INTRO}")
        with gr.Row():
            files = gr.File(file_count="multiple", label="Images (drag and drop)", elem_id="files")
            folder = gr.File(file_count="directory", label="or a folder", elem_id="folder")
        patient_text = gr.Textbox(label="Patient ids (optional): file,patient per line", lines=2,
                                  elem_id="patients")
        button = gr.Button("Score", variant="primary", elem_id="score")
        summary = gr.Markdown(elem_id="summary")
        gallery = gr.Gallery(label="Image | Grad-CAM overlay", columns=4, format="png", elem_id="gallery")
        table = gr.Dataframe(label="Results", interactive=False, elem_id="results")
        patients = gr.Dataframe(label="Per patient", interactive=False, elem_id="patient-summary")
        download = gr.File(label="Download results (CSV)", elem_id="download")
        button.click(run, [files, folder, patient_text], [gallery, table, patients, download, summary])
    return page


def configured_scorer(config: AppConfig) -> tuple[Scorer, str]:
    """The page's scorer and what it scores with: the scoring server where one is given, else the model."""
    if config.scoring_url:
        return remote_scorer(config.scoring_url), config.scoring_url
    tracking.configure()
    return local_scorer(config.model_uri), config.model_uri


def run(config: AppConfig) -> None:
    """Start the page (blocks until stopped)."""
    import gradio as gr

    config.validate()
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    scorer, source = configured_scorer(config)
    print(f"histoflow app: scoring with {source} at http://{config.host}:{config.port}", flush=True)
    # System fonts: the page works offline (Gradio's default theme would fetch Google fonts).
    theme = gr.themes.Soft(font=["ui-sans-serif", "system-ui", "sans-serif"],
                           font_mono=["ui-monospace", "monospace"])
    build_page(scorer).launch(server_name=config.host, server_port=config.port, theme=theme, ssr_mode=False,
                              max_file_size=8 * MAX_FILE_BYTES, footer_links=[], show_error=True)
