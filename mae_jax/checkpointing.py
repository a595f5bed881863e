"""Orbax checkpoints for training runs: async saves, keep last K, preemption saves.

A checkpoint at step `s` is the directory `<directory>/<s>/` holding two Orbax items:

- `state`: any pytree of `jax.Array`s (sharded over any mesh, multi-process), numpy
  arrays or Python scalars, written with `ocp.args.StandardSave`;
- `meta`: a JSON-serializable dict (data position, RNG seed info, model name, config
  summary), written with `ocp.args.JsonSave` by the primary process only.

Crash safety: Orbax writes each step into a temporary directory and renames it into
place only once every process has finished writing, so a process killed mid-save
leaves the older steps intact and the partial step invisible to `latest_step()`
(leftover temporary directories are removed when a `Checkpointer` is next opened).

Multi-process contract (Orbax's): every process calls `should_save`, `save`, `restore`,
`wait` and `close` with the same arguments at the same points; Orbax coordinates the
writes and only the primary process writes the JSON item and finalizes the directory.

Preemption: `should_save(step)` is also True once a preemption notice has arrived.
- With `jax.distributed` initialized, JAX's preemption sync manager receives the
  SIGTERM and Orbax's `reached_preemption(step)` turns True on the same step on every
  process. `should_save` must then be called at *every* step by every process.
- In a single process without `jax.distributed`, this class installs a SIGTERM
  handler (main thread only) that just sets a flag; the next `should_save(step)`
  returns True. A second SIGTERM terminates the process the default way.
In both cases `preemption_requested` becomes True; the trainer is expected to save,
`wait()` and exit cleanly.
"""

from __future__ import annotations

import json
import os
import signal
import threading
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from etils import epath

_STATE = "state"
_META = "meta"


def _as_path(directory) -> epath.Path:
    text = os.fspath(directory)
    if not text:
        raise ValueError("checkpoint directory must be a non-empty path, got ''")
    if "://" not in text:  # Local path: Orbax wants it absolute.
        text = os.path.abspath(os.path.expanduser(text))
    return epath.Path(text)


def _distributed_client_active() -> bool:
    return bool(jax.distributed.is_initialized())


class Checkpointer:
    """Saves and restores `(state, meta)` pairs at integer steps in one directory.

    Args:
      directory: root directory (local path or e.g. `gs://...`); created if missing.
      max_to_keep: keep only the latest K complete checkpoints (None keeps all).
      save_interval_steps: `should_save(step)` is True when `step % interval == 0`.
      async_save: write in a background thread after the blocking device-to-host copy
        (the caller may donate/delete the saved arrays as soon as `save` returns).
      enable_preemption_save: save on a preemption notice (see module docstring).
    """

    def __init__(
        self,
        directory,
        *,
        max_to_keep: int | None = 3,
        save_interval_steps: int = 1000,
        async_save: bool = True,
        enable_preemption_save: bool = True,
    ):
        if max_to_keep is not None and (not isinstance(max_to_keep, int) or max_to_keep < 1):
            raise ValueError(f"max_to_keep must be a positive int or None, got {max_to_keep!r}")
        if not isinstance(save_interval_steps, int) or save_interval_steps < 1:
            raise ValueError(
                f"save_interval_steps must be a positive int, got {save_interval_steps!r}"
            )
        path = _as_path(directory)
        if path.exists() and not path.is_dir():
            raise ValueError(f"checkpoint directory {str(path)!r} exists and is not a directory")
        self.directory = path
        self.save_interval_steps = save_interval_steps
        self._enable_preemption = enable_preemption_save
        self._sigterm_received = False
        self._preempted = False
        self._pending_step: int | None = None
        self._prev_sigterm_handler = None

        policies = [ocp.checkpoint_managers.FixedIntervalPolicy(save_interval_steps)]
        if enable_preemption_save:
            policies.append(ocp.checkpoint_managers.PreemptionCheckpointingPolicy())
        preservation = (
            ocp.checkpoint_managers.LatestN(n=max_to_keep) if max_to_keep is not None else None
        )
        options = ocp.CheckpointManagerOptions(
            create=True,
            cleanup_tmp_directories=True,
            enable_async_checkpointing=async_save,
            save_decision_policy=ocp.checkpoint_managers.AnySavePolicy(policies),
            preservation_policy=preservation,
        )
        self._mngr = ocp.CheckpointManager(path, options=options, item_names=(_STATE, _META))
        if enable_preemption_save:
            self._maybe_install_sigterm_handler()

    # ----------------------------------------------------------------- preemption
    def _maybe_install_sigterm_handler(self):
        if _distributed_client_active():
            return  # JAX's preemption sync manager owns SIGTERM.
        if threading.current_thread() is not threading.main_thread():
            logging.warning(
                "Checkpointer created off the main thread: no SIGTERM handler; "
                "preemption saves rely on jax.distributed only."
            )
            return
        self._prev_sigterm_handler = signal.signal(signal.SIGTERM, self._on_sigterm)

    def _on_sigterm(self, signum, frame):
        del frame
        if self._sigterm_received:  # Second notice: die the default way.
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        self._sigterm_received = True
        logging.warning("SIGTERM received: a checkpoint will be saved at the next step.")

    def _restore_sigterm_handler(self):
        if self._prev_sigterm_handler is not None:
            try:
                signal.signal(signal.SIGTERM, self._prev_sigterm_handler)
            except ValueError:  # Not on the main thread.
                pass
            self._prev_sigterm_handler = None

    @property
    def preemption_requested(self) -> bool:
        """True once a preemption notice (SIGTERM / JAX sync point) has been seen."""
        return self._sigterm_received or self._preempted

    # --------------------------------------------------------------------- steps
    def all_steps(self) -> list[int]:
        """Sorted steps of the complete checkpoints (an in-flight async save excluded)."""
        steps = set(self._mngr.all_steps())
        if self._pending_step is not None:
            if self._mngr.is_saving_in_progress():
                steps.discard(self._pending_step)
            else:
                self._pending_step = None
        return sorted(steps)

    def latest_step(self) -> int | None:
        """Latest complete checkpoint step, or None when there is none."""
        steps = self.all_steps()
        return steps[-1] if steps else None

    def should_save(self, step: int) -> bool:
        """True if `step` is on the save interval or a preemption notice arrived.

        Never True for a step at or below the latest saved one. On several processes,
        call this at every step on every process (JAX's preemption sync protocol).
        """
        step = self._check_step(step)
        if self._mngr.should_save(step):
            if self._enable_preemption and self._mngr.reached_preemption(step):
                self._preempted = True
            return True
        if self._sigterm_received:
            latest = self._mngr.latest_step()
            return latest is None or step > latest
        return False

    # ---------------------------------------------------------------- save/load
    def save(self, step: int, state: Any, meta: dict, *, force: bool = False) -> bool:
        """Saves `state` (pytree of arrays) and `meta` (JSON dict) at `step`.

        Without `force`, saves only when `should_save(step)` holds. With `force`, saves
        unless `step` is already saved. Returns whether a save was started; with
        `async_save` it completes in the background (see `wait`).
        """
        step = self._check_step(step)
        if not isinstance(meta, dict):
            raise ValueError(f"meta must be a dict, got {type(meta).__name__}")
        try:
            json.dumps(meta, allow_nan=False)
        except (TypeError, ValueError) as e:
            raise ValueError(
                f"meta must be JSON-serializable (finite numbers, str keys): {e}"
            ) from e
        if step in self._mngr.all_steps():
            logging.info("Checkpoint for step %d already exists; not saving again.", step)
            return False
        if not force and not self.should_save(step):
            return False
        saved = self._mngr.save(
            step,
            args=ocp.args.Composite(
                **{_STATE: ocp.args.StandardSave(state), _META: ocp.args.JsonSave(meta)}
            ),
            force=True,
        )
        if saved:
            self._pending_step = step
        return saved

    def restore(self, step: int, abstract_state: Any) -> tuple[Any, dict]:
        """Restores `(state, meta)` saved at `step`.

        `abstract_state` mirrors the saved pytree with `jax.ShapeDtypeStruct` leaves
        (e.g. from `jax.eval_shape`) carrying `.sharding`; arrays come back as
        `jax.Array`s with exactly those shardings (any mesh, not necessarily the one
        used to save). Leaves without a sharding come back as numpy arrays.
        """
        step = self._existing_step(step)
        restored = self._mngr.restore(
            step,
            args=ocp.args.Composite(
                **{_STATE: ocp.args.StandardRestore(abstract_state), _META: ocp.args.JsonRestore()}
            ),
        )
        return restored[_STATE], dict(restored[_META])

    def restore_partial(self, step: int, abstract_subtree: Any) -> Any:
        """Restores only the entries of the saved state that `abstract_subtree` holds (e.g.
        `{'params': ...}` without the optimizer state), reading nothing else.

        Leaves are `jax.ShapeDtypeStruct`s: with a `.sharding` they come back as `jax.Array`s
        with that sharding, without one as numpy arrays.
        """
        step = self._existing_step(step)

        def args(leaf):
            if getattr(leaf, "sharding", None) is not None:
                return ocp.ArrayRestoreArgs(
                    sharding=leaf.sharding, global_shape=leaf.shape, dtype=leaf.dtype
                )
            return ocp.RestoreArgs(restore_type=np.ndarray, dtype=leaf.dtype)

        with ocp.PyTreeCheckpointer() as reader:
            return reader.restore(
                self.directory / str(step) / _STATE,
                args=ocp.args.PyTreeRestore(
                    item=abstract_subtree,
                    restore_args=jax.tree.map(args, abstract_subtree),
                    partial_restore=True,
                ),
            )

    def read_meta(self, step: int) -> dict:
        """The meta dict saved at `step`, without reading any array."""
        step = self._existing_step(step)
        restored = self._mngr.restore(
            step, args=ocp.args.Composite(**{_META: ocp.args.JsonRestore()})
        )
        return dict(restored[_META])

    def wait(self):
        """Blocks until pending async saves are finished and committed."""
        self._mngr.wait_until_finished()
        self._pending_step = None

    def close(self):
        """Waits for pending saves, releases Orbax resources, restores SIGTERM handling."""
        try:
            self._mngr.close()
        finally:
            self._pending_step = None
            self._restore_sigterm_handler()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # ------------------------------------------------------------------- helpers
    @staticmethod
    def _check_step(step) -> int:
        if isinstance(step, bool):
            raise ValueError(f"step must be a non-negative int, got {step!r}")
        try:
            value = int(step)
        except (TypeError, ValueError):
            raise ValueError(f"step must be a non-negative int, got {step!r}") from None
        if value != step or value < 0:
            raise ValueError(f"step must be a non-negative int, got {step!r}")
        return value

    def _existing_step(self, step) -> int:
        step = self._check_step(step)
        if self._pending_step == step:
            self.wait()  # Restoring the step being written: let it finish first.
        available = self.all_steps()
        if step not in available:
            raise ValueError(
                f"no complete checkpoint for step {step} in {str(self.directory)!r}; "
                f"available steps: {available}"
            )
        return step
