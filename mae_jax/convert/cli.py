"""Command line: export a pretraining workdir's checkpoint to PyTorch files, import them back.

    python -m mae_jax.convert export --workdir DIR [--step N] --format official|timm|hf \
        --output PATH [--img-size S] [--force]
    python -m mae_jax.convert import --input PATH --model NAME --workdir DIR \
        [--set FIELD=VALUE ...] [--seed S] [--ignore-unexpected]

Export reads a workdir read-only (`mae_jax.workdir.Reader`: safe while that run trains), only
the params of its newest intact checkpoint. `import` writes a weights workdir: step 0 with
state `{'params': ...}` and meta `{'model': ..., 'kind': 'weights', 'source': ...}`; runs start
from it with `--config.init_from.path=DIR` (it is not a run to resume).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import warnings

import numpy as np

OUTPUT_HINT = {
    "official": "a .pth file",
    "timm": "a .safetensors (or .pth) file",
    "hf": "a directory",
}


class CliError(Exception):
    """A user-facing error: printed without a traceback, exit status 1."""


def restore_params(workdir: str, step: int | None):
    """`(step, config, params)` of a workdir's checkpoint, read-only (`init_from.read_mae`)."""
    from mae_jax import init_from  # noqa: PLC0415

    try:
        return init_from.read_mae(workdir, step)
    except ValueError as e:
        raise CliError(str(e)) from None


def _count(sd) -> tuple[int, int]:
    return len(sd), int(sum(np.size(v) for v in sd.values()))


# ----------------------------------------------------------------------------- export
def run_export(args) -> None:
    from mae_jax import convert  # pylint: disable=import-outside-toplevel

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
    step, config, params = restore_params(args.workdir, args.step)
    print(f"read the params of step {step} ({config.name}) from {args.workdir}", file=sys.stderr)
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
    from mae_jax import workdir as wdir  # pylint: disable=import-outside-toplevel
    from mae_jax.models import resolve  # pylint: disable=import-outside-toplevel

    config = resolve(args.model, **_parse_overrides(args.set))
    src = os.path.abspath(os.path.expanduser(args.input))
    if not os.path.exists(src):
        raise CliError(f"--input {src} does not exist")
    try:  # refuse a used workdir before the (slow) conversion; write_weights checks again
        wdir.check_new_weights_dir(args.workdir)
    except wdir.WorkdirError as e:
        raise CliError(str(e)) from None
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
        "kind": "weights",
        "source": src,
        "source_format": converted.format,
    }
    try:
        root = wdir.write_weights(args.workdir, {"params": params}, meta)
    except wdir.WorkdirError as e:
        raise CliError(str(e)) from None
    decoder = "" if converted.has_decoder else ", decoder freshly initialized"
    print(
        f"wrote {root}: {config.name} weights from {src} ({converted.format} format{decoder}); "
        f"start a run from them with --config.init_from.path={root}"
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
        except (CliError, ValueError, OSError, ImportError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 1
    return 0
