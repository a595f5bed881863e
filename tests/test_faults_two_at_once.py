"""Two things at once, with real processes: an export reading the workdir while the trainer saves
every step; a second trainer on the same workdir, the lock of a killed trainer taken over and a
second SIGTERM during the save (one chain; processes: tests/procs.py)."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import time

import pytest
from procs import (
    ENV,
    EXIT_TIMEOUT,
    EXPORT_TIMEOUT,
    NOTICE,
    REFUSE_TIMEOUT,
    REPO,
    RESUMED,
    RUN_TIMEOUT,
    START_TIMEOUT,
    TMP_MARK,
    assert_finished,
    checkpoint_names,
    error_lines,
    export_cmd,
    finalized,
    metric_steps,
)


@pytest.mark.slow
def test_export_in_a_loop_while_the_trainer_saves_every_step(tmp_path, spawn):
    torch = pytest.importorskip("torch")
    wd = tmp_path / "wd"
    total = 30  # saves for about as long as three exports take (the first starts at once)
    trainer = spawn.train(
        "train", wd, total_steps=total, checkpoint_every_steps=1, keep_checkpoints=2
    )
    deadline = time.monotonic() + START_TIMEOUT
    while not finalized(wd):
        assert trainer.running, trainer.tail()
        assert time.monotonic() < deadline, "no checkpoint in time" + trainer.tail()
        time.sleep(0.05)

    # Three exports while the trainer saves (fewer if it ends first; a count, not the trainer's
    # duration, which grows with the machine's load); after that one more only where none has
    # succeeded yet (one that read a checkpoint being replaced may fail cleanly: checked below).
    exports = []  # (index, trainer was running at the start, CompletedProcess, output)
    deadline = time.monotonic() + RUN_TIMEOUT
    while (
        (trainer.running and len(exports) < 3)
        or not exports
        or (exports[-1][1] and not any(r.returncode == 0 for _, _, r, _ in exports))
    ):
        assert time.monotonic() < deadline, f"{len(exports)} exports" + trainer.tail()
        i = len(exports)
        output = tmp_path / f"export_{i}.pth"
        running = trainer.running
        r = subprocess.run(
            export_cmd(wd, output),
            cwd=REPO,
            env=ENV,
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
    assert finalized(wd) == [total - 1, total], (checkpoint_names(wd), trainer.tail())
    assert metric_steps(wd) == list(range(1, total + 1))

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
            assert len(error_lines(r.stderr)) == 1, what
            assert not output.exists(), what
    assert ok >= 1, f"no export succeeded: {summary}"


@pytest.mark.slow
def test_a_refused_trainer_a_taken_over_lock_and_a_second_sigterm_during_the_save(tmp_path, spawn):
    """One chain on one workdir (4 processes; 5 as separate tests): trainer A holds the
    workdir, B is refused and A trains on; A killed (SIGKILL) leaves its lock behind and D
    takes it over, starting afresh; D gets a second SIGTERM during the save of the first; E
    resumes what D left and finishes."""
    wd = tmp_path / "wd"
    a, _ = spawn.until_step("train_a", wd, 1)
    t0 = time.monotonic()
    b = spawn.train("train_b", wd, total_steps=2000, checkpoint_every_steps=1000)
    rc_b = b.wait(REFUSE_TIMEOUT)
    took = time.monotonic() - t0
    assert a.running, "trainer A ended before B was refused" + a.tail() + b.tail()
    assert rc_b != 0, b.tail()
    err_b = b.stderr
    assert "is in use by another run" in err_b, b.tail()
    assert f"pid {a.pid}," in err_b, (a.pid, b.tail())
    assert len(error_lines(err_b)) == 1 and "Traceback" not in err_b, b.tail()
    assert not re.search(r"^step \d+/", b.stdout, re.MULTILINE), b.tail()
    print(f"trainer B was refused after {took:.1f} s")

    # A trains on after B's refusal, then dies without releasing anything
    printed = [int(m) for m in re.findall(r"^step (\d+)/", a.stdout, re.MULTILINE)]
    a.wait_for_step(max(printed) + 1)
    a.signal(signal.SIGKILL)
    assert a.wait(EXIT_TIMEOUT) == -signal.SIGKILL
    held = json.loads((wd / "lock").read_text())  # left behind, naming the dead process
    assert held["pid"] == a.pid
    steps = metric_steps(wd)
    assert len(steps) == len(set(steps)), f"steps logged twice: {steps}"
    assert steps == list(range(1, len(steps) + 1)) and len(steps) > max(printed), steps
    assert checkpoint_names(wd) == []  # none by B, none by A (no periodic checkpoint)

    # D takes the lock over and starts afresh (A saved nothing); then two SIGTERMs
    d, _ = spawn.until_step("train_d", wd, 2, total_steps=400)
    assert "taking over the lock" in d.stderr, d.tail()
    assert f"pid {a.pid}," in d.stderr, d.tail()
    assert RESUMED.findall(d.stderr) == [], d.tail()
    d.signal(signal.SIGTERM)
    time.sleep(0.05)
    if d.running:
        d.signal(signal.SIGTERM)
    rc = d.wait(EXIT_TIMEOUT)
    # Either the save finished and the run exited (0), or the second SIGTERM ended it.
    assert rc in (0, -signal.SIGTERM), d.tail()
    assert "Traceback" not in d.stderr, d.tail()
    saved = finalized(wd)
    assert len(saved) <= 1, (checkpoint_names(wd), d.tail())
    if rc == 0:
        notices = NOTICE.findall(d.stdout)
        assert [int(n) for n, _ in notices] == saved, (saved, d.tail())
    last = saved[-1] if saved else 0
    if rc == 0:  # A's lines replaced by D's, none twice
        assert metric_steps(wd) == list(range(1, last + 1)), d.tail()

    total = last + 3
    e = spawn.run("train_e", wd, total_steps=total, checkpoint_every_steps=1000)
    assert_finished(e, total, resumed_from=last or None)
    steps = metric_steps(wd)
    assert steps == list(range(1, total + 1)), (steps, e.tail())
    names = checkpoint_names(wd)
    assert not [n for n in names if TMP_MARK in n], (names, e.tail())
    assert finalized(wd)[-1] == total, (names, e.tail())
