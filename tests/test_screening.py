"""Quality and out-of-distribution screening: known answers, and a served model on real test splits."""

from __future__ import annotations

import base64
import io

import mlflow
import numpy as np
import pandas as pd
import pytest
from PIL import Image, ImageFilter

from conftest import BREAKHIS, IDC, sqlite_store
from histoflow.data.quality import (
    BLACK_LEVEL,
    COLOUR_BINS,
    TISSUE_SATURATION,
    colour_histogram,
    focus,
    measure,
    tissue_fraction,
)
from histoflow.modeling.screening import (
    INDETERMINATE,
    LOW_TISSUE,
    MIN_TISSUE,
    OUT_OF_FOCUS,
    UNFITTED,
    Distance,
    Screening,
    fit_screening,
    flags,
)
from histoflow.serving.requests import encode_file

PINK, PURPLE = (233, 150, 200), (120, 60, 160)  # eosin and haematoxylin as the eye sees them


def _h_and_e(size: int = 64, seed: int = 0) -> np.ndarray:
    """A synthetic stained image: purple nuclei on pink stroma with a little white, sharp edges."""
    rng = np.random.default_rng(seed)
    image = np.empty((size, size, 3), np.uint8)
    image[:] = PINK
    for _ in range(12):
        y, x = rng.integers(0, size, 2)
        image[max(0, y - 3):y + 3, max(0, x - 3):x + 3] = PURPLE
    image[:4, :] = 245
    return image


def test_tissue_fraction_known_answers():
    assert tissue_fraction(np.full((20, 20, 3), 255, np.uint8)) == 0.0  # glass
    assert tissue_fraction(np.full((20, 20, 3), 128, np.uint8)) == 0.0  # grey: no stain
    assert tissue_fraction(np.zeros((20, 20, 3), np.uint8)) == 0.0  # black border
    assert tissue_fraction(np.tile(np.array(PINK, np.uint8), (20, 20, 1))) == 1.0
    half = np.full((20, 20, 3), 255, np.uint8)
    half[:, :10] = PURPLE
    assert tissue_fraction(half) == 0.5


def test_tissue_fraction_is_the_saturation_rule_for_every_pixel_value():
    """The lookup table gives, for every brightest/darkest channel pair, what the rule computed per pixel gives."""
    brightest, darkest = np.meshgrid(np.arange(256), np.arange(256), indexing="ij")
    image = np.stack([brightest, darkest, np.maximum(darkest, brightest // 2)], axis=-1).astype(np.uint8)
    x = image.astype(np.float32) / 255.0
    high, low = x.max(axis=-1), x.min(axis=-1)
    stained = ((high - low) / np.maximum(high, 1e-6) > TISSUE_SATURATION) & (high > BLACK_LEVEL)
    assert [tissue_fraction(row[None]) for row in image] == [float(row.mean()) for row in stained]


def test_focus_falls_with_blur_and_ignores_contrast():
    sharp = _h_and_e()
    blurred = np.asarray(Image.fromarray(sharp).filter(ImageFilter.GaussianBlur(2)))
    assert focus(blurred, 64) < focus(sharp, 64) / 5
    # Contrast halved: the ratio to the grey variance stays (up to the small constant that keeps flat images finite).
    pale = (255 - (255 - sharp.astype(int)) // 2).astype(np.uint8)
    assert focus(pale, 64) == pytest.approx(focus(sharp, 64), rel=0.1)
    assert focus(np.zeros((1, 50, 3), np.uint8), 64) == 0.0  # a 50x1 border patch: nothing to measure
    # Measured at the input size: a larger image is shrunk to it, a smaller one never enlarged.
    big = np.asarray(Image.fromarray(sharp).resize((256, 256), Image.NEAREST))
    assert focus(big, 64) != pytest.approx(focus(big, 256), rel=0.2)
    assert focus(sharp, 256) == focus(sharp, 64)


def test_colour_histogram_is_a_unit_vector_of_cells():
    h = colour_histogram(_h_and_e())
    assert h.shape == (COLOUR_BINS ** 3,) and np.sum(h ** 2) == pytest.approx(1.0)
    red = colour_histogram(np.tile(np.array([255, 0, 0], np.uint8), (8, 8, 1)))
    assert red[(COLOUR_BINS - 1) * COLOUR_BINS ** 2] == 1.0 and np.count_nonzero(red) == 1


def test_mahalanobis_threshold_flags_the_tail_and_far_points():
    rng = np.random.default_rng(0)
    covariance = np.diag([1.0, 4.0, 0.25, 1.0, 1.0])
    train, val, fresh = (rng.multivariate_normal(np.arange(5.0), covariance, n) for n in (4000, 4000, 20000))
    distance = Distance.fit(train, val)
    # The threshold is the 99.5th percentile of validation: ~0.5 % of new points from the same law exceed it.
    assert 0.002 < np.mean(distance.scores(fresh) > 1) < 0.01
    # Distances are in units of each axis's spread: 5 standard deviations along the wide axis or the narrow one.
    far = np.arange(5.0) + np.array([[0, 10.0, 0, 0, 0], [0, 0, 2.5, 0, 0]])
    assert (distance.scores(far) > 1).all()
    # chi distribution with 5 degrees of freedom: its 99.5th percentile is sqrt(16.75) = 4.09.
    assert distance.threshold == pytest.approx(4.09, rel=0.08)
    assert np.isnan(UNFITTED.features.scores(fresh[:3])).all()


def test_screening_round_trip_and_flags(tmp_path):
    rng = np.random.default_rng(1)
    images = [_h_and_e(seed=s) for s in range(40)]
    quality = measure(images, 64)
    fitted = fit_screening(rng.normal(size=(40, 3)), quality, rng.normal(size=(40, 3)), quality)
    fitted.save(tmp_path / "s.npz")
    loaded = Screening.load(tmp_path / "s.npz")
    assert loaded.min_focus == fitted.min_focus and loaded.colour.threshold == fitted.colour.threshold
    np.testing.assert_array_equal(loaded.features.precision, fitted.features.precision)
    blank = measure([np.full((64, 64, 3), 255, np.uint8)], 64)
    blurred = measure([np.asarray(Image.fromarray(images[0]).filter(ImageFilter.GaussianBlur(3)))], 64)
    assert flags(blank, [0.5], [0.5], loaded) == [[LOW_TISSUE, OUT_OF_FOCUS]]
    assert flags(blurred, [0.5], [0.5], loaded) == [[OUT_OF_FOCUS]]
    assert flags(quality[:1], [2.0], [np.nan], loaded) == [["out_of_distribution"]]
    assert flags(quality[:1], [np.nan], [3.0], UNFITTED) == [["unusual_colour"]]
    assert loaded.min_tissue == MIN_TISSUE


def _b64_png(image: np.ndarray | Image.Image) -> str:
    buffer = io.BytesIO()
    (image if isinstance(image, Image.Image) else Image.fromarray(image)).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def _score(model, images: list) -> pd.DataFrame:
    return _score_encoded(model, [_b64_png(i) for i in images])


def _score_encoded(model, encoded: list[str]) -> pd.DataFrame:
    parts = [model.predict(pd.DataFrame({"image": encoded[s:s + 64]})) for s in range(0, len(encoded), 64)]
    return pd.concat(parts, ignore_index=True)


PHOTOGRAPHS = ("astronaut", "chelsea", "coffee", "rocket", "hubble_deep_field", "colorwheel", "retina")


@pytest.fixture(scope="module", params=["idc", "breakhis"])
def screened_model(request, tmp_path_factory):
    """A baseline trained on a developer set (all its training patients, a few epochs) and served: the
    run's screening is fitted on its training and validation splits; its test split is scored through it."""
    from histoflow.modeling import training_run
    from histoflow.modeling.variants import make_train_config
    from histoflow.registry.selection import classifier_uri, run_split

    data, size, epochs, images = {"idc": (IDC, 50, 2, 2000), "breakhis": (BREAKHIS, 64, 2, 0)}[request.param]
    root = tmp_path_factory.mktemp(f"screening-{request.param}")
    with sqlite_store(root):
        config = make_train_config("baseline", data_dir=str(data), max_images=images, epochs=epochs, image_size=size,
                                   gradcam_per_class=0, bootstrap=0, experiment="screening",
                                   image_cache=str(root / "cache"), checkpoint_dir="none")
        run = mlflow.get_run(training_run.run(config))
        model = mlflow.pyfunc.load_model(classifier_uri(run))
        _, split, _ = run_split(run)
        yield request.param, run, model, split[split["split"] == "test"]


@pytest.mark.slow
def test_developer_test_splits_are_not_flagged(screened_model):
    """At least 97 % of a developer set's test-split images (patients no threshold saw) are not flagged, as
    the run itself reports; and the served model's flags are the run's."""
    name, run, model, test = screened_model
    out = _score_encoded(model, [encode_file(p) for p in test["path"]])  # the files, as a client sends them
    flagged = float((out["label"] == INDETERMINATE).mean())
    assert flagged <= 0.03, out["flags"].value_counts()
    assert flagged == pytest.approx(run.data.metrics["test_flagged_share"], abs=1e-9)
    assert (out.loc[out["label"] != INDETERMINATE, "label"] == out.loc[out["label"] != INDETERMINATE,
                                                                       "model_label"]).all()
    assert {"tissue_fraction", "focus", "ood_score", "colour_score"} <= set(out["quality"].iloc[0])


@pytest.mark.slow
def test_blank_blurred_and_photographs_are_flagged(screened_model):
    import skimage.data

    name, _, model, test = screened_model
    size = 50 if name == "idc" else 224
    blank = [Image.new("RGB", (size, size), colour) for colour in ((0, 0, 0), (255, 255, 255), (128, 128, 128))]
    blank.append(Image.new("RGBA", (size, size), (0, 0, 0, 0)))
    out = _score(model, blank)
    assert (out["label"] == INDETERMINATE).all() and out["flags"].str.contains(LOW_TISSUE).all()
    # Flagged images keep their probabilities and the model's own label.
    assert out["model_label"].isin(model.metadata.metadata["class_names"]).all()
    assert all(abs(sum(p.values()) - 1) < 1e-6 for p in out["probabilities"])
    # Gaussian blur of 4 % of the width: 2 px on an IDC patch, 9 px on a BreaKHis image.
    images = [Image.open(p).convert("RGB") for p in test["path"].iloc[:40]]
    blurred = _score(model, [i.filter(ImageFilter.GaussianBlur(0.04 * max(i.size))) for i in images])
    assert (blurred["label"] == INDETERMINATE).all(), blurred["flags"].value_counts()
    photos = [getattr(skimage.data, n)() for n in PHOTOGRAPHS]
    scored = _score(model, photos)
    assert (scored["label"] == INDETERMINATE).all(), dict(zip(PHOTOGRAPHS, scored["flags"], strict=True))
