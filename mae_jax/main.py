"""Entry point: `python -m mae_jax.main --config=configs/mae_vit_base.py --workdir=DIR`.

Override any config key with `--config.key=value` (e.g. `--config.batch_size=256`). Rerunning
the same command on the same workdir resumes from its latest complete checkpoint. On several
hosts, `jax.distributed` is initialized first: automatically on Cloud TPU VMs, or from
`--coordinator_address`, `--num_processes` and `--process_id` elsewhere (e.g. SLURM).

A bad command line (an unknown `--config.KEY`, a value of the wrong type, a missing or broken
config file) ends in one line `error: ...` on stderr and exit status 2, before anything is
written; an invalid config (e.g. `--config.model.num_heads` not dividing `embed_dim`) or a
failed run in `error: ...` and exit status 1.
"""

from __future__ import annotations

import difflib
import importlib
import os
import re
import sys
from typing import Any

from absl import app, flags, logging
from ml_collections import config_dict, config_flags

from mae_jax import cli, config_file
from mae_jax.cli import CommandLineError

_CONFIG = config_flags.DEFINE_config_file("config", None, "Training config file.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs and metrics.")
_COORDINATOR = flags.DEFINE_string(
    "coordinator_address", None, "host:port of process 0, for multi-process runs off TPU VMs."
)
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Total number of processes.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index.")
_DISTRIBUTED = flags.DEFINE_enum(
    "distributed",
    "auto",
    ["auto", "on", "off"],
    "jax.distributed.initialize(): auto = on TPU pods or when --coordinator_address is given.",
)
flags.mark_flags_as_required(["config", "workdir"])


# config.task -> "module:function(config, workdir)"
TASKS = {
    "pretrain": "mae_jax.tasks.pretrain:train_and_evaluate",
    "linear_probe": "mae_jax.tasks.linear_probe:train_and_evaluate",
    "finetune": "mae_jax.tasks.finetune:train_and_evaluate",
    "evaluate": "mae_jax.tasks.evaluate:run",
}


def _on_tpu_pod() -> bool:
    hosts = os.environ.get("TPU_WORKER_HOSTNAMES", "")
    return len([h for h in hosts.split(",") if h]) > 1


def init_distributed() -> None:
    import jax

    explicit = _COORDINATOR.value is not None
    mode = _DISTRIBUTED.value
    if mode == "off" or (mode == "auto" and not explicit and not _on_tpu_pod()):
        return
    if explicit:
        if _NUM_PROCESSES.value is None or _PROCESS_ID.value is None:
            raise app.UsageError("--coordinator_address needs --num_processes and --process_id")
        if not 0 <= _PROCESS_ID.value < _NUM_PROCESSES.value:
            raise app.UsageError(
                f"--process_id={_PROCESS_ID.value} must be in [0, {_NUM_PROCESSES.value})"
            )
        jax.distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
    else:
        jax.distributed.initialize()
    logging.info(
        "process %d of %d, %d local / %d global devices",
        jax.process_index(),
        jax.process_count(),
        jax.local_device_count(),
        jax.device_count(),
    )


# ------------------------------------------------------------------ command-line checking
# --config.a.b=v, --config.a.b v, --noconfig.a.b (absl also accepts one leading dash)
_OVERRIDE = re.compile(r"--?(no)?config\.([^=]*)(?:=(.*))?", re.DOTALL)
# type of a config field -> (absl parser, what it expects)
_TYPE_CHECKS = {
    bool: (flags.BooleanParser(), "a bool (true or false)"),
    int: (flags.IntegerParser(), "an int"),
    float: (flags.FloatParser(), "a float"),
}


def _config_path(args: list[str]) -> str | None:
    """The value of the last `--config` in `args` (None without one)."""
    path = None
    for i, arg in enumerate(args):
        name, eq, value = arg.lstrip("-").partition("=")
        if arg.startswith("-") and name == "config":
            path = value if eq else (args[i + 1] if i + 1 < len(args) else None)
    return path


def load_config(path: str) -> Any:
    """`mae_jax.config_file.load`, its errors as `CommandLineError` (exit 2)."""
    try:
        return config_file.load(path)
    except config_file.ConfigFileError as e:
        raise CommandLineError(str(e)) from None


def _field_type(config: config_dict.ConfigDict, key: str) -> type | None:
    """The type of `config.KEY`; `CommandLineError` when `config` has no such key (None when
    the key is left to ml_collections: indexing, or a group that is None)."""
    holder, parts = config, key.split(".")
    for depth, part in enumerate(parts):
        if "[" in part or holder is None:
            return None
        where = ".".join(["config", *parts[:depth]])
        if not isinstance(holder, config_dict.ConfigDict):
            raise CommandLineError(
                f"unknown config key {key!r}: {where} is {holder!r}, not a group of keys"
            )
        if part not in holder:
            known = sorted(holder.keys())
            close = difflib.get_close_matches(part, known, n=1)
            prefix = "".join(p + "." for p in parts[:depth])
            hint = (
                f"did you mean {prefix + close[0]!r}?"
                if close
                else f"{where} has keys {', '.join(known)}"
            )
            raise CommandLineError(f"unknown config key {key!r}; {hint}")
        if depth == len(parts) - 1:
            return holder.get_type(part)
        holder = holder[part]
    return None


def check_command_line(argv: list[str]) -> None:
    """Load the `--config` file and check each `--config.KEY[=VALUE]` of `argv` against it
    (key, and type of value), raising `CommandLineError` for the first problem."""
    args = flags.FLAGS.read_flags_from_files(argv[1:], force_gnu=False)
    if "--" in args:
        args = args[: args.index("--")]
    path = _config_path(args)
    if path is None:
        return  # absl reports the missing --config
    config = load_config(path)
    if not isinstance(config, config_dict.ConfigDict):
        return
    for i, arg in enumerate(args):
        m = _OVERRIDE.fullmatch(arg)
        if not m:
            continue
        negated, key, value = m.groups()
        field_type = _field_type(config, key)
        if negated:
            continue
        if value is None and field_type is not bool and i + 1 < len(args):
            value = args[i + 1]  # `--config.KEY VALUE`
        if value is not None and field_type in _TYPE_CHECKS:
            parser, expected = _TYPE_CHECKS[field_type]
            try:
                parser.parse(value)
            except (TypeError, ValueError):
                raise CommandLineError(f"config.{key} must be {expected}, got {value!r}") from None


def _check_and_parse(argv: list[str]) -> list[str]:
    try:
        check_command_line(argv)
        return flags.FLAGS(argv)
    except (AttributeError, KeyError, TypeError, ValueError) as e:  # ml_collections overrides
        raise CommandLineError(
            f"cannot apply the --config overrides: {cli.first_line(e)}"
        ) from None


# `app.run`'s flag parser: absl's, but a bad command line ends in one line `error: ...` on stderr
# and exit status 2 (usage error) instead of a traceback.
parse_flags = cli.flags_parser(_check_and_parse)


def check_model(config) -> None:
    """Refuse an invalid `config.model` (ValueError) before anything is written to the workdir.
    A model without a name (its architecture comes from a checkpoint) is left to the task."""
    from mae_jax import models

    block = config.get("model")
    if not isinstance(block, config_dict.ConfigDict) or not block.get("name"):
        return
    try:
        models.resolve(block)
    except ValueError as e:
        raise ValueError(f"config.model: {e}") from None


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # TensorFlow's C++ INFO and WARNING lines
    cli.quiet_library_logs()
    cli.import_tensorflow_quietly()  # the input pipeline and TensorBoard import it later
    init_distributed()
    from mae_jax import train

    config = _CONFIG.value
    task = config.get("task", "pretrain")
    if task not in TASKS:
        raise app.UsageError(f"config.task={task!r} is not one of {sorted(TASKS)}")
    module, function = TASKS[task].split(":")
    entry = getattr(importlib.import_module(module), function)
    try:
        check_model(config)
        entry(config, _WORKDIR.value)
    except (ValueError, train.TrainingError) as e:
        logging.error("%s", e)
        print(f"error: {e}", file=sys.stderr, flush=True)
        sys.exit(1)


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)
