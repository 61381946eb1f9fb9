"""Stain normalisation and HED jitter: known answers on synthetic two-stain images, fallbacks, the pipeline."""

from __future__ import annotations

import logging

import numpy as np
import pytest
from PIL import Image

from conftest import BREAKHIS
from histoflow.data.images import read_image, resize_and_scale
from histoflow.data.pipeline import hed_affine, hed_jitter, make_dataset
from histoflow.data.stain import (
    LIGHT,
    RGB_FROM_HED,
    STAIN_METHODS,
    StainNormalizer,
    fit_reference,
)
from histoflow.errors import ConfigError
from histoflow.modeling.variants import make_train_config


def _unit(v) -> np.ndarray:
    v = np.asarray(v, dtype=float)
    return v / np.linalg.norm(v)


REFERENCE_STAINS = np.stack([_unit([0.65, 0.70, 0.29]), _unit([0.07, 0.99, 0.11])], axis=1)  # H, E columns
SOURCE_STAINS = np.stack([_unit([0.55, 0.80, 0.25]), _unit([0.20, 0.90, 0.35])], axis=1)


def _render(stains: np.ndarray, concentrations: np.ndarray, side: int = 64) -> np.ndarray:
    """Beer-Lambert: the RGB image (Macenko's convention I = Io exp(-OD) - 1) of these stain amounts."""
    od = stains @ concentrations
    return np.clip(np.round(LIGHT * np.exp(-od) - 1), 0, 255).astype(np.uint8).T.reshape(side, side, 3)


@pytest.fixture(scope="module")
def two_stain(tmp_path_factory):
    """The same tissue (stain amounts) under a reference and a different, stronger source staining."""
    rng = np.random.default_rng(0)
    amounts = np.stack([rng.gamma(2.0, 0.35, 64 * 64), rng.gamma(2.0, 0.25, 64 * 64)])
    reference, source = _render(REFERENCE_STAINS, amounts), _render(SOURCE_STAINS, 1.3 * amounts)
    path = tmp_path_factory.mktemp("stain") / "reference.png"
    Image.fromarray(reference).save(path)
    return reference, source, str(path)


def _lab_stats(image: np.ndarray) -> np.ndarray:
    from torchstain.numpy.utils.rgb2lab import rgb2lab

    lab = rgb2lab(image.astype("float32") / 255).reshape(-1, 3)
    return np.concatenate([lab.mean(axis=0), lab.std(axis=0)])


def test_macenko_recovers_the_stain_vectors_and_the_reference_colours(two_stain):
    reference, source, path = two_stain
    fitted = fit_reference("macenko", [path], seed=0)
    matrix = np.asarray(fitted["stain_matrix"])
    cosines = (matrix * REFERENCE_STAINS).sum(axis=0) / np.linalg.norm(matrix, axis=0)
    assert cosines.min() > 0.99, cosines  # haematoxylin first, eosin second, as rendered
    normalized, fell_back = StainNormalizer(fitted).normalize(source)
    assert not fell_back and normalized.dtype == np.uint8 and normalized.shape == source.shape
    before = np.abs(source.astype(float) - reference).mean()
    after = np.abs(normalized.astype(float) - reference).mean()
    assert before > 20 and after < 3, (before, after)


def test_reinhard_matches_the_reference_lab_statistics(two_stain):
    reference, source, path = two_stain
    fitted = fit_reference("reinhard", [path], seed=0)
    normalized, fell_back = StainNormalizer(fitted).normalize(source)
    assert not fell_back
    target = _lab_stats(reference)
    assert np.abs(_lab_stats(source) - target).max() > 10
    np.testing.assert_allclose(_lab_stats(normalized), target, atol=2.0)


@pytest.mark.parametrize("method", ["macenko", "reinhard"])
@pytest.mark.parametrize("colour", [255, 128, 0])
def test_blank_and_flat_tiles_fall_back_unchanged_with_a_warning(two_stain, method, colour, caplog):
    normalizer = StainNormalizer(fit_reference(method, [two_stain[2]], seed=0))
    blank = np.full((50, 50, 3), colour, np.uint8)
    with caplog.at_level(logging.WARNING, logger="histoflow.data.stain"):
        out, fell_back = normalizer.normalize(blank, "blank.png")
    assert fell_back and normalizer.fallbacks == 1 and np.array_equal(out, blank)
    assert "blank.png" in caplog.text and "used unchanged" in caplog.text


def test_the_reference_is_fitted_on_tissue_and_refuses_blank_sets(tmp_path, two_stain):
    white = tmp_path / "white.png"
    Image.new("RGB", (40, 40), (255, 255, 255)).save(white)
    with pytest.raises(ConfigError, match="none of 1 training images has enough stained tissue"):
        fit_reference("macenko", [str(white)], seed=0)
    # Blank tiles among real ones are skipped, not averaged in.
    with_blank = fit_reference("macenko", [str(white), two_stain[2]], seed=0)
    assert with_blank["images"] == 1
    assert with_blank["stain_matrix"] == fit_reference("macenko", [two_stain[2]], seed=0)["stain_matrix"]
    assert fit_reference("none", [str(white)], seed=0) == {"method": "none"}


def test_unknown_stain_method_fails_before_training():
    assert STAIN_METHODS == ("none", "macenko", "reinhard")
    with pytest.raises(ConfigError, match="stain_norm must be one of none, macenko, reinhard; got 'vahadane'"):
        make_train_config("baseline", stain_norm="vahadane")
    with pytest.raises(ConfigError, match="stain_norm must be one of"):
        fit_reference("vahadane", [], seed=0)


def test_hed_roundtrip_and_known_concentrations():
    rng = np.random.default_rng(1)
    image = rng.uniform(0.05, 1.0, (16, 16, 3)).astype("float32")
    same = hed_affine(image, np.ones(3), np.zeros(3)).numpy()
    np.testing.assert_allclose(same, image, atol=1e-5)
    # A pure haematoxylin pixel of amount c: doubling H gives amount 2c; shifting E by b adds b of eosin.
    c, b = 0.4, 0.1
    pure_h = np.exp(-c * RGB_FROM_HED[0]).astype("float32")[None, None]
    doubled = hed_affine(pure_h, np.array([2.0, 1.0, 1.0]), np.zeros(3)).numpy()[0, 0]
    np.testing.assert_allclose(doubled, np.exp(-2 * c * RGB_FROM_HED[0]), atol=1e-5)
    shifted = hed_affine(pure_h, np.ones(3), np.array([0.0, b, 0.0])).numpy()[0, 0]
    np.testing.assert_allclose(shifted, np.exp(-c * RGB_FROM_HED[0] - b * RGB_FROM_HED[1]), atol=1e-5)


def test_hed_jitter_is_mild_and_random():
    image = read_image(str(next(BREAKHIS.rglob("*.png"))))
    scaled = resize_and_scale(image, 64)
    jittered = [hed_jitter(scaled, seed=None).numpy() for _ in range(3)]
    for out in jittered:
        assert out.min() >= 0 and out.max() <= 1 and 0 < np.abs(out - scaled).mean() < 0.08
    assert not np.allclose(jittered[0], jittered[1])


def test_pipeline_normalises_before_resizing_and_jitters_only_training(two_stain):
    _, _, path = two_stain
    files = [str(p) for p in sorted(BREAKHIS.rglob("*.png"))[:4]]
    normalizer = StainNormalizer(fit_reference("macenko", files, seed=0))
    batch = next(iter(make_dataset(files, [0, 1, 0, 1], 48, 4, stain=normalizer)))[0].numpy()
    for image, f in zip(batch, files, strict=True):
        expected = resize_and_scale(normalizer.normalize(read_image(f))[0], 48)
        np.testing.assert_allclose(image, expected, atol=1e-6)
    evaluation = next(iter(make_dataset(files, [0, 1, 0, 1], 48, 4, augment="hed", stain=normalizer)))[0].numpy()
    np.testing.assert_allclose(evaluation, batch, atol=1e-6)
    train = next(iter(make_dataset(files, [0, 1, 0, 1], 48, 4, training=True, augment="hed", seed=2)))[0].numpy()
    assert train.shape == batch.shape and not np.allclose(np.sort(train.ravel()), np.sort(batch.ravel()), atol=1e-3)
