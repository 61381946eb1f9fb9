"""The served model: a pyfunc that takes image files (base64) and returns label, probabilities and threshold.

It is logged with MLflow's models-from-code (`model_code.py`; pickling TensorFlow objects fails) and
carries the trained `.keras` file(s), the class names and image size, the calibration, the stain reference,
and this package (`code_paths`), so the preprocessing is exactly the training one (`histoflow.data.images`,
`histoflow.data.stain`). Inference
runs through one `tf.function` per member network, traced once at load time with a fixed input
signature (a compiled graph, not `model.predict` per request, which costs about 3x: MLflow issue #5259),
all images of a request (times 8 with dihedral test-time augmentation) in one batch.

One member is a training run's model; several are a cross-validation's fold models, averaged (each
member's probabilities with its own stain reference and temperature, then the mean, then the ensemble's
threshold).
"""

from __future__ import annotations

import base64
import io
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
from mlflow.models import ModelSignature
from mlflow.pyfunc import PythonModel
from mlflow.types.schema import ColSpec, Map, ParamSchema, ParamSpec, Schema
from PIL import Image

from histoflow.artifacts import CLASSIFIER_ARTIFACT
from histoflow.data.images import MAX_PIXELS, resize_and_scale
from histoflow.data.quality import COLOUR, FOCUS, TISSUE, measure
from histoflow.data.stain import FALLBACK_FLAG, NO_STAIN_NORMALIZATION, StainNormalizer, check_method
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
    MAX_REQUEST_CHARS,
    RequestError,
    check_size,
    decode_item,
    encode_file,
    in_scoring_server,
    overloaded,
    request_items,
)
from histoflow.tracking import pinned_requirements

MODEL_CODE = Path(__file__).with_name("model_code.py")

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


class _Network:
    """One member network, compiled: probabilities (plain or over the 8 dihedral views) with the penultimate
    features of the plain view in the same forward pass; its temperature and screening; Grad-CAM on demand."""

    def __init__(self, path: str, temperature: float, screening: Screening, batch_spec) -> None:
        import keras
        import tensorflow as tf

        from histoflow.modeling.inference import average_views, dihedral_views
        from histoflow.modeling.screening import feature_model

        self.model = keras.saving.load_model(path, compile=False)
        both = feature_model(self.model)

        def plain(x):
            return both(x, training=False)

        def views(x):
            # The first of the 8 views is the image itself: its features come with the same batch.
            probabilities, features = both(dihedral_views(x), training=False)
            return average_views(probabilities), features[:tf.shape(x)[0]]

        self.infer = {mode: tf.function(f, input_signature=[batch_spec], autograph=False)
                      for mode, f in (("none", plain), ("dihedral8", views))}
        self.temperature, self.screening = temperature, screening
        self._gradcam = None

    def gradcam(self, batch, classes: np.ndarray) -> np.ndarray:
        if self._gradcam is None:  # built on the first explain request: plain requests never pay for it
            from histoflow.modeling.architectures import gradcam_layer
            from histoflow.modeling.explain import GradCam

            self._gradcam = GradCam(self.model, gradcam_layer(self.model))
        return self._gradcam(batch, classes)


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
        import tensorflow as tf

        if os.environ.get(SERVER_MODEL_PATH_ENV):  # inside MLflow's scoring server: its answers to bad requests
            install_http_errors()
        config = context.model_config or {}
        self.class_names: list[str] = list(config["class_names"])
        self.image_size = int(config["image_size"])
        self.calibration = Calibration(**config.get("calibration", {}))
        self.tta = config.get("tta", "none")
        # Models logged before ensembles: one network under "keras_model", its temperature in the calibration.
        members = config.get("members") or [{"temperature": self.calibration.temperature}]
        paths = [context.artifacts[f"keras_model_{i}"] for i in range(len(members))] if "members" in config \
            else [context.artifacts["keras_model"]]
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
        size = self.image_size
        batch_spec = tf.TensorSpec([None, size, size, 3], tf.float32)
        # Members that share a stain reference share one normalised batch: {reference: (normalizer, networks)}.
        self._groups: dict[str, tuple[StainNormalizer, list[_Network]]] = {}
        for path, member, screening in zip(paths, members, screenings, strict=True):
            reference = member.get("stain") or NO_STAIN_NORMALIZATION
            key = json.dumps(reference, sort_keys=True)
            if key not in self._groups:
                self._groups[key] = (StainNormalizer(reference), [])
            self._groups[key][1].append(_Network(path, float(member["temperature"]), screening, batch_spec))
        # The training preprocessing, compiled once for any image size (graph calls beat eager ops here).
        self._prepare = tf.function(lambda image: resize_and_scale(image, size), autograph=False,
                                    input_signature=[tf.TensorSpec([None, None, 3], tf.uint8)])
        # Trace now, so the first request does not pay for it (cold start = load + one tiny image).
        tiny = tf.stack([self._prepare(np.zeros((8, 8, 3), np.uint8))])
        for _, networks in self._groups.values():
            for network in networks:
                network.infer[self.tta](tiny)
        self._batcher = MicroBatcher(self._forward, BatchingSettings.resolve(config.get("batching")))

    def _forward(self, key: tuple[str, str], batch: np.ndarray) -> list[np.ndarray]:
        """The networks of one stain group on a batch: each one's probabilities and features, in turn."""
        group, tta = key
        outputs = []
        for network in self._groups[group][1]:
            probabilities, features = network.infer[tta](batch)
            outputs += [probabilities.numpy(), features.numpy()]
        return outputs

    def score(self, images: list[np.ndarray], tta: str = "none", coming=None) -> dict[str, np.ndarray]:
        """Calibrated class probabilities (each member's, with its stain reference and temperature, averaged),
        the mean OOD score, which images fell back to their unnormalised stain, and the batches the networks saw.
        The forward passes go through the micro-batcher (`coming`: what its `expecting()` gave this request)."""
        import tensorflow as tf

        outputs, ood, fallback, batches = [], [], np.zeros(len(images), dtype=bool), []
        for group, (stain, networks) in self._groups.items():
            normalized = [stain.normalize(image) for image in images]
            fallback |= [fell_back for _, fell_back in normalized]
            batch = tf.stack([self._prepare(image) for image, _ in normalized])
            batches.append((batch, networks))
            try:
                results = self._batcher.submit((group, tta), batch.numpy(), coming)
            except TimeoutError as exc:
                raise overloaded(exc) from None
            for network, probabilities, features in zip(networks, results[::2], results[1::2], strict=True):
                outputs.append(apply_temperature(probabilities, network.temperature))
                ood.append(network.screening.features.scores(features))
        return {"probabilities": np.mean(outputs, axis=0), "ood": np.mean(ood, axis=0), "fallback": fallback,
                "batches": batches}

    def explain(self, batches: list, classes: np.ndarray) -> list[str]:
        """Base64 PNGs: each image's Grad-CAM of its class (averaged over the members) over the image."""
        from histoflow.modeling.explain import overlay

        heatmaps = np.mean([network.gradcam(batch, classes) for batch, networks in batches for network in networks],
                           axis=0)
        shown = batches[0][0].numpy()
        return [_png_base64(overlay(image, heatmap)) for image, heatmap in zip(shown, heatmaps, strict=True)]

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
        return pd.concat(parts, ignore_index=True)

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


SERVING_PACKAGES = ("mlflow", "keras", "pillow", "pandas", "numpy", "torchstain")  # what the model code imports


def log_classifier(keras_paths: list[str | Path], class_names: list[str], image_size: int,
                   example_image: str | Path, *, calibration: Calibration | None = None,
                   member_temperatures: list[float] | None = None, stain_references: list[dict] | None = None,
                   tta: str = "none", screenings: list[str | Path | None] | None = None,
                   metadata: dict | None = None, name: str = CLASSIFIER_ARTIFACT):
    """Log the serving pyfunc into the active run; returns MLflow's ModelInfo.

    One network (a training run's): its temperature and threshold are `calibration`'s (default: temperature 1,
    threshold 0.5). Several (an ensemble): `member_temperatures` holds each one's, and `calibration` the
    ensemble's threshold.
    `stain_references`: each network's stain reference (default: none). `screenings`: each network's
    screening .npz (histoflow.modeling.screening; None: that network gets no focus or OOD checks).
    """
    import mlflow

    import histoflow

    if tta not in TTA_MODES:
        raise ConfigError(f"tta must be one of {', '.join(TTA_MODES)}; got {tta!r}")
    calibration = calibration or Calibration()
    temperatures = member_temperatures or [calibration.temperature]
    stains = stain_references or [NO_STAIN_NORMALIZATION] * len(keras_paths)
    checks = screenings or [None] * len(keras_paths)
    if not len(temperatures) == len(stains) == len(checks) == len(keras_paths):
        raise ConfigError(f"{len(keras_paths)} networks but {len(temperatures)} temperatures, "
                          f"{len(stains)} stain references and {len(checks)} screenings")
    for reference in stains:
        check_method(reference.get("method", "none"))
    example = pd.DataFrame({INPUT_COLUMN: [encode_file(example_image)]})
    with tempfile.TemporaryDirectory() as tmp:
        return mlflow.pyfunc.log_model(
            name=name,
            python_model=str(MODEL_CODE),
            artifacts={**{f"keras_model_{i}": str(path) for i, path in enumerate(keras_paths)},
                       **{f"screening_{i}": str(path) for i, path in enumerate(checks) if path}},
            model_config={"class_names": list(class_names), "image_size": int(image_size),
                          "calibration": calibration.to_dict(),
                          "members": [{"temperature": t, "stain": ref}
                                      for t, ref in zip(temperatures, stains, strict=True)],
                          "tta": tta},
            code_paths=[_package_code(Path(histoflow.__file__).parent, Path(tmp))],
            signature=signature(tta),
            input_example=example,
            pip_requirements=pinned_requirements(*SERVING_PACKAGES),
            metadata={"class_names": list(class_names), "image_size": int(image_size), **calibration.to_dict(),
                      "members": len(keras_paths), "tta": tta,
                      "stain_norm": sorted({ref.get("method", "none") for ref in stains}),
                      "input": f"base64 image files (PNG, JPEG, TIFF, BMP), column {INPUT_COLUMN!r}, at most "
                               f"{MAX_IMAGES_PER_REQUEST} and {MAX_REQUEST_CHARS:,} base64 characters per request, "
                               f"{MAX_PIXELS:,} pixels per image; params: tta (none or dihedral8), explain (true: "
                               "Grad-CAM overlays)",
                      **(metadata or {})},
        )


def _package_code(package: Path, folder: Path) -> str:
    """A copy of this package for the model's code, without what serving never reads: the sample images that
    ship for a first training run (`data_dir=sample`), and compiled files."""
    target = folder / package.name
    shutil.copytree(package, target, ignore=shutil.ignore_patterns("samples", "__pycache__"))
    return str(target)
