"""Mixup / CutMix with label smoothing, as timm's `Mixup` in batch mode, in pure JAX.

The official fine-tuning uses `Mixup(mixup_alpha=0.8, cutmix_alpha=1.0, prob=1.0,
switch_prob=0.5, mode='batch', label_smoothing=0.1)`: one `lam` and one mode per batch; each
image is mixed with the image at the mirrored batch position (`x.flip(0)`):

- mixup: `x <- lam * x + (1 - lam) * flip(x)`, `lam ~ Beta(0.8, 0.8)`;
- cutmix: `lam ~ Beta(1, 1)`; a box of side `int(H * sqrt(1 - lam))` x `int(W * sqrt(1 - lam))`
  centred at a uniform pixel, clipped to the image, is pasted from `flip(x)`; `lam` is then
  corrected to the kept area `1 - box_area / (H * W)`;
- targets: `lam * smooth(y) + (1 - lam) * smooth(flip(y))` with
  `smooth(y) = one_hot(y) * (1 - s) + s / num_classes`.

All functions are pure and jittable; randomness comes only from the `key` argument. Images are
NHWC. On a sharded global batch the pairing is over the global batch (timm pairs within each
GPU's local batch); the distribution of pairs is the same.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from mae_jax.spec import require


class MixParams(NamedTuple):
    lam: jax.Array  # float32 scalar: weight of the original image/label (corrected)
    use_cutmix: jax.Array  # bool scalar
    box: jax.Array  # int32 [4]: (y_lo, y_hi, x_lo, x_hi), half-open; empty for mixup


def smooth_one_hot(labels: jax.Array, num_classes: int, smoothing: float = 0.0) -> jax.Array:
    """Integer labels `[N]` -> `[N, num_classes]` float32 with off value `s / C` and on value
    `1 - s + s / C` (timm's `one_hot` with label smoothing)."""
    require("num_classes", num_classes, "int>=1")
    require("label smoothing", smoothing, "num[0,1)")
    if labels.ndim != 1 or not jnp.issubdtype(labels.dtype, jnp.integer):
        raise ValueError(
            f"labels must be integer class ids [N], got shape {labels.shape} dtype {labels.dtype}"
        )
    off = smoothing / num_classes
    on = 1.0 - smoothing + off
    return jax.nn.one_hot(labels, num_classes, dtype=jnp.float32) * (on - off) + off


def sample_mix_params(
    key: jax.Array,
    image_hw: tuple[int, int],
    *,
    mixup_alpha: float = 0.8,
    cutmix_alpha: float = 1.0,
    prob: float = 1.0,
    switch_prob: float = 0.5,
    correct_lam: bool = True,
) -> MixParams:
    """Draw the per-batch mixing parameters (timm `Mixup._params_per_batch` +
    `cutmix_bbox_and_lam`). With probability `1 - prob` nothing is mixed (`lam = 1`)."""
    mixup_alpha = float(require("mixup_alpha", mixup_alpha, "num>=0"))
    cutmix_alpha = float(require("cutmix_alpha", cutmix_alpha, "num>=0"))
    prob = float(require("prob", prob, "num[0,1]"))
    switch_prob = float(require("switch_prob", switch_prob, "num[0,1]"))
    if mixup_alpha == 0 and cutmix_alpha == 0:
        raise ValueError("one of mixup_alpha and cutmix_alpha must be > 0")
    h, w = (int(v) for v in image_hw)
    if h < 1 or w < 1:
        raise ValueError(f"image_hw must be positive, got {image_hw!r}")
    k_apply, k_switch, k_mix, k_cy, k_cx = jax.random.split(key, 5)

    if mixup_alpha > 0 and cutmix_alpha > 0:
        use_cutmix = jax.random.uniform(k_switch) < switch_prob
    else:
        use_cutmix = jnp.asarray(cutmix_alpha > 0)
    # One Beta draw per mode from a single call (an unused mode gets a harmless alpha of 1).
    alphas = jnp.array([mixup_alpha or 1.0, cutmix_alpha or 1.0], jnp.float32)
    lam_mix, lam_cut = jax.random.beta(k_mix, alphas, alphas)
    apply = jax.random.uniform(k_apply) < prob
    lam = jnp.where(apply, jnp.where(use_cutmix, lam_cut, lam_mix), 1.0).astype(jnp.float32)
    use_cutmix = apply & use_cutmix

    # rand_bbox: cut side int(size * sqrt(1 - lam)), centre uniform over the pixels.
    ratio = jnp.sqrt(jnp.clip(1.0 - lam, 0.0, 1.0))
    cut_h = jnp.floor(h * ratio).astype(jnp.int32)
    cut_w = jnp.floor(w * ratio).astype(jnp.int32)
    cy = jax.random.randint(k_cy, (), 0, h)
    cx = jax.random.randint(k_cx, (), 0, w)
    half = jnp.stack([cut_h, cut_h, cut_w, cut_w]) // 2 * jnp.array([-1, 1, -1, 1])
    box = jnp.clip(jnp.stack([cy, cy, cx, cx]) + half, 0, jnp.array([h, h, w, w]))
    box = jnp.where(use_cutmix, box, jnp.zeros_like(box)).astype(jnp.int32)
    if correct_lam:
        area = (box[1] - box[0]) * (box[3] - box[2])
        lam = jnp.where(use_cutmix, 1.0 - area / float(h * w), lam).astype(jnp.float32)
    return MixParams(lam=lam, use_cutmix=use_cutmix, box=box)


def box_mask(box: jax.Array, image_hw: tuple[int, int]) -> jax.Array:
    """`[H, W]` bool, True inside the half-open box `(y_lo, y_hi, x_lo, x_hi)`."""
    h, w = image_hw
    rows, cols = jnp.arange(h)[:, None], jnp.arange(w)[None, :]
    return (rows >= box[0]) & (rows < box[1]) & (cols >= box[2]) & (cols < box[3])


def apply_mix(
    images: jax.Array,
    labels: jax.Array,
    params: MixParams,
    num_classes: int,
    label_smoothing: float = 0.1,
) -> tuple[jax.Array, jax.Array]:
    """Mix `images [N, H, W, C]` and integer `labels [N]` with `params`.

    Returns `(mixed images [N, H, W, C] (input dtype), soft targets [N, num_classes] float32)`.
    """
    if images.ndim != 4:
        raise ValueError(f"images must be NHWC [N, H, W, C], got shape {images.shape}")
    if labels.shape != images.shape[:1]:
        raise ValueError(f"labels must have shape [N] = ({images.shape[0]},), got {labels.shape}")
    y = smooth_one_hot(labels, num_classes, label_smoothing)
    targets = params.lam * y + (1.0 - params.lam) * y[::-1]
    flipped = images[::-1]
    lam = params.lam.astype(images.dtype)
    mixed = images * lam + flipped * (1 - lam)
    inside = box_mask(params.box, images.shape[1:3])[None, :, :, None]
    cut = jnp.where(inside, flipped, images)
    return jnp.where(params.use_cutmix, cut, mixed), targets


def mixup_cutmix(
    key: jax.Array,
    images: jax.Array,
    labels: jax.Array,
    num_classes: int,
    *,
    mixup_alpha: float = 0.8,
    cutmix_alpha: float = 1.0,
    prob: float = 1.0,
    switch_prob: float = 0.5,
    label_smoothing: float = 0.1,
    correct_lam: bool = True,
) -> tuple[jax.Array, jax.Array]:
    """timm `Mixup(mode='batch')` with the official fine-tuning defaults.

    `images [N, H, W, C]`, `labels [N]` int -> `(images [N, H, W, C], targets [N, C] float32)`.
    """
    if images.ndim != 4:
        raise ValueError(f"images must be NHWC [N, H, W, C], got shape {images.shape}")
    params = sample_mix_params(
        key,
        images.shape[1:3],
        mixup_alpha=mixup_alpha,
        cutmix_alpha=cutmix_alpha,
        prob=prob,
        switch_prob=switch_prob,
        correct_lam=correct_lam,
    )
    return apply_mix(images, labels, params, num_classes, label_smoothing)


def soft_target_cross_entropy(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """Mean over the batch of `sum(-targets * log_softmax(logits))` (timm
    `SoftTargetCrossEntropy`), float32. `logits`, `targets`: `[N, C]`."""
    if logits.shape != targets.shape or logits.ndim != 2:
        raise ValueError(
            f"logits and targets must both be [N, C], got {logits.shape} and {targets.shape}"
        )
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    return jnp.mean(jnp.sum(-targets.astype(jnp.float32) * logp, axis=-1))
