import io

import numpy as np
import pytest
from PIL import Image

from conftest import BREAKHIS, IDC
from histoflow.errors import ImageDecodeError
from histoflow.data.pipeline import make_dataset
from histoflow.data.images import decode_image, preprocess_bytes

IDC_FILE = next((IDC / "10253" / "0").glob("*.png"))
BREAKHIS_ORIGINAL = next(BREAKHIS.rglob("SOB_B_A-14-22549AB-40-001.png"))


@pytest.mark.parametrize("fmt,mode", [("PNG", "RGB"), ("JPEG", "RGB"), ("TIFF", "RGB"), ("BMP", "RGB"),
                                      ("PNG", "L"), ("PNG", "RGBA"), ("TIFF", "P")])
def test_decodes_every_format_and_mode_to_rgb(fmt, mode):
    original = Image.open(BREAKHIS_ORIGINAL).convert(mode)
    buffer = io.BytesIO()
    original.save(buffer, format=fmt)
    array = decode_image(buffer.getvalue())
    assert array.shape == (460, 700, 3) and array.dtype == np.uint8
    if fmt in ("PNG", "TIFF", "BMP") and mode == "RGB":
        assert np.array_equal(array, np.asarray(original))  # lossless formats decode exactly


def test_bad_bytes_raise_clear_errors():
    data = BREAKHIS_ORIGINAL.read_bytes()
    with pytest.raises(ImageDecodeError, match="empty"):
        decode_image(b"")
    with pytest.raises(ImageDecodeError, match="not an image"):
        decode_image(b"hello, not an image")
    with pytest.raises(ImageDecodeError, match="truncated"):
        decode_image(data[: len(data) // 3])
    with pytest.raises(ImageDecodeError, match="above the limit"):
        decode_image(data, max_pixels=100_000)


def test_resize_and_scale_shape_and_range():
    out = preprocess_bytes(IDC_FILE.read_bytes(), 128)
    assert out.shape == (128, 128, 3) and out.dtype == np.float32
    assert 0.0 <= out.min() and out.max() <= 1.0 and out.std() > 0.01


def test_pipeline_matches_the_serving_preprocessing():
    """No training/serving skew: the tf.data batch equals preprocess_bytes of the same files."""
    files = [IDC_FILE, BREAKHIS_ORIGINAL]
    batch, labels = next(iter(make_dataset([str(f) for f in files], [0, 1], 96, batch_size=2)))
    for image, f in zip(batch.numpy(), files):
        np.testing.assert_allclose(image, preprocess_bytes(f.read_bytes(), 96), atol=1e-6)
    assert labels.numpy().tolist() == [[1, 0], [0, 1]]


def test_seed_augmentation_triples_with_rotations_and_flips():
    ds = make_dataset([str(IDC_FILE)], [1], 64, batch_size=8, training=True, augment="seed", seed=1)
    images = next(iter(ds))[0].numpy()
    assert images.shape[0] == 3
    base = preprocess_bytes(IDC_FILE.read_bytes(), 64)
    expected = [base, np.fliplr(np.rot90(base, 1)), np.fliplr(np.rot90(base, 2))]
    for want in expected:
        assert min(np.abs(img - want).max() for img in images) < 1e-6


def test_random_augmentation_only_when_training():
    paths, labels = [str(IDC_FILE)] * 4, [0] * 4
    evaluation = next(iter(make_dataset(paths, labels, 64, 4, training=False, augment="random")))[0].numpy()
    assert all(np.array_equal(evaluation[0], e) for e in evaluation)
    train = next(iter(make_dataset(paths, labels, 64, 4, training=True, augment="random", seed=3)))[0].numpy()
    assert not all(np.allclose(train[0], t) for t in train)
    assert train.min() >= 0.0 and train.max() <= 1.0
