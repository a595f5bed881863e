"""JAX's persistent XLA compilation cache, on by default, and compile-time accounting.

`enable(config.compilation_cache)` points JAX at a cache directory before the first
compilation, so a restart of the same command on the same machine loads its programs from
disk instead of compiling them again. The config value is:

- `"auto"` (the default): `$MAE_JAX_COMPILATION_CACHE` if set, else JAX's own
  `$JAX_COMPILATION_CACHE_DIR` if set, else `$XDG_CACHE_HOME/mae_jax/xla`
  (`~/.cache/mae_jax/xla` without XDG_CACHE_HOME);
- a local directory or a `gs://` URI (shared by all hosts of a multi-host run: only process 0
  writes entries);
- `""` or `"none"`: no persistent cache.

A local directory that cannot be created or written turns the cache off with a warning: the
run itself goes on, it only compiles from scratch. `CompileEvents` counts what JAX compiled
and what came from the cache (from `jax.monitoring` events).
"""

from __future__ import annotations

import os

import jax
from absl import logging
from jax.experimental.compilation_cache import compilation_cache as cc

from mae_jax import workdir as wdir

ENV_VAR = "MAE_JAX_COMPILATION_CACHE"
AUTO = "auto"
_OFF = ("", "none")
# Cache every program of a local cache (CPU compiles of small programs still take ~0.1 s);
# on a remote one each entry is a round trip, so keep JAX's default threshold (1 s) there.
_LOCAL_MIN_TIME_S = 0.0

TRACE_EVENT = "/jax/core/compile/jaxpr_trace_duration"
LOWER_EVENT = "/jax/core/compile/jaxpr_to_mlir_module_duration"
COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"  # also a cache load
CACHE_HIT_EVENT = "/jax/compilation_cache/cache_hits"

_applied: list = [object()]  # the location last applied (None: off); a sentinel until then


def resolve(value: str | None = AUTO) -> str | None:
    """The cache location that config value `value` stands for (see the module doc); None
    when it turns the cache off."""
    if value is None:
        value = AUTO
    if not isinstance(value, str):
        raise ValueError(
            f"config.compilation_cache must be a path, a gs:// URI, 'auto' or 'none', got {value!r}"
        )
    text = value.strip()
    if text.lower() == AUTO and ENV_VAR in os.environ:
        text = os.environ[ENV_VAR].strip()
    elif text.lower() == AUTO:
        base = os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache")
        text = os.environ.get("JAX_COMPILATION_CACHE_DIR") or os.path.join(base, "mae_jax", "xla")
    if text.lower() in _OFF:
        return None
    if wdir.is_remote(text):
        return text.rstrip("/")
    return os.path.abspath(os.path.expanduser(text))


def enable(value: str | None = AUTO, process_count: int = 1) -> str | None:
    """Point JAX's persistent compilation cache at `value` (a `config.compilation_cache`
    value; see the module doc) and log where it is; call it before the first compilation.
    `process_count` > 1 warns about a local cache on a multi-host run. Returns the directory
    in use, or None when off."""
    path = resolve(value)
    if path is not None and not wdir.is_remote(path):
        try:  # a writable directory, created if needed
            os.makedirs(path, exist_ok=True)
            problem = (
                None if os.access(path, os.W_OK | os.X_OK) else "the directory is not writable"
            )
        except OSError as e:
            problem = f"{type(e).__name__}: {e.strerror or e}"
        if problem:
            logging.warning(
                "XLA compilation cache off: cannot use %s (%s); every start compiles from "
                "scratch. Set config.compilation_cache (or $%s) to a writable directory, or "
                "to 'none' to silence this",
                path,
                problem,
                ENV_VAR,
            )
            path = None
    _apply(path)
    if path is None:
        logging.info("XLA compilation cache: off")
        return None
    logging.info("XLA compilation cache: %s", path)
    if process_count > 1 and not wdir.is_remote(path):
        logging.warning(
            "XLA compilation cache %s is local to each host, and only process 0 writes to it: "
            "the other processes compile on every start; use a gs:// location shared by all "
            "hosts (config.compilation_cache=gs://BUCKET/xla_cache)",
            path,
        )
    return path


def _apply(path: str | None) -> None:
    if _applied[0] == path:
        return
    jax.config.update("jax_enable_compilation_cache", path is not None)
    jax.config.update("jax_compilation_cache_dir", path)
    if path is not None and not wdir.is_remote(path):
        # An explicit JAX_* environment setting wins over these defaults.
        if "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS" not in os.environ:
            jax.config.update("jax_persistent_cache_min_compile_time_secs", _LOCAL_MIN_TIME_S)
        if "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES" not in os.environ:
            jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)
    cc.reset_cache()  # JAX opens its cache once per process: make it take the new location
    _applied[0] = path


class CompileEvents:
    """JAX's compile-phase durations (trace, lower to MLIR, XLA compile or cache load) and the
    persistent-cache hits while active: a context manager, or `start()` / `stop()`."""

    def __init__(self):
        self.events: list[tuple[str, float]] = []
        self.cache_hits = 0
        self._on = False

    def __call__(self, event: str, duration: float, **_):
        if event in (TRACE_EVENT, LOWER_EVENT, COMPILE_EVENT):
            self.events.append((event, float(duration)))

    def _event(self, event: str, **_):
        if event == CACHE_HIT_EVENT:
            self.cache_hits += 1

    def start(self) -> CompileEvents:
        if not self._on:
            jax.monitoring.register_event_duration_secs_listener(self)
            jax.monitoring.register_event_listener(self._event)
            self._on = True
        return self

    def stop(self) -> None:
        if self._on:
            jax.monitoring.unregister_event_duration_listener(self)
            jax.monitoring.unregister_event_listener(self._event)
            self._on = False

    def __enter__(self) -> CompileEvents:
        return self.start()

    def __exit__(self, *exc):
        self.stop()

    def summary(self) -> dict:
        """`trace_s` (nested jits are traced inside the outer trace: the longest), `lower_s`,
        `xla_compile_s` (compiling, or loading from the cache), `xla_programs`,
        `xla_cache_hits`."""
        of = lambda name: [d for e, d in self.events if e == name]  # noqa: E731
        return {
            "trace_s": max(of(TRACE_EVENT), default=0.0),
            "lower_s": sum(of(LOWER_EVENT)),
            "xla_compile_s": sum(of(COMPILE_EVENT)),
            "xla_programs": len(of(COMPILE_EVENT)),
            "xla_cache_hits": self.cache_hits,
        }


def describe(summary: dict) -> str:
    """One phrase on the XLA part of a `CompileEvents.summary()`, saying what the cache did."""
    s, n = summary.get("xla_compile_s", 0.0), summary.get("xla_programs")
    if n is None:  # a summary without the counts
        return f"XLA compile {s:.2f} s"
    if not n:
        return "no XLA compilation"
    hits = min(summary.get("xla_cache_hits", 0), n)
    programs = f"{n} program{'s' if n != 1 else ''}"
    if hits == n:
        return f"XLA {s:.2f} s, cache hit: {programs} loaded from the compilation cache"
    if hits:
        return f"XLA compile {s:.2f} s for {programs} ({hits} loaded from the compilation cache)"
    return f"XLA compile {s:.2f} s for {programs}"
