"""Image decoding and augmentation as pure TensorFlow graph functions.

All randomness is stateless: every function takes a `seed` tensor (int64 [2])
so that the same seed always produces the same crop/flip, whatever thread or
process runs it. Images are HWC; outputs are float32 normalized with the
ImageNet mean/std (NHWC once batched).

Training crops are resized as PIL resizes the uint8 images of the reference
torchvision pipeline (separable bicubic, each pass rounded to uint8; see
`resample_crop`), flipped as uint8 and normalized last. JPEG decoding can use
libjpeg's reduced DCT scales (1/2, 1/4, 1/8) for crops at least 2, 4, 8 times
the output side; see `jpeg_scale` and `decode_crop_resize`.

The crop box sampler follows torchvision's `RandomResizedCrop.get_params`:
10 attempts of (area fraction ~ U(scale), log aspect ~ U(log ratio)), the first
box that fits wins; otherwise a center crop with the aspect ratio clamped.
"""

from __future__ import annotations

import functools
import math

import numpy as np

from mae_jax.data.lazy_tf import tf_module

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
JPEG_MAGIC = b"\xff\xd8\xff"
# libjpeg's IDCT: INTEGER_ACCURATE (JDCT_ISLOW) is what PIL, hence torchvision,
# decodes with (bit-identical pixels); TensorFlow's default '' is INTEGER_FAST.
JPEG_DCT_METHODS = ("INTEGER_ACCURATE", "INTEGER_FAST")
JPEG_SCALES = (1, 2, 4, 8)  # DCT scale denominators `decode_and_crop_jpeg(ratio=)` accepts
_EXTRA_AUG_TAG = 0xE7A  # seed of `augment_fn` in random_resized_crop


def check_crop_params(scale, ratio) -> None:
    """ValueError unless 0 < scale[0] <= scale[1] <= 1 and 0 < ratio[0] <= ratio[1]."""
    if len(scale) != 2 or not 0 < scale[0] <= scale[1] <= 1:
        raise ValueError(f"crop scale {tuple(scale)!r} must satisfy 0 < min <= max <= 1")
    if len(ratio) != 2 or not 0 < ratio[0] <= ratio[1]:
        raise ValueError(f"crop ratio {tuple(ratio)!r} must satisfy 0 < min <= max")


def sample_crop_box(
    height, width, seed, scale=(0.2, 1.0), ratio=(3 / 4, 4 / 3), attempts: int = 10
):
    """Samples a RandomResizedCrop box for an image of `height` x `width`.

    Args:
      height, width: int32 scalars (tensors or ints), the image size.
      seed: int64 [2] stateless seed.
      scale: (min, max) fraction of the image area.
      ratio: (min, max) aspect ratio width / height.
      attempts: tries before the center-crop fallback (torchvision: 10).

    Returns:
      int32 [4] tensor (offset_y, offset_x, crop_h, crop_w).
    """
    tf = tf_module()
    check_crop_params(scale, ratio)
    h_f, w_f = (tf.cast(tf.cast(v, tf.int32), tf.float64) for v in (height, width))
    area = h_f * w_f
    seeds = tf.random.experimental.stateless_split(seed, 4)
    target_area = area * tf.random.stateless_uniform(
        [attempts], seeds[0], scale[0], scale[1], dtype=tf.float64
    )
    log_ratio = tf.random.stateless_uniform(
        [attempts], seeds[1], math.log(ratio[0]), math.log(ratio[1]), dtype=tf.float64
    )
    aspect = tf.exp(log_ratio)
    ws = tf.round(tf.sqrt(target_area * aspect))
    hs = tf.round(tf.sqrt(target_area / aspect))
    fits = (ws > 0) & (ws <= w_f) & (hs > 0) & (hs <= h_f)
    first = tf.argmax(tf.cast(fits, tf.int32), output_type=tf.int32)
    # Uniform integer offsets in [0, H - h] and [0, W - w] for every attempt.
    u = tf.random.stateless_uniform([2, attempts], seeds[2], dtype=tf.float64)
    ys = tf.floor(u[0] * (h_f - hs + 1))
    xs = tf.floor(u[1] * (w_f - ws + 1))
    # Fallback: whole image, aspect ratio clamped to the allowed range.
    in_ratio = w_f / h_f
    fb_w = tf.where(in_ratio > ratio[1], tf.round(h_f * ratio[1]), w_f)
    fb_h = tf.where(in_ratio < ratio[0], tf.round(w_f / ratio[0]), h_f)
    fb_y = tf.floor((h_f - fb_h) / 2)
    fb_x = tf.floor((w_f - fb_w) / 2)
    box = tf.where(
        tf.reduce_any(fits),
        tf.stack([ys[first], xs[first], hs[first], ws[first]]),
        tf.stack([fb_y, fb_x, fb_h, fb_w]),
    )
    return tf.cast(box, tf.int32)


def check_dct_method(dct_method: str) -> None:
    """ValueError naming `dct_method` unless it is one of JPEG_DCT_METHODS."""
    if dct_method not in JPEG_DCT_METHODS:
        raise ValueError(
            f"jpeg_dct_method {dct_method!r} must be one of {JPEG_DCT_METHODS} "
            f"(INTEGER_ACCURATE decodes exactly as PIL/torchvision)"
        )


def _is_jpeg(data):
    tf = tf_module()
    return tf.equal(tf.strings.substr(data, 0, 3), JPEG_MAGIC)


def image_shape(data, is_jpeg=None):
    """int32 [2] (height, width) of an encoded image, reading only the header for JPEG."""
    tf = tf_module()
    return tf.cond(
        _is_jpeg(data) if is_jpeg is None else is_jpeg,
        lambda: tf.image.extract_jpeg_shape(data)[:2],
        lambda: tf.shape(_decode_any(data))[:2],
    )


def _decode_any(data):
    """Any JPEG/PNG/GIF/BMP/WebP string -> uint8 [H, W, 3], without JPEG options."""
    tf = tf_module()
    return tf.io.decode_image(data, channels=3, dtype=tf.uint8, expand_animations=False)


def decode(data, dct_method: str = "INTEGER_FAST", is_jpeg=None):
    """Decodes any JPEG/PNG/GIF/BMP/WebP string to uint8 [H, W, 3] (JPEG: `dct_method`)."""
    tf = tf_module()
    check_dct_method(dct_method)
    image = tf.cond(
        _is_jpeg(data) if is_jpeg is None else is_jpeg,
        lambda: tf.io.decode_jpeg(data, channels=3, dct_method=dct_method),
        lambda: _decode_any(data),
    )
    image.set_shape([None, None, 3])
    return image


def decode_and_crop(data, box, dct_method: str = "INTEGER_FAST", is_jpeg=None):
    """Decodes only the crop `box` (y, x, h, w) of an encoded image: uint8 [h, w, 3].

    JPEGs use the fused `decode_and_crop_jpeg`; other formats decode fully.
    """
    tf = tf_module()
    check_dct_method(dct_method)
    image = tf.cond(
        _is_jpeg(data) if is_jpeg is None else is_jpeg,
        lambda: tf.image.decode_and_crop_jpeg(data, box, channels=3, dct_method=dct_method),
        lambda: tf.image.crop_to_bounding_box(_decode_any(data), box[0], box[1], box[2], box[3]),
    )
    image.set_shape([None, None, 3])
    return image


def jpeg_scale(crop_h, crop_w, out_h: int, out_w: int):
    """Largest r in JPEG_SCALES with crop_h / r >= out_h and crop_w / r >= out_w.

    Decoding at 1/r then never upsamples: the reduced crop still has at least
    the output's pixels along both axes. int32 scalar tensor.
    """
    tf = tf_module()
    crop_h, crop_w = tf.cast(crop_h, tf.int32), tf.cast(crop_w, tf.int32)
    r = tf.constant(1, tf.int32)
    for k in JPEG_SCALES[1:]:
        r = tf.where((crop_h >= k * out_h) & (crop_w >= k * out_w), k, r)
    return r


def _reduced_window(hw, box, r: int):
    """Window of the 1/r-scale image covering `box` (full-scale y, x, h, w).

    libjpeg's 1/r image has ceil(H / r) x ceil(W / r) pixels, pixel i covering
    full-scale pixels [r i, r i + r). Returns (window int32 [4] in scaled
    pixels, float32 [2] offset of the box's top-left corner inside the window,
    float32 [2] box size, both in scaled pixels).
    """
    tf = tf_module()
    hw = tf.cast(hw, tf.int32)
    start = box[:2] // r
    stop = tf.minimum(-((-(box[:2] + box[2:])) // r), -(-hw // r))  # ceil division
    window = tf.concat([start, stop - start], 0)
    offset = tf.cast(box[:2], tf.float32) / r - tf.cast(start, tf.float32)
    return window, offset, tf.cast(box[2:], tf.float32) / r


def resize_bicubic(image, size, antialias: bool = True):
    """Resizes uint8/float [h, w, 3] to float32 [size[0], size[1], 3], bicubic.

    With `antialias`, downscaling widens the kernel like PIL does (so this
    matches torchvision on PIL images); upscaling uses the plain (cheaper) kernel,
    which is the same function. (Training crops use the faster `resample_crop`.)
    """
    tf = tf_module()
    size = tf.convert_to_tensor(size, tf.int32)

    def resize(smooth):
        return lambda: tf.image.resize(image, size, method="bicubic", antialias=smooth)

    if not antialias:
        out = resize(False)()
    else:
        out = tf.cond(tf.reduce_all(tf.shape(image)[:2] <= size), resize(False), resize(True))
    out.set_shape([None, None, 3])
    return tf.clip_by_value(out, 0.0, 255.0)


def _resample_rows(x, size: int, scale, translation, antialias: bool):
    """Bicubic resampling of the rows of x [n, m] (uint8/float): float32 [size, m].

    Output row i samples input row position (i + 0.5 - translation) / scale - 0.5
    (half-pixel centres); `antialias` widens the kernel by 1 / scale when
    downscaling (PIL's filter support). One ScaleAndTranslate call on an
    [1, n, 1, m] image: its row gather runs over whole contiguous rows.
    """
    tf = tf_module()
    out = tf.raw_ops.ScaleAndTranslate(
        images=tf.reshape(x, [1, tf.shape(x)[0], 1, tf.shape(x)[1]]),
        size=tf.constant([size, 1], tf.int32),
        scale=tf.stack([tf.cast(scale, tf.float32), 1.0]),
        translation=tf.stack([tf.cast(translation, tf.float32), 0.0]),
        kernel_type="keyscubic",
        antialias=antialias,
    )
    return tf.reshape(out, [size, tf.shape(x)[1]])


def resample_crop(image, size: int, offset=None, extent=None, antialias: bool = True, flip=None):
    """uint8 [h, w, 3] -> uint8 [size, size, 3]: bicubic resize of a box, optional h-flip.

    The box is `extent` (float32 [2], height and width, default (h, w)) pixels
    at `offset` (float32 [2], y and x of its top-left corner, default 0) in the
    continuous pixel coordinates of `image`; fractional boxes are exact.
    `flip`: optional bool scalar tensor, mirror the output horizontally.

    Separable like PIL: a vertical pass rounded and clipped to uint8 (as PIL
    stores its intermediate), then a horizontal one, rounded. Each pass is
    `_resample_rows`; between them the data is transposed as a 2-D uint8
    [rows, width * 3] matrix so that the second pass also runs over rows and
    channels end up planar ([w, 3, size]), and a last 2-D transpose restores
    HWC. ScaleAndTranslate's own column gather (a scalar loop per pixel and
    channel) and 3-channel transposes (a memmove per pixel) are about 2x slower.
    Same kernel and weights as `tf.image.resize(..., 'bicubic', antialias)`.
    """
    tf = tf_module()
    h, w = tf.shape(image)[0], tf.shape(image)[1]
    if extent is None:
        extent = tf.cast(tf.stack([h, w]), tf.float32)
    if offset is None:
        offset = tf.zeros([2], tf.float32)
    scale = size / extent
    shift = -offset * scale
    rows = _resample_rows(tf.reshape(image, [h, w * 3]), size, scale[0], shift[0], antialias)
    cols = tf.reshape(tf.transpose(round_to_uint8(rows)), [w, 3 * size])  # [x, (c, y)]
    out = round_to_uint8(_resample_rows(cols, size, scale[1], shift[1], antialias))
    if flip is not None:
        out = tf.cond(flip, lambda: tf.reverse(out, [0]), lambda: out)  # reverse x
    return tf.reshape(tf.transpose(tf.reshape(out, [size * 3, size])), [size, size, 3])


def decode_crop_resize(
    data,
    box,
    size: int,
    antialias: bool = True,
    dct_method: str = "INTEGER_FAST",
    reduced_scale: bool = False,
    hw=None,
    is_jpeg=None,
    flip=None,
):
    """Encoded image -> uint8 [size, size, 3]: crop `box` (y, x, h, w), bicubic resize.

    See `resample_crop` (also for the optional `flip`, a bool scalar tensor).
    With `reduced_scale`, a JPEG crop whose sides are >= r * size (r = 2, 4, 8,
    see `jpeg_scale`) is decoded by libjpeg at 1/r scale (its IDCT reduces each
    8x8 block to 8/r x 8/r pixels): about r^2 fewer pixels to decode and
    resize. The box then maps to a fractional box of the 1/r image: the
    covering integer window is decoded and the exact box resampled from it, so
    the geometry is the full-scale crop's. `hw`: the image's int32 [2]
    (height, width), read from the header when None.
    """
    tf = tf_module()
    check_dct_method(dct_method)
    is_jpeg = _is_jpeg(data) if is_jpeg is None else is_jpeg

    def full_scale():
        image = decode_and_crop(data, box, dct_method, is_jpeg)
        return resample_crop(image, size, antialias=antialias, flip=flip)

    if not reduced_scale:
        return full_scale()
    hw = image_shape(data, is_jpeg) if hw is None else hw

    def reduced(r):
        window, offset, extent = _reduced_window(hw, box, r)
        image = tf.image.decode_and_crop_jpeg(
            data, window, channels=3, ratio=r, dct_method=dct_method
        )
        return resample_crop(image, size, offset, extent, antialias, flip)

    def jpeg():
        r = jpeg_scale(box[2], box[3], size, size)
        index = tf.add_n([tf.cast(r >= k, tf.int32) for k in JPEG_SCALES[1:]])
        scaled = [functools.partial(reduced, k) for k in JPEG_SCALES[1:]]
        return tf.switch_case(index, [full_scale, *scaled])

    out = tf.cond(is_jpeg, jpeg, full_scale)
    out.set_shape([size, size, 3])
    return out


def round_to_uint8(image):
    """float [..., 3] -> uint8, rounded half up and clipped to [0, 255] (as PIL)."""
    tf = tf_module()
    return tf.saturate_cast(image + 0.5, tf.uint8)


@functools.cache
def _normalize_coefficients(shape: tuple[int, ...]):
    scale = np.array([1.0 / (255.0 * s) for s in IMAGENET_STD], np.float32)
    offset = np.array([-m / s for m, s in zip(IMAGENET_MEAN, IMAGENET_STD)], np.float32)
    return np.broadcast_to(scale, shape).copy(), np.broadcast_to(offset, shape).copy()


def normalize(image):
    """[..., 3] uint8/float in [0, 255] -> float32 (x / 255 - mean) / std (ImageNet).

    For statically shaped [..., H, W, 3] images the per-channel coefficients are
    [H, W, 3] constants: TF's broadcast of a [3] vector along the last axis
    costs about 3x the plain elementwise op (same values either way).
    """
    tf = tf_module()
    image = tf.cast(image, tf.float32)
    shape = tuple(image.shape[-3:]) if image.shape.rank and image.shape.rank >= 3 else ()
    if not (len(shape) == 3 and all(shape) and shape[-1] == 3 and math.prod(shape) <= 1 << 22):
        shape = (3,)
    scale, offset = _normalize_coefficients(shape)
    return image * tf.constant(scale) + tf.constant(offset)


def random_resized_crop(
    data,
    seed,
    image_size: int,
    scale,
    ratio,
    flip: bool = True,
    antialias: bool = True,
    augment_fn=None,
    dct_method: str = "INTEGER_FAST",
    reduced_scale: bool = False,
):
    """Encoded image -> float32 [S, S, 3] normalized: RandomResizedCrop + flip.

    Args:
      data: scalar tf.string, an encoded image (JPEG decode is fused with the crop).
      seed: int64 [2] stateless seed (the only source of randomness).
      image_size: output side S.
      scale, ratio: RandomResizedCrop ranges.
      flip: random horizontal flip with probability 0.5.
      antialias: PIL-like antialiasing when downscaling.
      augment_fn: optional `(image, seed) -> image` replacing the final `normalize`:
        it gets the cropped, flipped float32 [S, S, 3] image with integer values in
        [0, 255] (the rounded uint8 pixels, not normalized) and its own int64 [2]
        stateless seed (derived from `seed`, so the crop and flip are the same with
        or without it), and returns the final float32 [S, S, 3] model input,
        normalized (e.g. RandAugment on the uint8 pixels, `normalize`, then
        RandomErasing).
      dct_method: libjpeg IDCT, one of JPEG_DCT_METHODS.
      reduced_scale: decode large JPEG crops at 1/2, 1/4 or 1/8 scale (see
        `decode_crop_resize`).
    """
    tf = tf_module()
    seeds = tf.random.experimental.stateless_split(seed, 2)
    is_jpeg = _is_jpeg(data)
    hw = image_shape(data, is_jpeg)
    box = sample_crop_box(hw[0], hw[1], seeds[0], scale, ratio)
    do_flip = tf.random.stateless_uniform([], seeds[1]) < 0.5 if flip else None
    image = decode_crop_resize(
        data, box, image_size, antialias, dct_method, reduced_scale, hw, is_jpeg, do_flip
    )
    if augment_fn is None:
        image = normalize(image)
    else:
        extra_seed = tf.random.experimental.stateless_fold_in(seed, _EXTRA_AUG_TAG)
        image = tf.cast(augment_fn(tf.cast(image, tf.float32), extra_seed), tf.float32)
    image.set_shape([image_size, image_size, 3])
    return image


def center_crop_eval(
    data,
    image_size: int,
    crop_fraction: float = 0.875,
    antialias: bool = True,
    dct_method: str = "INTEGER_FAST",
):
    """Encoded image -> float32 [S, S, 3] normalized: resize shorter side to
    int(S / crop_fraction) (bicubic), then center crop S, as the reference eval."""
    tf = tf_module()
    if not 0 < crop_fraction <= 1:
        raise ValueError(f"eval crop fraction {crop_fraction!r} must be in (0, 1]")
    resize_to = max(int(image_size / crop_fraction), image_size)
    image = decode(data, dct_method)
    # torchvision's Resize(int): the shorter side becomes `resize_to`
    h, w = tf.unstack(tf.cast(tf.shape(image)[:2], tf.float64))
    long_ = tf.cast(tf.cast(resize_to, tf.float64) * tf.maximum(h, w) / tf.minimum(h, w), tf.int32)
    short = tf.constant(resize_to, tf.int32)
    new_hw = tf.where(h <= w, tf.stack([short, long_]), tf.stack([long_, short]))
    image = resize_bicubic(image, new_hw, antialias)
    top, left = tf.unstack(
        tf.cast(tf.round(tf.cast(new_hw - image_size, tf.float32) / 2), tf.int32)
    )
    image = normalize(image[top : top + image_size, left : left + image_size])
    image.set_shape([image_size, image_size, 3])
    return image
