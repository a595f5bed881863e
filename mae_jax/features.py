"""Features of a folder of images (or of a data set split) from any checkpoint `mae_jax.load`
reads, written to one `.npz`:

    python -m mae_jax.features --checkpoint PATH --images DIR_OR_GLOB [...] --output feats.npz
        [--pool cls|mean] [--batch_size 256] [--step N] [--model PRESET]
    python -m mae_jax.features --checkpoint PATH --config configs/smoke.py [--split validation]
        [--limit N] --output feats.npz

Images: every image file (`.jpg`, `.png`, ...) under a directory (recursively, sorted), or the
files a glob matches; each resized and centre-cropped as the evaluation input
(`augment.center_crop_eval`: shorter side to `img_size / 0.875`, bicubic, ImageNet
normalization). With `--config`, the examples of a split of the config's `data` block, read by
the data pipeline's eval iterator (and their labels kept).

Features `[N, D]` float32: an MAE's encoder on all patches, the cls token after the final norm
(`--pool cls`, the default: the paper's linear probe reads it) or the mean of the normed patch
tokens (`--pool mean`); a classifier's own pooled feature (what its head reads: `fc_norm` of the
patch mean, or the normed cls token), so `--pool` must be its pooling. The forward is one jitted
program over all devices, the batch sharded on the `data` axis, as the kNN monitor's
(`sharding.collect`, shared with it); every process reads its own rows.

The `.npz` holds `features [N, D]`, `names [N]` (paths relative to the directory, or as the glob
matched; `split[index]` with `--config`), `labels [N]` (with `--config`), `skipped` (files that
could not be read, each warned about) and `checkpoint`, `model`, `step`, `pool`. A bad command
line ends in one line `error: ...` and exit status 2, a failure in `error: ...` and status 1.
"""

from __future__ import annotations

import glob
import math
import os
import re
import sys
import time
import types
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import jax
import numpy as np
from absl import flags
from flax import nnx

from mae_jax import cli, loader
from mae_jax import sharding as shd
from mae_jax.cli import CommandLineError
from mae_jax.data import augment, pipeline
from mae_jax.data.lazy_tf import tf_module
from mae_jax.data.sources import IMAGE_EXTENSIONS
from mae_jax.evaluate import knn
from mae_jax.models.classifier import ViTClassifier
from mae_jax.spec import first_line

POOLS = ("cls", "mean")
PROG = "python -m mae_jax.features"


# ----------------------------------------------------------------------------- extraction
def pooled(model, images, pool: str):
    """`[N, D]` float32 features of normalized images `[N, H, W, C]` (see the module
    docstring): an MAE's cls token or patch mean, a classifier's own pooled feature."""
    if pool not in POOLS:
        raise ValueError(f"pool must be one of {POOLS}, got {pool!r}")
    if isinstance(model, ViTClassifier):
        own = "mean" if model.global_pool else "cls"
        if pool != own:
            raise ValueError(
                f"the classifier pools by {own!r} (what its head reads), not {pool!r}: use "
                f"pool {own!r}"
            )
        return model.features(images)
    return knn.encoder_features(model, images, global_pool=pool == "mean")


def program(model, mesh, pool: str):
    """`(run, state)`: `run(state, {'image' [B, H, W, C], 'mask' [B], ...})` -> `{'features'
    [B, D], 'mask', ...}` (the other batch entries passed through), jitted over `mesh` with
    the batch on its data axes; `state` is `model`'s, replicated."""
    graphdef, state = nnx.split(model)
    state = jax.device_put(state, shd.replicated(mesh))

    def run(state, batch):
        out = dict(batch)
        out["features"] = pooled(nnx.merge(graphdef, state), out.pop("image"), pool)
        return out

    return jax.jit(run, out_shardings=shd.replicated(mesh)), state


# ----------------------------------------------------------------------------- images
def list_images(patterns: Sequence[str]) -> tuple[list[str], list[str]]:
    """`(paths, names)` of the image files under directories (recursively, sorted; names
    relative to the directory) or matched by globs (sorted; names as matched), in argument
    order. ValueError when a pattern finds nothing."""
    paths, names = [], []
    for pattern in patterns:
        if os.path.isdir(pattern):
            found = sorted(
                os.path.join(root, f)
                for root, _, files in os.walk(pattern)
                for f in files
                if f.lower().endswith(IMAGE_EXTENSIONS)
            )
            names += [os.path.relpath(f, pattern) for f in found]
        else:
            found = sorted(f for f in glob.glob(pattern, recursive=True) if os.path.isfile(f))
            names += found
        paths += found
        if not found:
            raise ValueError(
                f"--images {pattern!r} finds no image file; expected a directory holding "
                f"images ({', '.join(IMAGE_EXTENSIONS)}) or a glob such as 'photos/*.jpg'"
            )
    return paths, names


def image_batches(paths: Sequence[str], img_size: int, global_batch: int, skipped: list):
    """Host-local batches `{'image' float32 [B/P, S, S, 3], 'mask' [B/P]}` of `paths` (this
    process's rows, see `sharding.collect`), eval-cropped; unreadable files are masked out,
    warned about and appended to `skipped`."""
    tf = tf_module()
    p, pc = jax.process_index(), jax.process_count()
    local = global_batch // pc
    mine = list(paths[p::pc])
    num_batches = math.ceil(math.ceil(len(paths) / pc) / local)
    blank = (np.zeros((img_size, img_size, 3), np.float32), False)

    def read(path):
        try:
            data = tf.io.read_file(path)
            return np.asarray(augment.center_crop_eval(data, img_size)), True
        except (tf.errors.OpError, ValueError) as e:
            why = re.sub(r"\{\{.*?\}\}\s*|\s*\[Op:.*$", "", first_line(e))
            print(f"warning: skipped {path}: {why}", file=sys.stderr, flush=True)
            skipped.append(path)
            return blank

    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        for i in range(num_batches):
            chunk = mine[i * local : (i + 1) * local]
            rows = list(pool.map(read, chunk)) + [blank] * (local - len(chunk))
            yield {"image": np.stack([r[0] for r in rows]), "mask": np.array([r[1] for r in rows])}


class Progress:
    """`done/total, per second, ETA` on one stderr line, rewritten in place (process 0), after
    each global batch of `batch` examples (the last one may be partly padding)."""

    def __init__(self, total: int, batch: int, what: str = "images"):
        self.total, self.batch, self.what, self.t0 = total, batch, what, time.perf_counter()

    def __call__(self, kept: int, batches: int) -> None:
        if jax.process_index():
            return
        done = min(batches * self.batch, self.total)
        rate = done / max(time.perf_counter() - self.t0, 1e-9)
        bar = "#" * (20 * done // max(self.total, 1))
        print(
            f"\rfeatures: {done}/{self.total} {self.what} [{bar:<20}] {rate:.1f}/s, "
            f"ETA {(self.total - done) / max(rate, 1e-9):.0f} s",
            end="\n" if done >= self.total else "",
            file=sys.stderr,
            flush=True,
        )


# ----------------------------------------------------------------------------- command
def compute(args) -> dict[str, np.ndarray]:
    """The `.npz` contents for the options `args` (see `define_flags`)."""
    loaded = loader.load(args.checkpoint, step=args.step, model=args.model, attention_impl="xla")
    pool = args.pool or ("mean" if loaded.head is not None and loaded.head.global_pool else "cls")
    mesh = shd.make_mesh({"data": -1, "fsdp": 1, "tensor": 1})
    batch = args.batch_size
    if batch % shd.data_parallel_size(mesh):
        raise ValueError(
            f"--batch_size {batch} is not divisible by the {shd.data_parallel_size(mesh)} "
            f"devices; use a multiple"
        )
    run, state = program(loaded.model, mesh, pool)
    print(f"loaded {loaded.describe()}", file=sys.stderr, flush=True)
    skipped: list[str] = []
    if args.config is not None:
        data_config = cli.load_config(args.config).data
        split = args.split or data_config.eval_split
        if int(data_config.image_size) != loaded.model.config.img_size:
            raise ValueError(
                f"the config's data.image_size {data_config.image_size} is not the model's "
                f"img_size {loaded.model.config.img_size}"
            )
        info = pipeline.dataset_info(data_config)
        size = info.num_eval_examples if split == data_config.eval_split else None
        data = pipeline.create_eval_iterator(data_config, global_batch_size=batch, split=split)
        total = min(x for x in (args.limit, size, len(data) * batch) if x is not None)
        try:
            out = shd.collect(
                run, state, data, mesh, limit=args.limit, progress=Progress(total, batch)
            )
        finally:
            data.close()
        out["names"] = np.array([f"{split}[{i}]" for i in out["index"]])
        out["labels"] = out.pop("label")
    else:
        paths, names = list_images(args.images)
        batches = image_batches(paths, loaded.model.config.img_size, batch, skipped)
        out = shd.collect(run, state, batches, mesh, progress=Progress(len(paths), batch))
        out["names"] = np.array(names)[out["index"]] if out else np.array([], str)
    out.pop("index", None)
    if "features" not in out or not len(out["features"]):
        raise ValueError("no image could be read; nothing to write")
    out.update(
        skipped=np.array(skipped, str),
        checkpoint=np.array(loaded.source),
        model=np.array(loaded.preset),
        step=np.array(-1 if loaded.step is None else loaded.step),
        pool=np.array(pool),
    )
    return out


def define_flags(fv: flags.FlagValues) -> None:
    """The command's flags, in `fv` (`flags.FLAGS` for the command line)."""
    fv_kw = {"flag_values": fv}
    flags.DEFINE_string("checkpoint", None, "workdir or PyTorch file (mae_jax.load)", **fv_kw)
    flags.DEFINE_integer("step", None, "a workdir's checkpoint step (default: newest)", **fv_kw)
    flags.DEFINE_string("model", None, "preset of a PyTorch file", **fv_kw)
    flags.DEFINE_multi_string(
        "images", None, "directory of images or glob; more may follow as arguments", **fv_kw
    )
    flags.DEFINE_string("config", None, "config file whose data block to read", **fv_kw)
    flags.DEFINE_string(
        "split", None, "with --config: the split (default: its eval split)", **fv_kw
    )
    flags.DEFINE_integer("limit", None, "with --config: the first N examples", **fv_kw)
    flags.DEFINE_string("output", None, ".npz file to write", **fv_kw)
    flags.DEFINE_string("pool", None, "cls or mean (default: cls; a classifier's own)", **fv_kw)
    flags.DEFINE_integer("batch_size", 256, "global batch", **fv_kw)


def options(fv: flags.FlagValues, args: Sequence[str]) -> types.SimpleNamespace:
    """The parsed flags; positional `args` are further `--images`. `CommandLineError` for a
    missing or contradictory flag."""
    keys = "checkpoint step model config split limit output pool batch_size".split()
    o = types.SimpleNamespace(
        **{k: fv[k].value for k in keys},
        images=[*(fv["images"].value or ()), *args],
    )
    if not o.checkpoint:
        raise CommandLineError("--checkpoint is required (a workdir or a PyTorch file)")
    if not o.output:
        raise CommandLineError("--output is required (an .npz file)")
    if bool(o.images) == bool(o.config):
        raise CommandLineError("give either --images (a directory or glob) or --config")
    if not o.config and (o.split or o.limit is not None):
        raise CommandLineError("--split and --limit go with --config")
    if o.pool is not None and o.pool not in POOLS:
        raise CommandLineError(f"--pool {o.pool!r} is not one of {', '.join(POOLS)}")
    for key in ("batch_size", "limit"):
        if getattr(o, key) is not None and getattr(o, key) < 1:
            raise CommandLineError(f"--{key} {getattr(o, key)} must be at least 1")
    return o


def run(args) -> str:
    """Write the `.npz` of the options `args`; its path."""
    out = compute(args)
    if jax.process_index() == 0:
        os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
        np.savez(args.output, **out)
        n, d = out["features"].shape
        skipped = f", {len(out['skipped'])} unreadable skipped" if len(out["skipped"]) else ""
        print(f"wrote {args.output}: features [{n}, {d}] ({out['pool']} pool), names{skipped}")
    return args.output


def main(argv: Sequence[str]) -> int:
    """`python -m mae_jax.features ARGV...` in this process; the exit status (0, 1 or 2)."""
    return cli.call(PROG, define_flags, options, cli.reporting(run), argv)


if __name__ == "__main__":
    define_flags(flags.FLAGS)
    cli.run_command(options, cli.reporting(run))
