"""Tests of mae_jax.data.pipeline on real-photo JPEG folders and mocked TFDS."""

import io
import math
import os
import shutil

import numpy as np
import pytest
from PIL import Image

from mae_jax import schema
from mae_jax.data import augment, pipeline
from mae_jax.data import sources as data_sources
from mae_jax.data.lazy_tf import tf_module, tfds_module

MEAN = np.array(augment.IMAGENET_MEAN)
STD = np.array(augment.IMAGENET_STD)
LOW, HIGH = (-MEAN / STD).min(), ((1 - MEAN) / STD).max()
CLASSES = ("astronaut", "chelsea", "coffee")


def _photo(name):
    from skimage import data

    return getattr(data, name)()


def _make_folder(root, per_class=8, seed=0):
    """root/<class>/img_i.jpg: crops of skimage photos, sides 300-500 px, plus one PNG."""
    rng = np.random.default_rng(seed)
    for c in CLASSES:
        photo = _photo(c)
        os.makedirs(os.path.join(root, c))
        for i in range(per_class):
            h = int(rng.integers(min(300, photo.shape[0]), min(500, photo.shape[0]) + 1))
            w = int(rng.integers(min(300, photo.shape[1]), min(500, photo.shape[1]) + 1))
            y = int(rng.integers(0, photo.shape[0] - h + 1))
            x = int(rng.integers(0, photo.shape[1] - w + 1))
            Image.fromarray(photo[y : y + h, x : x + w]).save(
                os.path.join(root, c, f"img_{i}.jpg"), quality=90
            )
    Image.fromarray(_photo("astronaut")[:320, :400]).save(
        os.path.join(root, "astronaut", "extra.png")
    )
    return root


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return _make_folder(str(tmp_path_factory.mktemp("photos")))


@pytest.fixture(scope="module")
def corrupt_folder(tmp_path_factory, folder):
    root = str(tmp_path_factory.mktemp("corrupt") / "photos")
    shutil.copytree(folder, root)
    with open(os.path.join(root, "chelsea", "garbage.jpg"), "wb") as f:
        f.write(b"this is not an image" * 50)
    with open(os.path.join(root, "coffee", "img_0.jpg"), "rb") as f:
        good = f.read()
    with open(os.path.join(root, "coffee", "truncated.jpg"), "wb") as f:
        f.write(good[: len(good) // 3])
    return root


def _cfg(folder_path, **kw):
    cfg = schema.defaults(schema.DATA)
    cfg.source = "folder"
    cfg.path = folder_path
    cfg.image_size = 32
    cfg.with_keys = True
    cfg.update(kw)
    return cfg


def _take(it, n):
    return [next(it) for _ in range(n)]


# Streams that several tests read, read once: building an iterator (tracing its tf.data
# functions) costs far more than the few small batches each test takes.
@pytest.fixture(scope="module")
def stream(folder):
    """The first 10 batches (two epochs of the 25 examples) of the default folder stream (seed 0,
    batch 5, one process), and its iterator's (position, skipped) after them. The iterator is
    not kept: its tf.data threads end now, not at the end of the module."""
    it = _pretrain(_cfg(folder))
    batches = _take(it, 10)
    return (it.position, it.skipped), batches


@pytest.fixture(scope="module")
def half_stream(folder):
    """The first 9 batches of process 0 of 2 (13 examples, local batch 5)."""
    return _take(_pretrain(_cfg(folder), batch=5, p=0, pc=2), 9)


@pytest.fixture(scope="module")
def eval_batch(folder):
    """The first batch of 4 of the one-process eval pass with 40% of the folder held out."""
    cfg = _cfg(folder, folder_eval_fraction=0.4)
    return next(pipeline.create_eval_iterator(cfg, 4, process_index=0, process_count=1))


def _pretrain(cfg, batch=5, seed=0, start=0, p=0, pc=1):
    return pipeline.create_pretrain_iterator(
        cfg,
        global_batch_size=batch * pc,
        seed=seed,
        start_step=start,
        process_index=p,
        process_count=pc,
    )


# ------------------------------------------------------------- augmentation


def test_crop_box_statistics_within_range():
    tf = tf_module()
    h, w = 375, 500
    seeds = tf.stack(
        [tf.fill([400], tf.constant(7, tf.int64)), tf.range(400, dtype=tf.int64)], axis=1
    )
    sample = tf.function(
        lambda s: tf.map_fn(
            lambda one: augment.sample_crop_box(h, w, one, (0.2, 1.0), (3 / 4, 4 / 3)),
            s,
            fn_output_signature=tf.int32,
        )
    )
    boxes = sample(seeds).numpy()
    y, x, bh, bw = boxes.T
    assert (y >= 0).all() and (x >= 0).all()
    assert (y + bh <= h).all() and (x + bw <= w).all()
    area = bh * bw / (h * w)
    ratio = bw / bh
    # Rounding of w and h to integers moves area/ratio by at most ~1%.
    assert area.min() >= 0.2 * 0.98 and area.max() <= 1.0
    assert ratio.min() >= 0.75 * 0.99 and ratio.max() <= 4 / 3 * 1.01
    # Uniform area in [0.2, 1] (minus rejected large boxes): spread, not stuck.
    assert 0.4 < area.mean() < 0.65 and area.min() < 0.25 and area.max() > 0.9
    assert 0.75 < np.exp(np.log(ratio).mean()) < 1.1
    assert len({tuple(b) for b in boxes}) > 390
    again = augment.sample_crop_box(
        h, w, tf.constant([7, 3], tf.int64), (0.2, 1.0), (3 / 4, 4 / 3)
    ).numpy()
    np.testing.assert_array_equal(again, boxes[3])


def test_crop_box_fallback_is_center_crop_with_clamped_ratio():
    tf = tf_module()
    # 10 x 1000: no box of ratio <= 4/3 with area >= 0.5 fits -> fallback.
    box = augment.sample_crop_box(
        10, 1000, tf.constant([0, 1], tf.int64), (0.5, 1.0), (3 / 4, 4 / 3)
    ).numpy()
    np.testing.assert_array_equal(box, [0, (1000 - 13) // 2, 10, 13])
    box = augment.sample_crop_box(
        1000, 10, tf.constant([0, 1], tf.int64), (0.5, 1.0), (3 / 4, 4 / 3)
    ).numpy()
    np.testing.assert_array_equal(box, [(1000 - 13) // 2, 0, 13, 10])


def test_bad_crop_params_raise():
    with pytest.raises(ValueError, match="crop scale"):
        augment.check_crop_params((0.0, 1.0), (0.75, 1.33))
    with pytest.raises(ValueError, match="crop ratio"):
        augment.check_crop_params((0.2, 1.0), (2.0, 1.0))


@pytest.mark.parametrize("shape", [(300, 280), (150, 180)])  # down- and upscaling
def test_resize_matches_pil_bicubic(shape):
    image = _photo("astronaut")[: shape[0], : shape[1]]
    ref = np.asarray(Image.fromarray(image).resize((224, 224), Image.BICUBIC), np.float32)
    ours = augment.resize_bicubic(tf_module().constant(image), [224, 224]).numpy()
    assert np.abs(np.round(ours) - ref).mean() < 0.3
    crop = augment.resample_crop(tf_module().constant(image), 224).numpy()  # training path
    assert np.abs(crop - ref).mean() < 0.3


def test_eval_preprocessing_matches_pil_resize_center_crop():
    image = _photo("coffee")  # 400 x 600
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    ours = augment.center_crop_eval(tf_module().constant(buf.getvalue()), 224).numpy()
    pil = Image.fromarray(image).resize((384, 256), Image.BICUBIC)  # shorter side 256
    ref = np.asarray(pil, np.float32)[16:240, 80:304] / 255.0
    ref = (ref - MEAN) / STD
    assert ours.shape == (224, 224, 3)
    assert np.abs(ours - ref).mean() < 0.3 / 255 / 0.224


def test_random_resized_crop_jpeg_and_png_paths_agree():
    tf = tf_module()
    image = _photo("chelsea")
    encoded = {}
    for fmt in ("JPEG", "PNG"):
        buf = io.BytesIO()
        Image.fromarray(image).save(buf, format=fmt, quality=98)
        encoded[fmt] = buf.getvalue()
    seed = tf.constant([3, 4], tf.int64)
    a = augment.random_resized_crop(
        tf.constant(encoded["JPEG"]), seed, 64, (0.2, 1.0), (3 / 4, 4 / 3)
    ).numpy()
    b = augment.random_resized_crop(
        tf.constant(encoded["PNG"]), seed, 64, (0.2, 1.0), (3 / 4, 4 / 3)
    ).numpy()
    assert a.shape == b.shape == (64, 64, 3) and a.dtype == np.float32
    assert np.abs(a - b).mean() < 0.05  # same crop, only JPEG loss differs


# ---------------------------------------------------------------- pretraining


def test_pretrain_batches_shapes_dtypes_ranges(stream):
    (position, skipped), batches = stream
    for batch in batches:
        assert set(batch) == {"image", "key"}
        img = batch["image"]
        assert img.shape == (5, 32, 32, 3) and img.dtype == np.float32
        assert np.isfinite(img).all()
        assert img.min() >= LOW - 1e-4 and img.max() <= HIGH + 1e-4
        assert img.std() > 0.3  # real photos, not constant
    assert position == 10 and skipped == 0


def test_same_seed_same_batches_different_seed_differs(folder, stream):
    cfg = _cfg(folder)
    a = stream[1][:6]  # seed 0
    b = _take(_pretrain(cfg, seed=0), 6)
    c = _take(_pretrain(cfg, seed=2), 6)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x["image"], y["image"])
        np.testing.assert_array_equal(x["key"], y["key"])
    assert any(not np.array_equal(x["key"], z["key"]) for x, z in zip(a, c))
    assert not np.allclose(a[0]["image"], c[0]["image"])


def test_epochs_cover_the_split_and_reshuffle(folder, stream):
    n = data_sources.make_source(_cfg(folder)).num_examples("train")
    assert n == 25
    keys = np.concatenate([b["key"] for b in stream[1]])
    np.testing.assert_array_equal(np.sort(keys[:n]), np.arange(n))
    np.testing.assert_array_equal(np.sort(keys[n : 2 * n]), np.arange(n))
    assert not np.array_equal(keys[:n], keys[n : 2 * n])


def test_two_processes_disjoint_and_cover(folder, half_stream):
    cfg = _cfg(folder)
    seen = []
    for p in range(2):
        size = data_sources.make_source(cfg).shard_sizes("train", 2)[p]
        batches = half_stream if p == 0 else _take(_pretrain(cfg, batch=5, p=1, pc=2), 3)
        keys = np.concatenate([b["key"] for b in batches[: math.ceil(size / 5)]])[:size]
        assert len(set(keys)) == size
        seen.append(set(keys.tolist()))
    assert not seen[0] & seen[1]
    assert seen[0] | seen[1] == set(range(25))


def test_resume_equals_kth_batch_across_epochs_and_chunks(folder, half_stream, monkeypatch):
    cfg = _cfg(folder)
    # 13 examples on process 0 of 2, local batch 5: epochs end inside batches 2, 5, 7.
    fresh = half_stream
    for k in (2, 8):
        resumed = next(_pretrain(cfg, batch=5, start=k, p=0, pc=2))
        np.testing.assert_array_equal(resumed["key"], fresh[k]["key"])
        np.testing.assert_array_equal(resumed["image"], fresh[k]["image"])
    # Tiny chunks: the pipeline is rebuilt every few batches; the stream is unchanged.
    monkeypatch.setattr(pipeline, "_MIN_CHUNK_BATCHES", 1)
    it = _pretrain(cfg, batch=5, p=0, pc=2)
    for k, batch in enumerate(_take(it, 9)):
        np.testing.assert_array_equal(batch["image"], fresh[k]["image"])
    assert it.position == 9


def test_decode_options_change_pixels_slightly_not_the_stream(folder, stream, eval_batch):
    # 300-500 px photos at image_size 32: crops are >= 2x the output, so the
    # default decodes them at 1/2..1/8 DCT scale (jpeg_reduced_scale), where
    # libjpeg's scaled IDCTs ignore jpeg_dct_method.
    reduced = stream[1][:2]
    full = _take(_pretrain(_cfg(folder, jpeg_reduced_scale=False)), 2)
    fast_dct = _take(
        _pretrain(_cfg(folder, jpeg_reduced_scale=False, jpeg_dct_method="INTEGER_FAST")), 2
    )
    for first, second in ((reduced, full), (full, fast_dct)):
        for a, b in zip(first, second):
            np.testing.assert_array_equal(a["key"], b["key"])
            assert not np.array_equal(a["image"], b["image"])
            assert np.abs(a["image"] - b["image"]).mean() < 0.05  # ~2.5 grey levels
    cfg = _cfg(folder, folder_eval_fraction=0.4, jpeg_dct_method="INTEGER_FAST")
    fast = next(pipeline.create_eval_iterator(cfg, 4, process_index=0, process_count=1))
    ev = [eval_batch["image"], fast["image"]]
    assert not np.array_equal(*ev) and np.abs(ev[0] - ev[1]).mean() < 0.05
    with pytest.raises(ValueError, match="'DCT_FLOAT'"):
        _pretrain(_cfg(folder, jpeg_dct_method="DCT_FLOAT"))
    with pytest.raises(ValueError, match="jpeg_reduced_scale"):
        _pretrain(_cfg(folder, jpeg_reduced_scale=None))


def test_augmentation_differs_between_epochs(stream):
    n = 25  # epochs 0 and 1: batches 0-4 and 5-9 (default crop_min_scale 0.2)
    batches = stream[1]
    a = {k: im for b in batches[:5] for k, im in zip(b["key"], b["image"])}
    b = {k: im for b in batches[5:] for k, im in zip(b["key"], b["image"])}
    assert sum(not np.allclose(a[k], b[k]) for k in a) >= n - 1


def test_process_layout_defaults_to_jax_and_partial_config(folder):
    import ml_collections

    cfg = ml_collections.ConfigDict({"source": "folder", "path": folder, "image_size": 24})
    it = pipeline.create_pretrain_iterator(cfg, global_batch_size=3)
    assert next(it)["image"].shape == (3, 24, 24, 3)  # one JAX process in tests


def test_train_iterator_labels_match_class_folders(folder):
    cfg = _cfg(folder)
    src = data_sources.make_source(cfg)
    _, labels = src._files("train")  # pylint: disable=protected-access
    batch = next(pipeline.create_train_iterator(cfg, 10, seed=0, process_index=0, process_count=1))
    assert batch["label"].dtype == np.int32 and batch["image"].shape == (10, 32, 32, 3)
    np.testing.assert_array_equal(batch["label"], labels[batch["key"]])
    info = pipeline.dataset_info(cfg)
    assert (info.num_train_examples, info.num_classes) == (25, 3)
    assert info["class_names"] == CLASSES


# ------------------------------------------------------------------------ eval


def test_eval_iterator_pads_and_masks(folder, eval_batch):
    cfg = _cfg(folder, folder_eval_fraction=0.4)
    info = pipeline.dataset_info(cfg)
    n_eval, n_train = info.num_eval_examples, info.num_train_examples
    assert n_eval > 0 and n_train + n_eval == 25
    keys, counts = [], []
    for p in range(2):
        it = pipeline.create_eval_iterator(cfg, 8, process_index=p, process_count=2)
        batches = list(it)
        assert len(batches) == len(it) == math.ceil(math.ceil(n_eval / 2) / 4)
        for b in batches:
            assert b["image"].shape == (4, 32, 32, 3) and b["mask"].dtype == bool
            assert np.isfinite(b["image"]).all()
            assert (b["image"][~b["mask"]] == 0).all()
        keys += [k for b in batches for k, m in zip(b["key"], b["mask"]) if m]
        counts.append(sum(int(b["mask"].sum()) for b in batches))
    assert sum(counts) == n_eval and len(set(keys)) == n_eval
    # Eval is deterministic (no randomness at all).
    b = next(pipeline.create_eval_iterator(cfg, 4, process_index=0, process_count=1))
    np.testing.assert_array_equal(eval_batch["image"], b["image"])


def test_folder_with_split_directories(tmp_path):
    root = tmp_path / "ds"
    _make_folder(str(root / "train"), per_class=2)
    _make_folder(str(root / "val"), per_class=1, seed=1)
    cfg = _cfg(str(root), eval_split="val")
    info = pipeline.dataset_info(cfg)
    assert (info.num_train_examples, info.num_eval_examples) == (7, 4)
    it = pipeline.create_eval_iterator(cfg, 4, process_index=0, process_count=1)
    assert sum(int(b["mask"].sum()) for b in it) == 4


# -------------------------------------------------------------- corrupt files


def test_corrupt_images_are_skipped_and_counted(corrupt_folder, caplog):
    cfg = _cfg(corrupt_folder)
    n = data_sources.make_source(cfg).num_examples("train")
    assert n == 27
    it = _pretrain(cfg, batch=9)
    with caplog.at_level("WARNING"):
        batches = _take(it, 6)  # two epochs
    assert it.skipped == 4  # 2 bad files x 2 epochs
    assert it._fast_failures >= 1  # pylint: disable=protected-access
    assert "skipped" in caplog.text
    for b in batches:
        assert np.isfinite(b["image"]).all() and b["image"].std() > 0.3
        assert not (b["image"] == 0).all(axis=(1, 2, 3)).any()
    # Fast pipeline + guarded re-reads around failures == guarded all along.
    ref = _pretrain(cfg, batch=9)
    ref._always_guarded = True  # pylint: disable=protected-access
    for b, r in zip(batches, _take(ref, 6)):
        np.testing.assert_array_equal(b["image"], r["image"])
    assert ref.skipped == 4
    # The stream is unchanged by skipping: resume still lands on the same batch.
    np.testing.assert_array_equal(
        next(_pretrain(cfg, batch=9, start=4))["image"], batches[4]["image"]
    )
    ev = pipeline.create_eval_iterator(cfg, 9, process_index=0, process_count=1, split="train")
    assert sum(int(b["mask"].sum()) for b in ev) == n - 2
    assert ev.skipped == 2


def test_corrupt_images_with_cache(corrupt_folder):
    it = _pretrain(_cfg(corrupt_folder, cache=True), batch=27)
    batch = next(it)
    assert it.skipped == 2 and np.isfinite(batch["image"]).all()


# ---------------------------------------------------------------------- errors


def test_missing_folder_and_bad_arguments(tmp_path, folder):
    missing = str(tmp_path / "nope")
    with pytest.raises(ValueError, match="nope"):
        _pretrain(_cfg(missing))
    with pytest.raises(ValueError, match="no split directory 'validation'"):
        pipeline.create_eval_iterator(_cfg(folder), 4, process_index=0, process_count=1)
    with pytest.raises(ValueError, match="multiple of process_count"):
        pipeline.create_pretrain_iterator(_cfg(folder), 5, process_index=0, process_count=2)
    with pytest.raises(ValueError, match="config.data.source must be one of .* got 'hdf5'"):
        _pretrain(_cfg(folder, source="hdf5"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no class subdirectories"):
        _pretrain(_cfg(str(tmp_path / "empty")))


def test_missing_tfds_dataset_and_dir(tmp_path):
    cfg = schema.defaults(schema.DATA)
    cfg.source = "tfds"
    cfg.name = "no_such_dataset_xyz"
    with pytest.raises(ValueError, match="no_such_dataset_xyz"):
        _pretrain(cfg)
    cfg.name = "mnist"
    cfg.data_dir = str(tmp_path / "missing_dir")
    with pytest.raises(ValueError, match="missing_dir"):
        _pretrain(cfg)
    cfg.data_dir = str(tmp_path)  # exists, but mnist is not prepared there
    with pytest.raises(ValueError, match="not prepared"):
        _pretrain(cfg)


# ------------------------------------------------------------------------ TFDS


def test_tfds_mock_data_pretrain_resume_and_eval():
    tfds = tfds_module()
    cfg = schema.defaults(schema.DATA)
    cfg.update(source="tfds", name="imagenette", image_size=32, with_keys=True, shuffle_buffer=16)
    with tfds.testing.mock_data(num_examples=12):
        info = pipeline.dataset_info(cfg)
        assert (info.num_train_examples, info.num_classes) == (12, 10)
        fresh = _take(_pretrain(cfg, batch=5), 6)
        for b in fresh:
            assert b["image"].shape == (5, 32, 32, 3) and np.isfinite(b["image"]).all()
        keys = np.concatenate([b["key"] for b in fresh])
        assert len(set(keys[:12].tolist())) == 12  # one epoch = every example once
        resumed = next(_pretrain(cfg, batch=5, start=4))  # epoch 1 -> 2 boundary
        np.testing.assert_array_equal(resumed["image"], fresh[4]["image"])
        train = next(pipeline.create_train_iterator(cfg, 4, process_index=0, process_count=1))
        assert train["label"].shape == (4,) and (train["label"] < 10).all()
        ev = list(pipeline.create_eval_iterator(cfg, 8, process_index=0, process_count=1))
        assert len(ev) == 2 and sum(int(b["mask"].sum()) for b in ev) == 12


def _prepared_tfds_dataset(data_dir):
    """A real (on-disk TFRecord) TFDS image data set of 30 photo crops, 3 classes."""
    tfds = tfds_module()

    class MaeJaxTestPhotos(tfds.core.GeneratorBasedBuilder):
        VERSION = tfds.core.Version("1.0.0")

        def _info(self):
            return tfds.core.DatasetInfo(
                builder=self,
                features=tfds.features.FeaturesDict(
                    {
                        "image": tfds.features.Image(shape=(None, None, 3)),
                        "label": tfds.features.ClassLabel(names=CLASSES),
                    }
                ),
            )

        def _split_generators(self, dl_manager):
            return {"train": self._generate_examples(30), "test": self._generate_examples(7)}

        def _generate_examples(self, n):
            for i in range(n):
                photo = _photo(CLASSES[i % 3])
                yield i, {"image": photo[i : i + 64, 2 * i : 2 * i + 80], "label": i % 3}

    builder = MaeJaxTestPhotos(data_dir=data_dir)
    builder.download_and_prepare()
    return builder.name


def test_tfds_prepared_dataset_processes_disjoint_and_resume(tmp_path):
    cfg = schema.defaults(schema.DATA)
    cfg.update(
        source="tfds",
        data_dir=str(tmp_path),
        image_size=16,
        with_keys=True,
        shuffle_buffer=8,
        eval_split="test",
    )
    cfg.name = _prepared_tfds_dataset(str(tmp_path))
    info = pipeline.dataset_info(cfg)
    assert (info.num_train_examples, info.num_eval_examples, info.num_classes) == (30, 7, 3)
    seen = []
    for p in range(2):
        fresh = _take(_pretrain(cfg, batch=5, p=p, pc=2), 3 + 2 * p)  # process 1: into epoch 1
        keys = np.concatenate([b["key"] for b in fresh[:3]])  # epoch 0
        assert len(set(keys.tolist())) == 15
        seen.append(set(keys.tolist()))
    assert not seen[0] & seen[1]
    np.testing.assert_array_equal(  # batch 4 of process 1: examples 5-9 of its epoch 1
        next(_pretrain(cfg, batch=5, start=4, p=1, pc=2))["image"], fresh[4]["image"]
    )
    ev = [pipeline.create_eval_iterator(cfg, 4, process_index=p, process_count=2) for p in range(2)]
    assert len(ev[0]) == len(ev[1]) == 2
    assert sum(int(b["mask"].sum()) for it in ev for b in it) == 7
