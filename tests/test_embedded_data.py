"""Tests of the embedded default data set (real photo crops, 10 classes)."""

import io

import numpy as np
import pytest
from PIL import Image

from mae_jax import schema
from mae_jax.data import embedded, pipeline


def _decode(jpeg: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(jpeg)).convert("RGB"), np.float32)


def test_photos_are_bundled_real_rgb_images():
    assert len(embedded.PHOTOS) == 10
    for _, loader in embedded.PHOTOS:
        photo = embedded.load_photo(loader)
        assert photo.dtype == np.uint8 and photo.ndim == 3 and photo.shape[2] == 3
        assert 256 <= min(photo.shape[:2]) <= embedded.MAX_PHOTO_SIDE


def test_split_regions_are_disjoint():
    for h, w in [(512, 512), (300, 451), (640, 427)]:
        ty, tx, th, tw = embedded.split_region(h, w, "train")
        ey, ex, eh, ew = embedded.split_region(h, w, "validation")
        train = np.zeros((h, w), bool)
        train[ty : ty + th, tx : tx + tw] = True
        evalm = np.zeros((h, w), bool)
        evalm[ey : ey + eh, ex : ex + ew] = True
        assert not (train & evalm).any() and (train | evalm).all()
    with pytest.raises(ValueError, match="'test'"):
        embedded.split_region(10, 10, "test")


def test_crop_boxes_stay_in_their_region():
    rng = np.random.default_rng(0)
    for split in embedded.SPLITS:
        ry, rx, rh, rw = embedded.split_region(300, 451, split)
        boxes = embedded.sample_crops(300, 451, split, 500, rng)
        y, x, h, w = boxes.T
        assert (y >= ry).all() and (x >= rx).all()
        assert (y + h <= ry + rh).all() and (x + w <= rx + rw).all()
        assert (h >= 8).all() and (w >= 8).all()


def test_build_split_deterministic_labelled_and_sized():
    train = embedded.build_split("train", 24, 12)
    again = embedded.build_split.__wrapped__("train", 24, 12)
    assert train.images == again.images
    np.testing.assert_array_equal(train.labels, np.arange(120) % 10)
    assert train.class_names == embedded.CLASS_NAMES
    corr = []
    for jpeg in train.images:
        img = _decode(jpeg)
        assert min(img.shape[:2]) == 24
        a, b = img[:, :-1].ravel(), img[:, 1:].ravel()
        corr.append(np.corrcoef(a, b)[0, 1] if a.std() > 0 else 1.0)
    # Real photo crops: neighbouring pixels are correlated (~0 for noise).
    assert np.mean(corr) > 0.7
    val = embedded.build_split("validation", 24, 3)
    assert len(val) == 30 and not set(val.images) & set(train.images)
    with pytest.raises(ValueError, match="per_class"):
        embedded.build_split("train", 24, 0)


def test_classes_are_learnable_from_simple_colour_statistics():
    """A nearest-class-mean probe on colour statistics beats chance (10%) by far
    on the spatially disjoint eval split: labels carry signal."""

    def feats(split):
        s = embedded.build_split(split, 24, 30 if split == "train" else 10)
        x = np.stack(
            [np.concatenate([(im := _decode(j)).mean((0, 1)), im.std((0, 1))]) for j in s.images]
        )
        return x, s.labels

    xt, yt = feats("train")
    xv, yv = feats("validation")
    mu, sd = xt.mean(0), xt.std(0) + 1e-6
    xt, xv = (xt - mu) / sd, (xv - mu) / sd
    centers = np.stack([xt[yt == c].mean(0) for c in range(10)])
    pred = np.argmin(((xv[:, None] - centers[None]) ** 2).sum(-1), axis=1)
    assert (pred == yv).mean() > 0.4


@pytest.mark.parametrize("size", [32, 48])
def test_default_config_pipeline_at_requested_size(size):
    cfg = schema.defaults(schema.DATA)
    assert cfg.source == "embedded"
    cfg.image_size = size
    cfg.embedded_train_per_class = 20
    cfg.embedded_eval_per_class = 5
    info = pipeline.dataset_info(cfg)
    assert (info.num_train_examples, info.num_eval_examples, info.num_classes) == (200, 50, 10)
    batch = next(
        pipeline.create_pretrain_iterator(
            cfg, global_batch_size=16, seed=0, process_index=0, process_count=1
        )
    )
    assert batch["image"].shape == (16, size, size, 3) and batch["image"].dtype == np.float32
    ev = list(pipeline.create_eval_iterator(cfg, 16, process_index=0, process_count=1))
    assert len(ev) == 4 and sum(int(b["mask"].sum()) for b in ev) == 50
    labels = np.concatenate([b["label"][b["mask"]] for b in ev])
    np.testing.assert_array_equal(np.bincount(labels, minlength=10), np.full(10, 5))
