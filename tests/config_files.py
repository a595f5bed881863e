"""Loading `configs/*.py` files in tests (as `--config=` does)."""

import importlib.util
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_config(path="configs/smoke.py"):
    """`get_config()` of the config file at `path` (relative to the repository root)."""
    spec = importlib.util.spec_from_file_location("cfg", os.path.join(ROOT, path))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.get_config()


def override(config, **dotted):
    """Set `config` entries by dotted key, e.g. `override(c, **{"optim.lr": 1e-3})`."""
    for key, value in dotted.items():
        target = config
        parts = key.split(".")
        for part in parts[:-1]:
            target = target[part]
        target[parts[-1]] = value
    return config
