"""The served model on ONNX Runtime: equal to the Keras evaluation for every variant, without TensorFlow, with the
served code alone; its fallback to TensorFlow and the runtime a server may choose."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest

from histoflow.serving.requests import encode_file

CLASSES = ["benign", "malignant"]


def _probabilities(frame: pd.DataFrame) -> np.ndarray:
    return np.array([[row[c] for c in CLASSES] for row in frame["probabilities"]])


def _keras_evaluation(keras_paths, temperatures, stains, images, size, tta) -> np.ndarray:
    """What the training run's evaluation computes for these networks: the tf.data pipeline (stain reference
    and all), inference.predict with the TTA, each network's temperature, the mean."""
    import keras

    from histoflow.data.pipeline import make_dataset
    from histoflow.data.stain import StainNormalizer
    from histoflow.modeling import inference
    from histoflow.modeling.calibration import Calibration

    out = []
    for path, temperature, stain in zip(keras_paths, temperatures, stains, strict=True):
        dataset = make_dataset(images, [0] * len(images), size, 4, stain=StainNormalizer(stain))
        model = keras.saving.load_model(path, compile=False)
        out.append(Calibration(temperature).apply(inference.predict(model, dataset, tta)))
    return np.mean(out, axis=0)


@pytest.fixture(scope="module")
def networks(tmp_path_factory, tiny_store):
    """Every variant's network as a .keras file: the tiny store's trained baseline, augmented CNN and CNN + LSTM
    (32 px), and untrained fusion networks (random weights: what matters is the graph) on DenseNet121,
    MobileNet alpha 0.75 and EfficientNetB0 (the transfer variant's other backbones' kind: rescaling in the
    graph, swish, squeeze-and-excitation)."""
    import keras

    from histoflow.modeling.architectures import build_fusion
    from histoflow.registry.selection import keras_artifact

    _, uri, runs = tiny_store
    mlflow.set_tracking_uri(uri)
    folder = tmp_path_factory.mktemp("networks")
    paths = {variant: keras_artifact(run) for variant, run in runs.items()}
    keras.utils.set_random_seed(3)
    for name, backbone, kwargs in (("densenet", "densenet121", {}),
                                   ("transfer_mobilenet", "mobilenet", {"alpha": 0.75}),
                                   ("transfer_efficientnet_b0", "efficientnet_b0", {})):
        model = build_fusion(backbone, 32, weights=None, fusion_width=8, **kwargs)
        # Random BatchNormalization statistics: the default ones (0 and 1) would hide a misplaced normalisation.
        for layer in model.layers:
            if isinstance(layer, keras.layers.BatchNormalization):
                mean, variance = layer.moving_mean, layer.moving_variance
                mean.assign(np.random.default_rng(0).normal(0, 0.1, mean.shape))
                variance.assign(np.random.default_rng(1).uniform(0.5, 1.5, variance.shape))
        paths[name] = str(folder / f"{name}.keras")
        model.save(paths[name])
    return paths


@pytest.fixture(scope="module")
def stain_reference(tiny_store):
    _, uri, runs = tiny_store
    run = mlflow.MlflowClient(uri).get_run(runs["baseline"])
    return mlflow.artifacts.load_dict(f"{run.info.artifact_uri}/data/stain_reference.json")


@pytest.mark.parametrize("variant", ["baseline", "augmented", "cnn_lstm", "densenet", "transfer_mobilenet",
                                     "transfer_efficientnet_b0"])
def test_every_variant_serves_the_keras_evaluation_on_onnx_runtime(use_store, networks, stain_reference, classifier,
                                                                     variant):
    """Served on ONNX Runtime (the default), each variant's probabilities equal its Keras evaluation to 1e-4:
    with the Macenko stain reference, plain and with dihedral8 TTA; the run is tagged with the runtime."""
    from histoflow.serving.packaging import log_classifier

    _, split = classifier
    images = split.loc[split["split"] == "test", "path"].tolist()[:5]
    with mlflow.start_run() as run:
        info = log_classifier([networks[variant]], CLASSES, 32, images[0], stain_references=[stain_reference])
    assert mlflow.get_run(run.info.run_id).data.tags["histoflow.serving.runtime"] == "onnx"
    model = mlflow.pyfunc.load_model(info.model_uri)
    assert model.unwrap_python_model().runtime == "onnx"
    request = pd.DataFrame({"image": [encode_file(p) for p in images]})
    for tta in ("none", "dihedral8"):
        served = _probabilities(model.predict(request, params={"tta": tta}))
        expected = _keras_evaluation([networks[variant]], [1.0], [stain_reference], images, 32, tta)
        np.testing.assert_allclose(served, expected, atol=1e-4)


def test_an_ensemble_on_onnx_runtime_is_the_mean_of_its_keras_members(use_store, networks, stain_reference,
                                                                        classifier):
    """Three members (two stain references, three temperatures) with dihedral8 TTA: the served probabilities are
    the mean of each member's calibrated Keras evaluation, to 1e-4, and the model's threshold decides."""
    from histoflow.modeling.calibration import Calibration
    from histoflow.serving.packaging import log_classifier

    _, split = classifier
    images = split.loc[split["split"] == "test", "path"].tolist()[:4]
    members = [networks["baseline"], networks["augmented"], networks["transfer_mobilenet"]]
    temperatures, stains = [0.7, 1.0, 1.6], [stain_reference, {"method": "none"}, stain_reference]
    with mlflow.start_run():
        info = log_classifier(members, CLASSES, 32, images[0], calibration=Calibration(1.0, 0.4),
                              member_temperatures=temperatures, stain_references=stains, tta="dihedral8")
    out = mlflow.pyfunc.load_model(info.model_uri).predict(pd.DataFrame({"image": [encode_file(p) for p in images]}))
    expected = _keras_evaluation(members, temperatures, stains, images, 32, "dihedral8")
    np.testing.assert_allclose(_probabilities(out), expected, atol=1e-4)
    assert out["model_label"].tolist() == [CLASSES[int(p >= 0.4)] for p in expected[:, 1]]


SCORE_WITHOUT_TENSORFLOW = textwrap.dedent("""
    import json, sys, time
    for name in ("tensorflow", "keras", "tf2onnx"):  # any import of them fails
        sys.modules[name] = None
    start = time.perf_counter()
    import mlflow, pandas as pd
    model = mlflow.pyfunc.load_model(sys.argv[1])
    loaded = time.perf_counter() - start
    out = model.predict(pd.read_json(sys.argv[2], orient="split"))
    import histoflow
    try:
        model.predict(pd.read_json(sys.argv[2], orient="split"), params={"explain": True})
        explain = "answered"
    except mlflow.exceptions.MlflowException as exc:
        explain = [exc.error_code, exc.message]
    print(json.dumps({"probabilities": out["probabilities"].tolist(), "labels": out["label"].tolist(),
                      "package": histoflow.__file__, "loaded_s": loaded, "explain": explain,
                      "modules": sorted(m for m, module in sys.modules.items() if module is not None
                                        and m.split(".")[0] in ("tensorflow", "keras", "histoflow", "sklearn"))}))
""")


def test_the_served_model_loads_and_scores_without_tensorflow_from_its_own_code(classifier, tmp_path):
    """In a process where TensorFlow, Keras and tf2onnx cannot be imported, the logged model loads and scores
    (the same answers as in this process) from the code it carries, which holds no training code; explain
    answers 501 (not implemented) saying what it needs. Nor does it import scikit-learn, which only fitting needs
    (its import alone was a second of every cold start)."""
    model_dir, split = classifier
    images = split.loc[split["split"] == "test", "path"].tolist()[:3]
    request = pd.DataFrame({"image": [encode_file(p) for p in images]})
    request_file = tmp_path / "request.json"
    request.to_json(request_file, orient="split")
    done = subprocess.run([sys.executable, "-c", SCORE_WITHOUT_TENSORFLOW, model_dir, str(request_file)],
                          capture_output=True, text=True, timeout=300, cwd=tmp_path,
                          env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"})
    assert done.returncode == 0, done.stderr[-3000:]
    got = json.loads(done.stdout.strip().splitlines()[-1])
    here = mlflow.pyfunc.load_model(model_dir).predict(request)
    np.testing.assert_allclose(np.array([[p[c] for c in CLASSES] for p in got["probabilities"]]),
                               _probabilities(here), atol=1e-6)
    assert got["labels"] == here["label"].tolist()
    assert Path(got["package"]).is_relative_to(Path(model_dir).resolve()) or got["package"].startswith(model_dir)
    assert not [m for m in got["modules"] if m.split(".")[0] in ("tensorflow", "keras", "sklearn")]
    assert "histoflow.serving.onnx_network" in got["modules"]
    code, message = got["explain"]
    assert code == "NOT_IMPLEMENTED" and "explain needs TensorFlow" in message
    shipped = {p.relative_to(Path(model_dir) / "code").as_posix() for p in (Path(model_dir) / "code").rglob("*.py")}
    assert "histoflow/serving/onnx_network.py" in shipped and "histoflow/data/images.py" in shipped
    for training in ("histoflow/modeling/training_run.py", "histoflow/modeling/fitting.py", "histoflow/tuning",
                     "histoflow/workflow.py", "histoflow/registry", "histoflow/serving/packaging.py",
                     "histoflow/modeling/onnx_export.py"):
        assert not any(s.startswith(training) for s in shipped), training
    requirements = (Path(model_dir) / "requirements.txt").read_text()
    assert "onnxruntime==" in requirements and "tensorflow" not in requirements and "keras" not in requirements


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_a_network_that_does_not_convert_is_served_by_tensorflow_with_a_warning_and_a_tag(use_store, classifier,
                                                                                          tmp_path, caplog):
    """A network with an operation ONNX has no conversion for is logged for the tensorflow runtime: a warning, the
    run tags say why, and the model serves (the Keras evaluation's answers). A server can choose tensorflow for a
    model that has graphs too (HISTOFLOW_RUNTIME)."""
    import logging

    import keras
    import tensorflow as tf

    from histoflow.modeling.architectures import build_baseline
    from histoflow.serving.packaging import log_classifier

    @keras.saving.register_keras_serializable(package="histoflow_tests")
    class GradientOfRelu(keras.layers.Layer):  # a raw op tf2onnx cannot convert: ReluGrad
        def call(self, x):
            return tf.raw_ops.ReluGrad(gradients=x, features=x)

    base = build_baseline(32)
    x = GradientOfRelu(name="relu_grad")(base.get_layer("dense").output)
    model = keras.Model(base.inputs, keras.layers.Dense(2, activation="softmax", name="probabilities")(x))
    path = tmp_path / "unconvertible.keras"
    model.save(path)
    _, split = classifier
    images = split.loc[split["split"] == "test", "path"].tolist()[:3]
    with caplog.at_level(logging.WARNING, logger="histoflow.serving.packaging"), mlflow.start_run() as run:
        info = log_classifier([path], CLASSES, 32, images[0])
    assert "has no ONNX graph" in caplog.text and "tensorflow runtime" in caplog.text
    tags = mlflow.get_run(run.info.run_id).data.tags
    assert tags["histoflow.serving.runtime"] == "tensorflow" and "network 0:" in tags["histoflow.serving.onnx_failure"]
    served = mlflow.pyfunc.load_model(info.model_uri)
    assert served.unwrap_python_model().runtime == "tensorflow"
    assert mlflow.models.get_model_info(info.model_uri).metadata["runtime"] == "tensorflow"
    out = served.predict(pd.DataFrame({"image": [encode_file(p) for p in images]}))
    np.testing.assert_allclose(_probabilities(out), _keras_evaluation([path], [1.0], [{"method": "none"}], images, 32,
                                                                      "none"), atol=1e-5)


def test_a_server_may_choose_the_tensorflow_runtime(classifier, monkeypatch):
    """HISTOFLOW_RUNTIME=tensorflow serves the .keras files of a model logged with graphs: the same answers."""
    model_dir, split = classifier
    images = split.loc[split["split"] == "test", "path"].tolist()[:3]
    request = pd.DataFrame({"image": [encode_file(p) for p in images]})
    onnx = mlflow.pyfunc.load_model(model_dir)
    monkeypatch.setenv("HISTOFLOW_RUNTIME", "tensorflow")
    tensorflow = mlflow.pyfunc.load_model(model_dir)
    assert (onnx.unwrap_python_model().runtime, tensorflow.unwrap_python_model().runtime) == ("onnx", "tensorflow")
    np.testing.assert_allclose(_probabilities(onnx.predict(request)), _probabilities(tensorflow.predict(request)),
                               atol=1e-5)
    monkeypatch.setenv("HISTOFLOW_RUNTIME", "torch")
    with pytest.raises(Exception, match="runtime must be one of onnx, tensorflow; got 'torch'"):
        mlflow.pyfunc.load_model(model_dir)


def test_numpy_dihedral_views_are_tensorflows():
    """The ONNX runtime's views (numpy) are evaluation's (TensorFlow), in the same order."""
    from histoflow.modeling.inference import dihedral_views as tf_views
    from histoflow.serving.onnx_network import dihedral_views

    images = np.random.default_rng(0).random((3, 5, 5, 2), dtype=np.float32)
    np.testing.assert_array_equal(dihedral_views(images), tf_views(images).numpy())
