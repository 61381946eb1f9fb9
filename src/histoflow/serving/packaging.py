"""The served model packaged into the active run: each network's ONNX graph exported and checked, the served
code picked (the modules the served model imports, no training code), the serving requirements pinned, and
the pyfunc logged with MLflow's models-from-code (`model_code.py`; pickling TensorFlow objects fails).

This is the training side of serving: it imports TensorFlow (to export) and is not part of the served code.
"""

from __future__ import annotations

import ast
import logging
import tempfile
from pathlib import Path

import pandas as pd

from histoflow.artifacts import CLASSIFIER_ARTIFACT
from histoflow.data.images import MAX_PIXELS
from histoflow.data.stain import NO_STAIN_NORMALIZATION, check_method
from histoflow.errors import ConfigError
from histoflow.modeling.calibration import Calibration
from histoflow.modeling.variants import TTA_MODES
from histoflow.serving.classifier import NETWORK_CLASSES, signature
from histoflow.serving.requests import INPUT_COLUMN, MAX_IMAGES_PER_REQUEST, MAX_REQUEST_CHARS, encode_file
from histoflow.serving.settings import DEFAULT_RUNTIME, RUNTIME_TAG, check_runtime
from histoflow.tracking import pinned_requirements

MODEL_CODE = Path(__file__).with_name("model_code.py")

log = logging.getLogger(__name__)

# The distributions the served code imports (its requirements): torchstain's numpy backend for the stain,
# scipy for the quality measures; the runtime's own on top. (scikit-learn only fits calibration and screening.)
SERVING_PACKAGES = ("mlflow", "pillow", "pandas", "numpy", "scipy", "torchstain", "tqdm")
RUNTIME_PACKAGES = {"onnx": ("onnxruntime",), "tensorflow": ("keras",)}


def explain_requirements() -> list[str]:
    """What a serving environment of an ONNX model adds so that `explain` answers (Grad-CAM takes gradients,
    which ONNX Runtime does not): Keras and TensorFlow, pinned to this environment's versions."""
    return pinned_requirements(*RUNTIME_PACKAGES["tensorflow"], tensorflow=True)


def log_classifier(keras_paths: list[str | Path], class_names: list[str], image_size: int,
                   example_image: str | Path, *, calibration: Calibration | None = None,
                   member_temperatures: list[float] | None = None, stain_references: list[dict] | None = None,
                   tta: str = "none", screenings: list[str | Path | None] | None = None,
                   metadata: dict | None = None, name: str = CLASSIFIER_ARTIFACT, runtime: str = DEFAULT_RUNTIME,
                   input_mpp: float = 0.0):
    """Log the serving pyfunc into the active run; returns MLflow's ModelInfo.

    One network (a training run's): its temperature and threshold are `calibration`'s (default: temperature 1,
    threshold 0.5). Several (an ensemble): `member_temperatures` holds each one's, and `calibration` the
    ensemble's threshold.
    `stain_references`: each network's stain reference (default: none). `screenings`: each network's
    screening .npz (histoflow.modeling.screening; None: that network gets no focus or OOD checks).
    `runtime`: onnx exports each network's ONNX graph (checked against Keras) and serves those without TensorFlow;
    when one does not convert, the model is logged for tensorflow, with a warning and the run tag
    histoflow.serving.onnx_failure. The run's tag histoflow.serving.runtime says which it got.
    `input_mpp`: micrometres of tissue per pixel of the network's input (0: not known), the resolution
    predict-slide cuts slides at.
    """
    import mlflow

    import histoflow

    check_runtime(runtime)
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
        graphs = _onnx_graphs(keras_paths, Path(tmp)) if runtime == "onnx" else {}
        if runtime == "onnx" and not graphs:
            runtime = "tensorflow"
        mlflow.set_tag("histoflow.serving.runtime", runtime)
        return mlflow.pyfunc.log_model(
            name=name,
            python_model=str(MODEL_CODE),
            artifacts={**{f"keras_model_{i}": str(path) for i, path in enumerate(keras_paths)},
                       **graphs,
                       **{f"screening_{i}": str(path) for i, path in enumerate(checks) if path}},
            model_config={"class_names": list(class_names), "image_size": int(image_size),
                          "calibration": calibration.to_dict(),
                          "members": [{"temperature": t, "stain": ref}
                                      for t, ref in zip(temperatures, stains, strict=True)],
                          "tta": tta, "runtime": runtime, "input_mpp": float(input_mpp)},
            code_paths=[served_code(Path(histoflow.__file__).parent, Path(tmp) / "code")],
            signature=signature(tta),
            input_example=example,
            pip_requirements=pinned_requirements(*SERVING_PACKAGES, *RUNTIME_PACKAGES[runtime],
                                                 tensorflow=runtime == "tensorflow"),
            tags={RUNTIME_TAG: runtime},
            metadata={"class_names": list(class_names), "image_size": int(image_size), **calibration.to_dict(),
                      "members": len(keras_paths), "tta": tta, "runtime": runtime, "input_mpp": float(input_mpp),
                      "stain_norm": sorted({ref.get("method", "none") for ref in stains}),
                      "input": f"base64 image files (PNG, JPEG, TIFF, BMP), column {INPUT_COLUMN!r}, at most "
                               f"{MAX_IMAGES_PER_REQUEST} and {MAX_REQUEST_CHARS:,} base64 characters per request, "
                               f"{MAX_PIXELS:,} pixels per image; params: tta (none or dihedral8), explain (true: "
                               "Grad-CAM overlays)",
                      **(metadata or {})},
        )


def _onnx_graphs(keras_paths: list[str | Path], folder: Path) -> dict[str, str]:
    """{onnx_model_i: path} of every network's checked ONNX graph; empty (with a warning and a run tag) when one
    of them has none: the model is then served by TensorFlow whole."""
    import mlflow

    from histoflow.modeling.onnx_export import export_onnx

    graphs = {}
    for i, path in enumerate(keras_paths):
        exported = export_onnx(path, folder / f"network_{i}.onnx")
        if exported.path is None:
            log.warning("network %d has no ONNX graph (%s): the model is logged for the tensorflow runtime", i,
                        exported.reason)
            mlflow.set_tag("histoflow.serving.onnx_failure", f"network {i}: {exported.reason}"[:5000])
            return {}
        graphs[f"onnx_model_{i}"] = str(exported.path)
    return graphs


# What the served model imports: its models-from-code file and its runtimes' modules (loaded by name).
SERVED_ROOTS = ("histoflow.serving.model_code", *(target.split(":")[0] for target in NETWORK_CLASSES.values()))


def served_modules(package: Path, roots: tuple[str, ...] = SERVED_ROOTS) -> set[str]:
    """The package's modules that `roots` import, directly or not (function-level imports included), with
    their parent packages: the served model's code."""
    def source(name: str) -> Path | None:
        base = package.parent.joinpath(*name.split("."))
        return next((p for p in (base.with_suffix(".py"), base / "__init__.py") if p.is_file()), None)

    found: set[str] = set()
    pending = list(roots)
    while pending:
        name = pending.pop()
        if name in found or source(name) is None:
            continue
        found.add(name)
        pending += [name.rsplit(".", k)[0] for k in range(1, name.count(".") + 1)]  # its parent packages
        for node in ast.walk(ast.parse(source(name).read_text())):
            if isinstance(node, ast.Import):
                pending += [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                pending += [node.module, *(f"{node.module}.{alias.name}" for alias in node.names)]
    return {name for name in found if name.split(".")[0] == package.name}


def served_code(package: Path, folder: Path) -> str:
    """A copy of the package's served modules (served_modules) for the model's code: no training code, no sample
    images, no compiled files."""
    for name in served_modules(package):
        relative = Path(*name.split("."))
        file = relative / "__init__.py" if (package.parent / relative).is_dir() else relative.with_suffix(".py")
        (folder / file).parent.mkdir(parents=True, exist_ok=True)
        (folder / file).write_bytes((package.parent / file).read_bytes())
    return str(folder / package.name)
