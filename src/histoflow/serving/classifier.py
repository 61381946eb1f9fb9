"""The served model: a pyfunc that takes image files (base64) and returns label, probabilities and threshold.

It is logged with MLflow's models-from-code (`model_code.py`) and carries each network twice, as its `.keras`
file and as an ONNX graph (histoflow.modeling.onnx_export), with the class names and image size, the
calibration, the stain references and the screening, and the serving code alone (`code_paths`: the modules the
served model imports, no training code), so the preprocessing is exactly the training one
(`histoflow.data.images`, `histoflow.data.stain`).

Runtimes: `onnx` (the default) runs the graphs with ONNX Runtime and imports neither TensorFlow nor Keras to
load or predict: the serving environment installs neither (about 0.2 s to load, and a small image).
`tensorflow` runs the `.keras` files, each through one `tf.function` traced at load time with a fixed input
signature (not `model.predict` per request, ~3x slower: MLflow issue #5259); it is what models logged before
the ONNX graphs use, what `register runtime=tensorflow` logs, and what a network gets whose graph would not
convert or differed from Keras. Grad-CAM (`explain`) needs gradients: TensorFlow is imported on the first
explain request (seconds, once); an environment without it answers HTTP 501.

One member is a training run's model; several are a cross-validation's fold models, averaged (each
member's probabilities with its own stain reference and temperature, then the mean, then the ensemble's
threshold). Requests arriving together share forward passes (histoflow.serving.batching).
"""

from __future__ import annotations

import base64
import importlib
import io
import json
import logging
import os

import numpy as np
import pandas as pd
from mlflow.models import ModelSignature
from mlflow.protos.databricks_pb2 import NOT_IMPLEMENTED
from mlflow.pyfunc import PythonModel
from mlflow.types.schema import ColSpec, Map, ParamSchema, ParamSpec, Schema
from PIL import Image

from histoflow.data.images import resize_and_scale
from histoflow.data.quality import COLOUR, FOCUS, TISSUE, measure
from histoflow.data.stain import FALLBACK_FLAG, NO_STAIN_NORMALIZATION, StainNormalizer
from histoflow.errors import ConfigError
from histoflow.modeling.calibration import Calibration, apply_temperature
from histoflow.modeling.screening import INDETERMINATE, NO_DISTANCE, UNFITTED, Screening, flags
from histoflow.modeling.variants import TTA_MODES
from histoflow.serving.batching import BatchingSettings, MicroBatcher
from histoflow.serving.http_errors import SERVER_MODEL_PATH_ENV
from histoflow.serving.http_errors import install as install_http_errors
from histoflow.serving.requests import (
    INPUT_COLUMN,
    MAX_IMAGES_PER_REQUEST,
    RequestError,
    check_size,
    decode_item,
    in_scoring_server,
    overloaded,
    request_items,
)
from histoflow.serving.settings import check_runtime

log = logging.getLogger(__name__)


def signature(tta: str = "none") -> ModelSignature:
    """Base64 image files in; the decision, probabilities, threshold, flags and quality measures out.
    Request parameters: `tta` (none or dihedral8) overrides the model's test-time augmentation; `explain`
    adds each image's Grad-CAM overlay (base64 PNG, column gradcam)."""
    return ModelSignature(
        inputs=Schema([ColSpec("string", INPUT_COLUMN)]),
        outputs=Schema([ColSpec("string", "label"), ColSpec("string", "model_label"),
                        ColSpec("string", "positive_class"), ColSpec("double", "positive_probability"),
                        ColSpec(Map("double"), "probabilities"), ColSpec("double", "threshold"),
                        ColSpec("string", "flags"), ColSpec(Map("double"), "quality"),
                        ColSpec("string", "gradcam", required=False)]),
        params=ParamSchema([ParamSpec("tta", "string", tta), ParamSpec("explain", "boolean", False)]),
    )


NETWORK_CLASSES = {"onnx": "histoflow.serving.onnx_network:OnnxNetwork",
                   "tensorflow": "histoflow.serving.keras_network:KerasNetwork"}
RUNTIME_ENV = "HISTOFLOW_RUNTIME"  # a server's choice over the model's (tensorflow: the .keras files)


def _network_module(runtime: str):
    # By name: importing the TensorFlow runtime's module must not be a side effect of importing this one (the
    # import contract holds the served code free of TensorFlow).
    return importlib.import_module(NETWORK_CLASSES[runtime].split(":")[0])


def _network_class(runtime: str):
    return getattr(_network_module(runtime), NETWORK_CLASSES[runtime].split(":")[1])


class ImageClassifier(PythonModel):
    """Image files in, one row per image out.

    - `probabilities` (class -> p): calibrated (the temperature fitted on the run's validation split);
    - `model_label`: the positive class when its probability reaches `threshold` (chosen there), else the other;
    - `positive_class` (malignant, IDC) and `positive_probability`, its calibrated probability: model_label is the
      positive class when positive_probability reaches `threshold`. (A "confidence" of the label would read 0.35
      for a positive call at a threshold of 0.3: these names say what the number is.)
    - `flags`: comma-separated checks the image fails (histoflow.modeling.screening: low_tissue,
      out_of_focus, out_of_distribution, unusual_colour), and stain_fallback (too little tissue to
      normalise the stain: scored unchanged; informative only);
    - `label`: model_label, or "indeterminate" when a check failed: the probabilities are kept, but the
      answer is not to be trusted;
    - `quality`: tissue_fraction, focus, ood_score and colour_score (distances / thresholds, flagged above
      1; the scores are absent for models logged before screening existed, which get only low_tissue);
    - `gradcam` (only with params explain=true): the Grad-CAM overlay of model_label, a base64 PNG at the
      model's input size, on the image as the network saw it (stain-normalised; TTA plays no part).
    Models logged before calibration existed have neither: T = 1, threshold 0.5.
    """

    def load_context(self, context) -> None:
        if os.environ.get(SERVER_MODEL_PATH_ENV):  # inside MLflow's scoring server: its answers to bad requests
            install_http_errors()
        config = context.model_config or {}
        self.class_names: list[str] = list(config["class_names"])
        self.image_size = int(config["image_size"])
        self.input_mpp = float(config.get("input_mpp", 0.0))  # micrometres per input pixel; 0: not recorded
        self.calibration = Calibration(**config.get("calibration", {}))
        self.tta = config.get("tta", "none")
        # Models logged before ensembles: one network under "keras_model", its temperature in the calibration.
        members = config.get("members") or [{"temperature": self.calibration.temperature}]
        self._keras_paths = [context.artifacts[f"keras_model_{i}"] for i in range(len(members))] \
            if "members" in config else [context.artifacts["keras_model"]]
        onnx_paths = [context.artifacts.get(f"onnx_model_{i}") for i in range(len(self._keras_paths))]
        # Models logged before the ONNX graphs name no runtime: TensorFlow, as they were logged.
        self.runtime = os.environ.get(RUNTIME_ENV) or config.get("runtime", "tensorflow")
        check_runtime(self.runtime)
        if self.runtime == "onnx" and not all(onnx_paths):
            raise ConfigError("runtime onnx: this model carries no ONNX graph of its networks (logged with "
                              "runtime=tensorflow, or before histoflow exported them); serve it with "
                              f"{RUNTIME_ENV}=tensorflow")
        paths = onnx_paths if self.runtime == "onnx" else self._keras_paths
        screenings = [Screening.load(context.artifacts[f"screening_{i}"]) if f"screening_{i}" in context.artifacts
                      else UNFITTED for i in range(len(paths))]
        if any(s is UNFITTED for s in screenings):
            log.warning("this model was logged without screening thresholds: its predictions get no "
                        "out_of_focus, out_of_distribution or unusual_colour flag (a run trained by this "
                        "version of histoflow has them)")
        # The ensemble's checks: each network's distance scores, averaged; its quality thresholds' median.
        self._screenings = screenings
        self.screening = Screening(float(np.median([s.min_tissue for s in screenings])),
                                   float(np.median([s.min_focus for s in screenings])), NO_DISTANCE, NO_DISTANCE)
        network_class = _network_class(self.runtime)
        # Members that share a stain reference share one normalised batch: {reference: (normalizer, networks)}.
        self._groups: dict[str, tuple[StainNormalizer, list]] = {}
        self._members: list[tuple[str, int]] = []  # each member's group and place in it (Grad-CAM's networks)
        for path, member, screening in zip(paths, members, screenings, strict=True):
            reference = member.get("stain") or NO_STAIN_NORMALIZATION
            key = json.dumps(reference, sort_keys=True)
            if key not in self._groups:
                self._groups[key] = (StainNormalizer(reference), [])
            self._members.append((key, len(self._groups[key][1])))
            self._groups[key][1].append(network_class(path, float(member["temperature"]), screening))
        self._explainers: dict[str, list] | None = None
        # Run every network once now, so the first request does not pay for its first run (cold start = load +
        # one tiny image).
        tiny = resize_and_scale(np.zeros((8, 8, 3), np.uint8), self.image_size)[None]
        for _, networks in self._groups.values():
            for network in networks:
                network.infer(self.tta, tiny)
        self._batcher = MicroBatcher(self._forward, BatchingSettings.resolve(config.get("batching")))

    def _forward(self, key: tuple[str, str], batch: np.ndarray) -> list[np.ndarray]:
        """The networks of one stain group on a batch: each one's probabilities and features, in turn."""
        group, tta = key
        outputs = []
        for network in self._groups[group][1]:
            outputs += network.infer(tta, batch)
        return outputs

    def score(self, images: list[np.ndarray], tta: str = "none", coming=None) -> dict[str, np.ndarray]:
        """Calibrated class probabilities (each member's, with its stain reference and temperature, averaged),
        the mean OOD score, which images fell back to their unnormalised stain, and the batch of each stain group.
        The forward passes go through the micro-batcher (`coming`: what its `expecting()` gave this request)."""
        outputs, ood, fallback, batches = [], [], np.zeros(len(images), dtype=bool), {}
        for group, (stain, networks) in self._groups.items():
            normalized = [stain.normalize(image) for image in images]
            fallback |= [fell_back for _, fell_back in normalized]
            batch = np.stack([resize_and_scale(image, self.image_size) for image, _ in normalized])
            batches[group] = batch
            try:
                results = self._batcher.submit((group, tta), batch, coming)
            except TimeoutError as exc:
                raise overloaded(exc) from None
            for network, probabilities, features in zip(networks, results[::2], results[1::2], strict=True):
                outputs.append(apply_temperature(probabilities, network.temperature))
                ood.append(network.screening.features.scores(features))
        return {"probabilities": np.mean(outputs, axis=0), "ood": np.mean(ood, axis=0), "fallback": fallback,
                "batches": batches}

    def explain(self, batches: dict[str, np.ndarray], classes: np.ndarray) -> list[str]:
        """Base64 PNGs: each image's Grad-CAM of its class (averaged over the members) over the image."""
        overlays = _network_module("tensorflow").overlays
        try:
            groups = [(batches[key], self._explaining(key)) for key in self._groups]
        except ModuleNotFoundError as exc:
            raise RequestError(f"explain needs TensorFlow (Grad-CAM takes gradients), which this serving "
                               f"environment does not have ({exc}); it scores with ONNX Runtime. Install "
                               "tensorflow-cpu and keras beside it, or serve without explain", NOT_IMPLEMENTED
                               ) from None
        return [_png_base64(image) for image in overlays(groups, classes)]

    def _explaining(self, group: str) -> list:
        """The TensorFlow networks of a stain group: the served ones, or (ONNX runtime) loaded on first use."""
        if self.runtime == "tensorflow":
            return self._groups[group][1]
        if self._explainers is None:
            network_class = _network_class("tensorflow")
            self._explainers = {key: [] for key in self._groups}
            for path, (key, place) in zip(self._keras_paths, self._members, strict=True):
                served = self._groups[key][1][place]
                self._explainers[key].append(network_class(path, served.temperature, served.screening))
        return self._explainers[group]

    def predict(self, context, model_input: pd.DataFrame, params: dict | None = None) -> pd.DataFrame:
        params = params or {}
        tta = params.get("tta") or self.tta
        if tta not in TTA_MODES:
            raise RequestError(f"params.tta must be one of {', '.join(TTA_MODES)}; got {tta!r}")
        explain = bool(params.get("explain", False))  # MLflow has checked its type against the signature
        items = request_items(model_input, MAX_IMAGES_PER_REQUEST if in_scoring_server() else None)
        parts = []
        for start in range(0, len(items), MAX_IMAGES_PER_REQUEST):
            part = items[start:start + MAX_IMAGES_PER_REQUEST]
            check_size(part, start)
            with self._batcher.expecting() as coming:
                images = [decode_item(start + i, item) for i, item in enumerate(part)]
                parts.append(self._predict_chunk(images, tta, explain, coming))
        return parts[0] if len(parts) == 1 else pd.concat(parts, ignore_index=True)

    def score_arrays(self, images: list[np.ndarray], tta: str | None = None) -> pd.DataFrame:
        """predict's rows for decoded RGB uint8 images (whole-slide tiles: no file to encode and decode again)."""
        tta = tta or self.tta
        parts = [self._predict_chunk(images[start:start + MAX_IMAGES_PER_REQUEST], tta, False)
                 for start in range(0, len(images), MAX_IMAGES_PER_REQUEST)]
        return parts[0] if len(parts) == 1 else pd.concat(parts, ignore_index=True)

    def _predict_chunk(self, images: list[np.ndarray], tta: str, explain: bool, coming=None) -> pd.DataFrame:
        scored = self.score(images, tta, coming)
        probabilities = scored["probabilities"]
        decided = self.calibration.decide(probabilities)
        quality = measure(images, self.image_size)
        colour = np.mean([s.colour.scores(quality[:, COLOUR]) for s in self._screenings], axis=0)
        failed = flags(quality, scored["ood"], colour, self.screening)
        model_labels = [self.class_names[k] for k in decided]
        frame = pd.DataFrame({
            "label": [INDETERMINATE if f else label for f, label in zip(failed, model_labels, strict=True)],
            "model_label": model_labels,
            "positive_class": self.class_names[1],
            "positive_probability": probabilities[:, 1].astype(float),
            "probabilities": [dict(zip(self.class_names, map(float, row), strict=True)) for row in probabilities],
            "threshold": np.full(len(decided), self.calibration.threshold, dtype=float),
            "flags": [",".join(f + ([FALLBACK_FLAG] if fell_back else []))
                      for f, fell_back in zip(failed, scored["fallback"], strict=True)],
            "quality": [{"tissue_fraction": float(row[TISSUE]), "focus": float(row[FOCUS]),
                         **{name: float(v) for name, v in (("ood_score", ood), ("colour_score", c)) if np.isfinite(v)}}
                        for row, ood, c in zip(quality, scored["ood"], colour, strict=True)],
        })
        if explain:
            frame["gradcam"] = self.explain(scored["batches"], decided)
        return frame


def _png_base64(image: np.ndarray) -> str:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")
