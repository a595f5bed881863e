"""SIGTERM to a real training process: while it imports, while it starts up, after step 1 and
after 5 more steps; the step saved, and the next run resumes from it (processes:
tests/procs.py)."""

from __future__ import annotations

import signal
import time
from pathlib import Path

import pytest
from procs import (
    EXIT_TIMEOUT,
    NOTICE,
    RESUMED,
    SIGNAL_DELAY,
    STEP_LINE,
    assert_finished,
    checkpoint_names,
    finalized,
    metric_steps,
)


@pytest.mark.slow
def test_sigterm_saves_the_last_step_and_the_next_run_resumes(tmp_path, spawn):
    """One workdir, the same command again and again, each run the rerun of the one before:
    SIGTERM while it imports, while it starts up, after step 1, after 5 steps of a resumed run;
    then a run 3 steps longer than the last save resumes and finishes (5 processes, not 8: the
    trainer that each SIGTERM stops is the rerun that resumes from the one before)."""
    wd = tmp_path / "wd"
    saved = 0
    for when in ("at_launch", "during_startup", "after_step_1", "after_5_more_steps"):
        before = saved
        # 400 steps, no periodic checkpoint: a checkpoint on disk can only come from a SIGTERM.
        trainer = spawn.train(when, wd, total_steps=400, checkpoint_every_steps=1000)
        if when in SIGNAL_DELAY:
            time.sleep(SIGNAL_DELAY[when])
            assert trainer.running, trainer.tail()
            seen = 0
        else:
            seen = trainer.wait_for_step(1 if when == "after_step_1" else before + 5)
        trainer.signal(signal.SIGTERM)
        rc = trainer.wait(EXIT_TIMEOUT)
        out = trainer.stdout
        assert "Traceback" not in trainer.stderr, trainer.tail()
        assert "done at step" not in out, trainer.tail()
        # resumed from the step that the run before saved (none: started afresh), once a step
        # ran; a signal before that may come before or after the line
        resumed = [int(s) for s in RESUMED.findall(trainer.stderr)]
        expected = [before] if before else []
        assert resumed == expected or not seen and resumed == [], (before, trainer.tail())
        notices = NOTICE.findall(out)
        names = checkpoint_names(wd)
        if notices:
            assert rc == 0, trainer.tail()
            assert len(notices) == 1, trainer.tail()
            saved = int(notices[0][0])
            assert Path(notices[0][1]) == wd / "checkpoints", trainer.tail()
            assert saved >= max(seen, before + 1), trainer.tail()
            # Exactly the finalized checkpoint N (and the one resumed from): no other step, no
            # temporary directory left.
            assert names == sorted(str(s) for s in {before, saved} if s), (names, trainer.tail())
            assert (wd / "checkpoints" / str(saved) / "meta" / "metadata").is_file()
            printed = [int(m.group(1)) for m in map(STEP_LINE.match, out.splitlines()) if m]
            assert printed and max(printed) <= saved, trainer.tail()
        else:
            # Only a SIGTERM that arrives before the first step may end the run without a save:
            # then it must not leave any (partial) checkpoint behind.
            assert when in SIGNAL_DELAY, trainer.tail()
            assert rc in (0, -signal.SIGTERM), trainer.tail()
            assert names == ([str(before)] if before else []), (names, trainer.tail())
        steps = metric_steps(wd)
        assert steps == list(range(1, saved + 1)), (steps, trainer.tail())

    # The same command, 3 steps longer than what was saved, resumes and finishes.
    total = saved + 3
    rerun = spawn.run("rerun", wd, total_steps=total, checkpoint_every_steps=1000)
    assert_finished(rerun, total, resumed_from=saved)
    assert metric_steps(wd) == list(range(1, total + 1)), rerun.tail()
    assert finalized(wd)[-1] == total, (checkpoint_names(wd), rerun.tail())
