"""SIGTERM to a real training process: while it imports, while it starts up, after step 1 and
after step 5; the step saved, and a rerun resumes from it (processes: tests/procs.py)."""

from __future__ import annotations

import signal
import time
from pathlib import Path

import pytest
from procs import (
    EXIT_TIMEOUT,
    NOTICE,
    SIGNAL_DELAY,
    STEP_LINE,
    assert_finished,
    checkpoint_names,
    finalized,
    metric_steps,
)


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
    notices = NOTICE.findall(out)
    names = checkpoint_names(wd)
    if notices:
        assert rc == 0, trainer.tail()
        assert len(notices) == 1, trainer.tail()
        saved = int(notices[0][0])
        assert Path(notices[0][1]) == wd / "checkpoints", trainer.tail()
        assert saved >= max(seen, 1), trainer.tail()
        # Exactly the finalized checkpoint N: no other step, no temporary directory left.
        assert names == [str(saved)], (names, trainer.tail())
        assert (wd / "checkpoints" / str(saved) / "meta" / "metadata").is_file()
        printed = [int(m.group(1)) for m in map(STEP_LINE.match, out.splitlines()) if m]
        assert printed and max(printed) <= saved, trainer.tail()
    else:
        # Only a SIGTERM that arrives before the first step may end the run without a save:
        # then it must not leave any (partial) checkpoint behind.
        assert when in SIGNAL_DELAY, trainer.tail()
        assert rc in (0, -signal.SIGTERM), trainer.tail()
        assert names == [], (names, trainer.tail())
        saved = 0
    steps = metric_steps(wd)
    assert steps == list(range(1, saved + 1)), (steps, trainer.tail())

    # The same command, 3 steps longer than what was saved, resumes and finishes.
    total = saved + 3
    rerun = spawn.run("rerun", wd, total_steps=total, checkpoint_every_steps=1000)
    assert_finished(rerun, total, resumed_from=saved or None)
    assert metric_steps(wd) == list(range(1, total + 1)), rerun.tail()
    assert finalized(wd)[-1] == total, (checkpoint_names(wd), rerun.tail())
