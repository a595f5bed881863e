"""Command line: export a workdir's checkpoint (an MAE, or a fine-tuned / linear-probed
classifier) to PyTorch files, import them back.

    python -m mae_jax.convert export --workdir DIR [--step N] --format official|timm|hf \
        --output PATH [--img-size S] [--force]
    python -m mae_jax.convert import --input PATH --model NAME --workdir DIR \
        [--set FIELD=VALUE ...] [--seed S] [--ignore-unexpected]

Export reads a workdir read-only (`mae_jax.workdir.Reader`: safe while that run trains), only
the weights of its newest intact checkpoint; a classifier workdir (fine-tuning, linear probing)
is exported with its head (`mae_jax.convert.classifier`). `import` writes a weights workdir:
step 0 with state `{'params': ...}` and meta `{'model': ..., 'kind': 'weights', 'source': ...}`;
runs start from it with `--config.init_from.path=DIR` (it is not a run to resume). A file with a
classifier head (official fine-tuned or linear-probed, timm, HF `ViTForImageClassification`)
becomes a classifier weights workdir (meta: the head; state: also its BatchNorm statistics,
and its position table when not the fixed sin-cos one), for `task=evaluate`; with
`--ignore-unexpected` only its encoder is imported, as MAE weights.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import sys
import types
import warnings
from collections.abc import Sequence

import jax
import numpy as np
from absl import flags
from flax import nnx

from mae_jax import cli, convert
from mae_jax import workdir as wdir
from mae_jax.cli import CommandLineError
from mae_jax.convert import classifier as cc
from mae_jax.convert import files, mapping
from mae_jax.models import resolve

OUTPUT_HINT = {"official": "a .pth file", "timm": "a .safetensors (or .pth) file"}  # hf: a folder


class CliError(Exception):
    """A user-facing error: printed without a traceback, exit status 1."""


# ----------------------------------------------------------------------------- export
def run_export(args) -> None:
    fmt = args.format
    out = os.path.abspath(os.path.expanduser(args.output))
    empty_dir = fmt == "hf" and os.path.isdir(out) and not os.listdir(out)  # hf may fill it
    if os.path.lexists(out) and not args.force and not empty_dir:
        raise CliError(f"{out} already exists; pass --force to overwrite it")
    if fmt != "hf" and not out.endswith((".pth", ".pt", ".safetensors")):
        raise CliError(
            f"--output for --format {fmt} must be {OUTPUT_HINT[fmt]} "
            f"(.pth, .pt or .safetensors), got {out}"
        )
    if fmt == "hf" and out.endswith((".pth", ".pt", ".safetensors")):
        raise CliError(f"--format hf writes a directory; got the file name {out}")
    img_size, hf_cfg, what = args.img_size, None, ""
    _, meta = wdir.checkpoint_meta(wdir.Reader(args.workdir), args.step, "mae-jax")
    if not wdir.is_classifier(meta):
        step, config, params = wdir.read_mae(args.workdir, args.step)
        print(
            f"read the params of step {step} ({config.name}) from {args.workdir}", file=sys.stderr
        )
        sd = convert.params_to_pytorch(params, config, fmt, img_size=img_size)
    else:
        found = wdir.read_classifier(args.workdir, args.step)
        step, config, head = found.step, found.config, found.head
        sd = cc.tree_to_pytorch(
            found.tree,
            config,
            head,
            fmt,
            img_size=img_size,
            pos_embed=found.pos_embed,
            num_batches_tracked=step,
        )
        if fmt == "hf":
            hf_cfg = cc.hf_classifier_config(config, head, img_size)
        what = f", {describe_head(head)}" + (
            ", BatchNorm folded into the head" if head.linear_probe and fmt != "official" else ""
        )
    convert.save(sd, out, fmt, config, img_size=img_size, overwrite=args.force, hf_cfg=hf_cfg)
    n, numbers = len(sd), int(sum(np.size(v) for v in sd.values()))
    print(
        f"wrote {out}: {fmt} format{what}, {n} tensors, {numbers:,} numbers "
        f"(step {step}, image size {args.img_size or config.img_size})"
    )
    if what and fmt == "timm":
        name, kwargs = cc.timm_model(config, head, args.img_size)
        call = ", ".join(f"{k}={v!r}" for k, v in kwargs.items())
        model = f"timm.create_model({name!r}, {call})" if name else f"VisionTransformer({call})"
        print(f"load it in timm: model = {model}; timm.models.load_checkpoint(model, {out!r})")


def describe_head(head) -> str:
    kind = "linear probe" if head.linear_probe else "classifier"
    pool = "global pool + fc_norm" if head.global_pool else "cls token"
    return f"{kind} with {head.num_classes} classes ({pool})"


# ----------------------------------------------------------------------------- import
def _parse_overrides(items) -> dict:
    out = {}
    for item in items or ():
        if "=" not in item:
            raise CliError(f"--set expects FIELD=VALUE, got {item!r}")
        key, text = item.split("=", 1)
        out[key.strip()] = text
        with contextlib.suppress(json.JSONDecodeError):
            out[key.strip()] = json.loads(text)
    return out


def _write_weights(workdir: str, state: dict, config, source: str, fmt: str, **extra) -> str:
    """`state` as a weights workdir (numpy) with the meta every import writes; its root."""
    meta = {"model": dataclasses.asdict(config), "kind": "weights", **extra}
    meta.update(source=source, source_format=fmt)
    return wdir.write_weights(workdir, jax.tree.map(np.asarray, state), meta)


def run_import(args) -> None:
    config = resolve(args.model, **_parse_overrides(args.set))
    src = os.path.abspath(os.path.expanduser(args.input))
    if not os.path.exists(src):
        raise CliError(f"--input {src} does not exist")
    # Refuse a used workdir before the (slow) conversion; write_weights checks again.
    wdir.check_new_weights_dir(args.workdir)
    loaded = files.load_input(src)
    if not args.ignore_unexpected and mapping.classifier_head(loaded.state_dict) is not None:
        return import_classifier(loaded, config, args.workdir)
    converted = convert.read_pytorch(loaded, config, strict=not args.ignore_unexpected)
    if not converted.sincos:
        warnings.warn(
            "the file's position tables are not the fixed sin-cos ones; checkpoints "
            "keep parameters only, so the model will use its fixed sin-cos tables",
            stacklevel=2,
        )
    model = convert.build_model(converted, config, seed=args.seed)
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    root = _write_weights(args.workdir, {"params": params}, config, src, converted.format)
    decoder = "" if converted.has_decoder else ", decoder freshly initialized"
    print(
        f"wrote {root}: {config.name} weights from {src} ({converted.format} format{decoder}); "
        f"start a run from them with --config.init_from.path={root}"
    )


def import_classifier(loaded, config, workdir: str) -> None:
    """A classifier file -> a classifier weights workdir (see the module docstring)."""
    converted = cc.read_classifier(loaded, config)
    model = cc.build_classifier(converted, config)
    state = {"params": nnx.to_pure_dict(nnx.state(model, nnx.Param))}
    stats = nnx.to_pure_dict(nnx.state(model, nnx.BatchStat))
    if jax.tree.leaves(stats):
        state["batch_stats"] = stats
    if not converted.sincos:  # a trained table (the official fine-tuning trains it): kept
        state["pos_embed"] = model.pos_embed.get_value()  # to numpy with the rest
    extra = {**converted.head.meta(), "pos_embed": "sincos" if converted.sincos else "learned"}
    root = _write_weights(workdir, state, config, loaded.source, converted.format, **extra)
    table = "" if converted.sincos else ", its trained position table kept"
    print(
        f"wrote {root}: {config.name} {describe_head(converted.head)} from {loaded.source} "
        f"({converted.format} format{table}); evaluate it with python -m mae_jax.main "
        f"--config=configs/evaluate.py --workdir=EVAL_DIR --config.checkpoint.path={root}"
    )


# ----------------------------------------------------------------------------- main
PROG = "python -m mae_jax.convert"
# subcommand -> (its flags, the required ones)
COMMANDS = {
    "export": (
        ("workdir", "step", "format", "output", "img-size", "force"),
        ("workdir", "format", "output"),
    ),
    "import": (
        ("input", "model", "workdir", "set", "seed", "ignore-unexpected"),
        ("input", "model", "workdir"),
    ),
}


def define_flags(fv: flags.FlagValues) -> None:
    """The flags of both subcommands, in `fv` (`flags.FLAGS` for the command line)."""
    on = {"flag_values": fv}
    flags.DEFINE_string(
        "workdir",
        None,
        "export: pretraining, fine-tuning or linear-probing workdir (holds checkpoints/); "
        "import: workdir to create the checkpoint in",
        **on,
    )
    flags.DEFINE_integer("step", None, "export: checkpoint step (default: latest)", **on)
    flags.DEFINE_enum("format", None, ["official", "timm", "hf"], "export: file format", **on)
    flags.DEFINE_string(
        "output", None, "export: official: .pth; timm: .safetensors or .pth; hf: a directory", **on
    )
    flags.DEFINE_integer(
        "img-size", None, "export: position tables for this image size (default: the model's)", **on
    )
    flags.DEFINE_boolean("force", False, "export: overwrite an existing output", **on)
    flags.DEFINE_string(
        "input",
        None,
        "import: .pth / .safetensors file or Hugging Face directory (format detected)",
        **on,
    )
    flags.DEFINE_string("model", None, "import: model preset, e.g. mae_vit_base_patch16", **on)
    flags.DEFINE_multi_string(
        "set",
        None,
        "import: model config override FIELD=VALUE, e.g. --set img_size=448 (repeatable)",
        **on,
    )
    flags.DEFINE_integer(
        "seed", 0, "import: seed for parts the file lacks (the decoder of encoder-only files)", **on
    )
    flags.DEFINE_boolean(
        "ignore-unexpected",
        False,
        "import: drop keys the model does not have (e.g. a classifier head)",
        **on,
    )


def command(fv: flags.FlagValues, args: Sequence[str]) -> tuple[str, types.SimpleNamespace]:
    """The subcommand named by the positional `args` and its options; `CommandLineError` for
    a missing or unknown subcommand, a missing required flag or another subcommand's flag."""
    if len(args) != 1 or args[0] not in COMMANDS:
        got = f"got {' '.join(args)!r}" if args else "got none"
        raise CommandLineError(f"expected one subcommand, export or import; {got}")
    name = args[0]
    allowed, required = COMMANDS[name]
    for flag in (f for names, _ in COMMANDS.values() for f in names):
        if fv[flag].present and flag not in allowed:
            raise CommandLineError(f"--{flag} is not an option of {name}")
    missing = [f"--{f}" for f in required if fv[f].value is None]
    if missing:
        raise CommandLineError(f"{name} needs {', '.join(missing)}")
    options = {f.replace("-", "_"): fv[f].value for f in allowed}
    return name, types.SimpleNamespace(**options)


def run(name: str, args) -> int:
    """Run subcommand `name` with its `args`: exit status 0, or 1 after `error: ...` on stderr."""
    with warnings.catch_warnings():  # restores the warning machinery on exit
        warnings.simplefilter("always", UserWarning)
        warnings.showwarning = lambda m, *a, **k: print(f"warning: {m}", file=sys.stderr)
        try:
            (run_export if name == "export" else run_import)(args)
        except (CliError, ValueError, OSError, ImportError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 1
    return 0


def _execute(what) -> int:
    return run(*what)


def main(argv: Sequence[str]) -> int:
    """`python -m mae_jax.convert ARGV...` in this process: `main(["export", "--workdir", ...])`.
    Returns the exit status: 0, 1 (failed) or 2 (bad command line, one line `error: ...`)."""
    return cli.call(PROG, define_flags, command, _execute, argv)


def run_app() -> None:
    """`python -m mae_jax.convert`, on the flags `define_flags(flags.FLAGS)` made."""
    cli.run_command(command, _execute)
