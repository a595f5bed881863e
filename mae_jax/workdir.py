"""The workdir of a run: its layout, its lock, its checkpoints and every file in it.

This is the only module that opens Orbax and the only one that knows where a run's files go.
Paths are local paths or URIs (`gs://bucket/run`, and any other scheme TensorFlow's
`tf.io.gfile` knows, such as `ram://` in tests); every file goes through the same small path
layer below, so a `gs://` workdir holds all of a run, not only its checkpoints.

Layout of WORKDIR:
  checkpoints/<step>/state       Orbax pytree of arrays: params, opt_state, step, ...
  checkpoints/<step>/meta        JSON: model config, task, data position, schedule, ...
  config.json                    the resolved config of the newest start (the numbers used)
  config_history.json            earlier resolved configs, when a rerun changed them
  metrics.jsonl, events.*        metrics (`mae_jax.metrics`)
  eval_results.json              final evaluation of a classification run
  lock                           the writer's lock: host, pid, start time
  damaged_checkpoints/<step>     checkpoints a writer found unreadable, moved aside (never deleted)

Writers (`Writer`, one per run) hold the lock; a second writer is refused with a sentence naming
the holder, and a lock left by a killed process is taken over. Readers (`Reader`) never create,
clean, rename or delete anything, and see only finalized checkpoints, so they can read a run in
progress. Restoring skips a newest checkpoint that cannot be read, says so, and uses the next.
A full file system while saving is one `DiskFullError` sentence (the full path, the size of one
checkpoint, the intact checkpoints) once the half-written checkpoint is removed.

Multi-process (Orbax's contract): every process calls `Writer.save`, `restore`, `wait`, `close`
at the same points with the same arguments; process 0 alone takes the lock and writes the JSON
files, and all processes agree on which checkpoint they restored.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import errno
import json
import logging as std_logging
import os
import shutil
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
from absl import logging

from mae_jax.data import lazy_tf

CHECKPOINTS = "checkpoints"
DAMAGED = "damaged_checkpoints"
CONFIG = "config.json"
CONFIG_HISTORY = "config_history.json"
RESULTS = "eval_results.json"
LOCK = "lock"
_STATE = "state"
_META = "meta"
_META_FILE = "metadata"  # the file Orbax's JsonSave writes inside `meta/`
_TMP_MARK = ".orbax-checkpoint-tmp"  # in the name of a checkpoint Orbax is still writing


# The signals that ask a run to save its last completed step and stop (`Writer`).
_STOP_SIGNALS = {signal.SIGTERM: "SIGTERM", signal.SIGINT: "Ctrl-C (SIGINT)"}


class WorkdirError(ValueError):
    """A workdir that cannot be used as asked; the message is one sentence for the user."""


class DiskFullError(WorkdirError):
    """The file system of a workdir has no space left (`Writer.disk_full`)."""


def is_disk_full(error: BaseException) -> bool:
    """True when `error` (or an error it was raised from) is "No space left on device": an
    OSError with errno ENOSPC, or TensorStore's RESOURCE_EXHAUSTED that Orbax passes on."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, DiskFullError):
            return False  # already said
        if isinstance(error, OSError) and error.errno == errno.ENOSPC:
            return True
        if "No space left on device" in str(error):
            return True
        error = error.__cause__ or error.__context__
    return False


def _megabytes(num_bytes: float) -> str:
    return f"{num_bytes / 1e6:.1f} MB"


# ----------------------------------------------------------------------------- path layer
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


def _gfile():
    return lazy_tf.tf_module().io.gfile  # only URIs need TensorFlow's file systems


def exists(path) -> bool:
    return _gfile().exists(path) if is_remote(path) else os.path.exists(path)


def isdir(path) -> bool:
    return _gfile().isdir(path) if is_remote(path) else os.path.isdir(path)


def makedirs(path) -> None:
    if is_remote(path):
        _gfile().makedirs(path)
    else:
        os.makedirs(path, exist_ok=True)


def listdir(path) -> list[str]:
    if is_remote(path):
        return [name.rstrip("/") for name in _gfile().listdir(path)]
    return os.listdir(path)


def read_text(path) -> str:
    if is_remote(path):
        with _gfile().GFile(path, "r") as f:
            return f.read()
    with open(path, encoding="utf-8") as f:
        return f.read()


def write_text(path, text: str) -> None:
    """Writes `text` to `path` atomically (temporary file, then rename)."""
    tmp = f"{path}.tmp-{os.getpid()}"
    if is_remote(path):
        with _gfile().GFile(tmp, "w") as f:
            f.write(text)
        _gfile().rename(tmp, path, overwrite=True)
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
        _gfile().remove(path)
    else:
        os.remove(path)


def remove_tree(path) -> None:
    if is_remote(path):
        _gfile().rmtree(path)
    else:
        shutil.rmtree(path)


def free_bytes(path) -> int | None:
    """Free space of the local file system holding `path`; None for URIs."""
    return None if is_remote(path) else shutil.disk_usage(path).free


def rename(src, dst) -> None:
    if is_remote(src):
        _gfile().rename(src, dst, overwrite=False)
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
    if isinstance(value, float) and not np.isfinite(value):
        return None
    return value


def write_json(path, value) -> None:
    """Writes `value` as JSON (non-finite floats as null), atomically."""
    text = json.dumps(_finite(value), indent=2, sort_keys=True, default=str, allow_nan=False)
    write_text(path, text + "\n")


def _first_line(error: BaseException, limit: int = 300) -> str:
    text = str(error).strip().splitlines()
    line = text[0] if text else type(error).__name__
    line = f"{type(error).__name__}: {line}"
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
        raise WorkdirError(f"cannot write to the workdir {root} ({_first_line(e)})") from None


# ----------------------------------------------------------------------------- the lock
def _now() -> str:
    return datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _describe(holder: dict) -> str:
    return (
        f"host {holder.get('host', '?')}, pid {holder.get('pid', '?')}, "
        f"started {holder.get('started', '?')}"
    )


class Lock:
    """The writer's exclusive lock on a workdir (file `lock`, holding host, pid, start time).

    Local file systems: an `flock` on the file, which the kernel drops when the holder dies, so
    a lock left by a killed process is taken over at once. Object stores (`gs://`): a lease the
    holder renews every `heartbeat_s`; a lease older than `stale_s`, or one held by a dead
    process of this host, is taken over.
    """

    def __init__(self, root: str, *, heartbeat_s: float = 60.0, stale_s: float = 600.0):
        self.path = join(root, LOCK)
        self._root = root
        self._heartbeat_s = heartbeat_s
        self._stale_s = stale_s
        self._fd: int | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.holder = {"host": socket.gethostname(), "pid": os.getpid(), "started": _now()}

    def _refuse(self, holder: dict):
        raise WorkdirError(
            f"the workdir {self._root} is in use by another run ({_describe(holder)}); stop "
            f"that run first or choose another --workdir"
        )

    def acquire(self) -> Lock:
        if is_remote(self.path):
            self._acquire_lease()
        else:
            self._acquire_flock()
        return self

    def _acquire_flock(self):
        import fcntl  # noqa: PLC0415 - POSIX only

        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            try:
                holder = json.loads(os.pread(fd, 4096, 0) or b"{}")
            except ValueError:
                holder = {}
            os.close(fd)
            self._refuse(holder)
        old = os.pread(fd, 4096, 0)
        if old.strip():
            try:
                left = json.loads(old)
            except ValueError:
                left = {}
            logging.warning(
                "taking over the lock of %s left by a run that is no longer running (%s)",
                self._root,
                _describe(left),
            )
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(self.holder).encode(), 0)
        os.fsync(fd)
        self._fd = fd

    def _lease_alive(self, holder: dict) -> bool:
        if holder.get("host") == socket.gethostname() and isinstance(holder.get("pid"), int):
            return _pid_alive(holder["pid"])
        return time.time() - float(holder.get("heartbeat", 0)) < self._stale_s

    def _acquire_lease(self):
        if exists(self.path):
            try:
                holder = read_json(self.path)
            except ValueError:
                holder = {}
            if holder and self._lease_alive(holder):
                self._refuse(holder)
            if holder:
                logging.warning(
                    "taking over the lock of %s left by a run that is no longer running (%s)",
                    self._root,
                    _describe(holder),
                )
        self._write_lease()
        time.sleep(0.05)  # a racing writer's lease would land in between: re-read
        holder = read_json(self.path)
        if (holder.get("started"), holder.get("pid")) != (
            self.holder["started"],
            self.holder["pid"],
        ):
            self._refuse(holder)
        self._thread = threading.Thread(target=self._renew, name="workdir-lock", daemon=True)
        self._thread.start()

    def _write_lease(self):
        write_json(self.path, {**self.holder, "heartbeat": time.time()})

    def _renew(self):
        while not self._stop.wait(self._heartbeat_s):
            try:
                self._write_lease()
            except Exception as e:  # noqa: BLE001 - a failed renewal must not kill training
                logging.warning("could not renew the workdir lock %s: %s", self.path, e)

    def release(self) -> None:
        if self._fd is not None:
            import fcntl  # noqa: PLC0415

            os.ftruncate(self._fd, 0)
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self._thread = None
            try:
                if read_json(self.path).get("pid") == self.holder["pid"]:
                    remove(self.path)
            except Exception as e:  # noqa: BLE001
                logging.warning("could not remove the workdir lock %s: %s", self.path, e)


# ----------------------------------------------------------------------------- state layout
def _is_var(x) -> bool:
    from flax import nnx  # noqa: PLC0415

    return isinstance(x, nnx.Variable)


def _strip(tree):
    """Variables -> their values (for Orbax); other leaves unchanged."""
    return jax.tree.map(lambda v: v.get_value() if _is_var(v) else v, tree, is_leaf=_is_var)


def to_checkpoint(state: dict) -> dict:
    """Train state -> the on-disk layout: `params` a pure nested dict (as the converter and the
    evaluation tools read it), every other entry with its Variables stripped."""
    from flax import nnx  # noqa: PLC0415

    out = {k: _strip(v) for k, v in state.items() if k != "params"}
    out["params"] = nnx.to_pure_dict(state["params"])
    return out


def abstract_checkpoint(abstract_state: dict, shardings: dict) -> dict:
    """The on-disk layout of `abstract_state` as ShapeDtypeStructs carrying `shardings`."""
    from flax import nnx  # noqa: PLC0415

    both = jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
        _strip(abstract_state),
        _strip(shardings),
    )
    out = {k: v for k, v in both.items() if k != "params"}
    out["params"] = nnx.to_pure_dict(both["params"])
    return out


def from_checkpoint(restored: dict, abstract_state: dict) -> dict:
    """The on-disk layout -> a train state shaped like `abstract_state` (Variables rewrapped)."""
    from flax import nnx  # noqa: PLC0415

    params = jax.tree.map(lambda x: x, abstract_state["params"])
    nnx.replace_by_pure_dict(params, restored["params"])

    def rewrap(template, values):
        return jax.tree.map(
            lambda v, x: v.replace(x) if _is_var(v) else x, template, values, is_leaf=_is_var
        )

    out = {k: rewrap(abstract_state[k], restored[k]) for k in abstract_state if k != "params"}
    out["params"] = params
    return out


# ----------------------------------------------------------------------------- reading
def checkpoints_dir(path) -> str:
    """`path/checkpoints` for a workdir, or `path` itself when it is a checkpoints directory."""
    root = normalize(path)
    if not exists(root):
        raise WorkdirError(f"{root} does not exist")
    if not isdir(root):
        raise WorkdirError(f"{root} is a file, not a workdir")
    sub = join(root, CHECKPOINTS)
    return sub if isdir(sub) else root


def _agree(ok: bool) -> bool:
    """True only when `ok` holds on every process (a collective when there are several)."""
    if jax.process_count() == 1:
        return ok
    from jax.experimental import multihost_utils  # noqa: PLC0415

    flags = multihost_utils.process_allgather(np.asarray(int(ok), np.int32))
    return bool(np.min(flags))


def _quiet_orbax_teardown() -> None:
    """After a failed read, Orbax's abandoned reads report "Event loop is closed" from garbage
    collection, hundreds of times; those (and only those) are dropped, once noted."""
    previous = sys.unraisablehook
    if getattr(previous, "_mae_jax_quiet", False):
        return

    def hook(unraisable):
        exc = unraisable.exc_value
        if isinstance(exc, RuntimeError) and str(exc) == "Event loop is closed":
            return
        previous(unraisable)

    hook._mae_jax_quiet = True
    sys.unraisablehook = hook


class _NoItemMetadataWarning(std_logging.Filter):
    """Orbax's `PyTreeCheckpointer` looks for a step-level `_CHECKPOINT_METADATA` file inside
    the item (`<step>/state/`), where the checkpoint manager never writes one, and warns that it
    "does not exist" on every read of an intact checkpoint: that warning (only) is dropped."""

    def filter(self, record: std_logging.LogRecord) -> bool:
        return not (
            record.msg == "Metadata file does not exist: %s"
            and os.fspath(record.args[0] if record.args else "").endswith(
                f"{_STATE}/_CHECKPOINT_METADATA"
            )
        )


_NO_ITEM_METADATA_WARNING = _NoItemMetadataWarning()


def _quiet_disk_full_noise() -> None:
    """While a Writer saves: Orbax's threads report a full disk with a traceback per thread and
    TensorStore's callbacks report "Event loop is closed" afterwards; the Writer says it once
    (`Writer.disk_full`), so those log records keep their line but lose the traceback, and the
    "Event loop is closed" reports are dropped (`_quiet_orbax_teardown`)."""
    handler = logging.get_absl_handler()
    if not any(isinstance(f, _DiskFullTracebacks) for f in handler.filters):
        handler.addFilter(_DiskFullTracebacks())
    _quiet_orbax_teardown()


class _DiskFullTracebacks(std_logging.Filter):
    def filter(self, record) -> bool:
        if record.exc_info and record.exc_info[1] is not None:
            if is_disk_full(record.exc_info[1]):
                if record.name == "asyncio":  # "exception was never retrieved", per array
                    return False
                record.exc_info, record.exc_text = None, None
        return True


def _restore_args(leaf):
    import orbax.checkpoint as ocp  # noqa: PLC0415

    if getattr(leaf, "sharding", None) is not None:
        return ocp.ArrayRestoreArgs(
            sharding=leaf.sharding, global_shape=leaf.shape, dtype=leaf.dtype
        )
    return ocp.RestoreArgs(restore_type=np.ndarray, dtype=leaf.dtype)


def place(values, target):
    """Nested dicts/lists of numpy arrays -> `target`'s structure, leaf by key path; leaves
    whose target has a sharding become `jax.Array`s with it."""
    from mae_jax.optim import path_names  # noqa: PLC0415

    by_path = {path_names(p): v for p, v in jax.tree_util.tree_flatten_with_path(values)[0]}
    flat, treedef = jax.tree_util.tree_flatten_with_path(target)
    leaves = []
    for p, leaf in flat:
        names = path_names(p)
        if names not in by_path:
            raise WorkdirError(f"the checkpoint has no entry {'.'.join(names)}")
        value = np.asarray(by_path[names], dtype=leaf.dtype)
        if value.shape != tuple(leaf.shape):
            raise WorkdirError(
                f"checkpoint entry {'.'.join(names)} has shape {value.shape}, expected "
                f"{tuple(leaf.shape)}"
            )
        if getattr(leaf, "sharding", None) is not None:
            value = jax.make_array_from_callback(
                value.shape, leaf.sharding, lambda i, v=value: v[i]
            )
        leaves.append(value)
    return jax.tree_util.tree_unflatten(treedef, leaves)


@dataclasses.dataclass(frozen=True)
class Restored:
    step: int
    state: Any
    meta: dict


class Reader:
    """Read-only access to the checkpoints of a workdir (or of a checkpoints directory).

    Never creates, cleans, renames or deletes anything: safe on a run in progress.
    """

    def __init__(self, path):
        self.directory = checkpoints_dir(path)

    def steps(self) -> list[int]:
        """Sorted steps of the finalized checkpoints (in-flight and partial saves excluded)."""
        import orbax.checkpoint as ocp  # noqa: PLC0415

        if not isdir(self.directory):
            return []
        out = []
        for name in listdir(self.directory):
            if not name.isdigit():
                continue
            try:
                if ocp.step.is_path_finalized(join(self.directory, name)):
                    out.append(int(name))
            except Exception:  # noqa: BLE001,S112 - vanished while listing: not a checkpoint
                continue
        return sorted(out)

    def meta(self, step: int) -> dict:
        """The JSON meta saved with checkpoint `step` (no array is read)."""
        path = join(self.directory, str(step), _META, _META_FILE)
        try:
            meta = read_json(path)
        except Exception as e:  # noqa: BLE001
            raise WorkdirError(
                f"checkpoint {step} in {self.directory} has no readable meta ({_first_line(e)})"
            ) from None
        if not isinstance(meta, dict):
            raise WorkdirError(f"checkpoint {step} in {self.directory}: meta is not a dict")
        return meta

    def latest_meta(self) -> tuple[int, dict] | None:
        """`(step, meta)` of the newest finalized checkpoint whose meta reads, or None."""
        for step in reversed(self.steps()):
            try:
                return step, self.meta(step)
            except WorkdirError as e:
                logging.warning("skipping checkpoint %d: %s", step, e)
        return None

    def _read_state(self, step: int, target, partial: bool):
        import orbax.checkpoint as ocp  # noqa: PLC0415

        from mae_jax.models import layout  # noqa: PLC0415

        path = join(self.directory, str(step), _STATE)
        std_logging.getLogger("absl").addFilter(_NO_ITEM_METADATA_WARNING)  # once: one instance
        with ocp.PyTreeCheckpointer() as reader:
            try:  # the tree as written (its metadata file is redundant otherwise)
                stored = reader.metadata(path).item_metadata.tree
            except Exception:  # noqa: BLE001 - lost metadata: restore by the target alone
                stored = None
            if partial and stored is not None:
                stored = {k: stored[k] for k in target if k in stored}
            want, have = layout.layout_of(target), layout.layout_of(stored)
            if want is None or have is None or want == have:
                return reader.restore(
                    path,
                    args=ocp.args.PyTreeRestore(
                        item=target,
                        restore_args=jax.tree.map(_restore_args, target),
                        partial_restore=partial,
                    ),
                )
            # Written with the blocks in the other layout (`scan_layers` changed since): read
            # it as written, on the host, then convert and place into the target's shardings.
            logging.info(
                "checkpoint %d holds the transformer blocks %s; converting them to %s",
                step,
                "stacked" if have else "per block",
                "stacked" if want else "per block",
            )
            as_written = jax.tree.map(
                lambda m: jax.ShapeDtypeStruct(tuple(m.shape), m.dtype), stored
            )
            raw = reader.restore(
                path,
                args=ocp.args.PyTreeRestore(
                    item=as_written,
                    restore_args=jax.tree.map(_restore_args, as_written),
                    partial_restore=partial,
                ),
            )
        return place(layout.convert(raw, want), target)

    def restore(
        self,
        target,
        *,
        step: int | None = None,
        partial: bool = False,
        check_meta: Callable[[dict, int], None] | None = None,
        on_damaged: Callable[[int, str], None] | None = None,
    ) -> Restored:
        """Restores the newest intact checkpoint (or exactly `step`) into `target`.

        `target`: the on-disk layout with `jax.ShapeDtypeStruct` leaves; leaves with a
        `.sharding` come back as `jax.Array`s with it, others as numpy. `partial`: read only the
        entries `target` holds (e.g. `{'params': ...}`). `check_meta(meta, step)` may refuse a
        checkpoint of another model (its error propagates). A newest checkpoint that cannot be
        read is skipped with a warning and the next older one is used (then `on_damaged(step,
        reason)` is told of each skipped one); when none is intact, one WorkdirError says what
        was wrong with each and nothing else happens.
        """
        if step is not None:
            available = self.steps()
            if step not in available:
                raise WorkdirError(
                    f"there is no finalized checkpoint {step} in {self.directory}; available "
                    f"steps: {available or 'none'}"
                )
            candidates = [step]
        else:
            candidates = list(reversed(self.steps()))
        if not candidates:
            raise WorkdirError(f"there is no finalized checkpoint in {self.directory}")
        problems, damaged = [], []
        tried = set()
        while candidates:
            s = candidates.pop(0)
            tried.add(s)
            reason = None
            try:
                meta = self.meta(s)
            except WorkdirError as e:
                meta, reason = None, str(e)
            if meta is not None and check_meta is not None:
                check_meta(meta, s)
            state = None
            if reason is None:
                try:
                    state = self._read_state(s, target, partial)
                except Exception as e:  # noqa: BLE001 - any unreadable file is damage
                    reason = _first_line(e)
            if not _agree(reason is None):
                reason = reason or "another process could not read it"
                if step is None and s not in self.steps():
                    # Deleted by the run that owns it (keep-last-K) while we read: not damage.
                    candidates = [x for x in reversed(self.steps()) if x not in tried]
                    continue
                problems.append(f"step {s}: {reason}")
                damaged.append((s, reason))
                _quiet_orbax_teardown()
                logging.warning(
                    "checkpoint %d in %s is damaged or unreadable (%s)%s",
                    s,
                    self.directory,
                    reason,
                    f"; trying step {candidates[0]} instead" if candidates else "",
                )
                continue
            if problems:
                logging.warning("restored checkpoint %d instead of the damaged newer one(s)", s)
            # Only once an intact one is found: set the damaged newer ones aside (nothing is
            # moved when none is intact, so a rerun fails the same way instead of restarting).
            for bad, why in damaged:
                if on_damaged is not None:
                    on_damaged(bad, why)
            return Restored(s, state, meta)
        raise WorkdirError(
            f"no intact checkpoint in {self.directory}: " + "; ".join(problems)
            if problems
            else f"no finalized checkpoint in {self.directory}"
        )

    def restore_params(self, abstract_params, *, step: int | None = None, **kw) -> Restored:
        """Only `state['params']` (a pure nested dict of ShapeDtypeStructs) of the newest
        intact checkpoint, or of `step`; nothing else is read."""
        r = self.restore({"params": abstract_params}, step=step, partial=True, **kw)
        return Restored(r.step, r.state["params"], r.meta)


# ----------------------------------------------------------------------------- writing
class Writer:
    """The one writer of a workdir: lock, checkpoints (async, keep-last-K, milestones), the
    run's JSON files, and preemption notices.

    Args:
      root: the workdir (local path or URI); created if missing.
      keep: keep the newest `keep` checkpoints ...
      keep_every: ... and, for good, every checkpoint whose step is a multiple of `keep_every`
        (0: none), e.g. the 100-epoch milestones of a long run.
      async_save: write in a background thread after the device-to-host copy.
      handle_sigterm: single process: a SIGTERM or SIGINT (Ctrl-C) sets `preemption_requested`
        (the loop saves the last completed step and exits; `stop_signal` says which came); a
        second one ends the process at once (the newest finalized checkpoint stays). With
        `jax.distributed`, JAX's preemption sync point decides instead (`preempted`).
    """

    def __init__(
        self,
        root,
        *,
        keep: int | None = 3,
        keep_every: int = 0,
        async_save: bool = True,
        handle_sigterm: bool = True,
    ):
        if keep is not None and (isinstance(keep, bool) or not isinstance(keep, int) or keep < 1):
            raise WorkdirError(f"keep_checkpoints must be a positive integer, got {keep!r}")
        if isinstance(keep_every, bool) or not isinstance(keep_every, int) or keep_every < 0:
            raise WorkdirError(f"the milestone period must be an integer >= 0, got {keep_every!r}")
        self.root = normalize(root)
        self.primary = jax.process_index() == 0
        self._lock = Lock(self.root)
        ok = True
        error = None
        self._created = self.primary and not exists(self.root)
        if self.primary:
            try:
                check_writable_dir(self.root)
                self._lock.acquire()
            except WorkdirError as e:
                ok, error = False, e
        self.checkpoints = join(self.root, CHECKPOINTS)
        if ok and self.primary:
            makedirs(self.checkpoints)
        if not _agree(ok):
            if error is not None:
                raise error
            raise WorkdirError(f"process 0 could not open the workdir {self.root}; see its log")
        self._keep, self.keep_every, self._async = keep, keep_every, async_save
        self._mngr = None
        self.stop_signal: int | None = None  # the first SIGTERM / SIGINT received
        self._sync_preempted = False
        self._prev_handlers: dict[int, Any] = {}
        self._pending: tuple[int, float] | None = None
        self._checkpoint_bytes = 0  # of the newest save: its arrays' size
        self._failed: DiskFullError | None = None
        if handle_sigterm:
            self._install_sigterm_handler()
        _quiet_disk_full_noise()

    # ------------------------------------------------------------------- reading own state
    def reader(self) -> Reader:
        return Reader(self.root)

    def restore(self, target, *, check_meta=None) -> Restored | None:
        """The newest intact checkpoint into `target` (on-disk layout), or None when the workdir
        has none. Damaged newer checkpoints are moved to `damaged_checkpoints/` (never deleted)
        so that new saves are not mistaken for older ones."""
        reader = self.reader()
        if not reader.steps():
            return None
        return reader.restore(target, check_meta=check_meta, on_damaged=self._quarantine)

    def _quarantine(self, step: int, reason: str) -> None:
        if not self.primary:
            return
        dest_root = join(self.root, DAMAGED)
        makedirs(dest_root)
        dest = join(dest_root, f"{step}-{int(time.time())}")
        rename(join(self.checkpoints, str(step)), dest)
        write_text(join(dest, "REASON.txt"), reason + "\n")
        logging.warning(
            "moved damaged checkpoint %d to %s (if the read failure was passing, move it back "
            "into %s before the next run)",
            step,
            dest,
            self.checkpoints,
        )

    # ------------------------------------------------------------------- preemption
    def _install_sigterm_handler(self):
        if jax.distributed.is_initialized():
            return  # JAX's preemption sync manager owns SIGTERM
        if threading.current_thread() is not threading.main_thread():
            return
        for signum in _STOP_SIGNALS:
            self._prev_handlers[signum] = signal.signal(signum, self._on_stop_signal)

    def _on_stop_signal(self, signum, frame):
        del frame
        name = _STOP_SIGNALS[signum]
        if self.stop_signal is not None:
            logging.warning(
                "second %s: exiting now; the newest finalized checkpoint stays usable", name
            )
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        self.stop_signal = signum
        again = "Ctrl-C" if signum == signal.SIGINT else "SIGTERM"
        logging.warning(
            "%s received: saving the last completed step, then exiting (%s again: exit at once)",
            name,
            again,
        )

    @property
    def preemption_requested(self) -> bool:
        return self.stop_signal is not None or self._sync_preempted

    def preempted(self, step: int) -> bool:
        """True once a preemption notice arrived. With several processes it is JAX's sync point:
        True on the same `step` on every process, so call it at every step on every process."""
        if not self._sync_preempted and jax.distributed.is_initialized():
            from jax.experimental import multihost_utils  # noqa: PLC0415

            try:
                self._sync_preempted = bool(multihost_utils.reached_preemption_sync_point(step))
            except RuntimeError:  # the preemption service is off
                pass
        return self.preemption_requested

    # ------------------------------------------------------------------- saving
    def _manager(self):
        if self._mngr is None:
            import orbax.checkpoint as ocp  # noqa: PLC0415

            policies = []
            if self._keep is not None:
                policies.append(ocp.checkpoint_managers.LatestN(n=self._keep))
            if self.keep_every:
                policies.append(ocp.checkpoint_managers.EveryNSteps(self.keep_every))
            preservation = (
                ocp.checkpoint_managers.AnyPreservationPolicy(policies)
                if self._keep is not None
                else None
            )
            options = ocp.CheckpointManagerOptions(
                create=True,
                cleanup_tmp_directories=True,  # safe: the lock says no one else writes here
                enable_async_checkpointing=self._async,
                async_options=(
                    ocp.AsyncOptions(post_finalization_callback=self._finalized)
                    if self._async
                    else None
                ),
                preservation_policy=preservation,
            )
            self._mngr = ocp.CheckpointManager(
                self.checkpoints, options=options, item_names=(_STATE, _META)
            )
        return self._mngr

    def steps(self) -> list[int]:
        """Finalized checkpoint steps (the one being written excluded)."""
        self._note_finished()
        writing = self._pending[0] if self._pending is not None else None
        return sorted(s for s in self._manager().all_steps() if s != writing)

    def _note_finished(self):
        if self._pending is not None and not self._manager().is_saving_in_progress():
            self._pending = None

    def _finalized(self):
        """Orbax's post-finalization callback (a background thread when saving asynchronously):
        the moment the checkpoint is complete on disk."""
        if self._pending is not None:
            step, started = self._pending
            logging.info("checkpoint %d saved (%.1f s)", step, time.perf_counter() - started)

    def save(self, step: int, state: Any, meta: dict) -> bool:
        """Starts saving `state` (the on-disk layout) and `meta` (JSON) as checkpoint `step`;
        False when that step is already saved. `wait()` for it to be finalized."""
        import orbax.checkpoint as ocp  # noqa: PLC0415

        try:
            json.dumps(meta, allow_nan=False)
        except (TypeError, ValueError) as e:
            raise ValueError(f"checkpoint meta must be JSON-serializable: {e}") from e
        mngr = self._manager()
        if step in mngr.all_steps():
            return False
        with self._disk_full_check(step):
            self._note_finished()
            started = time.perf_counter()
            self._checkpoint_bytes = sum(
                int(getattr(x, "nbytes", None) or np.asarray(x).nbytes)
                for x in jax.tree.leaves(state)
            )
            mngr.save(
                step,
                args=ocp.args.Composite(
                    **{_STATE: ocp.args.StandardSave(state), _META: ocp.args.JsonSave(meta)}
                ),
                force=True,
            )
            self._pending = (step, started)
            if not self._async:
                self._finalized()
        return True

    def wait(self) -> None:
        """Blocks until pending saves are finalized (and logs them)."""
        if self._mngr is not None:
            with self._disk_full_check(self._pending[0] if self._pending else None):
                self._mngr.wait_until_finished()
        self._note_finished()

    # ------------------------------------------------------------------- a full disk
    @contextlib.contextmanager
    def _disk_full_check(self, step: int | None):
        """A full file system inside the block becomes `disk_full`'s error; once that has
        been raised, later failures of the same save are dropped (already said)."""
        try:
            yield
        except Exception as e:
            if self._failed is not None:
                logging.info("after the full disk: %s", _first_line(e))
                return
            if not is_disk_full(e):
                raise
            raise self.disk_full(e, step) from None

    def disk_full(self, error: BaseException, step: int | None = None) -> DiskFullError:
        """The error to raise for a full file system (`error`, e.g. while saving checkpoint
        `step`): says which path is full, how large one checkpoint is and which checkpoints
        are intact, after removing the half-written one. Later save failures are dropped."""
        _quiet_orbax_teardown()
        removed = self._remove_partial() if self.primary else []
        failed = [int(n.split(".", 1)[0]) for n in removed if n.split(".", 1)[0].isdigit()]
        if failed:  # the save that failed (an asynchronous one fails at the next call)
            step = failed[-1]
        try:
            intact = sorted(s for s in self._manager().all_steps() if s != step)
        except Exception:  # noqa: BLE001 - the listing is best effort here
            intact = []
        self._pending = None
        logging.info("the full disk as reported: %s", _first_line(error, 1000))
        free = free_bytes(self.root)
        where = (
            f"{self.checkpoints} while saving checkpoint {step}" if step is not None else self.root
        )
        size = _megabytes(self._checkpoint_bytes) if self._checkpoint_bytes else "unknown"
        text = (
            f"no space left on the file system of {where}: one checkpoint is about {size}, "
            f"{_megabytes(free) if free is not None else 'an unknown amount'} free; intact "
            f"checkpoints: {intact or 'none'} in {self.checkpoints}"
        )
        if removed:
            text += f"; removed the half-written {', '.join(removed)}"
        room = (self._keep or 1) + 1
        then = f"rerun to resume from step {intact[-1]}" if intact else "rerun (it starts over)"
        text += (
            f"; free some space or use a --workdir with room for {room} checkpoints, then {then}"
        )
        self._failed = DiskFullError(text)
        return self._failed

    def _remove_partial(self) -> list[str]:
        """Removes the unfinished (temporary) checkpoint directories; returns their names."""
        removed = []
        try:
            names = listdir(self.checkpoints)
        except Exception:  # noqa: BLE001
            return removed
        for name in sorted(names, key=lambda n: (len(n), n)):
            if _TMP_MARK in name:
                try:
                    remove_tree(join(self.checkpoints, name))
                    removed.append(name)
                except Exception as e:  # noqa: BLE001 - say it, keep the first error
                    logging.warning("could not remove %s: %s", name, _first_line(e))
        return removed

    # ------------------------------------------------------------------- JSON files
    def write_config(self, resolved: dict, step: int) -> None:
        """`config.json` := `resolved`; a different earlier one goes to `config_history.json`
        with the step at which it was replaced (process 0 only)."""
        if not self.primary:
            return
        path = join(self.root, CONFIG)
        if exists(path):
            try:
                old = read_json(path)
            except ValueError:
                old = None
            if old is not None and old != json.loads(json.dumps(resolved, default=str)):
                hist_path = join(self.root, CONFIG_HISTORY)
                history = read_json(hist_path) if exists(hist_path) else []
                history.append({"replaced_at_step": step, "replaced_on": _now(), "config": old})
                write_json(hist_path, history)
        write_json(path, resolved)

    def write_results(self, results: dict) -> str:
        path = join(self.root, RESULTS)
        if self.primary:
            write_json(path, results)
        return path

    # ------------------------------------------------------------------- closing
    def close(self) -> None:
        """Waits for pending saves, then releases Orbax, the signal handlers and the lock."""
        try:
            if self._mngr is not None:
                with self._disk_full_check(self._pending[0] if self._pending else None):
                    self._mngr.wait_until_finished()
                    self._note_finished()
                    self._mngr.close()
                self._mngr = None
        finally:
            for signum, handler in self._prev_handlers.items():
                try:
                    signal.signal(signum, handler)
                except ValueError:
                    pass
            self._prev_handlers = {}
            if self.primary:
                self._lock.release()
                self._remove_if_unused()

    def _remove_if_unused(self) -> None:
        """A run that wrote nothing (refused before its first file) leaves no workdir behind:
        its empty `checkpoints/` and `lock` go, and the root too when this writer created it."""
        try:
            names = set(listdir(self.root))
            if not names <= {CHECKPOINTS, LOCK} or (
                CHECKPOINTS in names and listdir(self.checkpoints)
            ):
                return
            if LOCK in names:
                remove(join(self.root, LOCK))
            if is_remote(self.root):
                _gfile().rmtree(self.checkpoints)
            else:
                os.rmdir(self.checkpoints)
                if self._created:
                    os.rmdir(self.root)
        except Exception as e:  # noqa: BLE001 - tidying must not hide the run's own error
            logging.warning("could not remove the unused workdir files in %s: %s", self.root, e)

    def __enter__(self) -> Writer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def check_new_weights_dir(root) -> None:
    """Refuses a workdir that already holds checkpoints (read-only check)."""
    root = normalize(root)
    if exists(root) and not isdir(root):
        raise WorkdirError(f"the workdir {root} exists and is a file, not a directory")
    steps = Reader(root).steps() if exists(root) else []
    if steps:
        raise WorkdirError(
            f"{root} already holds checkpoints (steps {steps}); import into a new --workdir"
        )


def write_weights(root, state: dict, meta: dict) -> str:
    """A weights workdir (what `convert import` writes): `state` and `meta` as checkpoint 0 of
    a new workdir, finalized before returning. A workdir with checkpoints is refused."""
    with Writer(root, keep=None, async_save=False, handle_sigterm=False) as writer:
        check_new_weights_dir(writer.root)
        writer.save(0, state, meta)
        writer.wait()
        return writer.root


def read_results(path) -> dict:
    """The final evaluation a classification run wrote (`eval_results.json`)."""
    file = join(normalize(path), RESULTS)
    if not exists(file):
        raise WorkdirError(f"{file} does not exist: the run has not finished")
    return read_json(file)
