"""The pathologist's page: scoring files (good, bad, too large) in-process and through a scoring server, and
the real page in Debian's headless chromium driven by Selenium."""

from __future__ import annotations

import io
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
import requests
from PIL import Image

from conftest import BREAKHIS, IDC, free_port, start_server, wait_for
from histoflow.errors import ConfigError
from histoflow.serving.requests import encode_file
from histoflow.serving.settings import AppConfig
from histoflow.serving.web_app import (
    DISPLAY_PX,
    GAP_PX,
    MAX_FILE_BYTES,
    configured_scorer,
    local_scorer,
    parse_patients,
    remote_scorer,
    score_files,
)

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"


@pytest.fixture(scope="module")
def uploads(classifier, tmp_path_factory) -> dict[str, Path]:
    """Two real test images, a full-size 700x460 BreaKHis image, a blank tile, a text file, a truncated PNG and a file
    over the size limit."""
    _, split = classifier
    folder = tmp_path_factory.mktemp("uploads")
    files = {}
    for i, path in enumerate(split.loc[split["split"] == "test", "path"].tolist()[:2]):
        files[f"image{i}"] = Path(shutil.copy(path, folder))
    catalogue = pd.read_csv(BREAKHIS / "images.csv")
    files["wide"] = Path(shutil.copy(BREAKHIS / catalogue.loc[catalogue["width"] == 700, "path"].iloc[0], folder))
    files["blank"] = folder / "blank.png"
    Image.new("RGB", (64, 64), (255, 255, 255)).save(files["blank"])
    files["text"] = folder / "notes.txt"
    files["text"].write_text("not an image")
    files["truncated"] = folder / "truncated.png"
    files["truncated"].write_bytes(files["image0"].read_bytes()[:500])
    files["huge"] = folder / "huge.png"
    with open(files["huge"], "wb") as fh:
        fh.truncate(MAX_FILE_BYTES + 1)  # sparse: no 48 MiB written
    return files


def pair_size(path: Path) -> tuple[int, int]:
    """The gallery's image | overlay pair of an image: DISPLAY_PX high, each half at the image's aspect ratio."""
    width, height = Image.open(path).size
    half = round(DISPLAY_PX * width / height)
    return 2 * half + GAP_PX, DISPLAY_PX


def _expected(model_dir: str, paths: list[Path]) -> pd.DataFrame:
    return mlflow.pyfunc.load_model(model_dir).predict(pd.DataFrame({"image": [encode_file(p) for p in paths]}))


def test_every_file_gets_a_row_and_bad_ones_a_message(classifier, uploads):
    model_dir, _ = classifier
    results = score_files(list(uploads.values()), local_scorer(model_dir), {"blank.png": "P-blank"})
    table = results.table.set_index("file")
    assert list(table.index) == [p.name for p in uploads.values()]
    images = [uploads["image0"], uploads["image1"], uploads["wide"]]
    expected = _expected(model_dir, images)
    for name, (_, want) in zip([p.name for p in images], expected.iterrows(), strict=True):
        assert table.loc[name, "label"] == want["label"] and table.loc[name, "flags"] == want["flags"]
        assert table.loc[name, "probability"] == pytest.approx(want["probabilities"]["malignant"], abs=1e-4)
        assert table.loc[name, "patient"].startswith("SOB_")  # from the BreaKHis file name
    assert table.loc["blank.png", "label"] == "indeterminate" and "low_tissue" in table.loc["blank.png", "flags"]
    assert table.loc["blank.png", "patient"] == "P-blank"
    assert "not an image" in table.loc["notes.txt", "problem"]
    assert "truncated" in table.loc["truncated.png", "problem"]
    assert "too large" in table.loc["huge.png", "problem"]
    assert (table.loc[["notes.txt", "truncated.png", "huge.png"], "label"] == "error").all()
    # A side-by-side image and overlay per scored file at the image's own shape, the call first in its caption.
    scored = [*images, uploads["blank"]]
    assert Image.open(uploads["wide"]).size == (700, 460) and pair_size(uploads["wide"]) == (2 * 243 + GAP_PX, 160)
    assert [image.size for image, _ in results.gallery] == [pair_size(p) for p in scored]
    assert [text.split(" ")[0] for _, text in results.gallery] == table.loc[[p.name for p in scored], "label"].tolist()
    # Patients summarised from their trusted images; one whose only image was flagged is listed, indeterminate.
    patients = results.patients.set_index("patient")
    trusted = table.loc[[p.name for p in images]]
    trusted = trusted[trusted["label"] != "indeterminate"]
    assert set(patients.index) == {*trusted["patient"], "P-blank"}
    assert patients.loc["P-blank", ["images", "flagged", "call"]].tolist() == [1, 1, "indeterminate"]
    assert np.isnan(patients.loc["P-blank", "mean_probability"])
    for patient, rows in trusted.groupby("patient"):
        assert patients.loc[patient, "mean_probability"] == pytest.approx(rows["probability"].mean(), abs=1e-4)
        assert patients.loc[patient, "call"] in ("benign", "malignant") and patients.loc[patient, "flagged"] == 0


def test_parse_patients():
    assert parse_patients("a.png, P1\n\nsub/b.png;P2\nc.png\tP3") == {"a.png": "P1", "b.png": "P2", "c.png": "P3"}
    with pytest.raises(ConfigError, match="line 1: expected `file,patient`"):
        parse_patients("a.png")


def test_through_a_scoring_server_and_when_it_is_down(classifier, scoring_server, uploads):
    model_dir, _ = classifier
    files = [uploads["image0"], uploads["text"], uploads["image1"]]
    remote = score_files(files, remote_scorer(f"{scoring_server}/invocations")).table
    local = score_files(files, local_scorer(model_dir)).table
    pd.testing.assert_frame_equal(remote, local)
    # Nothing listens there (a server that is down): the row says so, the page does not fail.
    down_url = f"http://127.0.0.1:{free_port()}/invocations"
    down = score_files([uploads["image0"]], remote_scorer(down_url)).table
    assert down["label"].tolist() == ["error"] and "cannot be reached" in down["problem"][0]


def test_the_page_scores_through_the_server_or_the_model_its_given(classifier, scoring_server, uploads):
    """`histoflow app --scoring_url` (the container's, browsed below) and `--model_uri` (a model in the page's own
    process) give the same rows."""
    model_dir, _ = classifier
    url = f"{scoring_server}/invocations"
    (remote, remote_source, no_model), (local, local_source, model) = (
        configured_scorer(AppConfig(scoring_url=url)), configured_scorer(AppConfig(model_uri=model_dir)))
    assert (remote_source, local_source, no_model) == (url, model_dir, None)
    assert model.metadata.model_uuid == mlflow.models.Model.load(model_dir).model_uuid  # slides are scored with it
    files = [uploads["image0"], uploads["image1"]]
    pd.testing.assert_frame_equal(score_files(files, remote).table, score_files(files, local).table)


@pytest.fixture(scope="module")
def page(scoring_server):
    """docker/app/Dockerfile's CMD, run here as the container runs it (PORT and SCORING_URL set): the page
    through the tiny model's scoring server, as it is deployed."""
    dockerfile = (Path(__file__).resolve().parents[1] / "docker" / "app" / "Dockerfile").read_text()
    command = json.loads(next(line for line in dockerfile.splitlines() if line.startswith("CMD "))[4:])
    assert "pip install \".[app]\"" in dockerfile and "histoflow app --scoring_url" in command[-1]
    port = free_port()
    env = {**os.environ, "PORT": str(port), "SCORING_URL": f"{scoring_server}/invocations",
           "GRADIO_ANALYTICS_ENABLED": "False", "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    process = start_server(command, env)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for(url, process, timeout=180)
        assert "histoflow" in requests.get(f"{url}/config", timeout=30).text  # the page names itself
        yield url
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=30)


def _require_chromium(chromium: str = CHROMIUM, chromedriver: str = CHROMEDRIVER) -> None:
    """Skip, saying why, where Debian's browser is not installed (as the PostgreSQL tests skip without it)."""
    if not (os.path.exists(chromium) and os.path.exists(chromedriver)):
        pytest.skip(f"the browser tests need Debian's chromium and chromium-driver ({chromium}, {chromedriver}): "
                    "`apt-get install chromium chromium-driver` (.ci/run installs them)")


@pytest.fixture(scope="module")
def browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    _require_chromium()
    options = Options()
    options.binary_location = CHROMIUM
    # No background networking: this machine's closed network refuses Chromium's own connections.
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1400,2000",
                     "--disable-gpu", "--no-first-run", "--disable-background-networking", "--disable-component-update",
                     "--disable-sync"):
        options.add_argument(argument)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    try:
        yield driver
    finally:
        driver.quit()


def test_without_the_browser_the_page_tests_are_skipped_saying_why(tmp_path):
    with pytest.raises(pytest.skip.Exception, match="chromium and chromium-driver .*apt-get install"):
        _require_chromium(str(tmp_path / "chromium"), CHROMEDRIVER)


@pytest.fixture(scope="module")
def screenshots(tmp_path_factory) -> Path:
    """Where the browser tests save the page: HISTOFLOW_SCREENSHOTS (docs/images makes the README's), else a temporary
    folder."""
    folder = Path(os.environ.get("HISTOFLOW_SCREENSHOTS") or tmp_path_factory.mktemp("screenshots"))
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def save_page(browser, path: Path) -> None:
    """The whole page as a PNG (beyond the window: Chromium's own capture), checked to be a real image."""
    import base64

    shot = browser.execute_cdp_cmd("Page.captureScreenshot", {"format": "png", "captureBeyondViewport": True})
    path.write_bytes(base64.b64decode(shot["data"]))
    width, height = Image.open(path).size
    assert width >= 1000 and height >= 1000, (width, height)


def _cells(browser, table_id: str) -> dict[str, list]:
    """A table on the page: {first cell: the row's cell elements} (the header row has no grid cells)."""
    from selenium.webdriver.common.by import By

    rows = [row.find_elements(By.CSS_SELECTOR, "[role=gridcell]")
            for row in browser.find_elements(By.CSS_SELECTOR, f"#{table_id} [role=row]")]
    return {cells[0].text: cells for cells in rows if cells}


@pytest.fixture(scope="module")
def scored_page(page, browser, uploads, screenshots):
    """The page after uploading, through its file input, two test images, the 700x460 BreaKHis image, the blank tile
    (its patient typed in the box) and the text file, and pressing Score."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    browser.get(page)
    WebDriverWait(browser, 60).until(lambda d: d.find_elements(By.CSS_SELECTOR, "#files input[type=file]"))
    files = [uploads[k] for k in ("image0", "image1", "wide", "blank", "text")]
    browser.find_element(By.CSS_SELECTOR, "#files input[type=file]").send_keys("\n".join(map(str, files)))
    browser.find_element(By.CSS_SELECTOR, "#patients textarea").send_keys("blank.png,P-blank")
    # Uploaded: each file listed in the input (its name wraps before the extension).
    WebDriverWait(browser, 60).until(lambda d: all(p.stem in d.find_element(By.ID, "files").text for p in files))
    browser.find_element(By.ID, "score").click()
    WebDriverWait(browser, 120).until(lambda d: "Scored" in d.find_element(By.ID, "summary").text)
    WebDriverWait(browser, 30).until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#gallery img")) == 4 and all(
        d.execute_script("return arguments[0].complete && arguments[0].naturalWidth > 0", i)
        for i in d.find_elements(By.CSS_SELECTOR, "#gallery img")))
    save_page(browser, screenshots / "app.png")
    return browser, files


def test_page_in_a_real_browser(scored_page, classifier):
    """The labels and the bad file's message read off the page, and the CSV downloaded."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    browser, files = scored_page
    model_dir, _ = classifier
    summary = browser.find_element(By.ID, "summary").text
    assert "Scored 4 of 5 files" in summary and "notes.txt: not an image" in summary
    by_file = {name: [c.text for c in cells] for name, cells in _cells(browser, "results").items()}
    expected = _expected(model_dir, files[:4])
    for path, label in zip(files[:4], expected["label"], strict=True):
        assert by_file[path.name][2] == label, (by_file[path.name], label)  # columns: file, patient, label
    assert by_file["notes.txt"][2] == "error"
    link = WebDriverWait(browser, 30).until(lambda d: d.find_elements(By.CSS_SELECTOR, "#download a[href]"))
    csv = pd.read_csv(io.StringIO(requests.get(link[0].get_attribute("href"), timeout=30).text))
    assert csv["file"].tolist() == [p.name for p in files] and csv["label"].iloc[-1] == "error"


def test_page_lists_a_patient_whose_only_image_was_flagged(scored_page):
    browser, _ = scored_page
    patients = {name: [c.text for c in cells] for name, cells in _cells(browser, "patient-summary").items()}
    # columns: patient, images, flagged, mean_probability, call
    assert patients["P-blank"][1:3] == ["1", "1"] and patients["P-blank"][4] == "indeterminate", patients
    assert len(patients) == 3  # and the two BreaKHis patients of the other images


def test_page_gallery_shows_each_pair_whole_with_its_caption_uncut(scored_page):
    """Each image | overlay pair is scaled into its tile, not cropped to fill it, and its caption, call first, is
    shown whole (not cut with an ellipsis)."""
    from selenium.webdriver.common.by import By

    browser, files = scored_page
    for image in browser.find_elements(By.CSS_SELECTOR, "#gallery img"):
        assert browser.execute_script("return getComputedStyle(arguments[0]).objectFit", image) == "contain"
    captions = browser.find_elements(By.CSS_SELECTOR, "#gallery .caption-label")
    assert len(captions) == 4
    for caption in captions:
        assert caption.is_displayed() and caption.text.split(" ")[0] in ("benign", "malignant", "indeterminate")
        assert browser.execute_script("const e = arguments[0]; return e.scrollWidth <= e.clientWidth + 1 && "
                                      "e.scrollHeight <= e.clientHeight + 1", caption), caption.text
    names = " ".join(c.text for c in captions).replace("\n", " ")
    assert all(p.name.replace("-", "") in names.replace("-", "").replace(" ", "") or p.name in names
               for p in files[:4])


def test_page_shows_a_700x460_image_at_its_own_shape(scored_page):
    """The BreaKHis original's pair is 700:460 on each side (the network's square overlay stretched back to it), and
    shown without distortion."""
    from selenium.webdriver.common.by import By

    browser, files = scored_page
    sizes = [tuple(browser.execute_script("return [arguments[0].naturalWidth, arguments[0].naturalHeight]", i))
             for i in browser.find_elements(By.CSS_SELECTOR, "#gallery img")]
    assert pair_size(files[2]) in sizes, sizes  # (490, 160): two 243x160 halves
    assert sorted(sizes) == sorted(pair_size(p) for p in files[:4])


def test_page_heat_map_has_a_colour_key(scored_page):
    """Under the overlays: the overlay's colour scale from low to high, as the overlays draw it (jet)."""
    import base64

    import matplotlib
    from selenium.webdriver.common.by import By

    from histoflow.modeling.overlay import OVERLAY_COLORMAP

    browser, _ = scored_page
    key = browser.find_element(By.ID, "gradcam-key")
    assert key.is_displayed() and "low" in key.text and "high" in key.text
    image = key.find_element(By.TAG_NAME, "img")
    assert browser.execute_script("return arguments[0].complete && arguments[0].naturalWidth", image) == 256
    ramp = np.asarray(Image.open(io.BytesIO(base64.b64decode(image.get_attribute("src").split(",", 1)[1]))))
    colours = matplotlib.colormaps[OVERLAY_COLORMAP]([0.0, 1.0])[:, :3] * 255
    np.testing.assert_allclose(ramp[0, [0, -1]], colours, atol=1)


def test_page_shows_the_problem_of_a_bad_file_without_scrolling(scored_page):
    browser, _ = scored_page
    from selenium.webdriver.common.by import By

    headers = [h.text.strip() for h in browser.find_elements(By.CSS_SELECTOR, "#results [role=columnheader]")]
    problem = _cells(browser, "results")["notes.txt"][headers.index("problem")]
    assert "not an image" in problem.get_attribute("textContent")
    right = browser.execute_script("return arguments[0].getBoundingClientRect().right", problem)
    assert right <= browser.execute_script("return window.innerWidth"), right


@pytest.mark.slow
def test_training_runs_open_in_the_mlflow_ui_model_training_view(browser, tiny_store):
    """The address a run prints (tracking.ui_link) opens the run in the MLflow UI's model-training view,
    in a real browser against a real `mlflow server`; without it MLflow 3.17 opens experiments in GenAI."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    from histoflow.tracking import ui_link

    _, uri, runs = tiny_store
    port = free_port()
    process = subprocess.Popen([sys.executable, "-m", "mlflow", "server", "--backend-store-uri", uri, "--host",
                                "127.0.0.1", "--port", str(port), "--workers", "1"],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    server = f"http://127.0.0.1:{port}"
    try:
        wait_for(f"{server}/health", process, timeout=120)
        mlflow.set_tracking_uri(server)
        run = mlflow.get_run(runs["baseline"])
        link = ui_link(run.info.experiment_id, run.info.run_id)
        assert link.startswith(f"{server}/#/experiments/{run.info.experiment_id}/runs/{run.info.run_id}")
        browser.get(link)
        WebDriverWait(browser, 60).until(lambda d: "Model metrics" in d.find_element(By.TAG_NAME, "body").text)
        page = browser.find_element(By.TAG_NAME, "body").text
        assert run.info.run_name in page and "Model registry" in page and "Agent versions" not in page
        browser.get(f"{server}/#/experiments/{run.info.experiment_id}")
        WebDriverWait(browser, 60).until(lambda d: "workflowType=genai" in d.current_url)
    finally:
        mlflow.set_tracking_uri(uri)
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=30)


@pytest.fixture(scope="module")
def slide_folder(tmp_path_factory) -> Path:
    """A folder the page's server reads slides from, holding one: the IDC patches of two patients at their file-name
    positions on white glass, a pyramidal TIFF with its resolution (as tests/test_slides.py builds them)."""
    from test_slides import IDC_MPP, mosaic, write_pyramid

    folder = tmp_path_factory.mktemp("page-slides")
    canvas, _ = mosaic(sorted(p.name for p in IDC.iterdir() if p.is_dir())[:2])
    write_pyramid(folder / "idc-mosaic.tiff", canvas, IDC_MPP)
    return folder


def test_a_slide_scored_for_the_page_is_predict_slide_s_with_the_top_tiles_explained(classifier, slide_folder):
    from histoflow.data.slides import open_slide, read_tile
    from histoflow.serving.slide_predict import TOP_TILES
    from histoflow.serving.web_app import model_scorer, png_b64, score_slide_file

    model_dir, _ = classifier
    model = mlflow.pyfunc.load_model(model_dir)
    batches = []  # the page's progress bar: told after every batch
    results = score_slide_file(slide_folder / "idc-mosaic.tiff", model, model_scorer(model),
                               on_batch=lambda done, total: batches.append((done, total)))
    tiles = pd.read_csv(results.files[0])
    total = -(-len(tiles) // 64)
    assert batches == [(done, total) for done in range(1, total + 1)]
    assert results.summary["tiles"] == len(tiles) > TOP_TILES and results.summary["tile_px"] == 32  # the model's size
    assert [f.name for f in results.files] == ["tiles.csv", "tiles.geojson", "summary.json", "heatmap.png"]
    assert Image.open(results.heatmap).size[0] > 500
    # The most positive tiles, each read again and explained: the served answer for that tile, its overlay beside it.
    best = tiles[tiles["label"].isin(["benign", "malignant"])].nlargest(TOP_TILES, "positive_probability")
    assert len(results.top) == TOP_TILES
    with open_slide(slide_folder / "idc-mosaic.tiff") as slide:
        images = [read_tile(slide, x, y, size, 32) for x, y, size in best[["x", "y", "size"]].itertuples(index=False)]
    served = model.predict(pd.DataFrame({"image": [png_b64(image) for image in images]}))
    np.testing.assert_allclose(served["probabilities"].map(lambda p: p["malignant"]), best["positive_probability"],
                               atol=1e-4)
    for (pair, text), (_, row), (x, y) in zip(results.top, served.iterrows(), best[["x", "y"]].itertuples(index=False),
                                              strict=True):
        assert text.startswith(f"{row['label']} (p malignant {row['probabilities']['malignant']:.2f})")
        assert text.endswith(f"tile {x},{y}") and pair.size == (2 * DISPLAY_PX + GAP_PX, DISPLAY_PX)


@pytest.fixture(scope="module")
def slide_page(classifier, slide_folder):
    """`histoflow app --model_uri <the tiny model> --slide_dir <slide_folder>`: the page with the model in its own
    process, which scores slides."""
    model_dir, _ = classifier
    port = free_port()
    process = start_server([str(Path(sys.executable).parent / "histoflow"), "app", "--model_uri", model_dir,
                            "--slide_dir", str(slide_folder), "--port", str(port)],
                           {**os.environ, "GRADIO_ANALYTICS_ENABLED": "False"})
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for(url, process, timeout=180)
        yield url
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=30)


def _open_slide_tab(browser, url: str) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    browser.get(url)
    WebDriverWait(browser, 60).until(lambda d: d.find_elements(By.CSS_SELECTOR, "button[role=tab]"))
    next(b for b in browser.find_elements(By.CSS_SELECTOR, "button[role=tab]") if b.text == "Whole slide").click()
    WebDriverWait(browser, 30).until(lambda d: d.find_element(By.ID, "score-slide").is_displayed())


def _score_slide(browser) -> str:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    browser.find_element(By.ID, "score-slide").click()
    WebDriverWait(browser, 120).until(lambda d: "Rule:" in d.find_element(By.ID, "slide-summary").text)
    return browser.find_element(By.ID, "slide-summary").text


def _overlaps(rect: dict, box: tuple[float, float, float, float]) -> bool:
    return (rect["x"] < box[2] and rect["x"] + rect["width"] > box[0] and rect["y"] < box[3]
            and rect["y"] + rect["height"] > box[1] and rect["width"] > 0 and rect["height"] > 0)


def _contains(outer: dict, inner: dict) -> bool:
    """`outer` holds `inner` (an element around the image, not over it)."""
    return (outer["x"] <= inner["x"] + 1 and outer["y"] <= inner["y"] + 1
            and outer["x"] + outer["width"] >= inner["x"] + inner["width"] - 1
            and outer["y"] + outer["height"] >= inner["y"] + inner["height"] - 1)


def test_a_slide_from_the_server_s_folder_on_the_page(slide_page, browser, classifier, slide_folder, screenshots):
    """Choose the slide the server offers, score it: the summary, the heat map with its key, the most positive tiles
    with their Grad-CAM and the downloads are predict-slide's for that slide."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    from histoflow.serving.slide_predict import TOP_TILES
    from histoflow.serving.web_app import model_scorer, score_slide_file

    model_dir, _ = classifier
    model = mlflow.pyfunc.load_model(model_dir)
    expected = score_slide_file(slide_folder / "idc-mosaic.tiff", model, model_scorer(model))
    _open_slide_tab(browser, slide_page)
    browser.find_element(By.CSS_SELECTOR, "#slide-choice input").click()
    options = WebDriverWait(browser, 30).until(lambda d: [o for o in d.find_elements(
        By.CSS_SELECTOR, "#slide-choice [role=option]") if o.is_displayed() and o.text])
    assert [o.text for o in options] == [str(slide_folder / "idc-mosaic.tiff")]
    options[0].click()
    text = _score_slide(browser)
    summary = expected.summary
    assert text.startswith(f"idc-mosaic.tiff: {summary['call']}")
    assert f"{summary['positive_tiles']} of {summary['tiles_scored']} scored tiles positive" in text
    assert f"Tissue {summary['tissue_area_mm2']:.2f} mm²" in text and "(slide level 0)" in text
    WebDriverWait(browser, 30).until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#slide-top img")) == TOP_TILES)
    captions = [c.text for c in browser.find_elements(By.CSS_SELECTOR, "#slide-top .caption-label")]
    assert captions == [text for _, text in expected.top]
    links = WebDriverWait(browser, 30).until(lambda d: d.find_elements(By.CSS_SELECTOR, "#slide-download a[href]"))
    downloads = {a.get_attribute("href").rsplit("/", 1)[-1]: requests.get(a.get_attribute("href"), timeout=30)
                 for a in links}
    assert sorted(downloads) == sorted(path.name for path in expected.files)
    tiles = pd.read_csv(io.StringIO(downloads["tiles.csv"].text))
    pd.testing.assert_frame_equal(tiles, pd.read_csv(expected.files[0]), check_exact=False, atol=1e-6)
    geojson = [f for f in downloads["tiles.geojson"].json()["features"] if f["properties"]["objectType"] == "tile"]
    assert len(geojson) == summary["tiles"]
    # The page shows the heat map it offers for download (matplotlib's tight box may differ by a pixel or two of
    # text between processes, so the shown image is compared with the server's own file, not this process's).
    heat = browser.find_element(By.CSS_SELECTOR, "#slide-heatmap img")
    shown = browser.execute_script("return arguments[0].complete && [arguments[0].naturalWidth, "
                                   "arguments[0].naturalHeight]", heat)
    assert shown == list(Image.open(io.BytesIO(downloads["heatmap.png"].content)).size)
    # Nothing of the page over the figure's title (its top tenth): Gradio's label badge once hid it.
    image = heat.rect
    title = (image["x"], image["y"], image["x"] + image["width"], image["y"] + image["height"] / 10)
    over = [e.text or e.tag_name for e in heat.find_elements(By.XPATH, "ancestor::*[@id='slide-heatmap']//*")
            if e.is_displayed() and e.tag_name not in ("img", "svg", "path", "button") and e != heat
            and _overlaps(e.rect, title) and not _contains(e.rect, image)]
    assert not over, over
    save_page(browser, screenshots / "app-slide.png")


def test_a_small_uploaded_slide_on_the_page_and_a_file_that_is_not_one(slide_page, browser, slide_folder, uploads,
                                                                        tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    _open_slide_tab(browser, slide_page)
    upload = browser.find_element(By.CSS_SELECTOR, "#slide-upload input[type=file]")
    upload.send_keys(str(slide_folder / "idc-mosaic.tiff"))
    WebDriverWait(browser, 60).until(lambda d: "idc-mosaic" in d.find_element(By.ID, "slide-upload").text)
    assert _score_slide(browser).startswith("idc-mosaic.tiff: ")
    # A PNG renamed .tif: refused with OpenSlide's reason on the page, which goes on serving.
    fake = Path(shutil.copy(uploads["image0"], tmp_path / "not-a-slide.tif"))
    _open_slide_tab(browser, slide_page)
    browser.find_element(By.CSS_SELECTOR, "#slide-upload input[type=file]").send_keys(str(fake))
    WebDriverWait(browser, 60).until(lambda d: "not-a-slide" in d.find_element(By.ID, "slide-upload").text)
    browser.find_element(By.ID, "score-slide").click()
    WebDriverWait(browser, 60).until(lambda d: "not a whole-slide image" in d.find_element(By.TAG_NAME, "body").text)
    assert requests.get(slide_page, timeout=30).ok
