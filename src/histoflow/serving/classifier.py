"""The served model: a pyfunc that takes image files (base64) and returns label, confidence, probabilities.

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

import json
from pathlib import Path

import numpy as np
import pandas as pd
from mlflow.models import ModelSignature
from mlflow.pyfunc import PythonModel
from mlflow.types.schema import ColSpec, Map, ParamSchema, ParamSpec, Schema

from histoflow.data.images import MAX_PIXELS, resize_and_scale
from histoflow.data.stain import FALLBACK_FLAG, NO_STAIN_NORMALIZATION, StainNormalizer, check_method
from histoflow.errors import ConfigError
from histoflow.modeling.calibration import Calibration, apply_temperature
from histoflow.modeling.inference import TTA_MODES
from histoflow.tracking import pinned_requirements
from histoflow.serving.requests import (
    INPUT_COLUMN,
    MAX_IMAGES_PER_REQUEST,
    MAX_REQUEST_CHARS,
    RequestError,
    check_size,
    decode_item,
    encode_file,
    in_scoring_server,
    request_items,
)

CLASSIFIER_ARTIFACT = "classifier"
MODEL_CODE = Path(__file__).with_name("model_code.py")

def signature(tta: str = "none") -> ModelSignature:
    """Base64 image files in; label, confidence, probabilities, the threshold applied and flags out. The
    request parameter `tta` (none or dihedral8) overrides the model's own test-time augmentation."""
    return ModelSignature(
        inputs=Schema([ColSpec("string", INPUT_COLUMN)]),
        outputs=Schema([ColSpec("string", "label"), ColSpec("double", "confidence"),
                        ColSpec(Map("double"), "probabilities"), ColSpec("double", "threshold"),
                        ColSpec("string", "flags")]),
        params=ParamSchema([ParamSpec("tta", "string", tta)]),
    )


class ImageClassifier(PythonModel):
    """Image files in, one row per image out: label, confidence, probabilities (class -> p), threshold, flags.

    The probabilities are calibrated (the temperature fitted on the run's validation split) and the label
    is the positive class when its probability reaches the threshold chosen there; the response names the
    threshold applied. Models logged before calibration existed have neither: T = 1, threshold 0.5.
    `flags` is "" or "stain_fallback" (too little tissue to normalise the stain: scored unchanged).
    """

    def load_context(self, context) -> None:
        import keras
        import tensorflow as tf

        from histoflow.modeling.inference import average_views, dihedral_views

        config = context.model_config or {}
        self.class_names: list[str] = list(config["class_names"])
        self.image_size = int(config["image_size"])
        self.calibration = Calibration(**config.get("calibration", {}))
        self.tta = config.get("tta", "none")
        # Models logged before ensembles: one network under "keras_model", its temperature in the calibration.
        members = config.get("members") or [{"temperature": self.calibration.temperature}]
        paths = [context.artifacts[f"keras_model_{i}"] for i in range(len(members))] if "members" in config \
            else [context.artifacts["keras_model"]]
        size = self.image_size
        batch_spec = tf.TensorSpec([None, size, size, 3], tf.float32)
        # Members that share a stain reference share one normalised batch: {reference: (normalizer, members)}.
        self._groups: dict[str, tuple[StainNormalizer, list]] = {}
        for path, member in zip(paths, members):
            model = keras.saving.load_model(path, compile=False)
            plain = tf.function(lambda x, m=model: m(x, training=False), input_signature=[batch_spec],
                                autograph=False)
            views = tf.function(lambda x, m=model: average_views(m(dihedral_views(x), training=False)),
                                input_signature=[batch_spec], autograph=False)
            reference = member.get("stain") or NO_STAIN_NORMALIZATION
            key = json.dumps(reference, sort_keys=True)
            if key not in self._groups:
                self._groups[key] = (StainNormalizer(reference), [])
            self._groups[key][1].append(({"none": plain, "dihedral8": views}, float(member["temperature"])))
        # The training preprocessing, compiled once for any image size (graph calls beat eager ops here).
        self._prepare = tf.function(lambda image: resize_and_scale(image, size), autograph=False,
                                    input_signature=[tf.TensorSpec([None, None, 3], tf.uint8)])
        # Trace now, so the first request does not pay for it (cold start = load + one tiny image).
        tiny = tf.stack([self._prepare(np.zeros((8, 8, 3), np.uint8))])
        for _, members in self._groups.values():
            for infer, _ in members:
                infer[self.tta](tiny)

    def probabilities(self, images: list[np.ndarray], tta: str = "none") -> tuple[np.ndarray, np.ndarray]:
        """Calibrated class probabilities (each member's, with its stain reference and temperature,
        averaged), and which images fell back to their unnormalised stain."""
        import tensorflow as tf

        outputs, fallback = [], np.zeros(len(images), dtype=bool)
        for stain, members in self._groups.values():
            normalized = [stain.normalize(image) for image in images]
            fallback |= [fell_back for _, fell_back in normalized]
            batch = tf.stack([self._prepare(image) for image, _ in normalized])
            outputs += [apply_temperature(infer[tta](batch).numpy(), t) for infer, t in members]
        return np.mean(outputs, axis=0), fallback

    def predict(self, context, model_input, params=None) -> pd.DataFrame:
        tta = (params or {}).get("tta") or self.tta
        if tta not in TTA_MODES:
            raise RequestError(f"params.tta must be one of {', '.join(TTA_MODES)}; got {tta!r}")
        items = request_items(model_input, MAX_IMAGES_PER_REQUEST if in_scoring_server() else None)
        chunks, fallbacks = [], []
        for start in range(0, len(items), MAX_IMAGES_PER_REQUEST):
            part = items[start:start + MAX_IMAGES_PER_REQUEST]
            check_size(part, start)
            probabilities, fallback = self.probabilities([decode_item(start + i, item) for i, item in enumerate(part)],
                                                         tta)
            chunks.append(probabilities)
            fallbacks.append(fallback)
        probabilities = np.concatenate(chunks)
        decided = self.calibration.decide(probabilities)
        return pd.DataFrame({
            "label": [self.class_names[k] for k in decided],
            "confidence": probabilities[np.arange(len(decided)), decided].astype(float),
            "probabilities": [dict(zip(self.class_names, map(float, row))) for row in probabilities],
            "threshold": np.full(len(decided), self.calibration.threshold, dtype=float),
            "flags": np.where(np.concatenate(fallbacks), FALLBACK_FLAG, ""),
        })


SERVING_PACKAGES = ("mlflow", "keras", "pillow", "pandas", "numpy", "torchstain")  # what the model code imports


def log_classifier(keras_paths: list[str | Path], class_names: list[str], image_size: int,
                   example_image: str | Path, calibration: Calibration = Calibration(),
                   member_temperatures: list[float] | None = None, stain_references: list[dict] | None = None,
                   tta: str = "none", metadata: dict | None = None, name: str = CLASSIFIER_ARTIFACT):
    """Log the serving pyfunc into the active run; returns MLflow's ModelInfo.

    One network (a training run's): its temperature and threshold are `calibration`'s. Several (an
    ensemble): `member_temperatures` holds each one's, and `calibration` the ensemble's threshold.
    `stain_references`: each network's stain reference (default: none).
    """
    import mlflow

    import histoflow

    if tta not in TTA_MODES:
        raise ConfigError(f"tta must be one of {', '.join(TTA_MODES)}; got {tta!r}")
    temperatures = member_temperatures or [calibration.temperature]
    stains = stain_references or [NO_STAIN_NORMALIZATION] * len(keras_paths)
    if not len(temperatures) == len(stains) == len(keras_paths):
        raise ConfigError(f"{len(keras_paths)} networks but {len(temperatures)} temperatures and "
                          f"{len(stains)} stain references")
    for reference in stains:
        check_method(reference.get("method", "none"))
    example = pd.DataFrame({INPUT_COLUMN: [encode_file(example_image)]})
    return mlflow.pyfunc.log_model(
        name=name,
        python_model=str(MODEL_CODE),
        artifacts={f"keras_model_{i}": str(path) for i, path in enumerate(keras_paths)},
        model_config={"class_names": list(class_names), "image_size": int(image_size),
                      "calibration": calibration.to_dict(),
                      "members": [{"temperature": t, "stain": ref} for t, ref in zip(temperatures, stains)],
                      "tta": tta},
        code_paths=[str(Path(histoflow.__file__).parent)],
        signature=signature(tta),
        input_example=example,
        pip_requirements=pinned_requirements(*SERVING_PACKAGES),
        metadata={"class_names": list(class_names), "image_size": int(image_size), **calibration.to_dict(),
                  "members": len(keras_paths), "tta": tta,
                  "stain_norm": sorted({ref.get("method", "none") for ref in stains}),
                  "input": f"base64 image files (PNG, JPEG, TIFF, BMP), column {INPUT_COLUMN!r}, at most "
                           f"{MAX_IMAGES_PER_REQUEST} and {MAX_REQUEST_CHARS:,} base64 characters per request, "
                           f"{MAX_PIXELS:,} pixels per image; params: tta (none or dihedral8)",
                  **(metadata or {})},
    )
