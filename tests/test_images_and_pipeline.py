import io
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import tifffile
from PIL import Image

from conftest import BREAKHIS, IDC
from histoflow.data.images import decode_image, preprocess_bytes, read_image, resize
from histoflow.data.pipeline import cache_images, make_dataset
from histoflow.errors import ImageDecodeError

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


def _encoded(array: np.ndarray, fmt: str) -> bytes:
    buffer = io.BytesIO()
    if array.ndim == 3:  # 16-bit RGB: Pillow cannot write it; tifffile can
        tifffile.imwrite(buffer, array, photometric="rgb")
    else:
        Image.fromarray(array).save(buffer, format=fmt)
    return buffer.getvalue()


def test_16_bit_32_bit_and_float_microscopy_exports_decode_on_the_8_bit_scale():
    """A 16-bit grey export of a real tile was decoded as an all-white tile (Pillow clips at 255)."""
    grey = np.asarray(Image.open(BREAKHIS_ORIGINAL).convert("L"))
    rgb = np.asarray(Image.open(BREAKHIS_ORIGINAL).convert("RGB"))
    as_rgb = np.repeat(grey[..., None], 3, axis=2)
    for fmt in ("PNG", "TIFF"):
        assert np.array_equal(decode_image(_encoded(grey.astype(np.uint16) * 257, fmt)), as_rgb)
    assert np.array_equal(decode_image(_encoded(grey.astype(np.float32) / 255, "TIFF")), as_rgb)
    assert np.array_equal(decode_image(_encoded(rgb.astype(np.uint16) * 257, "TIFF")), rgb)
    # A 12-bit camera's values in a 16-bit file: on the 12-bit scale (4,095 -> 255), not a near-black tile.
    twelve = decode_image(_encoded(grey.astype(np.uint16) * 16, "PNG")).astype(int)
    assert np.abs(twelve - as_rgb).max() <= 1
    # Values beyond the scale (32-bit integers, floats above 1) are scaled by the image's own maximum.
    wide = decode_image(_encoded(grey.astype(np.int32) * 1_000_000, "TIFF"))
    assert wide.max() == 255 and np.corrcoef(wide[..., 0].ravel(), grey.ravel())[0, 1] > 0.999


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
    assert out.min() >= 0.0 and out.max() <= 1.0 and out.std() > 0.01


@pytest.mark.parametrize("size", [224, 128, 96, 32])
def test_resize_is_tensorflows_antialiased_bilinear(size):
    """The resize (Pillow, float per channel) is what tf.image.resize(bilinear, antialias=True) gave, which the
    models were trained with before it: within one grey level (float sums rounded), on a handful of values, on
    BreakHis originals (700x460) and IDC patches (50x50), smaller and larger."""
    import tensorflow as tf

    files = [BREAKHIS_ORIGINAL, *sorted(BREAKHIS.rglob("*.png"))[:4], IDC_FILE,
             *sorted((IDC / "10253").rglob("*.png"))[:4]]
    differing = total = 0
    for f in files:
        image = read_image(str(f))
        ours = resize(image, size)
        theirs = tf.cast(tf.round(tf.clip_by_value(tf.image.resize(tf.cast(image, tf.float32), (size, size),
                                                                   antialias=True), 0, 255)), tf.uint8).numpy()
        assert ours.shape == theirs.shape == (size, size, 3) and ours.dtype == np.uint8
        difference = np.abs(ours.astype(int) - theirs)
        assert difference.max() <= 1, f
        differing, total = differing + int((difference > 0).sum()), total + difference.size
    assert differing / total < 1e-3


def test_pipeline_matches_the_serving_preprocessing():
    """No training/serving skew: the tf.data batch equals preprocess_bytes of the same files."""
    files = [IDC_FILE, BREAKHIS_ORIGINAL]
    batch, labels = next(iter(make_dataset([str(f) for f in files], [0, 1], 96, batch_size=2)))
    for image, f in zip(batch.numpy(), files, strict=True):
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


def _idc_files(n: int) -> list[Path]:
    return sorted((IDC / "10253").rglob("*.png"))[:n]


def _images(ds) -> np.ndarray:
    return np.concatenate([x.numpy() for x, _ in ds])


def test_disk_cache_gives_the_decoded_images_and_is_reused(tmp_path):
    """Cached and streamed splits are bit for bit the same images, in order; a second pipeline over the
    same files reads the cache (one file) instead of writing another."""
    files = [str(f) for f in _idc_files(20)] + [str(BREAKHIS_ORIGINAL)]
    labels = [0] * 20 + [1]
    streamed = _images(make_dataset(files, labels, 64, 8))
    cached = _images(make_dataset(files, labels, 64, 8, cache_dir=tmp_path))
    assert np.array_equal(streamed, cached)
    data_files = list(tmp_path.glob("*.u8"))
    assert len(data_files) == 1 and data_files[0].stat().st_size == 21 * 64 * 64 * 3
    assert cache_images(files, 64, tmp_path).hit
    assert np.array_equal(_images(make_dataset(files, labels, 64, 8, cache_dir=tmp_path)), streamed)
    assert len(list(tmp_path.glob("*.u8"))) == 1


def test_cached_training_epochs_cover_every_image_view_once_in_a_new_order(tmp_path):
    files = [str(f) for f in _idc_files(6)]
    ds = make_dataset(files, [0, 1, 0, 1, 0, 1], 32, 4, training=True, augment="seed", seed=7, cache_dir=tmp_path)
    base = _images(make_dataset(files, [0] * 6, 32, 6))
    views = [v for b in base for v in (b, np.fliplr(np.rot90(b, 1)), np.fliplr(np.rot90(b, 2)))]
    epochs = [_images(ds), _images(ds)]
    for epoch in epochs:
        assert len(epoch) == 18
        matched = sorted(next(i for i, v in enumerate(views) if np.array_equal(v, img)) for img in epoch)
        assert matched == list(range(18))  # each copy of each image exactly once
    assert not np.array_equal(epochs[0], epochs[1])  # reshuffled every epoch


def test_a_changed_folder_never_reads_a_stale_cache(tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    sources = _idc_files(4)
    for i, src in enumerate(sources):
        shutil.copy(src, folder / f"{i}.png")
    files = [str(folder / f"{i}.png") for i in range(4)]
    cache = tmp_path / "cache"
    first = _images(make_dataset(files, [0] * 4, 32, 4, cache_dir=cache))
    # Rewritten in place (another patch under the same name), added, removed: each is another cache.
    shutil.copy(BREAKHIS_ORIGINAL, folder / "1.png")
    os.utime(folder / "1.png", ns=(time.time_ns(), time.time_ns() + 10**9))
    rewritten = _images(make_dataset(files, [0] * 4, 32, 4, cache_dir=cache))
    assert np.array_equal(rewritten[[0, 2, 3]], first[[0, 2, 3]]) and not np.array_equal(rewritten[1], first[1])
    assert np.array_equal(rewritten, _images(make_dataset(files, [0] * 4, 32, 4)))
    assert len(list(cache.glob("*.u8"))) == 2
    shutil.copy(sources[0], folder / "4.png")
    assert len(_images(make_dataset(files + [str(folder / "4.png")], [0] * 5, 32, 4, cache_dir=cache))) == 5
    assert len(_images(make_dataset(files[:3], [0] * 3, 32, 4, cache_dir=cache))) == 3
    assert len(list(cache.glob("*.u8"))) == 4


# The cache's writer (what cache_images runs with the input pipeline's decoding) in a process whose disk is full
# after 100 kB; the images decoded by Pillow here, so that this process needs no TensorFlow.
FULL_DISK = """
import resource, sys
import numpy as np
from PIL import Image
from histoflow.data.image_cache import CHUNK, ensure_cached
from histoflow.data.images import read_image

def batches_of(paths):
    for start in range(0, len(paths), CHUNK):
        chunk = paths[start:start + CHUNK]
        yield np.stack([np.asarray(Image.fromarray(read_image(p)).resize((64, 64))) for p in chunk])

resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, 100_000))
try:
    ensure_cached(sys.argv[2:], 64, sys.argv[1], batches_of, {"method": "none"}, lambda: 0)
except Exception as exc:
    print(type(exc).__name__, exc)
    sys.exit(3)
"""


def test_a_full_disk_fails_naming_the_folder_and_leaves_nothing_to_trust(tmp_path):
    files = [str(f) for f in _idc_files(30)]  # 30 x 12 kB at 64 px: past the limit on the 9th image
    cache = tmp_path / "cache"
    out = subprocess.run([sys.executable, "-c", FULL_DISK, str(cache), *files], capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 3, out.stderr[-2000:]
    assert out.stdout.startswith("DataError could not cache the 30 images of")
    assert str(IDC / "10253") in out.stdout and "image_cache=none" in out.stdout
    assert list(cache.iterdir()) == []  # no partial file, no manifest
    # Room again: the next run writes a complete cache.
    assert not cache_images(files, 64, cache).hit and cache_images(files, 64, cache).hit
