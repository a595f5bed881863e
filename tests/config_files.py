"""Loading `configs/*.py` files in tests (as `--config=` does)."""

import os

from mae_jax import config_file

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
