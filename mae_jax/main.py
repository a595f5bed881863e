"""Entry point: `python -m mae_jax.main --config=configs/mae_vit_base.py --workdir=DIR`.

Override any config key with `--config.key=value` (e.g. `--config.batch_size=256`). Rerunning
the same command on the same workdir resumes from its latest complete checkpoint. On several
hosts, `jax.distributed` is initialized first: automatically on Cloud TPU VMs, or from
`--coordinator_address`, `--num_processes` and `--process_id` elsewhere (e.g. SLURM).

A bad command line (an unknown `--config.KEY`, a value of the wrong type, a missing or broken
config file) ends in one line `error: ...` on stderr and exit status 2, before anything is
written; an invalid config (e.g. `--config.model.num_heads` not dividing `embed_dim`) or a
failed run in `error: ...` and exit status 1. A Ctrl-C saves the last completed step like a
preemption notice, then exits with status 130 (a second Ctrl-C exits at once).
"""

from __future__ import annotations

import importlib
import os
import sys

import jax
from absl import app, flags, logging
from ml_collections import config_flags

from mae_jax import cli, train

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


# `app.run`'s flag parser: absl's, the `--config.KEY` overrides checked first (`cli`); a bad
# command line ends in one line `error: ...` on stderr and exit status 2 instead of a traceback.
parse_flags = cli.config_flags_parser()


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # TensorFlow's C++ INFO and WARNING lines
    cli.quiet_library_logs()
    cli.import_tensorflow_quietly()  # the input pipeline and TensorBoard import it later
    init_distributed()
    config = _CONFIG.value
    task = config.get("task", "pretrain")
    if task not in TASKS:
        raise app.UsageError(f"config.task={task!r} is not one of {sorted(TASKS)}")
    module, function = TASKS[task].split(":")
    entry = getattr(importlib.import_module(module), function)
    try:
        entry(config, _WORKDIR.value)
    except (ValueError, train.TrainingError) as e:
        logging.error("%s", e)
        print(f"error: {e}", file=sys.stderr, flush=True)
        sys.exit(1)


def interrupted(error: KeyboardInterrupt) -> int:
    """Says how a Ctrl-C ended the process and returns its exit status (130, as a shell's)."""
    if isinstance(error, train.Stopped):  # the last completed step was saved and announced
        print(error, flush=True)
    else:
        print("error: interrupted by Ctrl-C; nothing was saved", file=sys.stderr, flush=True)
    return 130


if __name__ == "__main__":
    try:
        app.run(main, flags_parser=parse_flags)
    except KeyboardInterrupt as e:
        sys.exit(interrupted(e))
