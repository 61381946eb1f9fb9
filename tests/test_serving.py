"""The served model: in-process pyfunc and the real `mlflow models serve` process, good and bad requests."""

from __future__ import annotations

import base64
import functools
import io
import json
import os
import sys
import threading
import time
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
import requests
from PIL import Image, ImageFilter

from histoflow.data.images import MAX_PIXELS
from histoflow.serving.batching import BatchingSettings
from histoflow.serving.requests import (
    MAX_IMAGES_PER_REQUEST,
    MAX_REQUEST_CHARS,
    RequestError,
    decode_request,
    encode_file,
)


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


@functools.cache  # the 40-megapixel one: each case of the bad requests' test builds them all
def _png(width: int, height: int, mode: str = "RGB", colour=0) -> bytes:
    buffer = io.BytesIO()
    Image.new(mode, (width, height), colour).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def test_images(classifier):
    _, split = classifier
    paths = split.loc[split["split"] == "test", "path"].tolist()
    return paths[:4]


@pytest.fixture(scope="module")
def server(scoring_server):
    return scoring_server


def test_decode_request_formats_and_errors(test_images):
    data = encode_file(test_images[0])
    assert len(decode_request(pd.DataFrame({"image": [data, data]}))) == 2
    assert decode_request({"image": data})[0].ndim == 3
    assert decode_request([data])[0].shape[2] == 3
    for bad, message in [([], "no images"), (["%%%"], "not valid base64"), ({"img": [data]}, "key 'image'"),
                         ([_b64(b"")], "empty file"), ([_b64(b"plain text")], "not an image"),
                         ([data] * (MAX_IMAGES_PER_REQUEST + 1), "the limit is")]:
        with pytest.raises(RequestError, match=message):
            decode_request(bad)


def test_the_size_limit_is_per_request_and_counts_raw_bytes(test_images):
    """MAX_REQUEST_CHARS bounds all images of a request together, base64 strings and raw bytes alike."""
    half = "A" * (MAX_REQUEST_CHARS // 2 + 4)  # each under the limit, together over it
    with pytest.raises(RequestError, match=f"together \\(image 0 alone {len(half):,}\\), above the limit of "
                                           f"{MAX_REQUEST_CHARS:,} per request"):
        decode_request([half, half])
    raw = b"\0" * (MAX_REQUEST_CHARS // 4 * 3 + 3)  # its base64 is just over the limit
    with pytest.raises(RequestError, match="above the limit"):
        decode_request([raw])
    good = Path(test_images[0]).read_bytes()
    assert decode_request([good, encode_file(test_images[0])])[0].shape == decode_request([good])[0].shape


def test_served_probabilities_and_labels_are_the_evaluations(classifier, test_images, tiny_store):
    """The served model = the training run's evaluation: the same preprocessing, the stain reference fitted
    on the training split, dihedral test-time augmentation, the temperature and the threshold fitted on
    validation, to 1e-5."""
    import keras

    from histoflow.data.pipeline import make_dataset
    from histoflow.data.stain import StainNormalizer
    from histoflow.modeling import inference
    from histoflow.modeling.calibration import Calibration

    model_uri, split = classifier
    _, _, runs = tiny_store
    pyfunc = mlflow.pyfunc.load_model(model_uri)
    images = pd.DataFrame({"image": [encode_file(p) for p in test_images]})
    out = pyfunc.predict(images)
    assert list(out.columns) == ["label", "model_label", "positive_class", "positive_probability", "probabilities",
                                 "threshold", "flags",
                                 "quality"]
    probs = np.array([[row["benign"], row["malignant"]] for row in out["probabilities"]])
    # The same images through the training input pipeline, the .keras file and the run's calibration.
    keras_path = next(p for p in _model_files(model_uri) if p.endswith(".keras"))
    model = keras.saving.load_model(keras_path)
    labels = split.set_index("path").loc[test_images, "label"]
    run = mlflow.MlflowClient(tiny_store[1]).get_run(runs["baseline"])
    reference = mlflow.artifacts.load_dict(f"{run.info.artifact_uri}/data/stain_reference.json")
    assert reference["method"] == "macenko" and run.data.metrics["stain_fallback_images"] >= 0
    stain = StainNormalizer(reference)
    dataset = make_dataset(test_images, labels, 32, 8, stain=stain)
    assert stain.method == "macenko" and not any(stain.normalize(x)[1] for x in map(_read, test_images))
    assert not np.allclose(next(iter(dataset))[0], next(iter(make_dataset(test_images, labels, 32, 8)))[0], atol=0.01)
    saved = mlflow.artifacts.load_dict(f"{run.info.artifact_uri}/evaluation/calibration.json")
    fitted = Calibration(**{k: v for k, v in saved.items() if k != "class_names"})
    assert fitted.threshold_policy == "youden" and fitted.temperature == run.data.metrics["temperature"]
    assert run.data.params["tta"] == "dihedral8"
    np.testing.assert_allclose(probs, fitted.apply(inference.predict(model, dataset, "dihedral8")), atol=1e-5)
    assert out["model_label"].tolist() == [["benign", "malignant"][k]
                                           for k in (probs[:, 1] >= fitted.threshold).astype(int)]
    assert (out["threshold"] == fitted.threshold).all() and not out["flags"].str.contains("stain_fallback").any()
    assert (out["positive_class"] == "malignant").all() and np.allclose(out["positive_probability"], probs[:, 1])
    assert pyfunc.metadata.signature.inputs.input_names() == ["image"]
    # A request may switch test-time augmentation off: one view, the same calibration.
    single = pyfunc.predict(images, params={"tta": "none"})
    single_probs = np.array([[row["benign"], row["malignant"]] for row in single["probabilities"]])
    np.testing.assert_allclose(single_probs, fitted.apply(model.predict(dataset, verbose=0)), atol=1e-5)
    assert not np.allclose(single_probs, probs, atol=1e-6)
    with pytest.raises(RequestError, match="params.tta must be one of none, dihedral8"):
        pyfunc.predict(images, params={"tta": "rotate"})


def test_explain_returns_the_training_gradcam_overlay(classifier, test_images):
    """params explain=true adds each image's Grad-CAM overlay: a PNG at the model's input size, the overlay of
    the same heatmap the training run's figure draws (explain.GradCam on the batch the network saw, for the
    served label). Without it the response has no such column."""
    import keras

    from histoflow.data.images import resize_and_scale
    from histoflow.data.stain import StainNormalizer
    from histoflow.modeling.architectures import gradcam_layer
    from histoflow.modeling.explain import GradCam
    from histoflow.modeling.overlay import overlay

    model_uri, _ = classifier
    pyfunc = mlflow.pyfunc.load_model(model_uri)
    images = pd.DataFrame({"image": [encode_file(p) for p in test_images]})
    plain = pyfunc.predict(images)
    explained = pyfunc.predict(images, params={"explain": True})
    assert "gradcam" not in plain and list(explained.columns)[:-1] == list(plain.columns)
    pd.testing.assert_frame_equal(explained.drop(columns="gradcam"), plain)
    model = keras.saving.load_model(next(p for p in _model_files(model_uri) if p.endswith(".keras")))
    reference = pyfunc.unwrap_python_model()._groups
    stain = next(iter(reference.values()))[0]
    assert isinstance(stain, StainNormalizer)
    batch = np.stack([resize_and_scale(stain.normalize(_read(p))[0], 32) for p in test_images])
    classes = [["benign", "malignant"].index(label) for label in plain["model_label"]]
    expected = [overlay(i, h) for i, h in zip(batch, GradCam(model, gradcam_layer(model))(batch, classes), strict=True)]
    for got, want in zip(explained["gradcam"], expected, strict=True):
        png = np.asarray(Image.open(io.BytesIO(base64.b64decode(got))))
        assert png.shape == (32, 32, 3) and png.dtype == np.uint8
        assert np.abs(png.astype(int) - want).max() <= 1
    assert not np.array_equal(np.asarray(Image.open(io.BytesIO(base64.b64decode(explained["gradcam"][0])))),
                              np.rint(batch[0] * 255).astype(np.uint8))  # a heatmap is drawn on the image
    with pytest.raises(mlflow.exceptions.MlflowException, match="'explain'.*boolean"):
        pyfunc.predict(images, params={"explain": "maybe"})  # MLflow checks it against the signature


def test_a_model_logged_without_screening_still_serves(use_store, classifier, test_images, caplog):
    """A model logged before screening existed (no screening file) loads with a warning; its predictions get
    the tissue check only: no focus, OOD or colour flag, no such scores, never an error."""
    import logging

    from histoflow.registry.selection import keras_artifact
    from histoflow.serving.packaging import log_classifier

    _, _, runs = use_store
    with mlflow.start_run():
        info = log_classifier([keras_artifact(runs["augmented"])], ["benign", "malignant"], 32, test_images[0])
    with caplog.at_level(logging.WARNING, logger="histoflow.serving.classifier"):
        model = mlflow.pyfunc.load_model(info.model_uri)
    assert "without screening thresholds" in caplog.text
    blurred = Image.open(test_images[0]).convert("RGB").filter(ImageFilter.GaussianBlur(20))
    buffer = io.BytesIO()
    blurred.save(buffer, format="PNG")
    out = model.predict(pd.DataFrame({"image": [_b64(_png(64, 64, "RGB", (0, 0, 0))), _b64(buffer.getvalue()),
                                                encode_file(test_images[1])]}))
    assert out["flags"].tolist() == ["low_tissue", "", ""]
    assert out["label"].tolist()[1:] == out["model_label"].tolist()[1:] and out["label"][0] == "indeterminate"
    assert all(set(q) == {"tissue_fraction", "focus"} for q in out["quality"])


def _read(path: str) -> np.ndarray:
    from histoflow.data.images import read_image

    return read_image(path)


def test_blank_tiles_are_scored_unnormalised_and_flagged(classifier, test_images):
    """A white or flat grey tile has no stain to normalise: scored as it is, flagged (no tissue, and the stain
    fallback), indeterminate, never NaN."""
    pyfunc = mlflow.pyfunc.load_model(classifier[0])
    blank = [_b64(_png(64, 64, "RGB", colour)) for colour in ((255, 255, 255), (128, 128, 128))]
    out = pyfunc.predict(pd.DataFrame({"image": blank + [encode_file(test_images[0])]}))
    assert [f.split(",")[0] for f in out["flags"][:2]] == ["low_tissue"] * 2
    assert out["flags"][:2].str.endswith("stain_fallback").all() and "stain_fallback" not in out["flags"][2]
    assert (out["label"][:2] == "indeterminate").all()
    assert all(np.isfinite(list(p.values())).all() for p in out["probabilities"])


def _model_files(model_uri: str) -> list[str]:
    local = mlflow.artifacts.download_artifacts(model_uri)
    return [os.path.join(d, f) for d, _, files in os.walk(local) for f in files]


def test_server_endpoints_and_formats(server, classifier, test_images):
    model_uri, _ = classifier
    assert requests.get(f"{server}/ping", timeout=10).status_code == 200
    assert requests.get(f"{server}/health", timeout=10).status_code == 200
    assert requests.get(f"{server}/version", timeout=10).text == mlflow.__version__
    images = [encode_file(p) for p in test_images]
    expected = mlflow.pyfunc.load_model(model_uri).predict(pd.DataFrame({"image": images}))
    payloads = {
        "inputs list": {"inputs": images},
        "inputs columns": {"inputs": {"image": images}},
        "dataframe_split": {"dataframe_split": {"columns": ["image"], "data": [[i] for i in images]}},
        "dataframe_records": {"dataframe_records": [{"image": i} for i in images]},
    }
    for name, payload in payloads.items():
        response = requests.post(f"{server}/invocations", json=payload, timeout=60)
        assert response.status_code == 200, (name, response.text[:300])
        predictions = response.json()["predictions"]
        assert [p["label"] for p in predictions] == expected["label"].tolist(), name
        for got, want in zip(predictions, expected.to_dict("records"), strict=True):
            assert got["positive_probability"] == pytest.approx(want["positive_probability"], abs=1e-5)
            assert got["probabilities"] == pytest.approx(want["probabilities"], abs=1e-5)
            assert got["flags"] == want["flags"] and got["quality"] == pytest.approx(want["quality"], rel=1e-6)
    explained = requests.post(f"{server}/invocations", json={"inputs": images[:2], "params": {"explain": True}},
                              timeout=60)
    assert explained.status_code == 200, explained.text[:300]
    overlays = [Image.open(io.BytesIO(base64.b64decode(p["gradcam"]))) for p in explained.json()["predictions"]]
    assert [o.size for o in overlays] == [(32, 32)] * 2


def _bad_requests(good: str) -> dict[str, dict]:
    truncated = base64.b64decode(good)[:2000]
    return {
        "not base64": {"json": {"inputs": {"image": ["this is not base64!"]}}},
        "base64 of a non-image": {"json": {"inputs": {"image": [_b64(b"%PDF-1.4 not an image")]}}},
        "truncated image": {"json": {"inputs": {"image": [_b64(truncated)]}}},
        "0-byte image": {"json": {"inputs": {"image": [""]}}},
        "null entry": {"json": {"inputs": [good, None]}},
        "null in a column": {"json": {"dataframe_split": {"columns": ["image"], "data": [[None]]}}},
        "too many pixels": {"json": {"inputs": {"image": [_b64(_png(8000, 5001, "L"))]}}},
        "too many images": {"json": {"inputs": {"image": [good] * (MAX_IMAGES_PER_REQUEST + 1)}}},
        "empty list": {"json": {"inputs": []}},
        "wrong JSON key": {"json": {"images": [good]}},
        "wrong column": {"json": {"dataframe_split": {"columns": ["img"], "data": [[good]]}}},
        "malformed JSON": {"data": '{"inputs": [', "headers": {"Content-Type": "application/json"}},
        "wrong content type": {"data": good, "headers": {"Content-Type": "image/png"}},
        "unknown tta": {"json": {"inputs": [good], "params": {"tta": "rotate"}}},
        "explain over the limit": {"json": {"inputs": [good] * (MAX_IMAGES_PER_REQUEST + 1),
                                            "params": {"explain": True}}},
        "explain not boolean": {"json": {"inputs": [good], "params": {"explain": "maybe"}}},
        "explain yes": {"json": {"inputs": [good], "params": {"explain": "yes"}}},
        "unknown parameter": {"json": {"inputs": [good], "params": {"tta": "none", "colour": "blue"}}},
        "wrong input key": {"json": {"inputs": {"img": [good]}}},
        "no content type": {"data": json.dumps({"inputs": [good]}), "headers": {}},
    }


EXPECTED_MESSAGES = {
    "not base64": "not valid base64", "base64 of a non-image": "not an image",
    "truncated image": "truncated", "0-byte image": "empty file",
    "null entry": "image 1: the entry is null", "null in a column": "image 0: the entry is null",
    "too many pixels": f"{MAX_PIXELS:,} pixels", "too many images": f"the limit is {MAX_IMAGES_PER_REQUEST}",
    "empty list": "no images", "wrong JSON key": "exactly one of the input fields",
    "wrong column": "image", "malformed JSON": "valid JSON", "wrong content type": "content types",
    "unknown tta": "params.tta must be one of none, dihedral8",
    "explain over the limit": f"the limit is {MAX_IMAGES_PER_REQUEST}", "explain not boolean": "explain",
    "explain yes": "explain", "unknown parameter": "unknown parameter 'colour'; this model takes tta",
    "wrong input key": "image", "no content type": "application/json",
}


@pytest.mark.parametrize("case", list(EXPECTED_MESSAGES))
def test_bad_request_gets_4xx_and_the_server_keeps_serving(server, test_images, case):
    good = encode_file(test_images[0])
    response = requests.post(f"{server}/invocations", timeout=60, **_bad_requests(good)[case])
    assert 400 <= response.status_code < 500, (case, response.status_code, response.text[:300])
    assert EXPECTED_MESSAGES[case] in response.text, (case, response.text[:500])
    assert len(response.text) < 2000, (case, response.text[:500])  # the reason, not an echo of the request
    if response.headers["content-type"].startswith("application/json"):
        assert not response.json()["message"].startswith("Failed to predict data"), case
    if case == "no content type":
        assert response.status_code == 415
    after = requests.post(f"{server}/invocations", json={"inputs": [good]}, timeout=60)
    assert after.status_code == 200 and len(after.json()["predictions"]) == 1


def test_any_size_and_format(server):
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 255, (300, 470, 3), dtype=np.uint8)
    files = []
    for fmt in ("PNG", "JPEG", "TIFF", "BMP"):
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, format=fmt)
        files.append(_b64(buffer.getvalue()))
    files.append(_b64(_png(37, 1200, "RGBA")))
    response = requests.post(f"{server}/invocations", json={"inputs": files}, timeout=60)
    assert response.status_code == 200, response.text[:300]
    predictions = response.json()["predictions"]
    assert len(predictions) == 5
    assert all(abs(sum(p["probabilities"].values()) - 1) < 1e-4 for p in predictions)
    # Lossless formats of the same pixels give the same answer.
    lossless = [predictions[i]["probabilities"]["malignant"] for i in (0, 2, 3)]
    assert max(lossless) - min(lossless) < 1e-5
    for p in predictions:  # the label follows the threshold the response names
        assert p["model_label"] == ("malignant" if p["probabilities"]["malignant"] >= p["threshold"] else "benign")
        assert p["positive_probability"] == pytest.approx(p["probabilities"][p["positive_class"]])


def test_a_16_bit_export_is_scored_as_its_8_bit_image_not_as_a_white_tile(server, test_images):
    grey = np.asarray(Image.open(test_images[0]).convert("L"))
    files = []
    for pixels in (grey, grey.astype(np.uint16) * 257):
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, format="PNG")
        files.append(_b64(buffer.getvalue()))
    response = requests.post(f"{server}/invocations", json={"inputs": files}, timeout=60)
    assert response.status_code == 200, response.text[:300]
    eight, sixteen = response.json()["predictions"]
    assert sixteen["probabilities"] == pytest.approx(eight["probabilities"], abs=1e-6)
    assert sixteen["quality"] == pytest.approx(eight["quality"]) and sixteen["flags"] == eight["flags"]


def _at_once(send, items: list) -> list:
    """send(item) for every item from its own thread, all released together; the answers in order."""
    answers: list = [None] * len(items)
    start = threading.Barrier(len(items))

    def client(i: int) -> None:
        start.wait()
        answers[i] = send(items[i])

    threads = [threading.Thread(target=client, args=(i,)) for i in range(len(items))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    return answers


def test_concurrent_requests_share_forward_passes_and_get_their_own_answers(classifier, test_images, monkeypatch):
    monkeypatch.setenv("HISTOFLOW_MAX_WAIT_MS", "200")  # gathering made certain: the test is about the answers
    pyfunc = mlflow.pyfunc.load_model(classifier[0])
    batcher = pyfunc.unwrap_python_model()._batcher
    files = [encode_file(p) for p in test_images] * 3
    alone = [pyfunc.predict(pd.DataFrame({"image": [f]})) for f in files]
    passes = batcher.passes
    together = _at_once(lambda f: pyfunc.predict(pd.DataFrame({"image": [f]})), files)
    assert batcher.passes - passes < len(files)  # gathered
    for one, other in zip(alone, together, strict=True):
        assert other["model_label"].tolist() == one["model_label"].tolist()
        np.testing.assert_allclose(other["positive_probability"], one["positive_probability"], atol=1e-6)
        assert other["flags"].tolist() == one["flags"].tolist()


def test_concurrent_clients_of_the_server_get_their_own_predictions(server, test_images):
    def post(inputs):
        response = requests.post(f"{server}/invocations", json={"inputs": inputs}, timeout=60)
        return response.status_code, response.json()

    files = [encode_file(p) for p in test_images]
    requests_ = [files[i % len(files):] + files[:i % len(files)] for i in range(8)]  # 4 images each, rotated
    requests_[3] = [files[0], "not base64!"]  # a bad image fails its own request only
    alone = [post(inputs) for inputs in requests_]
    together = _at_once(post, requests_)
    for (status, answer), (status_alone, answer_alone) in zip(together, alone, strict=True):
        assert status == status_alone
        if status == 200:
            for got, want in zip(answer["predictions"], answer_alone["predictions"], strict=True):
                assert got["positive_probability"] == pytest.approx(want["positive_probability"], abs=1e-6)
                assert got["label"] == want["label"] and got["flags"] == want["flags"]
    assert together[3][0] == 400 and "image 1: not valid base64" in together[3][1]["message"]


def test_a_request_that_waits_too_long_for_its_forward_pass_gets_a_503(classifier, test_images):
    """Concurrent requests queue for their batched pass; on an overloaded machine (a pass takes 1 s) those that
    wait over the timeout are answered 503 (retry), the others are scored, and the model goes on serving."""
    pyfunc = mlflow.pyfunc.load_model(classifier[0])
    batcher = pyfunc.unwrap_python_model()._batcher
    network = batcher.forward
    batcher.forward = lambda key, images: (time.sleep(1.0), network(key, images))[1]  # an overloaded machine
    batcher.settings = BatchingSettings(max_wait_ms=50, timeout_s=0.2)

    def send(item):
        try:
            return pyfunc.predict(pd.DataFrame({"image": [item]}))
        except RequestError as exc:
            return exc

    answers = _at_once(send, [encode_file(p) for p in test_images] * 2)
    refused = [a for a in answers if isinstance(a, RequestError)]
    assert refused and all(a.get_http_status_code() == 503 and "no forward pass within 0.2 s" in a.message
                           for a in refused)  # the client may retry
    assert all(len(a) == 1 for a in answers if not isinstance(a, RequestError))
    batcher.forward, batcher.settings = network, BatchingSettings()
    assert len(pyfunc.predict(pd.DataFrame({"image": [encode_file(test_images[0])]}))) == 1


def test_in_process_requests_keep_the_size_limit_per_chunk(classifier):
    model_uri, _ = classifier
    pyfunc = mlflow.pyfunc.load_model(model_uri)
    with pytest.raises(RequestError, match="above the limit"):
        pyfunc.predict(pd.DataFrame({"image": [b"\0" * (MAX_REQUEST_CHARS // 4 * 3 + 3)]}))


def test_in_process_batches_are_chunked_not_refused(classifier, test_images):
    model_uri, _ = classifier
    pyfunc = mlflow.pyfunc.load_model(model_uri)
    # 96 px corners of the test images: many of them are scored quickly (the stain is normalised per pixel).
    crops = []
    for path in test_images:
        buffer = io.BytesIO()
        Image.open(path).convert("RGB").crop((0, 0, 96, 96)).save(buffer, format="PNG")
        crops.append(buffer.getvalue())
    images = [_b64(crop) for crop in crops]
    many = images * (MAX_IMAGES_PER_REQUEST // len(images) + 1)  # more than one request may hold
    out = pyfunc.predict(pd.DataFrame({"image": many}), params={"tta": "none"})
    assert len(out) == len(many) > MAX_IMAGES_PER_REQUEST
    few = pyfunc.predict(pd.DataFrame({"image": images}), params={"tta": "none"})
    assert out["label"].tolist() == few["label"].tolist() * (len(many) // len(images))


def _scoring_workers(pid: int) -> list[int]:
    """The uvicorn worker processes under a server's process (multiprocessing's spawned children)."""
    found, pending = [], [pid]
    while pending:
        p = pending.pop()
        for task in Path(f"/proc/{p}/task").glob("*"):
            try:
                pending += [int(c) for c in (task / "children").read_text().split()]
            except OSError:
                continue
        try:
            if b"spawn_main" in Path(f"/proc/{p}/cmdline").read_bytes():
                found.append(p)
        except OSError:
            continue
    return sorted(found)


@pytest.mark.slow
def test_a_worker_killed_mid_batch_loses_only_its_own_requests(classifier, tiny_store, test_images):
    """Two workers under concurrent clients; one is killed (SIGKILL) while requests are in flight: only the
    requests it held fail (at most one per client), every other answer is the unbatched one, uvicorn starts a new
    worker and the server goes on serving."""
    import signal

    from conftest import free_port, start_server, wait_for

    model_dir, _ = classifier
    port = free_port()
    process = start_server([sys.executable, "-m", "mlflow", "models", "serve", "-m", model_dir, "--env-manager",
                            "local", "--host", "127.0.0.1", "--port", str(port), "--workers", "2"],
                           env={**os.environ, "MLFLOW_TRACKING_URI": tiny_store[1]})
    url = f"http://127.0.0.1:{port}"
    inputs = [encode_file(p) for p in test_images] * 2  # 8 images with dihedral TTA: passes take a while
    payload = {"inputs": inputs, "params": {"tta": "dihedral8"}}
    expected = mlflow.pyfunc.load_model(model_dir).predict(pd.DataFrame({"image": inputs}), params={"tta": "dihedral8"})
    try:
        wait_for(f"{url}/ping", process)
        deadline = time.time() + 60
        while len(_scoring_workers(process.pid)) < 2 and time.time() < deadline:
            time.sleep(0.2)
        workers = _scoring_workers(process.pid)
        assert len(workers) == 2, workers
        clients, outcomes, lock = 6, [], threading.Lock()
        started = threading.Barrier(clients + 1)

        def client() -> None:
            session = requests.Session()
            started.wait()
            for _ in range(3):
                try:
                    response = session.post(f"{url}/invocations", json=payload, timeout=60)
                    got = response.status_code, response.json() if response.status_code == 200 else None
                except requests.RequestException as exc:  # the killed worker's connections
                    got = type(exc).__name__, None
                with lock:
                    outcomes.append(got)

        threads = [threading.Thread(target=client) for _ in range(clients)]
        for t in threads:
            t.start()
        started.wait()
        time.sleep(0.5)  # requests in flight on both workers
        os.kill(workers[0], signal.SIGKILL)
        for t in threads:
            t.join(180)
        failed = [status for status, _ in outcomes if status != 200]
        assert len(outcomes) == clients * 3 and len(failed) <= clients, failed
        for status, answer in outcomes:
            if status == 200:
                got = [p["positive_probability"] for p in answer["predictions"]]
                np.testing.assert_allclose(got, expected["positive_probability"], atol=1e-6)
        deadline = time.time() + 60  # uvicorn replaces the worker
        while len(_scoring_workers(process.pid)) < 2 and time.time() < deadline:
            time.sleep(0.2)
        assert len(_scoring_workers(process.pid)) == 2 and workers[0] not in _scoring_workers(process.pid)
        for _ in range(4):
            assert requests.post(f"{url}/invocations", json=payload, timeout=60).status_code == 200
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=30)
