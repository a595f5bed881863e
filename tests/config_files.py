"""Loading `configs/*.py` files in tests (as `--config=` does), the tiny pretraining and its
command, and weights workdirs written from a model."""

import dataclasses
import os

import jax
import numpy as np
from flax import nnx

from mae_jax import config_file
from mae_jax import workdir as wdir

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# `compiler_options` of test programs compiled for their numbers, not their speed: without LLVM's
# optimizations their CPU compiles take about half the time (they run slower: small programs only).
UNOPTIMIZED = {"xla_backend_optimization_level": 0}


def load_config(path="configs/smoke.py"):
    """`get_config()` of the config file at `path` (relative to the repository root; `FILE:ARG`
    for a variant)."""
    return config_file.load(os.path.join(ROOT, path))


def override(config, **dotted):
    """Set `config` entries by dotted key, e.g. `override(c, **{"optim.lr": 1e-3})`."""
    for key, value in dotted.items():
        target = config
        parts = key.split(".")
        for part in parts[:-1]:
            target = target[part]
        target[parts[-1]] = value
    return config


# configs/smoke.py on the 2-block test model at batch 16, without reconstruction images: the
# base of `main_command` (the real command) and `main_config` (the same config in this process).
MAIN_OVERRIDES = {"model.name": "mae_vit_test", "batch_size": 16, "reconstruction_every_steps": 0}


def main_config(**dotted):
    """The config `main_command` runs, with `dotted` overrides as in `override`."""
    return override(load_config(), **{**MAIN_OVERRIDES, **dotted})


def tiny_pretrain(**dotted):
    """The smoke pretraining on the 2-block test model: batch 16, 6 steps without warm-up, a
    metrics line every 2 steps, checkpoints at 3 and 6, no reconstruction images; `dotted`
    overrides as in `override`."""
    tiny = {"total_steps": 6, "warmup_steps": 0, "log_every_steps": 2, "checkpoint_every_steps": 3}
    return main_config(**{**tiny, **dotted})


def main_command(workdir, *overrides):
    """`python -u -m mae_jax.main` running `main_config()`, plus `overrides`
    (`--config.KEY=VALUE`, later ones win)."""
    import sys

    return [
        sys.executable,
        "-u",
        "-m",
        "mae_jax.main",
        f"--config={ROOT}/configs/smoke.py",
        f"--workdir={workdir}",
        *(f"--config.{k}={v}" for k, v in MAIN_OVERRIDES.items()),
        *overrides,
    ]


def parse_main_flags(argv):
    """main.py's command-line parsing of `argv` in this process: `cli.config_flags_parser` on
    fresh flags with main.py's `--config` (a locked config file, its overrides read from `argv`)
    and `--workdir`, never absl's global ones (an xdist worker runs many tests). Returns the
    parsed `(config, workdir)`; a refusal raises SystemExit (the process's exit status) after
    printing its `error:` line on stderr."""
    from absl import flags
    from ml_collections import config_flags

    from mae_jax import cli

    fv = flags.FlagValues()
    config = config_flags.DEFINE_config_file(
        "config", None, "", flag_values=fv, lock_config=True, sys_argv=argv
    )
    workdir = flags.DEFINE_string("workdir", None, "", flag_values=fv)
    cli.config_flags_parser(fv)(argv)
    return config.value, workdir.value


def write_params_checkpoint(workdir, model):
    """A weights workdir holding `model`'s parameters, as `mae_jax.convert import` writes it."""
    params = jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(model, nnx.Param)))
    meta = {"model": dataclasses.asdict(model.config), "kind": "weights", "source": "test"}
    wdir.write_weights(workdir, {"params": params}, meta)
    return params
