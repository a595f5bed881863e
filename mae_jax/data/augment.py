"""Image decoding and augmentation as pure TensorFlow graph functions.

All randomness is stateless: every function takes a `seed` tensor (int64 [2])
so that the same seed always produces the same crop/flip, whatever thread or
process runs it. Images are HWC; outputs are float32 normalized with the
ImageNet mean/std (NHWC once batched).

The crop box sampler follows torchvision's `RandomResizedCrop.get_params`:
10 attempts of (area fraction ~ U(scale), log aspect ~ U(log ratio)), the first
box that fits wins; otherwise a center crop with the aspect ratio clamped.
"""

from __future__ import annotations

import math

from mae_jax.data.lazy_tf import tf_module

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
JPEG_MAGIC = b"\xff\xd8\xff"
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
    height = tf.cast(height, tf.int32)
    width = tf.cast(width, tf.int32)
    h_f = tf.cast(height, tf.float64)
    w_f = tf.cast(width, tf.float64)
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
    any_fit = tf.reduce_any(fits)
    # Uniform integer offsets in [0, H - h] and [0, W - w] for every attempt.
    u = tf.random.stateless_uniform([2, attempts], seeds[2], dtype=tf.float64)
    ys = tf.floor(u[0] * (h_f - hs + 1))
    xs = tf.floor(u[1] * (w_f - ws + 1))
    # Fallback: whole image, aspect ratio clamped to the allowed range.
    in_ratio = w_f / h_f
    fb_w = tf.where(
        in_ratio < ratio[0], w_f, tf.where(in_ratio > ratio[1], tf.round(h_f * ratio[1]), w_f)
    )
    fb_h = tf.where(in_ratio < ratio[0], tf.round(w_f / ratio[0]), h_f)
    fb_y = tf.floor((h_f - fb_h) / 2)
    fb_x = tf.floor((w_f - fb_w) / 2)
    box = tf.where(
        any_fit,
        tf.stack([ys[first], xs[first], hs[first], ws[first]]),
        tf.stack([fb_y, fb_x, fb_h, fb_w]),
    )
    return tf.cast(box, tf.int32)


def _is_jpeg(data):
    tf = tf_module()
    return tf.equal(tf.strings.substr(data, 0, 3), JPEG_MAGIC)


def image_shape(data):
    """int32 [2] (height, width) of an encoded image, reading only the header for JPEG."""
    tf = tf_module()
    return tf.cond(
        _is_jpeg(data),
        lambda: tf.image.extract_jpeg_shape(data)[:2],
        lambda: tf.shape(decode(data))[:2],
    )


def decode(data):
    """Decodes any JPEG/PNG/GIF/BMP/WebP string to uint8 [H, W, 3]."""
    tf = tf_module()
    image = tf.io.decode_image(data, channels=3, dtype=tf.uint8, expand_animations=False)
    image.set_shape([None, None, 3])
    return image


def decode_and_crop(data, box):
    """Decodes only the crop `box` (y, x, h, w) of an encoded image: uint8 [h, w, 3].

    JPEGs use the fused `decode_and_crop_jpeg`; other formats decode fully.
    """
    tf = tf_module()

    def jpeg():
        return tf.image.decode_and_crop_jpeg(data, box, channels=3)

    def other():
        return tf.image.crop_to_bounding_box(decode(data), box[0], box[1], box[2], box[3])

    image = tf.cond(_is_jpeg(data), jpeg, other)
    image.set_shape([None, None, 3])
    return image


def resize_bicubic(image, size, antialias: bool = True):
    """Resizes uint8/float [h, w, 3] to float32 [size[0], size[1], 3], bicubic.

    With `antialias`, downscaling widens the kernel like PIL does (so this
    matches torchvision on PIL images); upscaling uses the plain (cheaper) kernel,
    which is the same function.
    """
    tf = tf_module()
    size = tf.convert_to_tensor(size, tf.int32)
    hw = tf.shape(image)[:2]

    def plain():
        return tf.image.resize(image, size, method="bicubic", antialias=False)

    def smooth():
        return tf.image.resize(image, size, method="bicubic", antialias=True)

    if not antialias:
        out = plain()
    else:
        out = tf.cond(tf.reduce_all(hw <= size), plain, smooth)
    out.set_shape([None, None, 3])
    return tf.clip_by_value(out, 0.0, 255.0)


def normalize(image):
    """[..., 3] float in [0, 255] -> float32 (x / 255 - mean) / std (ImageNet)."""
    tf = tf_module()
    scale = [1.0 / (255.0 * s) for s in IMAGENET_STD]
    offset = [-m / s for m, s in zip(IMAGENET_MEAN, IMAGENET_STD)]
    return tf.cast(image, tf.float32) * tf.constant(scale) + tf.constant(offset)


def random_resized_crop(
    data,
    seed,
    image_size: int,
    scale,
    ratio,
    flip: bool = True,
    antialias: bool = True,
    augment_fn=None,
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
        it gets the cropped, flipped float32 [S, S, 3] image with values in [0, 255]
        (not normalized) and its own int64 [2] stateless seed (derived from `seed`,
        so the crop and flip are the same with or without it), and returns the
        final float32 [S, S, 3] model input, normalized (e.g. RandAugment on the
        rounded uint8 pixels, `normalize`, then RandomErasing).
    """
    tf = tf_module()
    seeds = tf.random.experimental.stateless_split(seed, 2)
    hw = image_shape(data)
    box = sample_crop_box(hw[0], hw[1], seeds[0], scale, ratio)
    image = decode_and_crop(data, box)
    image = resize_bicubic(image, [image_size, image_size], antialias)
    if flip:
        do_flip = tf.random.stateless_uniform([], seeds[1]) < 0.5
        image = tf.cond(do_flip, lambda: tf.reverse(image, [1]), lambda: image)
    if augment_fn is None:
        image = normalize(image)
    else:
        image.set_shape([image_size, image_size, 3])
        extra_seed = tf.random.experimental.stateless_fold_in(seed, _EXTRA_AUG_TAG)
        image = tf.cast(augment_fn(image, extra_seed), tf.float32)
    image.set_shape([image_size, image_size, 3])
    return image


def resize_shorter_side(height, width, size: int):
    """New (h, w) with the shorter side = size, as torchvision's Resize(int)."""
    tf = tf_module()
    h = tf.cast(height, tf.float64)
    w = tf.cast(width, tf.float64)
    short = tf.minimum(h, w)
    long_ = tf.cast(tf.cast(size, tf.float64) * tf.maximum(h, w) / short, tf.int32)
    size = tf.constant(size, tf.int32)
    return tf.where(h <= w, tf.stack([size, long_]), tf.stack([long_, size]))


def center_crop_eval(data, image_size: int, crop_fraction: float = 0.875, antialias: bool = True):
    """Encoded image -> float32 [S, S, 3] normalized: resize shorter side to
    int(S / crop_fraction) (bicubic), then center crop S, as the reference eval."""
    tf = tf_module()
    if not 0 < crop_fraction <= 1:
        raise ValueError(f"eval crop fraction {crop_fraction!r} must be in (0, 1]")
    resize_to = max(int(image_size / crop_fraction), image_size)
    image = decode(data)
    hw = tf.shape(image)[:2]
    new_hw = resize_shorter_side(hw[0], hw[1], resize_to)
    image = resize_bicubic(image, new_hw, antialias)
    top = tf.cast(tf.round(tf.cast(new_hw[0] - image_size, tf.float32) / 2), tf.int32)
    left = tf.cast(tf.round(tf.cast(new_hw[1] - image_size, tf.float32) / 2), tf.int32)
    image = image[top : top + image_size, left : left + image_size]
    image = normalize(image)
    image.set_shape([image_size, image_size, 3])
    return image
