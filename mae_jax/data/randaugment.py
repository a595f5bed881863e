"""Fine-tuning augmentations in TensorFlow ops, for use inside a tf.data pipeline:
RandAugment as timm's `rand-m9-mstd0.5-inc1` and RandomErasing (`prob=0.25, mode='pixel'`).

Every function is pure: randomness comes from a stateless seed, a `[2]` int32/int64 tensor
(e.g. from `tf.data.Dataset.random(seed).batch(2)` zipped with the data, or
`tf.random.experimental.stateless_split`). TensorFlow is imported lazily, on first use.

RandAugment (timm `RandAugment` with `_RAND_INCREASING_TRANSFORMS`): `num_ops` (2) ops drawn
uniformly with replacement from the 15 ops in `OP_NAMES`; each is applied with probability 0.5,
at magnitude `N(9, 0.5)` clipped to [0, 10] (drawn per op), with a random sign for the signed
ops; the level of each op at magnitude m is timm's (`apply_op`, `_LEVEL_DENOM` = 10).
Pixel ops follow PIL's ImageOps / ImageEnhance arithmetic (8-bit, truncating blends, PIL's
ITU-R 601 luma `(19595 R + 38470 G + 7471 B + 2**15) >> 16`). Geometric ops follow PIL's
`Image.transform(AFFINE)`: pixel-centre coordinates, samples outside the image take the fill
colour (timm: the ImageNet mean in 0-255, (124, 116, 104)), bicubic resampling with PIL's
a = -1 cubic kernel (MAE's transform asks for bicubic).

Fidelity: every op is bit-exact against Pillow 13 (tests/test_mixup_augment.py compares them
on photos), the geometric ones included (float64 coordinates and PIL's interpolation formulas).
The random draws use TensorFlow's stateless RNG, not Python's `random`, so the sequence of ops
differs from timm's for a given seed, not its distribution.

RandomErasing (timm, applied after normalization): with probability `prob`, up to 10 attempts
to draw a box of area `U(0.02, 1/3) * H * W` and aspect `exp(U(log 0.3, log 1/0.3))`
(`h = round(sqrt(area * aspect))`, `w = round(sqrt(area / aspect))`); the first box that fits
(`h < H`, `w < W`) is placed uniformly and filled with per-pixel N(0, 1) noise ('pixel' mode).
"""

from __future__ import annotations

import functools
import math

from mae_jax.data.lazy_tf import tf_module

OP_NAMES = tuple(
    "AutoContrast Equalize Invert Rotate PosterizeIncreasing SolarizeIncreasing SolarizeAdd "
    "ColorIncreasing ContrastIncreasing BrightnessIncreasing SharpnessIncreasing ShearX ShearY "
    "TranslateXRel TranslateYRel".split()
)
IMAGENET_FILL = (124, 116, 104)  # timm: round(255 * ImageNet mean)
MAX_LEVEL = 10.0  # timm's _LEVEL_DENOM
INTERPOLATIONS = ("bicubic", "bilinear")


def _check_uint8_image(image):
    tf = tf_module()
    image = tf.convert_to_tensor(image)
    if image.dtype != tf.uint8:
        raise ValueError(f"image must be uint8 [H, W, 3], got dtype {image.dtype.name}")
    if image.shape.rank != 3 or image.shape[-1] != 3:
        raise ValueError(f"image must be uint8 [H, W, 3] (HWC, RGB), got shape {image.shape}")
    return image


def _f64(x):
    """A float64 tensor; Python numbers are converted directly (not through float32)."""
    tf = tf_module()
    if isinstance(x, (tuple, list)):
        return tf.stack([_f64(v) for v in x])
    return tf.constant(x, tf.float64) if isinstance(x, (int, float)) else tf.cast(x, tf.float64)


def _lut(image, lut):
    """Apply a per-channel lookup table `lut [256, 3]` (int) to a uint8 image."""
    tf = tf_module()
    idx = tf.cast(image, tf.int32) + tf.constant([0, 256, 512], tf.int32)
    flat = tf.reshape(tf.transpose(tf.cast(lut, tf.int32)), [-1])  # channel-major
    return tf.cast(tf.gather(flat, idx), tf.uint8)


# ----------------------------------------------------------------------------- pixel ops


def invert(image):
    """255 - x."""
    return 255 - _check_uint8_image(image)


def auto_contrast(image):
    """Per channel, stretch [min, max] to [0, 255] (PIL `ImageOps.autocontrast`, cutoff 0)."""
    tf = tf_module()
    image = _check_uint8_image(image)
    x = tf.cast(image, tf.float64)
    lo, hi = tf.reduce_min(x, axis=[0, 1]), tf.reduce_max(x, axis=[0, 1])
    scale = 255.0 / tf.maximum(hi - lo, 1.0)
    offset = -lo * scale
    levels = tf.range(256, dtype=tf.float64)[:, None]
    lut = tf.clip_by_value(tf.floor(levels * scale + offset), 0.0, 255.0)
    lut = tf.where(hi > lo, lut, levels * tf.ones_like(scale))
    return _lut(image, lut)


def equalize(image):
    """Per-channel histogram equalization (PIL `ImageOps.equalize`)."""
    tf = tf_module()
    image = _check_uint8_image(image)
    luts = []
    for c in range(3):
        ch = tf.reshape(tf.cast(image[..., c], tf.int32), [-1])
        hist = tf.math.bincount(ch, minlength=256, maxlength=256, dtype=tf.int32)
        last = 255 - tf.argmax(tf.reverse(tf.cast(hist > 0, tf.int32), [0]), output_type=tf.int32)
        step = (tf.reduce_sum(hist) - hist[last]) // 255
        lut = (step // 2 + tf.cumsum(hist, exclusive=True)) // tf.maximum(step, 1)
        lut = tf.where(step > 0, tf.clip_by_value(lut, 0, 255), tf.range(256))
        luts.append(lut)
    return _lut(image, tf.stack(luts, axis=1))


def posterize(image, bits):
    """Keep the `bits` (0..8) most significant bits of every value."""
    tf = tf_module()
    image = _check_uint8_image(image)
    div = tf.bitwise.left_shift(1, 8 - tf.clip_by_value(tf.cast(bits, tf.int32), 0, 8))
    x = tf.cast(image, tf.int32)
    return tf.cast((x // div) * div, tf.uint8)


def solarize(image, threshold):
    """Invert values >= `threshold`."""
    tf = tf_module()
    image = _check_uint8_image(image)
    x = tf.cast(image, tf.int32)
    return tf.cast(tf.where(x >= tf.cast(threshold, tf.int32), 255 - x, x), tf.uint8)


def solarize_add(image, addition, threshold=128):
    """Add `addition` (saturating at 255) to values below `threshold`."""
    tf = tf_module()
    image = _check_uint8_image(image)
    x = tf.cast(image, tf.int32)
    added = tf.minimum(x + tf.cast(addition, tf.int32), 255)
    return tf.cast(tf.where(x < tf.cast(threshold, tf.int32), added, x), tf.uint8)


def _luma(image):
    """PIL's RGB -> L conversion, int32 [H, W]."""
    tf = tf_module()
    x = tf.cast(image, tf.int32)
    return tf.bitwise.right_shift(
        x[..., 0] * 19595 + x[..., 1] * 38470 + x[..., 2] * 7471 + 0x8000, 16
    )


def blend(degenerate, image, factor):
    """PIL `Image.blend(degenerate, image, factor)`: `degenerate + factor * (image - degenerate)`,
    clipped, truncated to uint8 (PIL's `(UINT8)` casts). Both inputs uint8 (or broadcastable
    float of 0..255 values)."""
    tf = tf_module()
    d, x = tf.cast(degenerate, tf.float32), tf.cast(image, tf.float32)
    out = d + tf.cast(factor, tf.float32) * (x - d)
    return tf.cast(tf.floor(tf.clip_by_value(out, 0.0, 255.0)), tf.uint8)


def color(image, factor):
    """Saturation: blend with the grey (luma) image (PIL `ImageEnhance.Color`)."""
    tf = tf_module()
    image = _check_uint8_image(image)
    grey = tf.repeat(_luma(image)[..., None], 3, axis=-1)
    return blend(grey, image, factor)


def contrast(image, factor):
    """Blend with the uniform image of the mean luma (PIL `ImageEnhance.Contrast`)."""
    tf = tf_module()
    image = _check_uint8_image(image)
    mean = tf.floor(tf.reduce_mean(tf.cast(_luma(image), tf.float64)) + 0.5)
    return blend(tf.cast(mean, tf.float32) * tf.ones_like(image, tf.float32), image, factor)


def brightness(image, factor):
    """Blend with black (PIL `ImageEnhance.Brightness`)."""
    tf = tf_module()
    image = _check_uint8_image(image)
    return blend(tf.zeros_like(image), image, factor)


def sharpness(image, factor):
    """Blend with PIL's SMOOTH-filtered image (3x3 kernel [[1,1,1],[1,5,1],[1,1,1]] / 13,
    border pixels unfiltered) (PIL `ImageEnhance.Sharpness`)."""
    tf = tf_module()
    image = _check_uint8_image(image)
    x = tf.cast(image, tf.float32)[None]
    kernel = tf.constant([[1, 1, 1], [1, 5, 1], [1, 1, 1]], tf.float32) / 13.0
    kernel = tf.tile(kernel[:, :, None, None], [1, 1, 3, 1])
    smooth = tf.nn.depthwise_conv2d(x, kernel, [1, 1, 1, 1], "VALID")[0]
    smooth = tf.floor(tf.clip_by_value(smooth, 0.0, 255.0) + 0.5)
    h, w = tf.shape(image)[0], tf.shape(image)[1]
    smooth = tf.pad(smooth, [[1, 1], [1, 1], [0, 0]])
    rows, cols = tf.range(h)[:, None], tf.range(w)[None, :]
    interior = (rows > 0) & (rows < h - 1) & (cols > 0) & (cols < w - 1)
    degenerate = tf.where(interior[..., None], smooth, x[0])
    return blend(degenerate, image, factor)


# ----------------------------------------------------------------------------- geometric ops


def _bilinear(v, d):
    """PIL's BILINEAR macro: `a + (b - a) * d` over taps (0, 1)."""
    a, b = v
    return a + (b - a) * d


def _bicubic(v, d):
    """PIL's transform BICUBIC macro (cubic convolution, a = -1) over taps (-1, 0, 1, 2)."""
    v1, v2, v3, v4 = v
    p2 = -v1 + v3
    p3 = 2 * (v1 - v2) + v3 - v4
    p4 = -v1 + v2 - v3 + v4
    return v2 + d * (p2 + d * (p3 + d * p4))


def affine(image, matrix, fill=IMAGENET_FILL, interpolation="bicubic"):
    """PIL `Image.transform(size, AFFINE, matrix, resample, fillcolor=fill)` on a uint8 image.

    `matrix = (a, b, c, d, e, f)`: the output pixel centred at continuous (X, Y) (pixel (i, j)
    has centre (j + 0.5, i + 0.5)) samples the input at (aX + bY + c, dX + eY + f); samples
    outside the image take `fill` (one value per channel).
    """
    tf = tf_module()
    image = _check_uint8_image(image)
    if interpolation not in INTERPOLATIONS:
        raise ValueError(f"interpolation must be one of {INTERPOLATIONS}, got {interpolation!r}")
    m = _f64(matrix)
    h, w = tf.unstack(tf.shape(image)[:2])
    hf, wf = tf.cast(h, tf.float64), tf.cast(w, tf.float64)
    ys, xs = tf.meshgrid(tf.range(hf) + 0.5, tf.range(wf) + 0.5, indexing="ij")
    xin = m[0] * xs + m[1] * ys + m[2]
    yin = m[3] * xs + m[4] * ys + m[5]
    inside = (xin >= 0) & (xin < wf) & (yin >= 0) & (yin < hf)
    u, v = xin - 0.5, yin - 0.5
    x0, y0 = tf.floor(u), tf.floor(v)
    dx, dy = u - x0, v - y0
    x0, y0 = tf.cast(x0, tf.int32), tf.cast(y0, tf.int32)
    offsets = (0, 1) if interpolation == "bilinear" else (-1, 0, 1, 2)
    taps = tf.constant(offsets, tf.int32)
    xx = tf.clip_by_value(x0[..., None] + taps, 0, w - 1)  # [H, W, T]
    yy = tf.clip_by_value(y0[..., None] + taps, 0, h - 1)  # [H, W, T]
    idx = yy[..., :, None] * w + xx[..., None, :]  # [H, W, T, T]
    flat = tf.reshape(tf.cast(image, tf.float64), [-1, 3])
    values = tf.gather(flat, idx)  # [H, W, T(y), T(x), 3]
    interp = _bilinear if interpolation == "bilinear" else _bicubic
    rows = interp(tf.unstack(values, axis=3), dx[..., None, None])  # [H, W, T(y), 3]
    out = interp(tf.unstack(rows, axis=2), dy[..., None])  # [H, W, 3]
    out = tf.floor(tf.clip_by_value(out, 0.0, 255.0))
    fill = tf.cast(tf.broadcast_to(tf.convert_to_tensor(fill), [3]), tf.float64)
    out = tf.where(inside[..., None], out, fill)
    return tf.cast(out, tf.uint8)


def rotate(image, degrees, fill=IMAGENET_FILL, interpolation="bicubic"):
    """Counter-clockwise rotation about the image centre (PIL `Image.rotate`, no expand)."""
    tf = tf_module()
    image = _check_uint8_image(image)
    angle = -_f64(degrees) * (math.pi / 180.0)
    a, b = tf.cos(angle), tf.sin(angle)
    d, e = -tf.sin(angle), tf.cos(angle)
    cy, cx = tf.unstack(tf.cast(tf.shape(image)[:2], tf.float64) / 2.0)
    c = a * -cx + b * -cy + cx
    f = d * -cx + e * -cy + cy
    return affine(image, tf.stack([a, b, c, d, e, f]), fill, interpolation)


def _affine_entry(image, value, fill=IMAGENET_FILL, interpolation="bicubic", *, index):
    """`affine` with the identity matrix whose entry `index` is `value`."""
    tf = tf_module()
    m = [tf.constant(v, tf.float64) for v in (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)]
    m[index] = _f64(value)
    return affine(image, tf.stack(m), fill, interpolation)


shear_x = functools.partial(_affine_entry, index=1)  # (image, factor, fill, interpolation)
shear_y = functools.partial(_affine_entry, index=3)
# Output pixel x (y) samples input x + pixels (content moves left (up) for positive pixels).
translate_x = functools.partial(_affine_entry, index=2)  # (image, pixels, fill, interpolation)
translate_y = functools.partial(_affine_entry, index=5)


# ----------------------------------------------------------------------------- RandAugment


def apply_op(
    name, image, magnitude, sign, *, fill=IMAGENET_FILL, interpolation="bicubic", translate_pct=0.45
):
    """Apply op `name` of `OP_NAMES` at `magnitude` (0..10) with `sign` (+1/-1, used by the
    signed ops) to a uint8 `[H, W, 3]` image, as timm's level functions."""
    tf = tf_module()
    if name not in OP_NAMES:
        raise ValueError(f"unknown RandAugment op {name!r}; known: {OP_NAMES}")
    m = _f64(magnitude) / MAX_LEVEL  # levels in double, as timm's Python
    s = _f64(sign)
    geo = dict(fill=fill, interpolation=interpolation)
    size = tf.cast(tf.shape(image), tf.float64)
    enhance = 1.0 + s * m * 0.9
    ops = {
        "AutoContrast": lambda: auto_contrast(image),
        "Equalize": lambda: equalize(image),
        "Invert": lambda: invert(image),
        "Rotate": lambda: rotate(image, s * m * 30.0, **geo),
        "PosterizeIncreasing": lambda: posterize(image, 4 - tf.cast(m * 4.0, tf.int32)),
        "SolarizeIncreasing": lambda: solarize(image, 256 - tf.cast(m * 256.0, tf.int32)),
        "SolarizeAdd": lambda: solarize_add(image, tf.cast(m * 110.0, tf.int32)),
        "ColorIncreasing": lambda: color(image, enhance),
        "ContrastIncreasing": lambda: contrast(image, enhance),
        "BrightnessIncreasing": lambda: brightness(image, enhance),
        "SharpnessIncreasing": lambda: sharpness(image, enhance),
        "ShearX": lambda: shear_x(image, s * m * 0.3, **geo),
        "ShearY": lambda: shear_y(image, s * m * 0.3, **geo),
        "TranslateXRel": lambda: translate_x(image, s * m * translate_pct * size[1], **geo),
        "TranslateYRel": lambda: translate_y(image, s * m * translate_pct * size[0], **geo),
    }
    return ops[name]()


def _seed(seed):
    tf = tf_module()
    seed = tf.convert_to_tensor(seed)
    if (
        seed.shape.rank not in (None, 1)
        or seed.shape.as_list() not in ([None], [2])
        or not seed.dtype.is_integer
    ):
        raise ValueError(f"seed must be an int [2] tensor (a stateless seed), got {seed!r}")
    return tf.ensure_shape(tf.cast(seed, tf.int64), [2])


def rand_augment(
    image,
    seed,
    *,
    num_ops=2,
    magnitude=9.0,
    magnitude_std=0.5,
    prob=0.5,
    ops=OP_NAMES,
    fill=IMAGENET_FILL,
    interpolation="bicubic",
    translate_pct=0.45,
):
    """timm RandAugment (`rand-m9-mstd0.5-inc1` by default) on a uint8 `[H, W, 3]` image.

    Pure: the output is a function of `(image, seed)` only. Returns uint8 `[H, W, 3]`. The
    ranges of `num_ops`, `magnitude`, `magnitude_std`, `prob` are checked where they are read
    (`tasks.finetune.parse_rand_augment`).
    """
    tf = tf_module()
    image = _check_uint8_image(image)
    seed = _seed(seed)
    ops = tuple(ops)
    for name in ops:
        if name not in OP_NAMES:
            raise ValueError(f"unknown RandAugment op {name!r}; known: {OP_NAMES}")
    static_shape = image.shape
    kw = dict(fill=fill, interpolation=interpolation, translate_pct=translate_pct)
    splits = tf.unstack(tf.random.experimental.stateless_split(seed, max(num_ops, 1)))
    for seeds in splits[:num_ops]:
        s_op, s_apply, s_mag, s_sign = tf.unstack(tf.random.experimental.stateless_split(seeds, 4))
        op = tf.random.stateless_uniform([], s_op, 0, len(ops), dtype=tf.int32)
        apply = tf.random.stateless_uniform([], s_apply) < prob
        mag = magnitude + magnitude_std * tf.random.stateless_normal([], s_mag)
        mag = tf.clip_by_value(mag, 0.0, MAX_LEVEL)
        sign = tf.where(tf.random.stateless_uniform([], s_sign) < 0.5, -1.0, 1.0)

        def branch(name, img=image, mag=mag, sign=sign):
            return lambda: tf.ensure_shape(apply_op(name, img, mag, sign, **kw), static_shape)

        image = tf.cond(
            apply,
            lambda op=op: tf.switch_case(op, [branch(n) for n in ops]),
            lambda current=image: current,
        )
        image = tf.ensure_shape(image, static_shape)
    return image


# ----------------------------------------------------------------------------- erasing


def random_erasing(
    image,
    seed,
    *,
    prob=0.25,
    min_area=0.02,
    max_area=1 / 3,
    min_aspect=0.3,
    max_aspect=None,
    attempts=10,
):
    """timm RandomErasing (mode 'pixel', one box) on a normalized float `[H, W, C]` image.

    Pure function of `(image, seed)`; returns the same shape and dtype. `prob`: in [0, 1].
    """
    tf = tf_module()
    image = tf.convert_to_tensor(image)
    if not image.dtype.is_floating or image.shape.rank != 3:
        raise ValueError(
            f"image must be a normalized float [H, W, C], got {image.dtype.name} {image.shape}"
        )
    seed = _seed(seed)
    if not 0 < min_area <= max_area <= 1:
        raise ValueError(f"need 0 < min_area <= max_area <= 1, got {min_area}, {max_area}")
    max_aspect = 1.0 / min_aspect if max_aspect is None else max_aspect
    if not 0 < min_aspect <= max_aspect:
        raise ValueError(f"need 0 < min_aspect <= max_aspect, got {min_aspect}, {max_aspect}")
    s_do, s_area, s_aspect, s_top, s_left, s_noise = tf.unstack(
        tf.random.experimental.stateless_split(seed, 6)
    )
    shape = tf.shape(image)
    h, w = shape[0], shape[1]
    hf, wf = tf.cast(h, tf.float32), tf.cast(w, tf.float32)
    area = tf.random.stateless_uniform([attempts], s_area, min_area, max_area) * hf * wf
    log_aspect = (math.log(min_aspect), math.log(max_aspect))
    aspect = tf.exp(tf.random.stateless_uniform([attempts], s_aspect, *log_aspect))
    bh = tf.cast(tf.round(tf.sqrt(area * aspect)), tf.int32)  # round half to even, as Python
    bw = tf.cast(tf.round(tf.sqrt(area / aspect)), tf.int32)
    fits = (bw < w) & (bh < h)
    first = tf.argmax(tf.cast(fits, tf.int32), output_type=tf.int32)
    bh, bw = bh[first], bw[first]
    top, left = (
        tf.cast(tf.floor(tf.random.stateless_uniform([], s) * tf.cast(n + 1, tf.float32)), tf.int32)
        for s, n in ((s_top, h - bh), (s_left, w - bw))
    )
    erase = (tf.random.stateless_uniform([], s_do) < prob) & tf.reduce_any(fits)

    def erased():
        noise = tf.random.stateless_normal([bh, bw, shape[2]], s_noise, dtype=image.dtype)
        noise = tf.pad(noise, [[top, h - top - bh], [left, w - left - bw], [0, 0]])
        rows, cols = tf.range(h)[:, None], tf.range(w)[None, :]
        inside = (rows >= top) & (rows < top + bh) & (cols >= left) & (cols < left + bw)
        return tf.where(inside[..., None], noise, image)

    return tf.ensure_shape(tf.cond(erase, erased, lambda: image), image.shape)
