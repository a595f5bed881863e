"""Tests of the decode/resize fast paths of mae_jax.data.augment: reduced-scale JPEG
decoding, the PIL-like separable resampler, the DCT method option, normalization."""

import io

import numpy as np
import pytest
from PIL import Image

from mae_jax.data import augment
from mae_jax.data.lazy_tf import tf_module

MEAN = np.array(augment.IMAGENET_MEAN)
STD = np.array(augment.IMAGENET_STD)


def _photo(name="astronaut"):
    from skimage import data

    return getattr(data, name)()


def _jpeg(image, quality=90):
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def _psnr(a, b):
    return 10 * np.log10(255.0**2 / np.mean((a.astype(np.float64) - b) ** 2))


@pytest.fixture(scope="module")
def astronaut_jpeg():
    return _jpeg(_photo())  # 512 x 512


# ------------------------------------------------------------ reduced scale


@pytest.mark.parametrize(
    "crop, out, expected",
    [
        ((224, 224), (224, 224), 1),
        ((447, 1000), (224, 224), 1),  # one side short of 2x: full scale
        ((448, 448), (224, 224), 2),
        ((895, 900), (224, 224), 2),
        ((900, 896), (224, 224), 4),
        ((1792, 1800), (224, 224), 8),
        ((9000, 9000), (224, 224), 8),  # 8 is libjpeg's largest
        ((130, 300), (64, 100), 2),  # per axis: 130 >= 2 * 64, 300 >= 2 * 100
        ((130, 300), (64, 160), 1),
    ],
)
def test_jpeg_scale_is_largest_ratio_that_never_upsamples(crop, out, expected):
    r = int(augment.jpeg_scale(crop[0], crop[1], out[0], out[1]))
    assert r == expected
    assert crop[0] // r >= out[0] and crop[1] // r >= out[1]


def test_reduced_window_covers_the_box_in_scaled_pixels():
    tf = tf_module()
    rng = np.random.default_rng(0)
    for _ in range(200):
        hh, ww = rng.integers(64, 1200, 2)
        r = int(rng.choice([2, 4, 8]))
        h, w = rng.integers(1, hh + 1), rng.integers(1, ww + 1)
        y, x = rng.integers(0, hh - h + 1), rng.integers(0, ww - w + 1)
        window, offset, extent = augment._reduced_window(  # pylint: disable=protected-access
            tf.constant([hh, ww]), tf.constant([y, x, h, w], tf.int32), r
        )
        window, offset, extent = window.numpy(), offset.numpy(), extent.numpy()
        scaled = -(-np.array([hh, ww]) // r)  # libjpeg's 1/r image size
        assert (window[:2] >= 0).all() and (window[:2] + window[2:] <= scaled).all()
        np.testing.assert_allclose(window[:2] + offset, [y / r, x / r], rtol=1e-6, atol=1e-4)
        np.testing.assert_allclose(extent, [h / r, w / r], rtol=1e-6)
        assert (offset >= 0).all() and (offset < 1).all()
        assert (offset + extent <= window[2:] + 1e-4).all()


# Measured (astronaut, quality 90): PSNR 35-47 dB against the full-scale decode of the
# same box, while a box misplaced by half a scaled pixel scores 21-31 dB.
@pytest.mark.parametrize(
    "box, size, r",
    [
        ((3, 9, 130, 140), 64, 2),
        ((101, 7, 400, 496), 64, 4),
        ((13, 17, 270, 259), 64, 4),
        ((0, 0, 512, 512), 64, 8),
        ((31, 45, 460, 449), 224, 2),
    ],
)
def test_reduced_scale_decode_is_close_to_full_scale(astronaut_jpeg, box, size, r):
    tf = tf_module()
    data, box_t = tf.constant(astronaut_jpeg), tf.constant(box, tf.int32)
    assert int(augment.jpeg_scale(box[2], box[3], size, size)) == r
    full = augment.decode_crop_resize(data, box_t, size, dct_method="INTEGER_ACCURATE").numpy()
    fast = augment.decode_crop_resize(
        data, box_t, size, dct_method="INTEGER_ACCURATE", reduced_scale=True
    ).numpy()
    assert fast.shape == full.shape == (size, size, 3) and fast.dtype == np.uint8
    assert not np.array_equal(fast, full)  # the 1/r decode was used
    assert _psnr(fast, full) > 33.0
    assert np.abs(fast.astype(np.float64) - full).mean() < 3.0  # grey levels


def test_reduced_scale_leaves_small_crops_and_other_formats_alone(astronaut_jpeg):
    tf = tf_module()
    box = tf.constant([40, 50, 300, 280], tf.int32)  # < 2 x 224: r = 1
    for data in (astronaut_jpeg, _png(_photo())):
        data = tf.constant(data)
        full = augment.decode_crop_resize(data, box, 224)
        fast = augment.decode_crop_resize(data, box, 224, reduced_scale=True)
        np.testing.assert_array_equal(fast.numpy(), full.numpy())
    png = tf.constant(_png(_photo()))  # large box, but not a JPEG: full decode
    big = tf.constant([0, 0, 512, 512], tf.int32)
    np.testing.assert_array_equal(
        augment.decode_crop_resize(png, big, 64, reduced_scale=True).numpy(),
        augment.decode_crop_resize(png, big, 64).numpy(),
    )


def _png(image):
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return buf.getvalue()


# --------------------------------------------------------------- resampling


@pytest.mark.parametrize("shape", [(300, 280), (150, 180), (100, 512), (512, 230), (224, 224)])
def test_resample_crop_matches_tf_and_pil_bicubic(shape):
    tf = tf_module()
    image = _photo()[: shape[0], : shape[1]]
    ours = augment.resample_crop(tf.constant(image), 224).numpy()
    assert ours.shape == (224, 224, 3) and ours.dtype == np.uint8
    ref_tf = tf.image.resize(image, [224, 224], "bicubic", antialias=True).numpy()
    ref_tf = np.clip(np.round(ref_tf), 0, 255)
    pil = np.asarray(Image.fromarray(image).resize((224, 224), Image.BICUBIC), np.float64)
    # Differences only from rounding the vertical pass to uint8, as PIL does.
    assert np.abs(ours - ref_tf).mean() < 0.3
    assert np.abs(ours - pil).mean() < 0.3


def test_resample_crop_flip_and_fractional_box():
    tf = tf_module()
    image = tf.constant(_photo()[:200, :260])
    plain = augment.resample_crop(image, 96).numpy()
    flipped = augment.resample_crop(image, 96, flip=tf.constant(True)).numpy()
    np.testing.assert_array_equal(flipped, plain[:, ::-1])
    np.testing.assert_array_equal(
        augment.resample_crop(image, 96, flip=tf.constant(False)).numpy(), plain
    )
    # An integer box given as offset/extent equals cropping first, but for the
    # border, where the kernel (~2 output pixels wide here) also reads pixels
    # around the box instead of only those inside.
    crop = augment.resample_crop(image[20:170, 30:230], 96).numpy().astype(int)
    boxed = augment.resample_crop(image, 96, tf.constant([20.0, 30.0]), tf.constant([150.0, 200.0]))
    diff = np.abs(boxed.numpy() - crop)
    assert diff[3:-3, 3:-3].max() <= 1 and diff.mean() < 0.2


def test_random_resized_crop_output_is_rounded_pixels_normalized(astronaut_jpeg):
    tf = tf_module()
    out = augment.random_resized_crop(
        tf.constant(astronaut_jpeg), tf.constant([5, 6], tf.int64), 64, (0.2, 1.0), (3 / 4, 4 / 3)
    ).numpy()
    pixels = (out * STD + MEAN) * 255.0
    np.testing.assert_allclose(pixels, np.round(pixels), atol=1e-3)
    assert out.shape == (64, 64, 3) and out.dtype == np.float32


# --------------------------------------------------------- DCT, normalization


def test_integer_accurate_decodes_like_pil_and_bad_method_raises(astronaut_jpeg):
    tf = tf_module()
    data = tf.constant(astronaut_jpeg)
    pil = np.asarray(Image.open(io.BytesIO(astronaut_jpeg)).convert("RGB"))
    accurate = augment.decode(data, "INTEGER_ACCURATE").numpy()
    np.testing.assert_array_equal(accurate, pil)
    fast = augment.decode(data, "INTEGER_FAST").numpy()
    assert 0 < np.abs(fast.astype(int) - pil).mean() < 2.0
    box = tf.constant([10, 20, 100, 120], tf.int32)
    np.testing.assert_array_equal(
        augment.decode_and_crop(data, box, "INTEGER_ACCURATE").numpy(), pil[10:110, 20:140]
    )
    with pytest.raises(ValueError, match="'ISLOW'"):
        augment.decode(data, "ISLOW")
    with pytest.raises(ValueError, match="jpeg_dct_method"):
        augment.decode_crop_resize(data, box, 32, dct_method="")


def test_normalize_full_size_constants_equal_broadcast():
    tf = tf_module()
    rng = np.random.default_rng(0)
    batch = rng.integers(0, 256, (2, 16, 24, 3), dtype=np.uint8)
    ref = ((batch / 255.0 - MEAN) / STD).astype(np.float32)
    for x, want in ((batch, ref), (batch[0], ref[0]), (batch.reshape(-1, 3), ref.reshape(-1, 3))):
        np.testing.assert_allclose(augment.normalize(tf.constant(x)).numpy(), want, atol=1e-6)
    dynamic = tf.function(augment.normalize, input_signature=[tf.TensorSpec(None, tf.uint8)])
    np.testing.assert_array_equal(
        dynamic(tf.constant(batch[0])).numpy(), augment.normalize(tf.constant(batch[0])).numpy()
    )
