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


def tiny_pretrain(**dotted):
    """The smoke pretraining on the 2-block test model: batch 16, 6 steps without warm-up, a
    metrics line every 2 steps, checkpoints at 3 and 6, no reconstruction images; `dotted`
    overrides as in `override`."""
    c = load_config()
    c.model.name = "mae_vit_test"
    c.batch_size = 16
    c.total_steps = 6
    c.warmup_steps = 0
    c.log_every_steps = 2
    c.checkpoint_every_steps = 3
    c.reconstruction_every_steps = 0
    return override(c, **dotted)


def main_command(workdir, *overrides):
    """`python -u -m mae_jax.main` on configs/smoke.py with the 2-block test model at batch 16
    and no reconstruction images, plus `overrides` (`--config.KEY=VALUE`, later ones win)."""
    import sys

    return [
        sys.executable,
        "-u",
        "-m",
        "mae_jax.main",
        f"--config={ROOT}/configs/smoke.py",
        f"--workdir={workdir}",
        "--config.model.name=mae_vit_test",
        "--config.batch_size=16",
        "--config.reconstruction_every_steps=0",
        *overrides,
    ]


def write_params_checkpoint(workdir, model):
    """A weights workdir holding `model`'s parameters, as `mae_jax.convert import` writes it."""
    params = jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(model, nnx.Param)))
    meta = {"model": dataclasses.asdict(model.config), "kind": "weights", "source": "test"}
    wdir.write_weights(workdir, {"params": params}, meta)
    return params
