"""Damaged checkpoints: the newest set aside and the run resumed from the previous one (each
kind of damage in this process, one in a real process); none intact is one error line in a real
process (processes: tests/procs.py)."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest
from config_files import tiny_pretrain
from procs import (
    assert_finished,
    checkpoint_names,
    error_lines,
    finalized,
    listing,
    metric_steps,
)

from mae_jax import workdir as wdir
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


# The command of `config_files.tiny_pretrain()` (the run of the `tiny_run` workdir): its model,
# schedule and cadence, on one device (tiny_run was trained on 8).
TINY = {
    "model.name": "mae_vit_test",
    "warmup_steps": 0,
    "log_every_steps": 2,
    "checkpoint_every_steps": 3,
}


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
def test_a_damaged_checkpoint_in_a_real_process(spawn, copy_tiny_run):
    wd = Path(copy_tiny_run)
    _damage(wd / "checkpoints" / "6", "data_deleted")
    damaged_files = listing(wd / "checkpoints" / "6")

    rerun = spawn.run("rerun", wd, total_steps=9, **TINY)
    # Orbax's failed asynchronous reads of a damaged checkpoint print tracebacks of their own
    # ("Task exception was never retrieved", "Event loop is closed"): allowed, as long as none
    # goes through mae_jax (an exception of ours).
    assert_finished(rerun, 9, resumed_from=3, no_traceback=False)
    assert re.search(r"checkpoint 6 in \S+ is damaged or unreadable", rerun.stderr), rerun.tail()
    _check_set_aside(wd, 6, damaged_files, [1, 2, 4, 6, 8, 9])
    assert finalized(wd) == [3, 6, 9], (checkpoint_names(wd), rerun.tail())


@pytest.mark.slow
def test_no_intact_checkpoint_is_one_error_line(spawn, copy_tiny_run):
    wd = Path(copy_tiny_run)
    before = {}
    for step in (3, 6):
        _damage(wd / "checkpoints" / str(step), "state_metadata_deleted")
        before[step] = listing(wd / "checkpoints" / str(step))

    rerun = spawn.run("rerun", wd, total_steps=9, **TINY)
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
    # so a rerun fails the same way instead of silently starting from scratch: the same run
    # through the trainer in this process (the real process above showed the exit status and
    # the error line that main.py makes of this error)
    with pytest.raises(wdir.WorkdirError, match=r"^no intact checkpoint in"):
        pretrain.train_and_evaluate(tiny_pretrain(total_steps=9), str(wd))
    assert metric_steps(wd) == [1, 2, 4, 6]  # nothing was trained or truncated
