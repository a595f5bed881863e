"""Damaged checkpoints: the newest set aside and the run resumed from the previous one (each
kind of damage in this process, one in a real process); none intact is one error line in a real
process (processes: tests/procs.py)."""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

import pytest
from config_files import tiny_pretrain
from procs import (
    RUN_TIMEOUT,
    Proc,
    assert_finished,
    checkpoint_names,
    error_lines,
    finalized,
    listing,
    metric_steps,
    train_cmd,
)

from mae_jax.tasks import pretrain


def _data_files(state: Path) -> list[Path]:
    """Every file below a `d/` directory of an Orbax state directory (the array data)."""
    return [p for p in state.rglob("*") if p.is_file() and "d" in p.relative_to(state).parts[:-1]]


def _damage(checkpoint: Path, kind: str) -> None:
    state = checkpoint / "state"
    if kind in ("data_deleted", "data_truncated"):
        files = _data_files(state)
        assert files, f"no array data file below {state}: {sorted(listing(state))}"
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
def four_steps(tmp_path_factory) -> Path:
    """A workdir trained 4 steps with checkpoints 2 and 4 (copied by each test)."""
    log_dir = tmp_path_factory.mktemp("four_steps")
    wd = log_dir / "wd"
    proc = Proc("train_4", train_cmd(wd, total_steps=4, checkpoint_every_steps=2), log_dir)
    try:
        proc.wait(RUN_TIMEOUT)
    finally:
        proc.kill()
    assert_finished(proc, 4, resumed_from=None)
    assert finalized(wd) == [2, 4], checkpoint_names(wd)
    assert metric_steps(wd) == [1, 2, 3, 4]
    return wd


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst, symlinks=True)
    return dst


def _check_set_aside(wd: Path, step: int, damaged_files: dict, steps: list[int]) -> None:
    """Checkpoint `step` moved aside as it was (not deleted, not repaired) with its reason, a
    new checkpoint `step` written in its place, every step in `steps` logged once."""
    moved = sorted((wd / "damaged_checkpoints").iterdir())
    assert [p.name.split("-")[0] for p in moved] == [str(step)], moved
    files = listing(moved[0])
    assert files.pop("REASON.txt", None) is not None, files
    assert files == damaged_files
    assert (moved[0] / "REASON.txt").read_text().strip()
    assert (wd / "checkpoints" / str(step) / "meta" / "metadata").is_file()
    assert metric_steps(wd) == steps


@pytest.mark.slow
@pytest.mark.parametrize(
    "kind", ["data_deleted", "data_truncated", "state_metadata_deleted", "meta_deleted"]
)
def test_a_damaged_newest_checkpoint_is_set_aside_and_the_run_resumes_from_the_previous(
    copy_tiny_run, warnings_log, kind
):
    """Each kind of damage, through the trainer in this process: the tiny run (checkpoints 3 and
    6, a metrics line every 2 steps) extended to 9 steps, its step 6 damaged (the same in a real
    process: the test below)."""
    wd = Path(copy_tiny_run)
    _damage(wd / "checkpoints" / "6", kind)
    damaged_files = listing(wd / "checkpoints" / "6")
    pretrain.train_and_evaluate(tiny_pretrain(total_steps=9), str(wd))
    said = [
        m for m in warnings_log if re.search(r"checkpoint 6 in \S+ is damaged or unreadable", m)
    ]
    assert said, warnings_log
    _check_set_aside(wd, 6, damaged_files, [1, 2, 4, 6, 8, 9])
    assert finalized(wd) == [3, 6, 9], checkpoint_names(wd)


@pytest.mark.slow
def test_a_damaged_checkpoint_in_a_real_process(tmp_path, spawn, four_steps):
    wd = _copy(four_steps, tmp_path / "wd")
    _damage(wd / "checkpoints" / "4", "data_deleted")
    damaged_files = listing(wd / "checkpoints" / "4")

    rerun = spawn.run("rerun", wd, total_steps=6, checkpoint_every_steps=2)
    # Orbax's failed asynchronous reads of a damaged checkpoint print tracebacks of their own
    # ("Task exception was never retrieved", "Event loop is closed"): allowed, as long as none
    # goes through mae_jax (an exception of ours).
    assert_finished(rerun, 6, resumed_from=2, no_traceback=False)
    assert re.search(r"checkpoint 4 in \S+ is damaged or unreadable", rerun.stderr), rerun.tail()
    _check_set_aside(wd, 4, damaged_files, list(range(1, 7)))
    assert finalized(wd) == [2, 4, 6], (checkpoint_names(wd), rerun.tail())


@pytest.mark.slow
def test_no_intact_checkpoint_is_one_error_line(tmp_path, spawn, four_steps):
    wd = _copy(four_steps, tmp_path / "wd")
    before = {}
    for step in (2, 4):
        _damage(wd / "checkpoints" / str(step), "state_metadata_deleted")
        before[step] = listing(wd / "checkpoints" / str(step))

    rerun = spawn.run("rerun", wd, total_steps=6, checkpoint_every_steps=2)
    assert rerun.popen.returncode != 0, rerun.tail()
    err = rerun.stderr
    assert "Traceback" not in err, rerun.tail()
    errors = error_lines(err)
    assert len(errors) == 1, rerun.tail()
    assert errors[0].startswith("error: no intact checkpoint in"), rerun.tail()
    assert "done at step" not in rerun.stdout, rerun.tail()
    # Both damaged checkpoints are left in place, file for file: nothing was moved or deleted.
    for step, files in before.items():
        assert listing(wd / "checkpoints" / str(step)) == files, step
    assert not (wd / "damaged_checkpoints").exists()
    # so a rerun fails the same way instead of silently starting from scratch
    again = spawn.run("rerun2", wd, total_steps=6, checkpoint_every_steps=2)
    assert again.popen.returncode != 0, again.tail()
    assert error_lines(again.stderr)[0].startswith("error: no intact checkpoint in")
    assert metric_steps(wd) == [1, 2, 3, 4]  # nothing was trained or truncated
