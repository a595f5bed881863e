"""Faults, with real training processes and real files: SIGTERM (at start-up, after a step,
twice in a row), a reader exporting while the trainer saves every step, two trainers on one
workdir, the lock of a killed trainer, and damaged checkpoints.

Every test spawns `python -m mae_jax.main --config=configs/smoke.py` (the tiny model on the
embedded images, on the CPU, one device) and checks exit codes, printed lines and the files of
the workdir. The processes share one JAX compilation cache, which shortens a start-up from
about 40 s to about 15 s on 2 busy cores. The stdout and stderr of every process are saved in
the test's tmp_path (`<name>.stdout`, `<name>.stderr`) and their tails are in the failure
messages.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

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
_STEP_LINE = re.compile(r"^step (\d+)/(\d+)\s")
_NOTICE = re.compile(r"^preemption notice: saved step (\d+) in (.+); exiting$", re.MULTILINE)
_RESUMED = re.compile(r"resumed from step (\d+)\b")
_TMP_MARK = "orbax-checkpoint-tmp"


# ------------------------------------------------------------------------------ processes
def _train_cmd(workdir, **config) -> list[str]:
    return [
        sys.executable,
        "-m",
        "mae_jax.main",
        "--config=configs/smoke.py",
        f"--workdir={workdir}",
        *BASE_OVERRIDES,
        *(f"--config.{k}={v}" for k, v in config.items()),
    ]


def _export_cmd(workdir, output) -> list[str]:
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


@pytest.fixture(scope="session")
def env(tmp_path_factory) -> dict:
    """The subprocesses' environment: CPU, one device, a shared compilation cache."""
    out = dict(os.environ)
    out.pop("XLA_FLAGS", None)  # one device, not conftest's 8 simulated ones
    out.update(
        JAX_PLATFORMS="cpu",
        CUDA_VISIBLE_DEVICES="",
        TF_CPP_MIN_LOG_LEVEL="2",
        PYTHONUNBUFFERED="1",
        JAX_COMPILATION_CACHE_DIR=str(tmp_path_factory.mktemp("jax_cache")),
    )
    out["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), out.get("PYTHONPATH")) if p)
    return out


class Proc:
    """A spawned command: stdout is read line by line by a thread (and saved to
    `<name>.stdout`), stderr goes straight to `<name>.stderr`."""

    def __init__(self, name: str, cmd: list[str], log_dir: Path, env: dict):
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
                env=env,
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
                    m = _STEP_LINE.match(line)
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
    def __init__(self, log_dir: Path, env: dict):
        self.log_dir, self.env, self.procs = log_dir, env, []

    def __call__(self, name: str, cmd: list[str]) -> Proc:
        proc = Proc(name, cmd, self.log_dir, self.env)
        self.procs.append(proc)
        return proc

    def train(self, name: str, workdir, **config) -> Proc:
        return self(name, _train_cmd(workdir, **config))

    def run(self, name: str, workdir, timeout: float = RUN_TIMEOUT, **config) -> Proc:
        proc = self.train(name, workdir, **config)
        proc.wait(timeout)
        return proc

    def kill_all(self) -> None:
        for proc in self.procs:
            proc.kill()


@pytest.fixture
def spawn(tmp_path, env):
    spawner = Spawner(tmp_path, env)
    try:
        yield spawner
    finally:
        spawner.kill_all()


# ------------------------------------------------------------------------------ workdir files
def _checkpoint_names(workdir: Path) -> list[str]:
    d = workdir / "checkpoints"
    return sorted(os.listdir(d)) if d.is_dir() else []


def _finalized(workdir: Path) -> list[int]:
    """Steps of the finalized checkpoints (Orbax renames `<step>.orbax-checkpoint-tmp-*` to
    `<step>` when a save is complete)."""
    return sorted(int(n) for n in _checkpoint_names(workdir) if n.isdigit())


def _metric_steps(workdir: Path) -> list[int]:
    path = workdir / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line)["step"] for line in path.read_text().splitlines() if line.strip()]


def _listing(directory: Path) -> dict[str, int]:
    """Relative path -> size of every file below `directory`."""
    return {
        str(p.relative_to(directory)): p.stat().st_size for p in directory.rglob("*") if p.is_file()
    }


def _error_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith("error:")]


def _assert_finished(
    proc: Proc, total: int, resumed_from: int | None, no_traceback: bool = True
) -> None:
    """Exit 0, `done at step total`, resumed from `resumed_from` (None: started fresh), and
    no traceback on stderr (`no_traceback=False`: none through mae_jax's own code)."""
    assert proc.popen.returncode == 0, proc.tail()
    assert f": done at step {total}." in proc.stdout, proc.tail()
    resumed = [int(s) for s in _RESUMED.findall(proc.stderr)]
    assert resumed == ([] if resumed_from is None else [resumed_from]), proc.tail()
    if no_traceback:
        assert "Traceback" not in proc.stderr, proc.tail()
    else:
        assert not re.search(r'File ".*/mae_jax/', proc.stderr), proc.tail()


# ------------------------------------------------------------------------------ 1. SIGTERM
@pytest.mark.slow
@pytest.mark.parametrize("when", ["at_launch", "during_startup", "after_step_1", "after_step_5"])
def test_sigterm_saves_the_last_step_and_a_rerun_resumes(tmp_path, spawn, when):
    wd = tmp_path / "wd"
    # 400 steps, no periodic checkpoint: a checkpoint on disk can only come from the SIGTERM.
    trainer = spawn.train("train", wd, total_steps=400, checkpoint_every_steps=1000)
    if when in SIGNAL_DELAY:
        time.sleep(SIGNAL_DELAY[when])
        assert trainer.running, trainer.tail()
        seen = 0
    else:
        seen = trainer.wait_for_step(int(when.rsplit("_", 1)[1]))
    trainer.signal(signal.SIGTERM)
    rc = trainer.wait(EXIT_TIMEOUT)
    out = trainer.stdout
    assert "Traceback" not in trainer.stderr, trainer.tail()
    assert "done at step" not in out, trainer.tail()
    notices = _NOTICE.findall(out)
    names = _checkpoint_names(wd)
    if notices:
        assert rc == 0, trainer.tail()
        assert len(notices) == 1, trainer.tail()
        saved = int(notices[0][0])
        assert Path(notices[0][1]) == wd / "checkpoints", trainer.tail()
        assert saved >= max(seen, 1), trainer.tail()
        # Exactly the finalized checkpoint N: no other step, no temporary directory left.
        assert names == [str(saved)], (names, trainer.tail())
        assert (wd / "checkpoints" / str(saved) / "meta" / "metadata").is_file()
        printed = [int(m.group(1)) for m in map(_STEP_LINE.match, out.splitlines()) if m]
        assert printed and max(printed) <= saved, trainer.tail()
    else:
        # Only a SIGTERM that arrives before the first step may end the run without a save:
        # then it must not leave any (partial) checkpoint behind.
        assert when in SIGNAL_DELAY, trainer.tail()
        assert rc in (0, -signal.SIGTERM), trainer.tail()
        assert names == [], (names, trainer.tail())
        saved = 0
    steps = _metric_steps(wd)
    assert steps == list(range(1, saved + 1)), (steps, trainer.tail())

    # The same command, 3 steps longer than what was saved, resumes and finishes.
    total = saved + 3
    rerun = spawn.run("rerun", wd, total_steps=total, checkpoint_every_steps=1000)
    _assert_finished(rerun, total, resumed_from=saved or None)
    assert _metric_steps(wd) == list(range(1, total + 1)), rerun.tail()
    assert _finalized(wd)[-1] == total, (_checkpoint_names(wd), rerun.tail())


@pytest.mark.slow
def test_a_second_sigterm_during_the_save_leaves_a_usable_workdir(tmp_path, spawn):
    wd = tmp_path / "wd"
    trainer = spawn.train("train", wd, total_steps=400, checkpoint_every_steps=1000)
    trainer.wait_for_step(2)
    trainer.signal(signal.SIGTERM)
    time.sleep(0.05)
    if trainer.running:
        trainer.signal(signal.SIGTERM)
    rc = trainer.wait(EXIT_TIMEOUT)
    # Either the save finished and the run exited (0), or the second SIGTERM ended it.
    assert rc in (0, -signal.SIGTERM), trainer.tail()
    assert "Traceback" not in trainer.stderr, trainer.tail()
    saved = _finalized(wd)
    assert len(saved) <= 1, (_checkpoint_names(wd), trainer.tail())
    if rc == 0:
        notices = _NOTICE.findall(trainer.stdout)
        assert [int(n) for n, _ in notices] == saved, (saved, trainer.tail())
    last = saved[-1] if saved else 0
    if rc == 0:
        assert _metric_steps(wd) == list(range(1, last + 1)), trainer.tail()

    total = last + 3
    rerun = spawn.run("rerun", wd, total_steps=total, checkpoint_every_steps=1000)
    _assert_finished(rerun, total, resumed_from=last or None)
    steps = _metric_steps(wd)
    assert steps == list(range(1, total + 1)), (steps, rerun.tail())
    names = _checkpoint_names(wd)
    assert not [n for n in names if _TMP_MARK in n], (names, rerun.tail())
    assert _finalized(wd)[-1] == total, (names, rerun.tail())


# ------------------------------------------------------------------------------ 2. a reader
@pytest.mark.slow
def test_export_in_a_loop_while_the_trainer_saves_every_step(tmp_path, spawn, env):
    torch = pytest.importorskip("torch")
    wd = tmp_path / "wd"
    total = 30  # saves for about as long as three exports take (the first starts at once)
    trainer = spawn.train(
        "train", wd, total_steps=total, checkpoint_every_steps=1, keep_checkpoints=2
    )
    deadline = time.monotonic() + START_TIMEOUT
    while not _finalized(wd):
        assert trainer.running, trainer.tail()
        assert time.monotonic() < deadline, "no checkpoint in time" + trainer.tail()
        time.sleep(0.05)

    exports = []  # (index, trainer was running at the start, CompletedProcess, output)
    deadline = time.monotonic() + RUN_TIMEOUT
    while trainer.running or len(exports) < 3:
        assert time.monotonic() < deadline, f"{len(exports)} exports" + trainer.tail()
        i = len(exports)
        output = tmp_path / f"export_{i}.pth"
        running = trainer.running
        r = subprocess.run(
            _export_cmd(wd, output),
            cwd=REPO,
            env=env,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=EXPORT_TIMEOUT,
        )
        (tmp_path / f"export_{i}.stdout").write_text(r.stdout)
        (tmp_path / f"export_{i}.stderr").write_text(r.stderr)
        exports.append((i, running, r, output))
    rc = trainer.wait(EXIT_TIMEOUT)

    assert rc == 0, trainer.tail()
    assert f": done at step {total}." in trainer.stdout, trainer.tail()
    assert "Traceback" not in trainer.stderr, trainer.tail()
    assert _finalized(wd) == [total - 1, total], (_checkpoint_names(wd), trainer.tail())
    assert _metric_steps(wd) == list(range(1, total + 1))

    summary = [(i, running, r.returncode) for i, running, r, _ in exports]
    print(f"exports (index, trainer running, exit code): {summary}")
    assert exports[0][1], f"the trainer ended before the first export: {summary}"
    ok = 0
    for i, _, r, output in exports:
        what = f"export {i}: exit code {r.returncode}\n{r.stdout[-2000:]}\n{r.stderr[-2000:]}"
        assert "Traceback" not in r.stderr, what
        if r.returncode == 0:
            assert output.is_file(), what
            n = int(re.search(r"official format, (\d+) tensors", r.stdout).group(1))
            model = torch.load(output, map_location="cpu", weights_only=True)["model"]
            assert len(model) == n and all(isinstance(v, torch.Tensor) for v in model.values())
            ok += 1
        else:
            assert r.returncode == 1, what
            assert len(_error_lines(r.stderr)) == 1, what
            assert not output.exists(), what
    assert ok >= 1, f"no export succeeded: {summary}"


# ------------------------------------------------------------------------------ 3. the lock
@pytest.mark.slow
def test_a_second_trainer_on_the_same_workdir_is_refused(tmp_path, spawn):
    wd = tmp_path / "wd"
    a = spawn.train("train_a", wd, total_steps=2000, checkpoint_every_steps=1000)
    a.wait_for_step(1)
    t0 = time.monotonic()
    b = spawn.train("train_b", wd, total_steps=2000, checkpoint_every_steps=1000)
    rc_b = b.wait(REFUSE_TIMEOUT)
    took = time.monotonic() - t0
    assert a.running, "trainer A ended before B was refused" + a.tail() + b.tail()
    assert rc_b != 0, b.tail()
    err_b = b.stderr
    assert "is in use by another run" in err_b, b.tail()
    assert f"pid {a.pid}," in err_b, (a.pid, b.tail())
    assert len(_error_lines(err_b)) == 1 and "Traceback" not in err_b, b.tail()
    assert not re.search(r"^step \d+/", b.stdout, re.MULTILINE), b.tail()
    print(f"trainer B was refused after {took:.1f} s")

    a.signal(signal.SIGTERM)
    rc_a = a.wait(EXIT_TIMEOUT)
    assert rc_a == 0, a.tail()
    saved = int(_NOTICE.search(a.stdout).group(1))
    steps = _metric_steps(wd)
    assert len(steps) == len(set(steps)), f"steps logged twice: {steps}"
    assert steps == list(range(1, saved + 1)), steps
    assert _checkpoint_names(wd) == [str(saved)]


@pytest.mark.slow
def test_the_lock_of_a_killed_trainer_is_taken_over(tmp_path, spawn):
    wd = tmp_path / "wd"
    c = spawn.train("train_c", wd, total_steps=2000, checkpoint_every_steps=1000)
    c.wait_for_step(1)
    c.signal(signal.SIGKILL)
    assert c.wait(EXIT_TIMEOUT) == -signal.SIGKILL
    held = json.loads((wd / "lock").read_text())  # left behind, naming the dead process
    assert held["pid"] == c.pid

    d = spawn.run("train_d", wd, total_steps=3, checkpoint_every_steps=1000)
    _assert_finished(d, 3, resumed_from=None)
    assert "taking over the lock" in d.stderr, d.tail()
    assert f"pid {c.pid}," in d.stderr, d.tail()
    assert _metric_steps(wd) == [1, 2, 3]
    assert _finalized(wd) == [3]


# ------------------------------------------------------------------------------ 4. damage
def _data_files(state: Path) -> list[Path]:
    """Every file below a `d/` directory of an Orbax state directory (the array data)."""
    return [p for p in state.rglob("*") if p.is_file() and "d" in p.relative_to(state).parts[:-1]]


def _damage(checkpoint: Path, kind: str) -> None:
    state = checkpoint / "state"
    if kind in ("data_deleted", "data_truncated"):
        files = _data_files(state)
        assert files, f"no array data file below {state}: {sorted(_listing(state))}"
        for f in files:
            if kind == "data_deleted":
                f.unlink()
            else:
                os.truncate(f, f.stat().st_size // 2)
    elif kind == "state_metadata_deleted":
        (state / "_METADATA").unlink()
    elif kind == "meta_deleted":
        (checkpoint / "meta" / "metadata").unlink()
    else:
        raise AssertionError(kind)


@pytest.fixture(scope="module")
def four_steps(tmp_path_factory, env) -> Path:
    """A workdir trained 4 steps with checkpoints 2 and 4 (copied by each test)."""
    log_dir = tmp_path_factory.mktemp("four_steps")
    wd = log_dir / "wd"
    proc = Proc("train_4", _train_cmd(wd, total_steps=4, checkpoint_every_steps=2), log_dir, env)
    try:
        proc.wait(RUN_TIMEOUT)
    finally:
        proc.kill()
    _assert_finished(proc, 4, resumed_from=None)
    assert _finalized(wd) == [2, 4], _checkpoint_names(wd)
    assert _metric_steps(wd) == [1, 2, 3, 4]
    return wd


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst, symlinks=True)
    return dst


@pytest.mark.slow
@pytest.mark.parametrize(
    "kind", ["data_deleted", "data_truncated", "state_metadata_deleted", "meta_deleted"]
)
def test_a_damaged_newest_checkpoint_is_set_aside_and_the_run_resumes_from_the_previous(
    tmp_path, spawn, four_steps, kind
):
    wd = _copy(four_steps, tmp_path / "wd")
    _damage(wd / "checkpoints" / "4", kind)
    damaged_files = _listing(wd / "checkpoints" / "4")

    rerun = spawn.run("rerun", wd, total_steps=6, checkpoint_every_steps=2)
    # Orbax's failed asynchronous reads of a damaged checkpoint print tracebacks of their own
    # ("Task exception was never retrieved", "Event loop is closed"): allowed, as long as none
    # goes through mae_jax (an exception of ours).
    _assert_finished(rerun, 6, resumed_from=2, no_traceback=False)
    err = rerun.stderr
    assert re.search(r"checkpoint 4 in \S+ is damaged or unreadable", err), rerun.tail()
    # Moved aside as it was (not deleted, not repaired), with the reason.
    moved = sorted((wd / "damaged_checkpoints").iterdir())
    assert [p.name.split("-")[0] for p in moved] == ["4"], (moved, rerun.tail())
    files = _listing(moved[0])
    assert files.pop("REASON.txt", None) is not None, files
    assert files == damaged_files
    assert (moved[0] / "REASON.txt").read_text().strip()
    # A new checkpoint 4 (and 6) replaced it; every step is logged once.
    assert _finalized(wd) == [2, 4, 6], (_checkpoint_names(wd), rerun.tail())
    assert (wd / "checkpoints" / "4" / "meta" / "metadata").is_file()
    assert _metric_steps(wd) == list(range(1, 7)), rerun.tail()


@pytest.mark.slow
def test_no_intact_checkpoint_is_one_error_line(tmp_path, spawn, four_steps):
    wd = _copy(four_steps, tmp_path / "wd")
    before = {}
    for step in (2, 4):
        _damage(wd / "checkpoints" / str(step), "state_metadata_deleted")
        before[step] = _listing(wd / "checkpoints" / str(step))

    rerun = spawn.run("rerun", wd, total_steps=6, checkpoint_every_steps=2)
    assert rerun.popen.returncode != 0, rerun.tail()
    err = rerun.stderr
    assert "Traceback" not in err, rerun.tail()
    errors = _error_lines(err)
    assert len(errors) == 1, rerun.tail()
    assert errors[0].startswith("error: no intact checkpoint in"), rerun.tail()
    assert "done at step" not in rerun.stdout, rerun.tail()
    # Both damaged checkpoints are left in place, file for file: nothing was moved or deleted.
    for step, files in before.items():
        assert _listing(wd / "checkpoints" / str(step)) == files, step
    assert not (wd / "damaged_checkpoints").exists()
    # so a rerun fails the same way instead of silently starting from scratch
    again = spawn.run("rerun2", wd, total_steps=6, checkpoint_every_steps=2)
    assert again.popen.returncode != 0, again.tail()
    assert _error_lines(again.stderr)[0].startswith("error: no intact checkpoint in")
    assert _metric_steps(wd) == [1, 2, 3, 4]  # nothing was trained or truncated
