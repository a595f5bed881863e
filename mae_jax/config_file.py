"""Config files: Python files with `get_config()` (or `get_config(arg)`) returning a ConfigDict.

`load("configs/mae_pretrain.py:vit_large")` runs the file and calls `get_config("vit_large")`,
as `--config=configs/mae_pretrain.py:vit_large` does on the command line. A named recipe file
can stand for a variant of another one with `variant(__file__, "mae_pretrain.py", "vit_large")`.
"""

from __future__ import annotations

import os
import traceback
import types
from typing import Any

from mae_jax.spec import first_line


class ConfigFileError(ValueError):
    """A config file that cannot be used; the message is one sentence for the user."""


def load(spec: str) -> Any:
    """Run the config file of `spec` (`FILE` or `FILE:ARG`) and return its `get_config(...)`.
    A missing file, a syntax error or an exception in it raises ConfigFileError."""
    file, *arg = os.fspath(spec).split(":", 1)
    if not os.path.isfile(file):
        what = "is not a file" if os.path.exists(file) else "does not exist"
        raise ConfigFileError(f"config file {file!r} {what}")
    try:
        with open(file, encoding="utf-8") as f:
            code = compile(f.read(), file, "exec")
    except SyntaxError as e:
        raise ConfigFileError(
            f"config file {file!r} has a syntax error at line {e.lineno}: {e.msg}"
        ) from None
    except (OSError, ValueError) as e:
        raise ConfigFileError(f"config file {file!r} cannot be read: {first_line(e)}") from None
    module = types.ModuleType("mae_jax_config")
    module.__file__ = file
    try:
        exec(code, module.__dict__)  # noqa: S102 - a config file is code, by design
        if not callable(getattr(module, "get_config", None)):
            raise ConfigFileError(f"config file {file!r} has no get_config() function")
        config = module.get_config(*arg)
    except ConfigFileError:
        raise
    except Exception as e:  # noqa: BLE001 - any error in the user's file becomes one sentence
        lines = [f.lineno for f in traceback.extract_tb(e.__traceback__) if f.filename == file]
        where = f" at line {lines[-1]}" if lines else ""
        raise ConfigFileError(
            f"config file {file!r} failed{where}: {type(e).__name__}: {first_line(e)}"
        ) from None
    if config is None:
        raise ConfigFileError(f"config file {file!r}: get_config() returned None")
    return config


def variant(alias_file: str, recipe: str, arg: str) -> Any:
    """`get_config(arg)` of the recipe file `recipe` in the directory of `alias_file`."""
    here = os.path.dirname(os.path.abspath(alias_file))
    return load(f"{os.path.join(here, recipe)}:{arg}")
