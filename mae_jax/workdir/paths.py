"""The path layer: every file of a workdir, local or a URI, and the run's JSON files.

Paths are local paths or URIs (`gs://bucket/run`, and any other scheme TensorFlow's
`tf.io.gfile` knows, such as `ram://` in tests): a `gs://` workdir holds all of a run.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from typing import Any

from mae_jax import spec
from mae_jax.data import lazy_tf

# The files of a workdir (layout: `mae_jax.workdir`).
CHECKPOINTS = "checkpoints"
DAMAGED = "damaged_checkpoints"
CONFIG = "config.json"
CONFIG_HISTORY = "config_history.json"
RESULTS = "eval_results.json"
LOCK = "lock"


class WorkdirError(ValueError):
    """A workdir that cannot be used as asked; the message is one sentence for the user."""


def is_remote(path) -> bool:
    """True for URIs (`gs://...`, `ram://...`), False for local paths."""
    return "://" in os.fspath(path)


def normalize(path) -> str:
    """Local paths made absolute (`~` expanded); URIs kept, without a trailing slash."""
    text = os.fspath(path)
    if not text:
        raise WorkdirError("the workdir path is empty; pass --workdir=DIR")
    if is_remote(text):
        return text.rstrip("/")
    return os.path.abspath(os.path.expanduser(text))


def join(root, *parts: str) -> str:
    root = os.fspath(root)
    if is_remote(root):
        return "/".join([root.rstrip("/"), *parts])
    return os.path.join(root, *parts)


def gfile():
    return lazy_tf.tf_module().io.gfile  # only URIs need TensorFlow's file systems


def exists(path) -> bool:
    return gfile().exists(path) if is_remote(path) else os.path.exists(path)


def isdir(path) -> bool:
    return gfile().isdir(path) if is_remote(path) else os.path.isdir(path)


def makedirs(path) -> None:
    if is_remote(path):
        gfile().makedirs(path)
    else:
        os.makedirs(path, exist_ok=True)


def listdir(path) -> list[str]:
    if is_remote(path):
        return [name.rstrip("/") for name in gfile().listdir(path)]
    return os.listdir(path)


def read_text(path) -> str:
    with gfile().GFile(path, "r") if is_remote(path) else open(path, encoding="utf-8") as f:
        return f.read()


def write_text(path, text: str) -> None:
    """Writes `text` to `path` atomically (temporary file, then rename)."""
    tmp = f"{path}.tmp-{os.getpid()}"
    if is_remote(path):
        with gfile().GFile(tmp, "w") as f:
            f.write(text)
        gfile().rename(tmp, path, overwrite=True)
        return
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def append_text(path, text: str) -> None:
    """Appends `text` (object stores cannot append: the file is rewritten there)."""
    if is_remote(path):
        old = read_text(path) if exists(path) else ""
        write_text(path, old + text)
        return
    with open(path, "a", encoding="utf-8") as f:
        f.write(text)
        f.flush()


def remove(path) -> None:
    if is_remote(path):
        gfile().remove(path)
    else:
        os.remove(path)


def remove_tree(path) -> None:
    if is_remote(path):
        gfile().rmtree(path)
    else:
        shutil.rmtree(path)


def free_bytes(path) -> int | None:
    """Free space of the local file system holding `path`; None for URIs."""
    return None if is_remote(path) else shutil.disk_usage(path).free


def rename(src, dst) -> None:
    if is_remote(src):
        gfile().rename(src, dst, overwrite=False)
    else:
        os.rename(src, dst)


def read_json(path) -> Any:
    return json.loads(read_text(path))


def _finite(value):
    """`value` with non-finite floats (NaN, inf) as None: JSON has no such numbers."""
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def write_json(path, value) -> None:
    """Writes `value` as JSON (non-finite floats as null), atomically."""
    text = json.dumps(_finite(value), indent=2, sort_keys=True, default=str, allow_nan=False)
    write_text(path, text + "\n")


def write_results(root, results: dict) -> str:
    """`root/eval_results.json` := `results`, the final evaluation of a classification run or
    of `task=evaluate` (process 0 writes it); returns its path."""
    path = join(normalize(root), RESULTS)
    write_json(path, results)
    return path


def read_results(root) -> dict:
    """The final evaluation a run wrote (`eval_results.json`)."""
    file = join(normalize(root), RESULTS)
    if not exists(file):
        raise WorkdirError(f"{file} does not exist: the run has not finished")
    return read_json(file)


def first_line(error: BaseException, limit: int = 300) -> str:
    """`Type: first line of the message`, at most `limit` characters."""
    line = f"{type(error).__name__}: {spec.first_line(error)}"
    return line if len(line) <= limit else line[: limit - 3] + "..."


def check_writable_dir(root: str) -> None:
    """Creates `root` if needed; refuses a path that is a file or cannot be written."""
    if exists(root) and not isdir(root):
        raise WorkdirError(f"the workdir {root} exists and is a file, not a directory")
    try:
        makedirs(root)
        probe = join(root, f".write-test-{os.getpid()}")
        write_text(probe, "")
        remove(probe)
    except Exception as e:  # noqa: BLE001 - OSError, or tf.errors from gfile on URIs
        raise WorkdirError(f"cannot write to the workdir {root} ({first_line(e)})") from None
