"""The writer's lock on a workdir: one writer at a time, a killed writer's lock taken over."""

from __future__ import annotations

import datetime
import fcntl
import json
import os
import socket
import threading
import time

from absl import logging

from mae_jax.workdir import paths
from mae_jax.workdir.paths import WorkdirError


def now() -> str:
    return datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _holder(text) -> dict:
    """The holder a lock file names ({} when unreadable)."""
    try:
        holder = json.loads(text or "{}")
    except ValueError:
        return {}
    return holder if isinstance(holder, dict) else {}


def _describe(holder: dict) -> str:
    return ", ".join(f"{key} {holder.get(key, '?')}" for key in ("host", "pid", "started"))


class Lock:
    """The writer's exclusive lock on a workdir (file `lock`, holding host, pid, start time).

    Local file systems: an `flock` on the file, which the kernel drops when the holder dies, so
    a lock left by a killed process is taken over at once. Object stores (`gs://`): a lease the
    holder renews every `heartbeat_s`; a lease older than `stale_s`, or one held by a dead
    process of this host, is taken over.
    """

    def __init__(self, root: str, *, heartbeat_s: float = 60.0, stale_s: float = 600.0):
        self.path = paths.join(root, paths.LOCK)
        self._root = root
        self._heartbeat_s = heartbeat_s
        self._stale_s = stale_s
        self._fd: int | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.holder = {"host": socket.gethostname(), "pid": os.getpid(), "started": now()}

    def _refuse(self, holder: dict):
        raise WorkdirError(
            f"the workdir {self._root} is in use by another run ({_describe(holder)}); stop "
            f"that run first or choose another --workdir"
        )

    def _take_over(self, left: dict):
        logging.warning(
            "taking over the lock of %s left by a run that is no longer running (%s)",
            self._root,
            _describe(left),
        )

    def acquire(self) -> Lock:
        if paths.is_remote(self.path):
            self._acquire_lease()
        else:
            self._acquire_flock()
        return self

    def _acquire_flock(self):
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _holder(os.pread(fd, 4096, 0))
            os.close(fd)
            self._refuse(holder)
        old = os.pread(fd, 4096, 0)
        if old.strip():
            self._take_over(_holder(old))
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(self.holder).encode(), 0)
        os.fsync(fd)
        self._fd = fd

    def _lease_alive(self, holder: dict) -> bool:
        if holder.get("host") == socket.gethostname() and isinstance(holder.get("pid"), int):
            return _pid_alive(holder["pid"])
        return time.time() - float(holder.get("heartbeat", 0)) < self._stale_s

    def _acquire_lease(self):
        holder = _holder(paths.read_text(self.path)) if paths.exists(self.path) else {}
        if holder and self._lease_alive(holder):
            self._refuse(holder)
        if holder:
            self._take_over(holder)
        self._write_lease()
        time.sleep(0.05)  # a racing writer's lease would land in between: re-read
        holder = paths.read_json(self.path)
        if any(holder.get(k) != self.holder[k] for k in ("started", "pid")):
            self._refuse(holder)
        self._thread = threading.Thread(target=self._renew, name="workdir-lock", daemon=True)
        self._thread.start()

    def _write_lease(self):
        paths.write_json(self.path, {**self.holder, "heartbeat": time.time()})

    def _renew(self):
        while not self._stop.wait(self._heartbeat_s):
            try:
                self._write_lease()
            except Exception as e:  # noqa: BLE001 - a failed renewal must not kill training
                logging.warning("could not renew the workdir lock %s: %s", self.path, e)

    def release(self) -> None:
        if self._fd is not None:
            os.ftruncate(self._fd, 0)
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self._thread = None
            try:
                if paths.read_json(self.path).get("pid") == self.holder["pid"]:
                    paths.remove(self.path)
            except Exception as e:  # noqa: BLE001
                logging.warning("could not remove the workdir lock %s: %s", self.path, e)
