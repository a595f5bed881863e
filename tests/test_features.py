"""`python -m mae_jax.features`: features of a folder of images (or of a config's split) from a
weights workdir, against the model's own forward on the evaluation crops; names, unreadable
files, pooling, the classifier's own pooling, and the command line."""

import dataclasses
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import skimage.data
from config_files import ROOT, load_config
from flax import nnx
from PIL import Image

import mae_jax
from mae_jax import features as F
from mae_jax import models
from mae_jax import workdir as wdir
from mae_jax.data import augment, pipeline
from mae_jax.evaluate import knn
from mae_jax.models.classifier import Head, from_head

PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "camera", "coins")


def _weights(root, model, **meta):
    state = {"params": jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(model, nnx.Param)))}
    return wdir.write_weights(
        str(root), state, {"model": dataclasses.asdict(model.config), "kind": "weights", **meta}
    )


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """11 photos (PNG and JPEG, 2 in a subfolder, assorted sizes) and one broken file."""
    root = tmp_path_factory.mktemp("photos")
    os.makedirs(root / "more")
    for i in range(11):
        image = getattr(skimage.data, PHOTOS[i % len(PHOTOS)])()
        image = Image.fromarray(image).convert("RGB").resize((40 + 7 * i, 36 + 3 * i))
        where = root / "more" if i >= 9 else root
        image.save(where / f"p{i:02d}.{'jpg' if i % 2 else 'png'}")
    (root / "broken.jpg").write_bytes(b"not an image")
    (root / "notes.txt").write_text("not an image either")
    return str(root)


@pytest.fixture(scope="module")
def mae_dir(tmp_path_factory):
    return _weights(tmp_path_factory.mktemp("w") / "mae", models.create("mae_vit_test", seed=3))


def _expected(model, paths, pool):
    images = np.stack(
        [np.asarray(augment.center_crop_eval(open(p, "rb").read(), 32)) for p in paths]
    )
    return np.asarray(F.pooled(model, jnp.asarray(images), pool))


def test_folder_of_images_gives_the_model_s_features_with_names(folder, mae_dir, tmp_path, capsys):
    model = mae_jax.load(mae_dir).model
    readable = [n for n in sorted(os.listdir(folder)) if n.startswith("p")]
    names = sorted([*readable, "more/p09.jpg", "more/p10.png"])
    for pool in ("cls", "mean"):
        out = str(tmp_path / f"{pool}.npz")
        args = ["--checkpoint", mae_dir, "--images", folder, "--output", out, "--batch_size", "8"]
        assert F.main([*args, "--pool", pool]) == 0
        got = np.load(out)
        assert list(got["names"]) == names  # relative, sorted, the broken file left out
        assert list(got["skipped"]) == [os.path.join(folder, "broken.jpg")]
        assert str(got["pool"]) == pool and str(got["model"]) == "mae_vit_test"
        expected = _expected(model, [os.path.join(folder, n) for n in names], pool)
        np.testing.assert_allclose(got["features"], expected, rtol=1e-5, atol=1e-5)
    err = capsys.readouterr().err
    assert "warning: skipped" in err and "broken.jpg" in err
    assert "features: 12/12 images [####################]" in err  # the progress line, at its end
    assert "broken.jpg: Unknown image file format" in err
    # a glob: names as matched
    out = str(tmp_path / "glob.npz")
    assert F.main(["--checkpoint", mae_dir, "--output", out, os.path.join(folder, "*.png")]) == 0
    got = np.load(out)
    assert list(got["names"]) == sorted(
        os.path.join(folder, n) for n in readable if n.endswith(".png")
    )


def test_a_config_split_gives_the_eval_iterator_s_examples_and_labels(mae_dir, tmp_path):
    out = str(tmp_path / "split.npz")
    args = ["--checkpoint", mae_dir, "--config", os.path.join(ROOT, "configs/smoke.py")]
    assert F.main([*args, "--limit", "20", "--output", out, "--batch_size", "16"]) == 0
    got = np.load(out)
    assert list(got["names"]) == [f"validation[{i}]" for i in range(20)]
    data = pipeline.create_eval_iterator(load_config().data, global_batch_size=40)
    batch = next(data)
    data.close()
    model = mae_jax.load(mae_dir).model
    expected = knn.encoder_features(model, jnp.asarray(batch["image"][:20]))
    np.testing.assert_allclose(got["features"], expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(got["labels"], batch["label"][:20])


def test_a_classifier_gives_its_own_pooled_feature(folder, tmp_path, capsys):
    head = Head(num_classes=5, global_pool=True, linear_probe=False)
    clf = from_head(models.resolve("mae_vit_test"), head, seed=2)
    root = _weights(tmp_path / "clf", clf, **head.meta())
    out = str(tmp_path / "c.npz")
    assert F.main(["--checkpoint", root, "--images", folder, "--output", out]) == 0
    got = np.load(out)
    assert str(got["pool"]) == "mean"
    paths = [os.path.join(folder, n) for n in got["names"]]
    np.testing.assert_allclose(got["features"], _expected(clf, paths, "mean"), atol=1e-5)
    assert F.main(["--checkpoint", root, "--images", folder, "--output", out, "--pool", "cls"]) == 1
    assert "the classifier pools by 'mean'" in capsys.readouterr().err


@pytest.mark.parametrize(
    "args, message",
    [
        (["--images", "x", "--output", "o.npz"], "--checkpoint is required"),
        (["--checkpoint", "c", "--output", "o.npz"], "either --images"),
        (["--checkpoint", "c", "--images", "x", "--config", "y", "--output", "o"], "either"),
        (["--checkpoint", "c", "--images", "x", "--output", "o", "--pool", "max"], "--pool"),
        (["--checkpoint", "c", "--images", "x", "--output", "o", "--split", "t"], "with --config"),
    ],
)
def test_bad_command_lines_are_one_line(args, message, capsys):
    assert F.main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and message in err and "\n" not in err


def test_nothing_to_read_is_one_sentence(mae_dir, tmp_path, capsys):
    args = ["--checkpoint", mae_dir, "--output", str(tmp_path / "o.npz")]
    assert F.main([*args, "--images", str(tmp_path / "none*.jpg")]) == 1
    assert "finds no image file" in capsys.readouterr().err
    assert F.main([*args, "--images", "/x", "--batch_size", "3"]) == 1
    assert "--batch_size 3 is not divisible by the 8 devices" in capsys.readouterr().err


@pytest.mark.slow
def test_the_command_as_a_new_user_runs_it(folder, mae_dir, tmp_path):
    out = str(tmp_path / "feats.npz")
    command = [sys.executable, "-m", "mae_jax.features", "--checkpoint", mae_dir]
    command += ["--images", folder, "--output", out]
    env = {**os.environ, "PYTHONPATH": ROOT}
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr
    assert f"wrote {out}: features [11, 32] (cls pool), names, 1 unreadable skipped" in done.stdout
    assert "loaded mae_vit_test MAE, weights, from" in done.stderr
    assert np.load(out)["features"].shape == (11, 32)
