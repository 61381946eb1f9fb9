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
import pandas as pd
import pytest
import requests
from PIL import Image

from conftest import free_port, start_server, wait_for
from histoflow.errors import ConfigError
from histoflow.serving.requests import encode_file
from histoflow.serving.settings import AppConfig
from histoflow.serving.web_app import (
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
    """Two real test images, a blank tile, a text file, a truncated PNG and a file over the size limit."""
    _, split = classifier
    folder = tmp_path_factory.mktemp("uploads")
    files = {}
    for i, path in enumerate(split.loc[split["split"] == "test", "path"].tolist()[:2]):
        files[f"image{i}"] = Path(shutil.copy(path, folder))
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


def _expected(model_dir: str, paths: list[Path]) -> pd.DataFrame:
    return mlflow.pyfunc.load_model(model_dir).predict(pd.DataFrame({"image": [encode_file(p) for p in paths]}))


def test_every_file_gets_a_row_and_bad_ones_a_message(classifier, uploads):
    model_dir, _ = classifier
    results = score_files(list(uploads.values()), local_scorer(model_dir), {"blank.png": "P-blank"})
    table = results.table.set_index("file")
    assert list(table.index) == [p.name for p in uploads.values()]
    expected = _expected(model_dir, [uploads["image0"], uploads["image1"]])
    for name, (_, want) in zip((uploads["image0"].name, uploads["image1"].name), expected.iterrows(), strict=True):
        assert table.loc[name, "label"] == want["label"] and table.loc[name, "flags"] == want["flags"]
        assert table.loc[name, "probability"] == pytest.approx(want["probabilities"]["malignant"], abs=1e-4)
        assert table.loc[name, "patient"].startswith("SOB_")  # from the BreaKHis file name
    assert table.loc["blank.png", "label"] == "indeterminate" and "low_tissue" in table.loc["blank.png", "flags"]
    assert table.loc["blank.png", "patient"] == "P-blank"
    assert "not an image" in table.loc["notes.txt", "problem"]
    assert "truncated" in table.loc["truncated.png", "problem"]
    assert "too large" in table.loc["huge.png", "problem"]
    assert (table.loc[["notes.txt", "truncated.png", "huge.png"], "label"] == "error").all()
    # A side-by-side image and overlay per scored file; patients summarised from their trusted images.
    assert len(results.gallery) == 3 and all(image.size == (68, 32) for image, _ in results.gallery)
    assert set(results.patients["patient"]) == set(table.loc[[uploads["image0"].name, uploads["image1"].name],
                                                             "patient"])
    assert results.patients["call"].isin(["benign", "malignant"]).all()


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
    (remote, remote_source), (local, local_source) = (configured_scorer(AppConfig(scoring_url=url)),
                                                      configured_scorer(AppConfig(model_uri=model_dir)))
    assert (remote_source, local_source) == (url, model_dir)
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


def test_page_in_a_real_browser(page, browser, classifier, uploads):
    """Upload through the page's file input, press Score, read the labels and the bad file's message off the
    page, check the overlays are rendered images, and download the CSV."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    model_dir, _ = classifier
    browser.get(page)
    WebDriverWait(browser, 60).until(lambda d: d.find_elements(By.CSS_SELECTOR, "#files input[type=file]"))
    files = [uploads["image0"], uploads["image1"], uploads["text"]]
    browser.find_element(By.CSS_SELECTOR, "#files input[type=file]").send_keys("\n".join(map(str, files)))
    # Uploaded: each file listed in the input (its name wraps before the extension).
    WebDriverWait(browser, 60).until(lambda d: all(p.stem in d.find_element(By.ID, "files").text for p in files))
    browser.find_element(By.ID, "score").click()
    WebDriverWait(browser, 120).until(lambda d: "Scored" in d.find_element(By.ID, "summary").text)
    summary = browser.find_element(By.ID, "summary").text
    assert "Scored 2 of 3 files" in summary and "notes.txt: not an image" in summary
    rows = [[cell.text for cell in row.find_elements(By.CSS_SELECTOR, "[role=gridcell]")]
            for row in browser.find_elements(By.CSS_SELECTOR, "#results [role=row]")]
    by_file = {cells[0]: cells for cells in rows if cells}  # the header row has no grid cells
    expected = _expected(model_dir, files[:2])
    for path, label in zip(files[:2], expected["label"], strict=True):
        assert by_file[path.name][2] == label, (by_file[path.name], label)  # columns: file, patient, label
    assert by_file["notes.txt"][2] == "error"
    # The overlays are rendered: loaded images of the side-by-side size (2 x 32 px + 4), one per scored file.
    WebDriverWait(browser, 30).until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#gallery img")) >= 2)
    images = browser.find_elements(By.CSS_SELECTOR, "#gallery img")
    widths = [browser.execute_script("return arguments[0].complete && arguments[0].naturalWidth", i) for i in images]
    assert widths == [68, 68]
    link = WebDriverWait(browser, 30).until(lambda d: d.find_elements(By.CSS_SELECTOR, "#download a[href]"))
    csv = pd.read_csv(io.StringIO(requests.get(link[0].get_attribute("href"), timeout=30).text))
    assert csv["file"].tolist() == [p.name for p in files] and csv["label"].iloc[2] == "error"


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
