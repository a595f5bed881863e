"""Mixup / CutMix (JAX) and RandAugment / RandomErasing (TensorFlow), against timm's rules and
Pillow's pixel arithmetic."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from mae_jax.data import mixup as M

tf = pytest.importorskip("tensorflow")
from PIL import Image, ImageEnhance, ImageOps  # noqa: E402

from mae_jax.data import randaugment as A  # noqa: E402

# ----------------------------------------------------------------------------- mixup / cutmix


def constant_batch(n=8, hw=(16, 20)):
    """Image i is filled with the value i, so the source of every pixel is readable."""
    return jnp.broadcast_to(jnp.arange(n, dtype=jnp.float32)[:, None, None, None], (n, *hw, 3))


def test_smooth_one_hot():
    y = M.smooth_one_hot(jnp.array([0, 3]), 10, 0.1)
    np.testing.assert_allclose(y[0], [0.91] + [0.01] * 9, rtol=1e-6)
    np.testing.assert_allclose(y.sum(1), 1.0, rtol=1e-6)


HW = (16, 20)
KEYS = jax.random.split(jax.random.key(0), 2000)


@pytest.fixture(scope="module")
def many_params():
    """Mix parameters for 2000 keys (one compile of the Beta sampler under vmap)."""
    return jax.jit(jax.vmap(lambda k: M.sample_mix_params(k, HW)))(KEYS)


def pick(params, i):
    return jax.tree.map(lambda v: v[i], params)


def test_mixed_targets_sum_to_one_and_follow_lam(many_params):
    x, labels = constant_batch(hw=HW), jnp.array([0, 1, 2, 3, 4, 5, 6, 7])
    y = M.smooth_one_hot(labels, 10, 0.1)
    for i in range(6):
        params = pick(many_params, i)
        mixed, targets = M.apply_mix(x, labels, params, 10, 0.1)
        assert mixed.shape == x.shape and targets.shape == (8, 10)
        np.testing.assert_allclose(targets.sum(1), 1.0, rtol=1e-6)
        lam = float(params.lam)
        np.testing.assert_allclose(targets, lam * y + (1 - lam) * y[::-1], rtol=1e-5, atol=1e-6)
    # the convenience wrapper draws the same parameters from the same key
    mixed2, targets2 = M.mixup_cutmix(KEYS[0], x, labels, 10)
    mixed, targets = M.apply_mix(x, labels, pick(many_params, 0), 10, 0.1)
    np.testing.assert_allclose(mixed, mixed2, rtol=1e-6)
    np.testing.assert_allclose(targets, targets2, rtol=1e-6)


def test_cutmix_lam_is_the_kept_area(many_params):
    x, labels = constant_batch(hw=HW), jnp.arange(8)
    cut = np.flatnonzero(np.asarray(many_params.use_cutmix))[:10]
    assert len(cut) == 10
    seen_partial = False
    for i in cut:
        params = pick(many_params, i)
        mixed, _ = M.apply_mix(x, labels, params, 8, 0.0)
        from_partner = np.asarray(mixed[..., 0] != x[..., 0])  # [N, H, W]
        kept = 1.0 - from_partner.mean(axis=(1, 2))
        # every image has the box (its partner 7 - i always differs from it)
        np.testing.assert_allclose(kept, float(params.lam), atol=1e-6)
        # the pasted pixels come from the mirrored image, inside the box only
        box = np.asarray(M.box_mask(params.box, HW))
        np.testing.assert_array_equal(from_partner[0], box)
        np.testing.assert_array_equal(np.asarray(mixed[0])[box], 7.0)
        seen_partial |= 0 < float(params.lam) < 1
    assert seen_partial


def test_mixup_is_a_convex_combination(many_params):
    x = jax.random.normal(jax.random.key(0), (8, *HW, 3))
    i = int(np.flatnonzero(~np.asarray(many_params.use_cutmix))[0])
    params = pick(many_params, i)
    mixed, _ = M.apply_mix(x, jnp.arange(8), params, 8)
    lam = float(params.lam)
    np.testing.assert_allclose(mixed, lam * x + (1 - lam) * x[::-1], rtol=1e-5, atol=1e-6)
    assert np.asarray(params.box).tolist() == [0, 0, 0, 0]


def timm_cutmix_lams(n, hw, rng):
    """timm's rand_bbox + cutmix_bbox_and_lam (correct_lam) with Beta(1, 1), in numpy."""
    h, w = hw
    out = []
    for lam in rng.beta(1.0, 1.0, n):
        ratio = np.sqrt(1 - lam)
        cut_h, cut_w = int(h * ratio), int(w * ratio)
        cy, cx = rng.integers(0, h), rng.integers(0, w)
        yl, yh = np.clip(cy - cut_h // 2, 0, h), np.clip(cy + cut_h // 2, 0, h)
        xl, xh = np.clip(cx - cut_w // 2, 0, w), np.clip(cx + cut_w // 2, 0, w)
        out.append(1 - (yh - yl) * (xh - xl) / (h * w))
    return np.array(out)


def test_switch_prob_and_lam_distributions(many_params):
    cut = np.asarray(many_params.use_cutmix)
    lam = np.asarray(many_params.lam)
    assert abs(cut.mean() - 0.5) < 0.05
    # mixup: Beta(0.8, 0.8), mean 0.5, var 0.64 / (2.56 * 2.6) = 0.096
    assert abs(lam[~cut].mean() - 0.5) < 0.03
    assert abs(lam[~cut].var() - 0.64 / (2.56 * 2.6)) < 0.012
    # cutmix: the area-corrected lam has the distribution of timm's box rule
    ref = timm_cutmix_lams(4000, HW, np.random.default_rng(0))
    assert abs(lam[cut].mean() - ref.mean()) < 0.03
    assert abs(np.median(lam[cut]) - np.median(ref)) < 0.05
    off = M.sample_mix_params(KEYS[0], HW, prob=0.0)
    assert float(off.lam) == 1.0 and not bool(off.use_cutmix)


def test_soft_target_cross_entropy():
    logits = jax.random.normal(jax.random.key(0), (5, 7))
    labels = jnp.array([0, 6, 3, 3, 1])
    hard = M.smooth_one_hot(labels, 7, 0.0)
    np.testing.assert_allclose(
        M.soft_target_cross_entropy(logits, hard),
        optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean(),
        rtol=1e-6,
    )
    soft = M.smooth_one_hot(labels, 7, 0.1)
    ref = -(soft * jax.nn.log_softmax(logits)).sum(1).mean()
    np.testing.assert_allclose(M.soft_target_cross_entropy(logits, soft), ref, rtol=1e-6)


def test_mixup_bad_input():
    x = constant_batch()
    with pytest.raises(ValueError, match="one of mixup_alpha"):
        M.sample_mix_params(jax.random.key(0), (8, 8), mixup_alpha=0.0, cutmix_alpha=0.0)
    with pytest.raises(ValueError, match="prob"):
        M.sample_mix_params(jax.random.key(0), (8, 8), prob=1.5)
    with pytest.raises(ValueError, match="labels"):
        M.mixup_cutmix(jax.random.key(0), x, jnp.zeros(8), 10)
    with pytest.raises(ValueError, match="NHWC"):
        M.mixup_cutmix(jax.random.key(0), x[0], jnp.arange(8), 10)
    with pytest.raises(ValueError, match="smoothing"):
        M.smooth_one_hot(jnp.arange(3), 3, 1.0)


# ----------------------------------------------------------------------------- RandAugment


def photo(size=48):
    import skimage.data

    return np.asarray(Image.fromarray(skimage.data.astronaut()).resize((size, size), Image.BICUBIC))


def low_contrast(size=48):
    return (photo(size) // 3 + 40).astype(np.uint8)


PIXEL_OPS = [
    ("invert", lambda x: A.invert(x), lambda p: ImageOps.invert(p)),
    ("autocontrast", lambda x: A.auto_contrast(x), lambda p: ImageOps.autocontrast(p)),
    ("equalize", lambda x: A.equalize(x), lambda p: ImageOps.equalize(p)),
    ("posterize1", lambda x: A.posterize(x, 1), lambda p: ImageOps.posterize(p, 1)),
    ("posterize3", lambda x: A.posterize(x, 3), lambda p: ImageOps.posterize(p, 3)),
    ("solarize", lambda x: A.solarize(x, 90), lambda p: ImageOps.solarize(p, 90)),
    (
        "solarize_add",
        lambda x: A.solarize_add(x, 70),
        lambda p: p.point([min(255, i + 70) if i < 128 else i for i in range(256)] * 3),
    ),
    ("color", lambda x: A.color(x, 0.3), lambda p: ImageEnhance.Color(p).enhance(0.3)),
    ("color+", lambda x: A.color(x, 1.8), lambda p: ImageEnhance.Color(p).enhance(1.8)),
    ("contrast", lambda x: A.contrast(x, 0.4), lambda p: ImageEnhance.Contrast(p).enhance(0.4)),
    ("contrast+", lambda x: A.contrast(x, 1.7), lambda p: ImageEnhance.Contrast(p).enhance(1.7)),
    (
        "brightness",
        lambda x: A.brightness(x, 1.6),
        lambda p: ImageEnhance.Brightness(p).enhance(1.6),
    ),
    ("sharpness", lambda x: A.sharpness(x, 0.2), lambda p: ImageEnhance.Sharpness(p).enhance(0.2)),
    ("sharpness+", lambda x: A.sharpness(x, 1.9), lambda p: ImageEnhance.Sharpness(p).enhance(1.9)),
]


@pytest.mark.parametrize("name,ours,pil", PIXEL_OPS, ids=[o[0] for o in PIXEL_OPS])
def test_pixel_ops_match_pillow_exactly(name, ours, pil):
    for img in (photo(), low_contrast()):
        np.testing.assert_array_equal(np.asarray(ours(img)), np.asarray(pil(Image.fromarray(img))))


FILL = A.IMAGENET_FILL
GEOMETRIC = [
    (
        "rotate",
        lambda x, i: A.rotate(x, 17.0, interpolation=i),
        lambda p, r: p.rotate(17.0, resample=r, fillcolor=FILL),
    ),
    (
        "shear_x",
        lambda x, i: A.shear_x(x, -0.27, interpolation=i),
        lambda p, r: p.transform(p.size, Image.AFFINE, (1, -0.27, 0, 0, 1, 0), r, fillcolor=FILL),
    ),
    (
        "shear_y",
        lambda x, i: A.shear_y(x, 0.2, interpolation=i),
        lambda p, r: p.transform(p.size, Image.AFFINE, (1, 0, 0, 0.2, 1, 0), r, fillcolor=FILL),
    ),
    (
        "translate_x",
        lambda x, i: A.translate_x(x, 9.7, interpolation=i),
        lambda p, r: p.transform(p.size, Image.AFFINE, (1, 0, 9.7, 0, 1, 0), r, fillcolor=FILL),
    ),
    (
        "translate_y",
        lambda x, i: A.translate_y(x, -12.3, interpolation=i),
        lambda p, r: p.transform(p.size, Image.AFFINE, (1, 0, 0, 0, 1, -12.3), r, fillcolor=FILL),
    ),
]


@pytest.mark.parametrize("name,ours,pil", GEOMETRIC, ids=[o[0] for o in GEOMETRIC])
def test_geometric_ops_match_pillow_exactly(name, ours, pil):
    img = photo()
    for interp, resample in (("bicubic", Image.BICUBIC), ("bilinear", Image.BILINEAR)):
        np.testing.assert_array_equal(
            np.asarray(ours(img, interp)), np.asarray(pil(Image.fromarray(img), resample))
        )


def test_every_op_keeps_shape_dtype_and_changes_the_image():
    img = low_contrast(32)
    for name in A.OP_NAMES:
        out = A.apply_op(name, img, 9.0, 1.0)
        assert out.shape == img.shape and out.dtype == tf.uint8, name
        assert not np.array_equal(out, img), f"{name} left the image unchanged"
    with pytest.raises(ValueError, match="unknown RandAugment op"):
        A.apply_op("Cutout", img, 9.0, 1.0)


@pytest.mark.parametrize(
    "op,expected",
    [
        ("Rotate", lambda x, s: A.rotate(x, s * 27.0)),
        ("ShearX", lambda x, s: A.shear_x(x, s * 0.27)),
        ("TranslateYRel", lambda x, s: A.translate_y(x, s * 0.405 * 32)),
        ("PosterizeIncreasing", lambda x, s: A.posterize(x, 1)),  # 4 - int(3.6)
        ("SolarizeIncreasing", lambda x, s: A.solarize(x, 26)),  # 256 - int(230.4)
        ("SolarizeAdd", lambda x, s: A.solarize_add(x, 99)),  # int(99.0)
        ("ColorIncreasing", lambda x, s: A.color(x, 1 + s * 0.81)),
    ],
)
def test_rand_augment_levels_follow_timm(op, expected):
    img = photo(32)
    outs = set()
    for seed in range(4):
        out = np.asarray(
            A.rand_augment(
                img, [seed, 1], num_ops=1, magnitude=9.0, magnitude_std=0.0, prob=1.0, ops=(op,)
            )
        )
        candidates = [np.asarray(expected(img, s)) for s in (1.0, -1.0)]
        assert any(np.array_equal(out, c) for c in candidates), op
        outs.add(out.tobytes())
    if op in ("Rotate", "ShearX", "TranslateYRel", "ColorIncreasing"):
        assert len(outs) == 2  # both signs occur over the seeds


def test_rand_augment_is_pure_and_runs_in_tf_data():
    img = photo(32)
    a = A.rand_augment(img, [3, 4])
    b = A.rand_augment(img, [3, 4])
    assert a.shape == (32, 32, 3) and a.dtype == tf.uint8
    np.testing.assert_array_equal(a, b)
    outs = [np.asarray(A.rand_augment(img, [s, 0])) for s in range(8)]
    assert sum(not np.array_equal(o, img) for o in outs) >= 4
    assert len({o.tobytes() for o in outs}) >= 4
    # graph mode inside tf.data gives the same result for the same seed
    ds = tf.data.Dataset.from_tensors((img, tf.constant([3, 4], tf.int64))).map(
        lambda x, s: A.rand_augment(x, s)
    )
    np.testing.assert_array_equal(next(iter(ds)), a)
    with pytest.raises(ValueError, match="uint8"):
        A.rand_augment(img.astype(np.float32), [0, 0])
    with pytest.raises(ValueError, match="seed"):
        A.rand_augment(img, [0, 0, 0])


def test_random_erasing():
    x = tf.random.stateless_normal([40, 48, 3], [0, 0])
    a = A.random_erasing(x, [1, 2], prob=1.0)
    np.testing.assert_array_equal(a, A.random_erasing(x, [1, 2], prob=1.0))
    assert a.shape == x.shape and a.dtype == x.dtype
    np.testing.assert_array_equal(A.random_erasing(x, [1, 2], prob=0.0), x)
    erased = 0
    for seed in range(200):
        out = np.asarray(A.random_erasing(x, [seed, 7], prob=1.0 if seed < 40 else 0.25))
        changed = np.any(out != np.asarray(x), axis=-1)
        if not changed.any():
            assert seed >= 40, "prob=1 must erase (a box always fits in 10 tries here)"
            continue
        if seed >= 40:
            erased += 1
        rows, cols = np.where(changed)
        h, w = rows.max() - rows.min() + 1, cols.max() - cols.min() + 1
        assert changed.sum() == h * w  # one solid rectangle
        area = h * w / (40 * 48)
        assert 0.015 <= area <= 1 / 3 + 0.03
        assert 0.3 / 1.3 <= h / w <= 1.3 / 0.3
    assert 0.15 <= erased / 160 <= 0.35
    with pytest.raises(ValueError, match="float"):
        A.random_erasing(tf.zeros([4, 4, 3], tf.uint8), [0, 0])


def test_random_erasing_box_statistics_follow_timm():
    # area fraction ~ U(0.02, 1/3) (rounded sides), log-aspect ~ U(log 0.3, log 1/0.3)
    x = tf.zeros([64, 64, 1])
    areas, logs = [], []
    for seed in range(120):
        changed = np.asarray(A.random_erasing(x, [seed, 3], prob=1.0))[..., 0] != 0
        rows, cols = np.where(changed)
        h, w = rows.max() - rows.min() + 1, cols.max() - cols.min() + 1
        areas.append(h * w / 64**2)
        logs.append(math.log(h / w))
    assert abs(np.mean(areas) - (0.02 + 1 / 3) / 2) < 0.04
    assert abs(np.mean(logs)) < 0.25
