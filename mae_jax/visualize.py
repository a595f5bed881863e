"""Reconstruction pictures: original | masked | reconstruction | reconstruction + visible.

As the official MAE visualization demo: the masked panel is the normalized image with removed
patches zeroed (they show as the ImageNet mean colour); the reconstruction is the decoder's
prediction for every patch; the last panel pastes the visible patches back. For a model trained
with `norm_pix_loss`, the prediction is in per-patch normalized units and is mapped back with
each patch's own target mean and (unbiased) variance, `pred * sqrt(var + 1e-6) + mean`.

Command line (writes one PNG, a row per image):

    python -m mae_jax.visualize --output out.png [--images a.jpg b.png ...] [--model NAME]
        [--checkpoint WORKDIR [--step N]] [--img-size S] [--mask-ratio 0.75] [--seed 0]

Image files may also follow as arguments (or come as several `--images`). Without any, a few
photos bundled with scikit-image are used (no network). Without `--checkpoint`, the model is
randomly initialized (a warning says so). A bad command line ends in one line `error: ...` and
exit status 2, a failure in `error: ...` and exit status 1.
"""

from __future__ import annotations

import functools
import os
import types
import warnings
from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags
from flax import nnx

from mae_jax import cli, compile_cache, loader, models, ops
from mae_jax.cli import CommandLineError

IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], np.float32)
DEFAULT_IMAGES = ("astronaut", "coffee", "chelsea", "rocket")  # skimage.data, bundled
PANELS = ("original", "masked", "reconstruction", "reconstruction + visible")


class Reconstruction(NamedTuple):
    """Normalized float32 images `[N, H, W, C]` for the four panels, and the mask `[N, L]`."""

    original: jax.Array
    masked: jax.Array
    reconstruction: jax.Array
    pasted: jax.Array
    mask: jax.Array


# ----------------------------------------------------------------------------- pixels
def normalize(images_uint8: np.ndarray) -> np.ndarray:
    """uint8 `[..., 3]` -> ImageNet-normalized float32."""
    return ((np.asarray(images_uint8, np.float32) / 255.0) - IMAGENET_MEAN) / IMAGENET_STD


def to_uint8(images) -> np.ndarray:
    """ImageNet-normalized float `[..., 3]` -> uint8 (clipped, rounded)."""
    x = (np.asarray(images, np.float32) * IMAGENET_STD + IMAGENET_MEAN) * 255.0
    return np.clip(np.round(x), 0, 255).astype(np.uint8)


def denormalize_patches(pred: jax.Array, target: jax.Array, eps: float = 1e-6) -> jax.Array:
    """Undo `norm_pix_loss`: `pred * sqrt(var + eps) + mean` with the per-patch mean and
    unbiased variance of `target`. Both `[N, L, p*p*C]`."""
    mean = jnp.mean(target, axis=-1, keepdims=True)
    var = jnp.var(target, axis=-1, keepdims=True, ddof=1)
    return pred * jnp.sqrt(var + eps) + mean


# ----------------------------------------------------------------------------- model
@functools.partial(jax.jit, static_argnums=(0, 4))
def _forward(graphdef, state, images, noise, mask_ratio):
    out = nnx.merge(graphdef, state)(images, noise=noise, mask_ratio=mask_ratio)
    return out.pred, out.mask


def reconstruct(
    model,
    images,
    *,
    key: jax.Array | None = None,
    noise: jax.Array | None = None,
    mask_ratio: float | None = None,
) -> Reconstruction:
    """Run `model` (an `MAE`) on normalized `images [N, H, W, C]` and build the four panels.

    The mask comes from `noise [N, L]` if given, else from `key` (uniform noise, as the model).
    """
    c = model.config
    images = jnp.asarray(images, jnp.float32)
    model.check_images(images)
    if noise is None:
        if key is None:
            raise ValueError("reconstruct needs key= or noise= to draw the mask")
        noise = jax.random.uniform(key, (images.shape[0], c.num_patches), dtype=jnp.float32)
    ratio = c.mask_ratio if mask_ratio is None else mask_ratio  # checked by random_masking
    graphdef, state = nnx.split(model)
    pred, mask = _forward(graphdef, state, images, jnp.asarray(noise, jnp.float32), ratio)
    target = ops.patchify(images, c.patch_size)
    if c.norm_pix_loss:
        pred = denormalize_patches(pred, target)
    grid = (c.grid_size, c.grid_size)
    recon = ops.unpatchify(pred, c.patch_size, grid, c.in_chans)
    mask_img = ops.unpatchify(
        jnp.repeat(mask[..., None], c.patch_dim, axis=-1), c.patch_size, grid, c.in_chans
    )
    masked = images * (1.0 - mask_img)
    return Reconstruction(images, masked, recon, masked + recon * mask_img, mask)


def grid_from_panels(panels: Sequence, pad: int = 2, pad_value: int = 255) -> np.ndarray:
    """Panels (each uint8 `[N, H, W, 3]`) -> one uint8 `[H', W', 3]` image: a row per sample,
    a column per panel, separated by `pad` pixels of `pad_value`."""
    panels = [np.asarray(p) for p in panels]
    if not panels or any(p.shape != panels[0].shape or p.ndim != 4 for p in panels):
        raise ValueError(
            f"panels must be equal-shape [N, H, W, 3] arrays, got {[p.shape for p in panels]}"
        )
    n, h, w, ch = panels[0].shape
    cols = len(panels)
    out = np.full((n * h + (n + 1) * pad, cols * w + (cols + 1) * pad, ch), pad_value, np.uint8)
    for i in range(n):
        for j, panel in enumerate(panels):
            y, x = pad + i * (h + pad), pad + j * (w + pad)
            out[y : y + h, x : x + w] = panel[i]
    return out


def reconstruction_grid(model, images, *, pad: int = 2, **kw) -> np.ndarray:
    """uint8 `[N*H + (N+1)*pad, 4*W + 5*pad, 3]`: per image, the four panels of `PANELS`;
    `kw`: `reconstruct`'s `key`, `noise`, `mask_ratio`."""
    r = reconstruct(model, images, **kw)
    return grid_from_panels(
        [to_uint8(p) for p in (r.original, r.masked, r.reconstruction, r.pasted)], pad=pad
    )


def save_png(path, grid: np.ndarray) -> None:
    """Write a uint8 `[H, W, 3]` array as PNG (parent directories created)."""
    from PIL import Image

    grid = np.asarray(grid)
    if grid.dtype != np.uint8 or grid.ndim != 3 or grid.shape[-1] != 3:
        raise ValueError(f"grid must be uint8 [H, W, 3], got {grid.dtype} {grid.shape}")
    os.makedirs(os.path.dirname(os.path.abspath(os.fspath(path))), exist_ok=True)
    Image.fromarray(grid).save(os.fspath(path), format="PNG")


# ----------------------------------------------------------------------------- inputs
def _square(image, size: int) -> np.ndarray:
    """PIL image -> uint8 `[size, size, 3]`: shorter side resized to `size` (bicubic), centre
    crop."""
    from PIL import Image

    image = image.convert("RGB")
    w, h = image.size
    scale = size / min(w, h)
    nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
    image = image.resize((nw, nh), Image.BICUBIC)
    left, top = (nw - size) // 2, (nh - size) // 2
    return np.asarray(image.crop((left, top, left + size, top + size)), np.uint8)


def load_images(paths: Sequence[str], img_size: int) -> np.ndarray:
    """Image files -> normalized float32 `[N, img_size, img_size, 3]`."""
    from PIL import Image

    out = []
    for path in paths:
        if not os.path.isfile(path):
            raise ValueError(f"image file {path!r} does not exist")
        with Image.open(path) as im:
            out.append(_square(im, img_size))
    return normalize(np.stack(out))


def default_images(img_size: int, names: Sequence[str] = DEFAULT_IMAGES) -> np.ndarray:
    """Photos bundled with scikit-image -> normalized float32 `[N, img_size, img_size, 3]`."""
    import skimage.data
    from PIL import Image

    photos = [Image.fromarray(getattr(skimage.data, name)()) for name in names]
    return normalize(np.stack([_square(photo, img_size) for photo in photos]))


# ----------------------------------------------------------------------------- checkpoints
def restore_mae(workdir, step: int | None = None, **overrides):
    """Rebuild the `MAE` of a pretraining run and load its parameters (read-only).

    `workdir`: a run directory holding `checkpoints/` (or that directory itself). `step`:
    default the newest intact one. The architecture comes from the checkpoint's meta;
    `overrides` replace config fields (e.g. `img_size=448`: the position embeddings are fixed
    sin-cos, so any multiple of the patch size works). Returns `(model, step)`.
    """
    loaded = loader.load(workdir, step=step, **overrides)
    if loaded.kind != "mae":
        raise ValueError(f"{loaded.describe()}: a classifier has no decoder to reconstruct with")
    return loaded.model, loaded.step


# ----------------------------------------------------------------------------- CLI
PROG = "python -m mae_jax.visualize"


def define_flags(fv: flags.FlagValues) -> None:
    """The command's flags, in `fv` (`flags.FLAGS` for the command line)."""
    flags.DEFINE_string("output", None, "PNG file to write", flag_values=fv)
    flags.DEFINE_multi_string(
        "images",
        None,
        "image files (default: photos bundled with scikit-image); more may follow as arguments",
        flag_values=fv,
    )
    flags.DEFINE_string(
        "model",
        None,
        "model preset (default: from the checkpoint, else mae_vit_base_patch16)",
        flag_values=fv,
    )
    flags.DEFINE_string(
        "checkpoint",
        None,
        "pretraining workdir (with checkpoints/) or checkpoints directory",
        flag_values=fv,
    )
    flags.DEFINE_integer("step", None, "checkpoint step (default: latest)", flag_values=fv)
    flags.DEFINE_integer("img-size", None, "image size (default: the model's)", flag_values=fv)
    flags.DEFINE_float("mask-ratio", 0.75, "fraction of patches masked", flag_values=fv)
    flags.DEFINE_integer("seed", 0, "seed of the masks (and a random model)", flag_values=fv)


def options(fv: flags.FlagValues, args: Sequence[str]) -> types.SimpleNamespace:
    """The parsed flags; positional `args` are further image files. `CommandLineError` for a
    missing `--output` or `--step` without `--checkpoint`."""
    if fv["output"].value is None:
        raise CommandLineError("--output is required")
    if fv["step"].value is not None and fv["checkpoint"].value is None:
        raise CommandLineError("--step needs --checkpoint")
    names = ("output", "model", "checkpoint", "step", "img-size", "mask-ratio", "seed")
    opts = {name.replace("-", "_"): fv[name].value for name in names}
    return types.SimpleNamespace(images=[*(fv["images"].value or ()), *args], **opts)


def run(args) -> str:
    """Write the PNG grid for the options `args`; its path. Errors raise ValueError / OSError."""
    # The persistent compilation cache, as training and the benchmark use it: a second run of
    # the same model loads its programs from disk.
    compile_cache.enable(compile_cache.AUTO)
    # CPU-friendly execution of any trained config: XLA attention, no remat.
    overrides = dict(attention_impl="xla", remat="none")
    if args.img_size is not None:
        overrides["img_size"] = args.img_size
    if args.checkpoint is not None:
        model, step = restore_mae(args.checkpoint, args.step, **overrides)
        if args.model is not None and args.model != model.config.name:
            warnings.warn(
                f"--model {args.model} ignored: the checkpoint holds {model.config.name}",
                stacklevel=2,
            )
        print(f"loaded {model.config.name} from {args.checkpoint} at step {step}")
    else:
        name = args.model or "mae_vit_base_patch16"
        model = models.create(name, seed=args.seed, **overrides)
        warnings.warn(
            f"no --checkpoint given: {name} is RANDOMLY INITIALIZED; its "
            f"reconstructions are meaningless",
            stacklevel=1,
        )
    size = model.config.img_size
    images = load_images(args.images, size) if args.images else default_images(size)
    grid = reconstruction_grid(
        model, images, key=jax.random.key(args.seed), mask_ratio=args.mask_ratio
    )
    save_png(args.output, grid)
    print(
        f"wrote {args.output}: {grid.shape[1]}x{grid.shape[0]}, {len(images)} rows of "
        f"{' | '.join(PANELS)}"
    )
    return args.output


def main(argv: Sequence[str]) -> int:
    """`python -m mae_jax.visualize ARGV...` in this process: `main(["--output", ...])`.
    Returns the exit status: 0, 1 (failed) or 2 (bad command line, one line `error: ...`)."""
    return cli.call(PROG, define_flags, options, cli.reporting(run), argv)


if __name__ == "__main__":
    define_flags(flags.FLAGS)
    cli.run_command(options, cli.reporting(run))
