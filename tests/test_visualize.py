"""Reconstruction grids and the `python -m mae_jax.visualize` command."""

import dataclasses
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from PIL import Image

from mae_jax import models, ops
from mae_jax import visualize as V
from mae_jax import workdir as wdir

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def model():
    return models.create("mae_vit_test", seed=0, norm_pix_loss=True)


def test_pixel_round_trip_and_patch_denormalization():
    pixels = np.random.default_rng(0).integers(0, 256, (2, 8, 8, 3), dtype=np.uint8)
    np.testing.assert_array_equal(V.to_uint8(V.normalize(pixels)), pixels)
    target = jax.random.normal(jax.random.key(0), (2, 5, 48)) * 3 + 1
    np.testing.assert_allclose(
        V.denormalize_patches(ops.normalize_targets(target), target), target, rtol=1e-5, atol=1e-5
    )


def test_reconstruction_panels(model):
    images = jnp.asarray(V.default_images(32)[:2])
    noise = jax.random.uniform(jax.random.key(1), (2, 16))
    r = V.reconstruct(model, images, noise=noise, mask_ratio=0.75)
    _, mask, _ = ops.random_masking(2, 16, 0.75, noise=noise)
    np.testing.assert_array_equal(r.mask, mask)
    removed = np.repeat(np.asarray(mask)[..., None], 8 * 8 * 3, -1).astype(bool)

    def patches(x):
        return np.asarray(ops.patchify(x, 8))

    orig, masked, recon, pasted = map(patches, (r.original, r.masked, r.reconstruction, r.pasted))
    np.testing.assert_array_equal(orig, patches(images))
    np.testing.assert_array_equal(masked[~removed], orig[~removed])
    np.testing.assert_array_equal(masked[removed], 0.0)
    np.testing.assert_array_equal(pasted[~removed], orig[~removed])
    np.testing.assert_allclose(pasted[removed], recon[removed], rtol=1e-6)
    # norm_pix_loss: the prediction is mapped back with each patch's target statistics
    graphdef, state = nnx.split(model)
    pred, _ = V._forward(graphdef, state, images, noise, 0.75)  # the jitted model call
    expected = V.denormalize_patches(pred, ops.patchify(images, 8))
    np.testing.assert_allclose(recon, expected, rtol=1e-4, atol=1e-4)


def test_grid_layout(model):
    images = V.default_images(32)[:2]  # the panels test's forward program (2 images)
    grid = V.reconstruction_grid(model, images, key=jax.random.key(0), pad=2)
    assert grid.dtype == np.uint8 and grid.shape == (2 * 32 + 3 * 2, 4 * 32 + 5 * 2, 3)
    np.testing.assert_array_equal(grid[:2], 255)  # top padding
    np.testing.assert_array_equal(grid[2:34, 2:34], V.to_uint8(images[0]))  # first original
    with pytest.raises(ValueError, match="key= or noise="):
        V.reconstruct(model, images)


def test_cli_random_model_writes_png(tmp_path):
    out = tmp_path / "sub" / "random.png"
    with pytest.warns(UserWarning, match="RANDOMLY INITIALIZED"):
        assert V.main(["--output", str(out), "--model", "mae_vit_test", "--mask-ratio", "0.5"]) == 0
    with Image.open(out) as im:
        assert im.format == "PNG" and im.size == (4 * 32 + 10, 4 * 32 + 10)
    # image files given on the command line, resized and centre-cropped to the model's size
    src = tmp_path / "wide.jpg"
    Image.fromarray(np.full((30, 50, 3), 200, np.uint8)).save(src)
    out2 = tmp_path / "files.png"
    with pytest.warns(UserWarning):
        assert (
            V.main(
                ["--output", str(out2), "--model", "mae_vit_test", "--images", str(src), str(src)]
            )
            == 0
        )
    with Image.open(out2) as im:
        assert im.size == (4 * 32 + 10, 2 * 32 + 6)
        first = np.asarray(im)[2:34, 2:34]
    assert np.abs(first.astype(int) - 200).max() <= 2


def save_run(workdir, model, step):
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    state = {"params": params, "opt_state": {"mu": params}, "step": step}
    with wdir.Writer(workdir, keep=None, async_save=False, handle_sigterm=False) as ckpt:
        ckpt.save(step, state, {"model": dataclasses.asdict(model.config), "step": step})


def test_restore_and_cli_from_checkpoint(tmp_path, model):
    trained = models.create("mae_vit_test", seed=7, norm_pix_loss=True)
    save_run(tmp_path, model, 1)
    save_run(tmp_path, trained, 5)
    restored, step = V.restore_mae(str(tmp_path))
    assert step == 5 and restored.config.norm_pix_loss
    jax.tree.map(
        np.testing.assert_array_equal,
        nnx.to_pure_dict(nnx.state(trained, nnx.Param)),
        nnx.to_pure_dict(nnx.state(restored, nnx.Param)),
    )
    older, step = V.restore_mae(str(tmp_path / "checkpoints"), step=1)
    assert step == 1
    np.testing.assert_array_equal(older.cls_token.get_value(), model.cls_token.get_value())
    # a larger image size works: position embeddings are fixed sin-cos
    big, _ = V.restore_mae(str(tmp_path), img_size=48)
    assert big.config.img_size == 48

    out = tmp_path / "ckpt.png"
    assert V.main(["--output", str(out), "--checkpoint", str(tmp_path), "--img-size", "48"]) == 0
    with Image.open(out) as im:
        assert im.size == (4 * 48 + 10, 4 * 48 + 10)
    # same grid as building it by hand from the restored model
    expected = V.reconstruction_grid(
        big, V.default_images(48), key=jax.random.key(0), mask_ratio=0.75
    )
    np.testing.assert_array_equal(np.asarray(Image.open(out)), expected)


def test_checkpoint_errors(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        V.restore_mae(str(tmp_path / "nope"))
    os.makedirs(tmp_path / "checkpoints")
    with pytest.raises(ValueError, match="no finalized checkpoint"):
        V.restore_mae(str(tmp_path))
    with wdir.Writer(tmp_path, async_save=False, handle_sigterm=False) as ckpt:
        ckpt.save(3, {"params": {"a": np.zeros(2)}}, {"step": 3})
    with pytest.raises(ValueError, match="says nothing of its model"):
        V.restore_mae(str(tmp_path))


@pytest.mark.slow
def test_module_entry_point(tmp_path):
    """`python -m mae_jax.visualize` in a real process: exit status, stdout and stderr. The model
    and mask ratio of test_cli_random_model_writes_png: its programs, from the compilation
    cache."""
    out = tmp_path / "cli.png"
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "mae_jax.visualize",
            "--output",
            str(out),
            "--model",
            "mae_vit_test",
            "--seed",
            "3",
            "--mask-ratio",
            "0.5",
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "RANDOMLY INITIALIZED" in proc.stderr and "wrote" in proc.stdout
    with Image.open(out) as im:
        assert im.size == (138, 138)
    proc = subprocess.run(
        [sys.executable, "-m", "mae_jax.visualize", "--output", str(out), "--step", "3"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 2 and proc.stderr == "error: --step needs --checkpoint\n"


def test_cli_errors(tmp_path, capsys):
    out = str(tmp_path / "x.png")
    assert V.main(["--output", out, "--checkpoint", str(tmp_path / "missing")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "does not exist" in err
    for argv, message in [
        (["--output", out, "--step", "3"], "--step needs --checkpoint"),
        (["--model", "mae_vit_test"], "--output is required"),
        (["--output", out, "--mask-ratio", "half"], "flag --mask-ratio=half: could not convert"),
        (["--output", out, "--chekpoint", "w"], "Unknown command line flag 'chekpoint'"),
    ]:
        assert V.main(argv) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and message in err and err.count("\n") == 1, err
    assert not os.path.exists(out)
