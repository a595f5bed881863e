"""Training metrics: JSON lines, TensorBoard event files and a console progress line.

Files written in `workdir` (primary process only; other processes write nothing):
- `metrics.jsonl`: one JSON object per `write_scalars` call, `{"step": int, name: value}`,
  flushed after every line. Non-finite values are written as the strings "nan", "inf",
  "-inf" (so every line is valid JSON and `float(v)` reads them back).
- `events.out.tfevents.*`: TensorBoard scalars, images and text (via `tf.summary`;
  TensorFlow is imported lazily, CPU only). If TensorFlow cannot be imported, only the
  JSON lines are written and a warning is logged.

On resume from a checkpoint older than the last logged step, call
`truncate_after(workdir, step)` (primary process) before creating the writer so the
re-run steps are not logged twice.
"""

from __future__ import annotations

import json
import math
import sys
import time
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
from absl import logging

from mae_jax import workdir as wd
from mae_jax.data import lazy_tf
from mae_jax.spec import require

JSONL_NAME = "metrics.jsonl"


def format_eta(seconds) -> str:
    """Compact duration: '45s', '3m12s', '2h05m', '3d04h'; '?' when unknown (None/nan/inf)."""
    if seconds is None or not math.isfinite(seconds := float(seconds)):
        return "?"
    if seconds < 0:
        raise ValueError(f"seconds must be >= 0, got {seconds}")
    m, s = divmod(int(round(seconds)), 60)
    h, m = divmod(m, 60)
    d, h = divmod(h, 24)
    if d:
        return f"{d}d{h:02d}h"
    return f"{h}h{m:02d}m" if h else (f"{m}m{s:02d}s" if m else f"{s}s")


def _to_number(name: str, value) -> int | float:
    """Python int/float from a Python, numpy or jax real scalar (or size-1 array)."""
    if type(value) is int:
        return value
    try:
        arr = np.asarray(value)
    except Exception:  # noqa: BLE001 - e.g. a ragged list: refused below
        arr = np.asarray(None)
    if arr.size != 1 or arr.dtype.kind not in "iuf":  # a bool's kind is 'b'
        raise ValueError(
            f"metric {name!r} must be a real scalar, got {type(value).__name__} {value!r:.60}"
        )
    return float(arr.reshape(()))


def _json_value(x: int | float) -> int | float | str:
    if isinstance(x, float) and not math.isfinite(x):
        return "nan" if math.isnan(x) else ("inf" if x > 0 else "-inf")
    return x


def read_jsonl(workdir) -> list[dict]:
    """All complete records of `workdir/metrics.jsonl` (a torn last line is skipped)."""
    path = wd.join(wd.normalize(workdir), JSONL_NAME)
    if not wd.exists(path):
        return []
    records = []
    for line in wd.read_text(path).splitlines():
        try:
            records.append(json.loads(line))
        except ValueError:
            continue
    return records


def truncate_after(workdir, step: int) -> int:
    """Drops lines of `workdir/metrics.jsonl` whose step is > `step`, atomically.

    Unparseable lines (e.g. torn by a kill mid-write) are dropped too. Returns the
    number of lines removed; a missing file is a no-op (0).
    """
    step = int(step)
    path = wd.join(wd.normalize(workdir), JSONL_NAME)
    if not wd.exists(path):
        return 0
    lines = wd.read_text(path).splitlines(keepends=True)
    kept = []
    for line in lines:
        try:
            s = int(json.loads(line)["step"])
        except (ValueError, KeyError, TypeError):
            continue
        if s <= step:
            kept.append(line if line.endswith("\n") else line + "\n")
    removed = len(lines) - len(kept)
    if removed:
        wd.write_text(path, "".join(kept))
    return removed


# The scalars a console progress line shows, and how; a call without any of them prints no line.
_PROGRESS_FORMATS = {"loss": "loss {:.4f}", "lr": "lr {:.1e}", "images_per_sec": "{:.1f} img/s"}
PROGRESS_KEYS = frozenset(_PROGRESS_FORMATS)


class MetricsWriter:
    """Writes metrics of the primary process to JSON lines, TensorBoard and the console.

    Args:
      workdir: directory for `metrics.jsonl` and the TensorBoard event files (created).
      is_primary: False on non-primary processes: then every method is a no-op and no
        file, directory or console line is produced.
      total_steps: shown as `step/total` and used for the ETA, when given.
      tensorboard: write TensorBoard event files (needs TensorFlow; falls back to JSON only).
      console: print a progress line (stdout, flushed) per `write_scalars` call that holds
        training progress (`PROGRESS_KEYS`); other scalars (an evaluation's, the kNN
        monitor's) are said by the code that computed them, in a sentence of their own.
      clock: seconds source for the step rate (tests inject a fake clock).
    """

    def __init__(
        self,
        workdir,
        *,
        is_primary: bool = True,
        total_steps: int | None = None,
        tensorboard: bool = True,
        console: bool = True,
        clock: Callable[[], float] = time.monotonic,
        ema_decay: float = 0.8,
    ):
        self.workdir = wd.normalize(workdir)
        self.is_primary = bool(is_primary)
        self.total_steps = None if total_steps is None else int(total_steps)
        self._console = console
        self._clock = clock
        self._ema_decay = ema_decay
        self._last_time: float | None = None
        self._last_step: int | None = None
        self._steps_per_sec: float | None = None
        self._pending: list[str] = []
        self._last_flush = 0.0
        self._tf = None
        self._tb = None
        self._closed = False
        if not self.is_primary:
            return
        if wd.exists(self.workdir) and not wd.isdir(self.workdir):
            raise ValueError(f"workdir {self.workdir!r} exists and is not a directory")
        wd.makedirs(self.workdir)
        self._path = wd.join(self.workdir, JSONL_NAME)
        if not wd.exists(self._path):
            wd.write_text(self._path, "")
        if tensorboard:
            self._tb = self._open_tensorboard()

    def _open_tensorboard(self):
        try:
            tf = lazy_tf.tf_module()
        except Exception as e:  # pylint: disable=broad-except
            logging.warning(
                "TensorBoard disabled (cannot import tensorflow: %s); writing %s only.",
                e,
                JSONL_NAME,
            )
            return None
        try:
            tf.config.set_visible_devices([], "GPU")
        except Exception:  # pylint: disable=broad-except  # Already initialized: fine.
            pass
        self._tf = tf
        return tf.summary.create_file_writer(self.workdir)

    @property
    def tensorboard_enabled(self) -> bool:
        return self._tb is not None

    @property
    def steps_per_sec(self) -> float | None:
        """Smoothed (EMA) steps per second between `write_scalars` calls, None until known."""
        return self._steps_per_sec

    # -------------------------------------------------------------------- scalars
    def write_scalars(self, step: int, scalars: Mapping[str, Any]):
        """Logs `scalars` (name -> Python/numpy/jax scalar) at `step` everywhere."""
        step = int(require("step", step, "int>=0"))
        if "step" in scalars:
            raise ValueError("scalars must not contain the reserved key 'step'")
        values = {str(k): _to_number(str(k), v) for k, v in scalars.items()}
        self._update_rate(step)
        if not self.is_primary:
            return
        self._check_open()
        record = {"step": step, **{k: _json_value(v) for k, v in values.items()}}
        self._pending.append(json.dumps(record, allow_nan=False) + "\n")
        # Object stores rewrite the whole file to append: there, at most once a minute.
        if not wd.is_remote(self.workdir) or time.monotonic() - self._last_flush > 60:
            self._flush_lines()
        if self._tb is not None:
            with self._tb.as_default(step=step):
                for k, v in values.items():
                    self._tf.summary.scalar(k, float(v))
        if self._console and not PROGRESS_KEYS.isdisjoint(values):
            print(self.progress_line(step, values), flush=True, file=sys.stdout)

    def _update_rate(self, step: int):
        now = self._clock()
        if self._last_step is not None and step > self._last_step and now > self._last_time:
            rate = (step - self._last_step) / (now - self._last_time)
            prev, d = self._steps_per_sec, self._ema_decay
            self._steps_per_sec = rate if prev is None else d * prev + (1 - d) * rate
        self._last_step, self._last_time = step, now

    def eta_seconds(self, step: int) -> float | None:
        """Seconds left to `total_steps` at the smoothed rate; None if unknown."""
        if self.total_steps is None or not self._steps_per_sec:
            return None
        return max(0, self.total_steps - step) / self._steps_per_sec

    def progress_line(self, step: int, values: Mapping[str, float]) -> str:
        """E.g. 'step 120/1000  loss 0.8123  lr 1.2e-04  312.4 img/s  ETA 3m12s'."""
        parts = [f"step {step}/{self.total_steps}" if self.total_steps else f"step {step}"]
        parts += [f.format(float(values[k])) for k, f in _PROGRESS_FORMATS.items() if k in values]
        if self.total_steps:
            parts.append(f"ETA {format_eta(self.eta_seconds(step))}")
        return "  ".join(parts)

    # ------------------------------------------------------------- images / text
    def write_images(self, step: int, images: Mapping[str, Any]):
        """TensorBoard images: each value uint8 (or float in [0, 1]) [H, W, C] or [N, H, W, C],
        C in (1, 3, 4)."""
        prepared = {}
        for name, img in images.items():
            arr = np.asarray(img)
            if arr.ndim == 3:
                arr = arr[None]
            if arr.ndim != 4 or arr.shape[-1] not in (1, 3, 4):
                raise ValueError(
                    f"image {name!r} must be [H, W, C] or [N, H, W, C] with C in "
                    f"(1, 3, 4), got shape {np.shape(img)}"
                )
            if arr.dtype != np.uint8:
                if not np.issubdtype(arr.dtype, np.floating):
                    raise ValueError(
                        f"image {name!r} must be uint8 or float in [0, 1], got {arr.dtype}"
                    )
                arr = np.clip(np.nan_to_num(arr.astype(np.float32)), 0.0, 1.0)
            prepared[str(name)] = arr
        if not self.is_primary or self._tb is None:
            return
        self._check_open()
        with self._tb.as_default(step=int(step)):
            for name, arr in prepared.items():
                self._tf.summary.image(name, arr, max_outputs=arr.shape[0])

    def write_text(self, step: int, texts: Mapping[str, str]):
        """TensorBoard text summaries (markdown), name -> str."""
        for name, text in texts.items():
            if not isinstance(text, str):
                raise ValueError(f"text {name!r} must be a str, got {type(text).__name__}")
        if not self.is_primary or self._tb is None:
            return
        self._check_open()
        with self._tb.as_default(step=int(step)):
            for name, text in texts.items():
                self._tf.summary.text(str(name), text)

    def write_config(self, config):
        """The config (ConfigDict or dict) as a TensorBoard text summary 'config' at step 0."""
        as_dict = config.to_dict() if hasattr(config, "to_dict") else config
        if not isinstance(as_dict, Mapping):
            raise ValueError(f"config must be a ConfigDict or a dict, got {type(config).__name__}")
        body = json.dumps(as_dict, indent=2, sort_keys=True, default=str)
        # Indented lines render as a code block in TensorBoard's markdown.
        self.write_text(0, {"config": "\n".join("    " + line for line in body.splitlines())})

    # ------------------------------------------------------------------ lifecycle
    def _check_open(self):
        if self._closed:
            raise ValueError("MetricsWriter is closed")

    def _flush_lines(self):
        if self._pending:
            wd.append_text(self._path, "".join(self._pending))
            self._pending = []
        self._last_flush = time.monotonic()

    def flush(self):
        if self.is_primary and not self._closed:
            self._flush_lines()
        if self._tb is not None and not self._closed:
            self._tb.flush()

    def close(self):
        if self._closed:
            return
        self.flush()
        self._closed = True
        if self._tb is not None:
            self._tb.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
