"""A profiler window over training steps: `config.profile_steps = (start_step, num_steps)`.

`Profiler` traces those steps with `jax.profiler` into `WORKDIR/profile` (one TensorBoard
profile run, `plugins/profile/TIME/HOST.xplane.pb`, and its `perfetto_trace.json.gz`); the
training loop (`mae_jax.train`) wraps each step in `StepTraceAnnotation("train", step_num=...)`
and the data fetch and checkpoint save in `TraceAnnotation`s.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile

import jax
from absl import logging

from mae_jax import workdir as wdir
from mae_jax.data import lazy_tf
from mae_jax.spec import ok


def window(value) -> tuple[int, int] | None:
    """`config.profile_steps` checked: None (no profile) or `(start_step, num_steps)`, the
    steps to trace (0-based, as `StepTraceAnnotation`'s step_num; the first step is 0)."""
    if value is None:
        return None
    if (
        not isinstance(value, (tuple, list))
        or len(value) != 2
        or not all(ok("int", v) for v in value)
    ):
        raise ValueError(
            f"config.profile_steps must be (start_step, num_steps), two integers such as "
            f"(10, 3), got {value!r}"
        )
    start, count = int(value[0]), int(value[1])
    if start < 0:
        raise ValueError(f"config.profile_steps={value!r}: the start step must be >= 0")
    if count < 1:
        raise ValueError(f"config.profile_steps={value!r}: the number of steps must be >= 1")
    return start, count


class Profiler:
    """Traces the steps of `window` (`window`) into `root/profile` (as the module doc says;
    `root/profile/process_I` on a multi-process run). A remote root gets a copy of a local
    trace. Profiler failures are logged, never fatal."""

    def __init__(self, window: tuple[int, int] | None, root: str, first: int, total: int):
        self.window = window
        self.dir = wdir.join(root, "profile")
        if jax.process_count() > 1:
            self.dir = wdir.join(self.dir, f"process_{jax.process_index()}")
        self._local = None  # where the running trace goes
        self.first = self.last = None
        if window and not (window[0] < total and sum(window) > first):
            logging.warning(
                "config.profile_steps=%s: no step of that window is run (steps %d..%d); no "
                "profile is written",
                window,
                first,
                total - 1,
            )

    def before(self, step: int) -> None:
        w = self.window
        if self._local is not None or not w or not w[0] <= step < w[0] + w[1]:
            return
        local = tempfile.mkdtemp(prefix="mae_jax_profile_") if wdir.is_remote(self.dir) else None
        try:
            jax.profiler.start_trace(local or self.dir, create_perfetto_trace=True)
        except Exception as e:  # noqa: BLE001 - e.g. another trace already running
            logging.warning("profile of step %d not taken: %s", step, e)
            self.window = None
            return
        self._local, self.first = local or self.dir, step

    def after(self, step: int, outputs) -> None:
        if self._local is not None:
            self.last = step
            if step + 1 >= sum(self.window):
                self.stop(outputs)

    def stop(self, outputs=None) -> None:
        """Ends a running trace once `outputs` (the last step's) are computed."""
        if self._local is None:
            return
        local, self._local = self._local, None
        with contextlib.suppress(Exception):  # a failed step: keep what was traced
            jax.block_until_ready(outputs)
        try:
            jax.profiler.stop_trace()
            if local != self.dir:
                _copy_tree(local, self.dir)
                shutil.rmtree(local, ignore_errors=True)
        except Exception as e:  # noqa: BLE001
            logging.warning("the profile could not be written to %s: %s", self.dir, e)
            return
        steps = f"steps {self.first}..{self.last}" if self.last is not None else "no complete step"
        logging.info(
            "profile of %s written to %s (tensorboard --logdir %s, profile tab; or "
            "perfetto_trace.json.gz in ui.perfetto.dev)",
            steps,
            self.dir,
            self.dir,
        )
        self.window = None


def _copy_tree(src: str, dst: str) -> None:
    """Copies the local directory `src` into `dst` (local or a URI)."""
    tf = lazy_tf.tf_module()  # URIs need TensorFlow's file systems

    for folder, _, files in os.walk(src):
        rel = os.path.relpath(folder, src)
        target = dst if rel == "." else wdir.join(dst, *rel.split(os.sep))
        wdir.makedirs(target)
        for name in files:
            tf.io.gfile.copy(os.path.join(folder, name), wdir.join(target, name), overwrite=True)


def top_ops(path: str, n: int = 20) -> tuple[list[str], list[dict]]:
    """Where a trace's time went: the `n` event names with the most total duration in a
    `perfetto_trace.json.gz` (or `.json`) written by `jax.profiler`, summed over the device
    processes (names starting `/device:`, i.e. GPU/TPU kernels) when the trace has any, else
    over every process. Returns (the processes summed, rows `{"name", "total_ms", "count",
    "share"}` largest first; `share` is of all those processes' event time)."""
    import gzip
    import json

    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rt") as f:
        data = json.load(f)
    events = data["traceEvents"] if isinstance(data, dict) else data
    names = {
        e["pid"]: e["args"]["name"]
        for e in events
        if e.get("ph") == "M" and e.get("name") == "process_name"
    }
    device = {pid for pid, name in names.items() if name.startswith("/device:")}
    keep = device or set(names) or {e.get("pid") for e in events}
    totals: dict[str, list[float]] = {}
    for e in events:
        if e.get("ph") == "X" and e.get("pid") in keep:
            t = totals.setdefault(e.get("name", "?"), [0.0, 0])
            t[0] += float(e.get("dur", 0.0))
            t[1] += 1
    whole = sum(t[0] for t in totals.values()) or 1.0
    rows = [
        {"name": k, "total_ms": v[0] / 1e3, "count": v[1], "share": v[0] / whole}
        for k, v in sorted(totals.items(), key=lambda kv: -kv[1][0])[:n]
    ]
    return sorted(names.get(p, str(p)) for p in keep), rows
