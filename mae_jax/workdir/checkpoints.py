"""Orbax checkpoints of a workdir: `Writer` (the one writer: lock, saves, the run's JSON files,
preemption notices) and `Reader` (read-only: the newest intact checkpoint).

Multi-process (Orbax's contract): every process calls `Writer.save`, `restore`, `wait`, `close`
at the same points with the same arguments; process 0 alone takes the lock and writes the JSON
files, and all processes agree on which checkpoint they restored.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import json
import logging as std_logging
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from flax import nnx
from jax.experimental import multihost_utils

from mae_jax.models import layout
from mae_jax.optim import path_names
from mae_jax.spec import require
from mae_jax.workdir import paths
from mae_jax.workdir.lock import Lock, now
from mae_jax.workdir.paths import WorkdirError

_STATE = "state"
_META = "meta"
_META_FILE = "metadata"  # the file Orbax's JsonSave writes inside `meta/`
_TMP_MARK = ".orbax-checkpoint-tmp"  # in the name of a checkpoint Orbax is still writing
# The signals that ask a run to save its last completed step and stop (`Writer`).
_STOP_SIGNALS = {signal.SIGTERM: "SIGTERM", signal.SIGINT: "Ctrl-C (SIGINT)"}


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


# ----------------------------------------------------------------------------- state layout
def _is_var(x) -> bool:
    return isinstance(x, nnx.Variable)


def _strip(tree):
    """Variables -> their values (for Orbax); other leaves unchanged."""
    return jax.tree.map(lambda v: v.get_value() if _is_var(v) else v, tree, is_leaf=_is_var)


def to_checkpoint(state: dict) -> dict:
    """Train state -> the on-disk layout: `params` a pure nested dict (as the converter and the
    evaluation tools read it), every other entry with its Variables stripped, but `window` (the
    metrics since the last log line: JSON in the meta, `train_step.StepFns.window_json`, so that
    checkpoints written before it existed still restore)."""
    out = {k: _strip(v) for k, v in state.items() if k not in ("params", "window")}
    out["params"] = nnx.to_pure_dict(state["params"])
    return out


def abstract_checkpoint(abstract_state: dict, shardings: dict) -> dict:
    """The on-disk layout of `abstract_state` as ShapeDtypeStructs carrying `shardings`."""

    def struct(a, s):
        return jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s)

    return to_checkpoint(jax.tree.map(struct, _strip(abstract_state), _strip(shardings)))


def from_checkpoint(restored: dict, abstract_state: dict) -> dict:
    """The on-disk layout -> a train state shaped like `abstract_state` (Variables rewrapped),
    without `window` (`train_step.StepFns.set_window`)."""

    def rewrap(template, values):
        return jax.tree.map(
            lambda v, x: v.replace(x) if _is_var(v) else x, template, values, is_leaf=_is_var
        )

    keys = restored.keys() - {"params"}
    out = {k: rewrap(v, restored[k]) for k, v in abstract_state.items() if k in keys}
    out["params"] = jax.tree.map(lambda x: x, abstract_state["params"])
    nnx.replace_by_pure_dict(out["params"], restored["params"])
    return out


# ----------------------------------------------------------------------------- reading
def checkpoints_dir(path) -> str:
    """`path/checkpoints` for a workdir, or `path` itself when it is a checkpoints directory."""
    root = paths.normalize(path)
    if not paths.exists(root):
        raise WorkdirError(f"{root} does not exist")
    if not paths.isdir(root):
        raise WorkdirError(f"{root} is a file, not a workdir")
    sub = paths.join(root, paths.CHECKPOINTS)
    return sub if paths.isdir(sub) else root


def _agree(ok: bool) -> bool:
    """True only when `ok` holds on every process (a collective when there are several)."""
    if jax.process_count() == 1:
        return ok
    return bool(np.min(multihost_utils.process_allgather(np.asarray(int(ok), np.int32))))


def _quiet_orbax_teardown() -> None:
    """After a failed read, Orbax's abandoned reads report "Event loop is closed" from garbage
    collection, hundreds of times; those (and only those) are dropped, once noted."""
    previous = sys.unraisablehook
    if getattr(previous, "_mae_jax_quiet", False):
        return

    def hook(unraisable):
        exc = unraisable.exc_value
        if not (isinstance(exc, RuntimeError) and str(exc) == "Event loop is closed"):
            previous(unraisable)

    hook._mae_jax_quiet = True
    sys.unraisablehook = hook


def _no_item_metadata_warning(record: std_logging.LogRecord) -> bool:
    """Orbax's `PyTreeCheckpointer` looks for a step-level `_CHECKPOINT_METADATA` file inside
    the item (`<step>/state/`), where the checkpoint manager never writes one, and warns that it
    "does not exist" on every read of an intact checkpoint: that warning (only) is dropped."""
    return not (
        record.msg == "Metadata file does not exist: %s"
        and os.fspath(record.args[0] if record.args else "").endswith(
            f"{_STATE}/_CHECKPOINT_METADATA"
        )
    )


def _quiet_disk_full_noise() -> None:
    """While a Writer saves: Orbax's threads report a full disk with a traceback per thread and
    TensorStore's callbacks report "Event loop is closed" afterwards; the Writer says it once
    (`Writer.disk_full`), so those log records keep their line but lose the traceback, and the
    "Event loop is closed" reports are dropped (`_quiet_orbax_teardown`)."""
    logging.get_absl_handler().addFilter(_disk_full_tracebacks)  # once: one function
    _quiet_orbax_teardown()


def _disk_full_tracebacks(record: std_logging.LogRecord) -> bool:
    if record.exc_info and record.exc_info[1] is not None and is_disk_full(record.exc_info[1]):
        if record.name == "asyncio":  # "exception was never retrieved", per array
            return False
        record.exc_info, record.exc_text = None, None
    return True


def _restore_args(leaf):
    if getattr(leaf, "sharding", None) is not None:
        return ocp.ArrayRestoreArgs(
            sharding=leaf.sharding, global_shape=leaf.shape, dtype=leaf.dtype
        )
    return ocp.RestoreArgs(restore_type=np.ndarray, dtype=leaf.dtype)


def place(values, target):
    """Nested dicts/lists of numpy arrays -> `target`'s structure, leaf by key path; leaves
    whose target has a sharding become `jax.Array`s with it."""
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
        if not paths.isdir(self.directory):
            return []
        out = []
        for name in paths.listdir(self.directory):
            if not name.isdigit():
                continue
            try:
                if ocp.step.is_path_finalized(paths.join(self.directory, name)):
                    out.append(int(name))
            except Exception:  # noqa: BLE001,S112 - vanished while listing: not a checkpoint
                continue
        return sorted(out)

    def meta(self, step: int) -> dict:
        """The JSON meta saved with checkpoint `step` (no array is read)."""
        path = paths.join(self.directory, str(step), _META, _META_FILE)
        try:
            meta = paths.read_json(path)
        except Exception as e:  # noqa: BLE001
            raise WorkdirError(
                f"checkpoint {step} in {self.directory} has no readable meta "
                f"({paths.first_line(e)})"
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
        path = paths.join(self.directory, str(step), _STATE)
        std_logging.getLogger("absl").addFilter(_no_item_metadata_warning)  # once: one function
        with ocp.PyTreeCheckpointer() as reader:

            def read(item):
                args = jax.tree.map(_restore_args, item)
                return reader.restore(
                    path,
                    args=ocp.args.PyTreeRestore(item, restore_args=args, partial_restore=partial),
                )

            try:  # the tree as written (its metadata file is redundant otherwise)
                stored = reader.metadata(path).item_metadata.tree
            except Exception:  # noqa: BLE001 - lost metadata: restore by the target alone
                stored = None
            if partial and stored is not None:
                stored = {k: stored[k] for k in target if k in stored}
            want, have = layout.layout_of(target), layout.layout_of(stored)
            if want is None or have is None or want == have:
                return read(target)
            # Written with the blocks in the other layout (`scan_layers` changed since): read
            # it as written, on the host, then convert and place into the target's shardings.
            logging.info(
                "checkpoint %d holds the transformer blocks %s; converting them to %s",
                step,
                "stacked" if have else "per block",
                "stacked" if want else "per block",
            )
            raw = read(
                jax.tree.map(lambda m: jax.ShapeDtypeStruct(tuple(m.shape), m.dtype), stored)
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
        available = self.steps()
        if step is not None and step not in available:
            raise WorkdirError(
                f"there is no finalized checkpoint {step} in {self.directory}; available "
                f"steps: {available or 'none'}"
            )
        candidates = [step] if step is not None else available[::-1]
        if not candidates:
            raise WorkdirError(f"there is no finalized checkpoint in {self.directory}")
        damaged, tried = [], set()
        while candidates:
            s = candidates.pop(0)
            tried.add(s)
            meta = state = reason = None
            try:
                meta = self.meta(s)
            except WorkdirError as e:
                reason = str(e)
            else:
                if check_meta is not None:
                    check_meta(meta, s)
                try:
                    state = self._read_state(s, target, partial)
                except Exception as e:  # noqa: BLE001 - any unreadable file is damage
                    reason = paths.first_line(e)
            if not _agree(reason is None):
                reason = reason or "another process could not read it"
                _quiet_orbax_teardown()  # the abandoned reads' noise, whatever the cause
                if step is None and s not in (now := self.steps()):
                    # Deleted by the run that owns it (keep-last-K) while we read: not damage.
                    candidates = [x for x in reversed(now) if x not in tried]
                    continue
                damaged.append((s, reason))
                logging.warning(
                    "checkpoint %d in %s is damaged or unreadable (%s)%s",
                    s,
                    self.directory,
                    reason,
                    f"; trying step {candidates[0]} instead" if candidates else "",
                )
                continue
            if damaged:
                logging.warning("restored checkpoint %d instead of the damaged newer one(s)", s)
            # Only once an intact one is found: set the damaged newer ones aside (nothing is
            # moved when none is intact, so a rerun fails the same way instead of restarting).
            if on_damaged is not None:
                for bad, why in damaged:
                    on_damaged(bad, why)
            return Restored(s, state, meta)
        raise WorkdirError(
            f"no intact checkpoint in {self.directory}: "
            + "; ".join(f"step {bad}: {why}" for bad, why in damaged)
            if damaged
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
        require("keep_checkpoints", keep, "?int>=1", WorkdirError)
        require("the milestone period", keep_every, "int>=0", WorkdirError)
        self.root = paths.normalize(root)
        self.primary = jax.process_index() == 0
        self._lock = Lock(self.root)
        self.checkpoints = paths.join(self.root, paths.CHECKPOINTS)
        self._created = self.primary and not paths.exists(self.root)
        error = None
        if self.primary:
            try:
                paths.check_writable_dir(self.root)
                self._lock.acquire()
            except WorkdirError as e:
                error = e
            else:
                paths.makedirs(self.checkpoints)
        if not _agree(error is None):
            raise error or WorkdirError(
                f"process 0 could not open the workdir {self.root}; see its log"
            )
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
        dest_root = paths.join(self.root, paths.DAMAGED)
        paths.makedirs(dest_root)
        dest = paths.join(dest_root, f"{step}-{int(time.time())}")
        paths.rename(paths.join(self.checkpoints, str(step)), dest)
        paths.write_text(paths.join(dest, "REASON.txt"), reason + "\n")
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

    def _on_stop_signal(self, signum, _frame):
        name = _STOP_SIGNALS[signum]
        if self.stop_signal is not None:
            logging.warning(
                "second %s: exiting now; the newest finalized checkpoint stays usable", name
            )
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        self.stop_signal = signum
        logging.warning(
            "%s received: saving the last completed step, then exiting (%s again: exit at once)",
            name,
            "Ctrl-C" if signum == signal.SIGINT else "SIGTERM",
        )

    @property
    def preemption_requested(self) -> bool:
        return self.stop_signal is not None or self._sync_preempted

    def preempted(self, step: int) -> bool:
        """True once a preemption notice arrived. With several processes it is JAX's sync point:
        True on the same `step` on every process, so call it at every step on every process."""
        if not self._sync_preempted and jax.distributed.is_initialized():
            with contextlib.suppress(RuntimeError):  # the preemption service is off
                self._sync_preempted = bool(multihost_utils.reached_preemption_sync_point(step))
        return self.preemption_requested

    # ------------------------------------------------------------------- saving
    def _manager(self):
        if self._mngr is not None:
            return self._mngr
        if jax.default_backend() == "cpu":
            # Orbax writes replicated arrays in slices, one per replica, each slice a jitted
            # program per shape and device: on one CPU host nothing is gained, and the first
            # save of the tiny model on 8 devices took 5.4 s instead of 0.4 s.
            ocp.type_handlers.register_type_handler(
                jax.Array, ocp.type_handlers.ArrayHandler(use_replica_parallel=False), override=True
            )
        preservation = None
        if self._keep is not None:
            policies = [ocp.checkpoint_managers.LatestN(n=self._keep)]
            if self.keep_every:
                policies.append(ocp.checkpoint_managers.EveryNSteps(self.keep_every))
            preservation = ocp.checkpoint_managers.AnyPreservationPolicy(policies)
        finalized = ocp.AsyncOptions(post_finalization_callback=self._finalized)
        options = ocp.CheckpointManagerOptions(
            create=True,
            cleanup_tmp_directories=True,  # safe: the lock says no one else writes here
            enable_async_checkpointing=self._async,
            async_options=finalized if self._async else None,
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
            items = {_STATE: ocp.args.StandardSave(state), _META: ocp.args.JsonSave(meta)}
            mngr.save(step, args=ocp.args.Composite(**items), force=True)
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
                logging.info("after the full disk: %s", paths.first_line(e))
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
        logging.info("the full disk as reported: %s", paths.first_line(error, 1000))
        free_bytes = paths.free_bytes(self.root)
        where = (
            f"{self.checkpoints} while saving checkpoint {step}" if step is not None else self.root
        )
        size = f"{self._checkpoint_bytes / 1e6:.1f} MB" if self._checkpoint_bytes else "unknown"
        free = f"{free_bytes / 1e6:.1f} MB" if free_bytes is not None else "an unknown amount"
        text = (
            f"no space left on the file system of {where}: one checkpoint is about {size}, "
            f"{free} free; intact checkpoints: {intact or 'none'} in {self.checkpoints}"
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
            names = paths.listdir(self.checkpoints)
        except Exception:  # noqa: BLE001
            return removed
        for name in sorted(names, key=lambda n: (len(n), n)):
            if _TMP_MARK in name:
                try:
                    paths.remove_tree(paths.join(self.checkpoints, name))
                    removed.append(name)
                except Exception as e:  # noqa: BLE001 - say it, keep the first error
                    logging.warning("could not remove %s: %s", name, paths.first_line(e))
        return removed

    # ------------------------------------------------------------------- JSON files
    def write_config(self, resolved: dict, step: int) -> None:
        """`config.json` := `resolved`; a different earlier one goes to `config_history.json`
        with the step at which it was replaced (process 0 only)."""
        if not self.primary:
            return
        path = paths.join(self.root, paths.CONFIG)
        if paths.exists(path):
            try:
                old = paths.read_json(path)
            except ValueError:
                old = None
            if old is not None and old != json.loads(json.dumps(resolved, default=str)):
                hist_path = paths.join(self.root, paths.CONFIG_HISTORY)
                history = paths.read_json(hist_path) if paths.exists(hist_path) else []
                history.append({"replaced_at_step": step, "replaced_on": now(), "config": old})
                paths.write_json(hist_path, history)
        paths.write_json(path, resolved)

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
                with contextlib.suppress(ValueError):
                    signal.signal(signum, handler)
            self._prev_handlers = {}
            if self.primary:
                self._lock.release()
                self._remove_if_unused()

    def _remove_if_unused(self) -> None:
        """A run that wrote nothing (refused before its first file) leaves no workdir behind:
        its empty `checkpoints/` and `lock` go, and the root too when this writer created it."""
        try:
            names = set(paths.listdir(self.root))
            if not names <= {paths.CHECKPOINTS, paths.LOCK} or (
                paths.CHECKPOINTS in names and paths.listdir(self.checkpoints)
            ):
                return
            if paths.LOCK in names:
                paths.remove(paths.join(self.root, paths.LOCK))
            if paths.is_remote(self.root):
                paths.remove_tree(self.checkpoints)
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
