"""Command line: export a pretraining workdir's checkpoint to PyTorch files, import them back.

    python -m mae_jax.convert export --workdir DIR [--step N] --format official|timm|hf \
        --output PATH [--img-size S] [--force]
    python -m mae_jax.convert import --input PATH --model NAME --workdir DIR \
        [--set FIELD=VALUE ...] [--seed S] [--ignore-unexpected]

A workdir keeps its Orbax checkpoints under `DIR/checkpoints/` (`mae_jax.checkpointing`); each
step's state holds `'params'` (our params tree) and its meta `'model'` (the model config as a
dict). `import` writes step 0 with state `{'params': ...}` and meta `{'model': ...,
'params_only': True, 'source': ...}`, from which pretraining resumes (with a fresh optimizer)
and evaluation starts.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import warnings

import numpy as np

CHECKPOINT_SUBDIR = "checkpoints"
OUTPUT_HINT = {
    "official": "a .pth file",
    "timm": "a .safetensors (or .pth) file",
    "hf": "a directory",
}


class CliError(Exception):
    """A user-facing error: printed without a traceback, exit status 1."""


def checkpoint_dir(workdir: str) -> str:
    """`WORKDIR/checkpoints` (local paths made absolute; `gs://...` kept)."""
    if "://" in workdir:
        return workdir.rstrip("/") + "/" + CHECKPOINT_SUBDIR
    return os.path.join(os.path.abspath(os.path.expanduser(workdir)), CHECKPOINT_SUBDIR)


def _is_dir(path: str) -> bool:
    from etils import epath  # pylint: disable=import-outside-toplevel

    return epath.Path(path).is_dir()


def _open_checkpointer(directory: str):
    from mae_jax.checkpointing import Checkpointer  # pylint: disable=import-outside-toplevel

    return Checkpointer(directory, max_to_keep=None, async_save=False, enable_preemption_save=False)


def restore_params(checkpoint_root, step: int, config):
    """Only `state['params']` of checkpoint `step` (no optimizer state is read), as numpy."""
    from mae_jax.convert.mapping import abstract_params  # pylint: disable=import-outside-toplevel

    ckpt = _open_checkpointer(checkpoint_root)
    try:
        return ckpt.restore_partial(step, {"params": abstract_params(config)})["params"]
    finally:
        ckpt.close()


def _count(sd) -> tuple[int, int]:
    return len(sd), int(sum(np.size(v) for v in sd.values()))


# ----------------------------------------------------------------------------- export
def run_export(args) -> None:
    from mae_jax import convert  # pylint: disable=import-outside-toplevel
    from mae_jax.models import resolve  # pylint: disable=import-outside-toplevel

    fmt = args.format
    out = os.path.abspath(os.path.expanduser(args.output))
    if (
        os.path.lexists(out)
        and not args.force
        and not (fmt == "hf" and os.path.isdir(out) and not os.listdir(out))
    ):
        raise CliError(f"{out} already exists; pass --force to overwrite it")
    if fmt != "hf" and not out.endswith((".pth", ".pt", ".safetensors")):
        raise CliError(
            f"--output for --format {fmt} must be {OUTPUT_HINT[fmt]} "
            f"(.pth, .pt or .safetensors), got {out}"
        )
    if fmt == "hf" and out.endswith((".pth", ".pt", ".safetensors")):
        raise CliError(f"--format hf writes a directory; got the file name {out}")
    ckpt_root = checkpoint_dir(args.workdir)
    if not _is_dir(ckpt_root):
        raise CliError(f"no checkpoint directory {ckpt_root}: is --workdir a pretraining workdir?")
    ckpt = _open_checkpointer(ckpt_root)
    try:
        steps = ckpt.all_steps()
        if not steps:
            raise CliError(f"no complete checkpoint in {ckpt_root}")
        step = steps[-1] if args.step is None else args.step
        if step not in steps:
            raise CliError(f"no checkpoint for step {step} in {ckpt_root}; available: {steps}")
        meta = ckpt.read_meta(step)
        if "model" not in meta:
            raise CliError(
                f"checkpoint {step} in {ckpt_root} has no 'model' config in its "
                f"meta (keys: {sorted(meta)})"
            )
        config = resolve(meta["model"])
        print(f"reading params of step {step} ({config.name}) from {ckpt_root}", file=sys.stderr)
    finally:
        ckpt.close()
    params = restore_params(ckpt_root, step, config)
    sd = convert.params_to_pytorch(params, config, fmt, img_size=args.img_size)
    convert.save(sd, out, fmt, config, img_size=args.img_size, overwrite=args.force)
    n, numbers = _count(sd)
    print(
        f"wrote {out}: {fmt} format, {n} tensors, {numbers:,} numbers "
        f"(step {step}, image size {args.img_size or config.img_size})"
    )


# ----------------------------------------------------------------------------- import
def _parse_overrides(items) -> dict:
    out = {}
    for item in items or ():
        if "=" not in item:
            raise CliError(f"--set expects FIELD=VALUE, got {item!r}")
        key, text = item.split("=", 1)
        try:
            value = json.loads(text)
        except json.JSONDecodeError:
            value = text
        out[key.strip()] = value
    return out


def run_import(args) -> None:
    import jax  # pylint: disable=import-outside-toplevel
    from flax import nnx  # pylint: disable=import-outside-toplevel

    from mae_jax import convert  # pylint: disable=import-outside-toplevel
    from mae_jax.models import resolve  # pylint: disable=import-outside-toplevel

    config = resolve(args.model, **_parse_overrides(args.set))
    src = os.path.abspath(os.path.expanduser(args.input))
    if not os.path.exists(src):
        raise CliError(f"--input {src} does not exist")
    ckpt_root = checkpoint_dir(args.workdir)
    if _is_dir(ckpt_root):
        ckpt = _open_checkpointer(ckpt_root)
        try:
            steps = ckpt.all_steps()
        finally:
            ckpt.close()
        if steps:
            raise CliError(
                f"{ckpt_root} already holds checkpoints (steps {steps}); import into "
                f"a new --workdir"
            )
    converted = convert.read_pytorch(src, config, strict=not args.ignore_unexpected)
    if not converted.sincos:
        warnings.warn(
            "the file's position tables are not the fixed sin-cos ones; checkpoints "
            "keep parameters only, so the model will use its fixed sin-cos tables",
            stacklevel=2,
        )
    model = convert.build_model(converted, config, seed=args.seed)
    params = jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(model, nnx.Param)))
    meta = {
        "model": dataclasses.asdict(config),
        "params_only": True,
        "source": src,
        "source_format": converted.format,
    }
    ckpt = _open_checkpointer(ckpt_root)
    try:
        ckpt.save(0, {"params": params}, meta, force=True)
        ckpt.wait()
    finally:
        ckpt.close()
    decoder = "" if converted.has_decoder else ", decoder freshly initialized"
    print(
        f"wrote step 0 of {ckpt_root}: {config.name} from {src} "
        f"({converted.format} format{decoder})"
    )


# ----------------------------------------------------------------------------- main
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m mae_jax.convert",
        description="Convert MAE weights between mae-jax checkpoints and PyTorch files "
        "(official MAE .pth, timm, Hugging Face ViTMAEForPreTraining).",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    ex = sub.add_parser("export", help="checkpoint of a workdir -> PyTorch file")
    ex.add_argument("--workdir", required=True, help="pretraining workdir (holds checkpoints/)")
    ex.add_argument("--step", type=int, default=None, help="checkpoint step (default: latest)")
    ex.add_argument("--format", required=True, choices=("official", "timm", "hf"))
    ex.add_argument(
        "--output",
        required=True,
        help="official: .pth; timm: .safetensors or .pth; hf: a directory",
    )
    ex.add_argument(
        "--img-size",
        type=int,
        default=None,
        help="position tables for this image size (default: the model's)",
    )
    ex.add_argument("--force", action="store_true", help="overwrite an existing output")
    im = sub.add_parser("import", help="PyTorch file -> step-0 checkpoint in a new workdir")
    im.add_argument(
        "--input",
        required=True,
        help=".pth / .safetensors file or Hugging Face directory (format detected)",
    )
    im.add_argument("--model", required=True, help="model preset, e.g. mae_vit_base_patch16")
    im.add_argument("--workdir", required=True, help="workdir to create the checkpoint in")
    im.add_argument(
        "--set",
        action="append",
        metavar="FIELD=VALUE",
        help="model config override, e.g. --set img_size=448 (repeatable)",
    )
    im.add_argument(
        "--seed",
        type=int,
        default=0,
        help="seed for parts the file lacks (the decoder of encoder-only files)",
    )
    im.add_argument(
        "--ignore-unexpected",
        action="store_true",
        help="drop keys the model does not have (e.g. a classifier head)",
    )
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    with warnings.catch_warnings():  # restores the warning machinery on exit
        warnings.simplefilter("always", UserWarning)
        warnings.showwarning = lambda message, *a, **k: print(
            f"warning: {message}", file=sys.stderr
        )
        try:
            if args.command == "export":
                run_export(args)
            else:
                run_import(args)
        except (CliError, ValueError, FileExistsError, FileNotFoundError, ImportError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 1
    return 0
