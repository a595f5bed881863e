"""Real training processes for the fault tests (tests/test_faults_*.py): `Proc` (a spawned
command whose stdout is read line by line), `Spawner` (the `spawn` fixture of conftest.py), the
commands, and readers of a workdir's files.

Every process is `python -m mae_jax.main --config=configs/smoke.py` (the tiny model on the
embedded images, on the CPU, one device) or `python -m mae_jax.convert export`. The processes
share the session's JAX compilation cache, which shortens a start-up from about 40 s to about
10 s. The stdout and stderr of every process are saved in the test's tmp_path
(`<name>.stdout`, `<name>.stderr`) and their tails are in the failure messages.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
# CPU, one device (not conftest's 8 simulated ones), the session's compilation cache (inherited).
ENV = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"} | {
    "JAX_PLATFORMS": "cpu",
    "CUDA_VISIBLE_DEVICES": "",
    "TF_CPP_MIN_LOG_LEVEL": "2",
    "PYTHONUNBUFFERED": "1",
    "PYTHONPATH": os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p),
}

START_TIMEOUT = 300  # launch -> first metrics line (imports and compilation on a busy machine)
EXIT_TIMEOUT = 120  # SIGTERM -> exit (one save of the tiny model)
RUN_TIMEOUT = 420  # a whole short run
REFUSE_TIMEOUT = 60  # a second trainer: launch -> refused
EXPORT_TIMEOUT = 180  # one `convert export`
# SIGTERM this long after the launch: still importing (no handler yet), or starting up (the
# workdir is open, no step has run).
SIGNAL_DELAY = {"at_launch": 0.5, "during_startup": 3.0}

# Small and quick: batch 16, no reconstruction images, a metrics line at every step.
BASE_OVERRIDES = (
    "--config.batch_size=16",
    "--config.reconstruction_every_steps=0",
    "--config.log_every_steps=1",
)
STEP_LINE = re.compile(r"^step (\d+)/(\d+)\s")
NOTICE = re.compile(r"^preemption notice: saved step (\d+) in (.+); exiting$", re.MULTILINE)
RESUMED = re.compile(r"resumed from step (\d+)\b")
TMP_MARK = "orbax-checkpoint-tmp"


# ------------------------------------------------------------------------------ processes
def train_cmd(workdir, **config) -> list[str]:
    return [
        sys.executable,
        "-m",
        "mae_jax.main",
        "--config=configs/smoke.py",
        f"--workdir={workdir}",
        *BASE_OVERRIDES,
        *(f"--config.{k}={v}" for k, v in config.items()),
    ]


def export_cmd(workdir, output) -> list[str]:
    return [
        sys.executable,
        "-m",
        "mae_jax.convert",
        "export",
        "--workdir",
        str(workdir),
        "--format",
        "official",
        "--output",
        str(output),
    ]


class Proc:
    """A spawned command: stdout is read line by line by a thread (and saved to
    `<name>.stdout`), stderr goes straight to `<name>.stderr`."""

    def __init__(self, name: str, cmd: list[str], log_dir: Path):
        self.name = name
        self.out_path = log_dir / f"{name}.stdout"
        self.err_path = log_dir / f"{name}.stderr"
        self._lines: list[str] = []
        self._eof = False
        self._cond = threading.Condition()
        with open(self.err_path, "w") as err:
            self.popen = subprocess.Popen(
                cmd,
                cwd=REPO,
                env=ENV,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=err,
                text=True,
                start_new_session=True,
            )
        self.pid = self.popen.pid
        self._pump = threading.Thread(target=self._read_stdout, daemon=True)
        self._pump.start()

    def _read_stdout(self):
        with open(self.out_path, "w") as f:
            for line in self.popen.stdout:
                f.write(line)
                f.flush()
                with self._cond:
                    self._lines.append(line)
                    self._cond.notify_all()
        with self._cond:
            self._eof = True
            self._cond.notify_all()

    @property
    def running(self) -> bool:
        return self.popen.poll() is None

    @property
    def stdout(self) -> str:
        with self._cond:
            return "".join(self._lines)

    @property
    def stderr(self) -> str:
        return self.err_path.read_text(errors="replace")

    def tail(self, n: int = 3000) -> str:
        return (
            f"\n--- {self.name} (pid {self.pid}, exit code {self.popen.poll()}) stdout "
            f"[{self.out_path}]:\n{self.stdout[-n:]}\n--- {self.name} stderr "
            f"[{self.err_path}]:\n{self.stderr[-n:]}"
        )

    def wait_for_step(self, at_least: int, timeout: float = START_TIMEOUT) -> int:
        """Blocks until a `step N/...` line with N >= `at_least` is printed; returns N."""
        deadline = time.monotonic() + timeout
        seen = 0
        with self._cond:
            while True:
                for line in self._lines[seen:]:
                    m = STEP_LINE.match(line)
                    if m and int(m.group(1)) >= at_least:
                        return int(m.group(1))
                seen = len(self._lines)
                left = deadline - time.monotonic()
                if self._eof or left <= 0:
                    break
                self._cond.wait(min(left, 1.0))
        pytest.fail(
            f"{self.name}: no line 'step N/...' with N >= {at_least} within {timeout} s"
            + self.tail()
        )

    def signal(self, signum: int) -> None:
        self.popen.send_signal(signum)

    def wait(self, timeout: float = RUN_TIMEOUT) -> int:
        try:
            rc = self.popen.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            pytest.fail(f"{self.name} did not exit within {timeout} s" + self.tail())
        self._pump.join(timeout=30)
        return rc

    def kill(self) -> None:
        if self.popen.poll() is None:
            self.popen.kill()
            try:
                self.popen.wait(timeout=30)
            except subprocess.TimeoutExpired:
                pass


class Spawner:
    def __init__(self, log_dir: Path):
        self.log_dir, self.procs = log_dir, []

    def __call__(self, name: str, cmd: list[str]) -> Proc:
        proc = Proc(name, cmd, self.log_dir)
        self.procs.append(proc)
        return proc

    def train(self, name: str, workdir, **config) -> Proc:
        return self(name, train_cmd(workdir, **config))

    def until_step(self, name: str, workdir, step: int, total_steps=2000, **config):
        """A trainer far from its end, without periodic checkpoints (a checkpoint on disk can
        only come from a signal), once it printed step `step` or later: `(proc, step seen)`."""
        proc = self.train(
            name, workdir, total_steps=total_steps, checkpoint_every_steps=1000, **config
        )
        return proc, proc.wait_for_step(step)

    def run(self, name: str, workdir, timeout: float = RUN_TIMEOUT, **config) -> Proc:
        proc = self.train(name, workdir, **config)
        proc.wait(timeout)
        return proc

    def kill_all(self) -> None:
        for proc in self.procs:
            proc.kill()


# ------------------------------------------------------------------------------ workdir files
def checkpoint_names(workdir: Path) -> list[str]:
    d = workdir / "checkpoints"
    return sorted(os.listdir(d)) if d.is_dir() else []


def finalized(workdir: Path) -> list[int]:
    """Steps of the finalized checkpoints (Orbax renames `<step>.orbax-checkpoint-tmp-*` to
    `<step>` when a save is complete)."""
    return sorted(int(n) for n in checkpoint_names(workdir) if n.isdigit())


def metric_steps(workdir: Path) -> list[int]:
    path = workdir / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line)["step"] for line in path.read_text().splitlines() if line.strip()]


def listing(directory: Path) -> dict[str, int]:
    """Relative path -> size of every file below `directory`."""
    return {
        str(p.relative_to(directory)): p.stat().st_size for p in directory.rglob("*") if p.is_file()
    }


def error_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith("error:")]


def assert_finished(
    proc: Proc, total: int, resumed_from: int | None, no_traceback: bool = True
) -> None:
    """Exit 0, `done at step total`, resumed from `resumed_from` (None: started fresh), and
    no traceback on stderr (`no_traceback=False`: none through mae_jax's own code)."""
    assert proc.popen.returncode == 0, proc.tail()
    assert f": done at step {total}." in proc.stdout, proc.tail()
    resumed = [int(s) for s in RESUMED.findall(proc.stderr)]
    assert resumed == ([] if resumed_from is None else [resumed_from]), proc.tail()
    if no_traceback:
        assert "Traceback" not in proc.stderr, proc.tail()
    else:
        assert not re.search(r'File ".*/mae_jax/', proc.stderr), proc.tail()
