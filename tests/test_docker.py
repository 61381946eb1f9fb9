"""The serving image: MLflow's generated Dockerfile (no Docker engine here) and its serving command, run locally."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import mlflow
import pandas as pd
import pytest
import requests

from conftest import REPO, wait_for
from histoflow.serving.requests import encode_file

pytestmark = pytest.mark.slow  # generates the build context and starts the image's server
CONTAINER_PORT = 8000  # the scoring server behind the image's nginx (which listens on 8080)


@pytest.fixture(scope="module")
def build_dir(registered_classifier, tiny_store, tmp_path_factory):
    model_uri = registered_classifier
    _, uri, _ = tiny_store
    out = tmp_path_factory.mktemp("docker") / "build"
    subprocess.run(["bash", str(REPO / "docker" / "generate_dockerfile.sh"), model_uri, str(out)], check=True,
                   env={**os.environ, "MLFLOW_TRACKING_URI": uri}, capture_output=True, timeout=300)
    return out


def test_generated_dockerfile_bakes_the_model_in(build_dir):
    dockerfile = (build_dir / "Dockerfile").read_text()
    assert re.search(r"^FROM python:3\.\d+", dockerfile, re.M)
    assert f"RUN pip install mlflow=={mlflow.__version__}" in dockerfile
    assert "COPY model_dir /opt/ml/model" in dockerfile
    assert "_install_pyfunc_deps('/opt/ml/model'" in dockerfile and "env_manager='local'" in dockerfile
    assert "ENV MLFLOW_DISABLE_ENV_CREATION=True" in dockerfile
    entrypoint = json.loads(re.search(r"^ENTRYPOINT (.+)$", dockerfile, re.M).group(1))
    assert entrypoint == ["python", "-c", "from mlflow.models import container as C; C._serve('local')"]
    model_dir = build_dir / "model_dir"
    suffixes = {p.suffix for p in (model_dir / "artifacts").iterdir()}
    assert {".onnx", ".keras"} <= suffixes  # the graph it serves, the network for Grad-CAM
    assert (model_dir / "code" / "histoflow" / "data" / "images.py").is_file()  # the training preprocessing
    assert not (model_dir / "code" / "histoflow" / "data" / "samples").exists()  # the sample images stay out
    assert not (model_dir / "code" / "histoflow" / "modeling" / "training_run.py").exists()  # nor training code
    assert (model_dir / "model_code.py").is_file()
    requirements = (model_dir / "requirements.txt").read_text()
    # The small image: ONNX Runtime, no TensorFlow or Keras.
    assert re.search(r"^onnxruntime==", requirements, re.M) and "pillow==" in requirements
    assert not re.search(r"^(tensorflow|tensorflow-cpu|keras)==", requirements, re.M)
    assert "torchstain==" in requirements  # the stain normalisation of the served preprocessing


def test_an_image_for_explanations_adds_this_environment_s_tensorflow(registered_classifier, tiny_store,
                                                                      tmp_path):
    """EXPLAIN=1 (the page's scoring service): the same build context, with Keras and TensorFlow pinned to the
    versions installed here added to the model's requirements, so that Grad-CAM answers in the image."""
    from importlib import metadata

    _, uri, _ = tiny_store
    out = tmp_path / "build"
    subprocess.run(["bash", str(REPO / "docker" / "generate_dockerfile.sh"), registered_classifier, str(out)],
                   check=True, env={**os.environ, "MLFLOW_TRACKING_URI": uri, "EXPLAIN": "1"}, capture_output=True,
                   timeout=300)
    lines = (out / "model_dir" / "requirements.txt").read_text().split()
    assert f"keras=={metadata.version('keras')}" in lines
    assert f"tensorflow-cpu=={metadata.version('tensorflow-cpu')}" in lines
    assert any(line.startswith("onnxruntime==") for line in lines)  # it still scores on ONNX Runtime


def test_image_listens_on_8080_and_proxies_ping_and_invocations():
    import mlflow.models.container as container

    conf = (Path(container.__file__).parent / "scoring_server" / "nginx.conf").read_text()
    assert "listen 8080" in conf and "location ~ ^/(ping|invocations)" in conf
    assert f"server 127.0.0.1:{CONTAINER_PORT}" in conf


def test_container_serving_command_serves_the_baked_model(build_dir, classifier):
    """Run the image's ENTRYPOINT code on this machine, against the model_dir it would copy in.

    Differences from the container, both forced by the missing Docker engine: MODEL_PATH points at the
    build folder instead of /opt/ml/model, and nginx (the 8080 front) is disabled, so the scoring
    server answers on its own port.
    """
    model_uri, split = classifier
    dockerfile = (build_dir / "Dockerfile").read_text()
    code = json.loads(re.search(r"^ENTRYPOINT (.+)$", dockerfile, re.M).group(1))[2]
    code = code.replace("C._serve(", f"C.MODEL_PATH = {str(build_dir / 'model_dir')!r}; C._serve(")
    env = {**os.environ, "DISABLE_NGINX": "true", "MLFLOW_DISABLE_ENV_CREATION": "True",
           "MLFLOW_MODELS_WORKERS": "1"}
    env.pop("MLFLOW_TRACKING_URI", None)  # the container has no registry: everything is baked in
    process = subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL, start_new_session=True)
    url = f"http://127.0.0.1:{CONTAINER_PORT}"
    try:
        wait_for(f"{url}/ping", process)
        paths = split.loc[split["split"] == "test", "path"].tolist()[:3]
        images = [encode_file(p) for p in paths]
        response = requests.post(f"{url}/invocations", json={"inputs": images}, timeout=60)
        assert response.status_code == 200, response.text[:300]
        expected = mlflow.pyfunc.load_model(model_uri).predict(pd.DataFrame({"image": images}))
        assert [p["label"] for p in response.json()["predictions"]] == expected["label"].tolist()
    finally:
        os.killpg(process.pid, 15)
        process.wait(timeout=30)
