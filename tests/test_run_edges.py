"""Edges of a run (issue 21): labels outside the model's classes, extending a finished run,
Ctrl-C, a full disk and a stop notice during long periodic work (the kNN monitor).

The process tests spawn `python -m mae_jax.main --config=configs/smoke.py` with the helpers of
`tests/procs.py` (same environment, compilation cache and logs in the test's tmp_path). The
disk-full tests mount a small tmpfs (root only; skipped where mounting is not permitted).
"""

from __future__ import annotations

import contextlib
import json
import re
import signal
import subprocess
import time
import uuid
from pathlib import Path

import jax
import numpy as np
import pytest
from config_files import load_config
from procs import (
    EXIT_TIMEOUT,
    NOTICE,
    RUN_TIMEOUT,
    START_TIMEOUT,
    checkpoint_names,
    error_lines,
    finalized,
    metric_steps,
)

from mae_jax import schema, train
from mae_jax import workdir as wdir
from mae_jax.data import pipeline
from mae_jax.evaluate import metrics
from mae_jax.tasks import classify as cs
from mae_jax.tasks import evaluate, finetune


# ------------------------------------------------------------------------------ 1. labels
def test_a_label_outside_the_classes_is_never_a_hit():
    scores = np.array([[0.1, 0.9, 0.0], [0.5, 0.3, 0.2], [0.2, 0.3, 0.5]], np.float32)
    labels = np.array([1, 7, -1], np.int32)
    never = np.iinfo(np.int32).max
    assert [int(r) for r in metrics.label_rank(scores, labels)] == [0, never, never]
    hits = metrics.topk_correct(scores, labels, ks=(1, 5))  # k=5 >= C: every valid label
    assert float(hits["top1"]) == 1.0 and float(hits["top5"]) == 1.0


def _finetune_config(num_classes=None):
    c = load_config("configs/finetune_smoke.py")
    c.model.name = "mae_vit_test"
    c.batch_size = 16
    c.eval_batch_size = 80
    c.data.embedded_eval_per_class = 10  # 100 eval examples
    c.total_steps, c.warmup_steps, c.epochs, c.warmup_epochs = 4, 0, None, None
    c.num_classes = num_classes
    return c


def test_fewer_classes_than_the_data_set_is_refused_when_the_run_starts():
    with pytest.raises(ValueError, match=r"config.num_classes=7 has 7 classes, fewer than the 10"):
        cs.plan(_finetune_config(7))
    assert cs.plan(_finetune_config(12)).num_classes == 12  # more is fine


def test_check_labels_names_both_class_counts():
    cs.check_labels(np.array([0, 6]), 7, 10, "split 'train'")
    with pytest.raises(ValueError, match=r"class id 9, outside \[0, 7\).*says it has 10 classes"):
        cs.check_labels(np.array([0, 9, 3]), 7, 10, "split 'train'")
    with pytest.raises(ValueError, match=r"class id -1, outside \[0, 7\)"):
        cs.check_labels(np.array([-1, 3]), 7, None, "split 'train'")


@pytest.fixture(scope="module")
def seven_class_workdir(tmp_path_factory):
    """A 7-class fine-tuned classifier saved as a workdir (made past the start-up check, as
    an older version or another tool could have), with its task, state and config. The state
    is zeros of the task's layout (what the tests read is the class count, not the weights: no
    init program to compile)."""
    from mae_jax import sharding as shd

    config = _finetune_config(7)
    root = str(tmp_path_factory.mktemp("seven"))
    mesh = shd.make_mesh(config.mesh)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(cs, "check_num_classes", lambda *a: None, raising=False)
        task = finetune.finetune_task(config, mesh, root)
    fns = task.fns
    state = jax.tree.map(
        lambda a, sh: jax.device_put(np.zeros(a.shape, a.dtype), sh),
        fns.abstract_state,
        fns.state_shardings,
    )
    with wdir.Writer(root, keep=None, async_save=False, handle_sigterm=False) as writer:
        writer.save(4, wdir.to_checkpoint(state), {**task.meta(), "step": 4})
        writer.wait()
    return root, task, state, config, mesh


def test_a_seven_class_head_on_the_ten_class_set(seven_class_workdir, tmp_path):
    root, task, state, config, mesh = seven_class_workdir
    # the task's own checks: a train batch, and the eval pass (before any batch is evaluated)
    with pytest.raises(ValueError, match=r"class id 9, outside \[0, 7\).*10 classes"):
        task.check_batch({"label": np.arange(10, dtype=np.int32)})
    with pytest.raises(ValueError, match=r"outside \[0, 7\) of the model's 7 classes"):
        cs.evaluate(task.fns, state, config.data, 80, mesh, 7)
    # configs/evaluate.py:smoke on it is refused before it reads any data
    c = load_config("configs/evaluate.py:smoke")
    c.checkpoint.path = root
    c.eval_batch_size = 80
    c.data.embedded_eval_per_class = 10
    out = tmp_path / "eval"
    with pytest.raises(ValueError, match=r"has 7 classes, fewer than the 10 of the data set"):
        evaluate.run(c, str(out))
    assert not (out / wdir.RESULTS).exists()


def test_results_with_a_nan_are_valid_json(tmp_path):
    path = tmp_path / "r.json"
    wdir.write_json(str(path), {"loss": float("nan"), "top1": 50.0, "xs": [float("inf"), 1.0]})
    assert json.loads(path.read_text(), parse_constant=pytest.fail) == {
        "loss": None,
        "top1": 50.0,
        "xs": [None, 1.0],
    }


# ------------------------------------------------------------------------------ 2. extending
def test_extending_a_finished_run_says_it_runs_at_min_lr_and_how_to_start_anew(warnings_log):
    c = load_config("configs/smoke.py")
    c.total_steps = 150
    c.optim.min_lr = 1e-6
    done = {"schedule": {"total_steps": 100, "warmup_steps": 10, "extensions": []}}
    train.plan(c, 2400, (100, done), "/runs/a")
    said = [m for m in warnings_log if "finished its schedule" in m]
    assert len(said) == 1, warnings_log
    assert "50 added steps run at its final learning rate, config.optim.min_lr=1e-06" in said[0]
    assert "--config.init_from.path=/runs/a --config.total_steps=50" in said[0]
    # midway, the cosine stretches: no such warning
    midway = {"schedule": {"total_steps": 200, "warmup_steps": 10, "extensions": []}}
    train.plan(c, 2400, (100, midway), "/runs/a")
    assert len([m for m in warnings_log if "finished its schedule" in m]) == 1


# ------------------------------------------------------------------------------ 3. Ctrl-C
def test_a_ctrl_c_in_the_writer_asks_to_stop_instead_of_raising(tmp_path):
    # What the process had before (Python's KeyboardInterrupt handler, or SIG_IGN where the
    # suite runs in the background, as in CI) comes back when the writer closes.
    before = signal.getsignal(signal.SIGINT)
    with wdir.Writer(tmp_path / "wd", handle_sigterm=True) as wd:
        signal.raise_signal(signal.SIGINT)
        time.sleep(0.01)  # the handler runs between bytecodes
        assert wd.preemption_requested and wd.stop_signal == signal.SIGINT
    assert signal.getsignal(signal.SIGINT) is before


@pytest.mark.slow
@pytest.mark.parametrize("times", [1, 2])
def test_ctrl_c_saves_the_last_step_like_a_preemption_notice(tmp_path, spawn, times):  # noqa: F811 - the fixture
    wd = tmp_path / "wd"
    trainer, seen = spawn.until_step("train", wd, 2, total_steps=400)
    trainer.signal(signal.SIGINT)
    if times == 2:
        time.sleep(0.05)
        if trainer.running:
            trainer.signal(signal.SIGINT)
    rc = trainer.wait(EXIT_TIMEOUT)
    err = trainer.stderr
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, trainer.tail()
    assert "Ctrl-C (SIGINT) received: saving the last completed step" in err, trainer.tail()
    notices = NOTICE.findall(trainer.stdout)
    if times == 1 or rc == 130:
        assert rc == 130, trainer.tail()  # a shell's status for Ctrl-C, after the save
        assert len(notices) == 1, trainer.tail()
        saved = int(notices[0][0])
        assert saved >= seen, trainer.tail()
        assert checkpoint_names(wd) == [str(saved)], trainer.tail()
        assert metric_steps(wd) == list(range(1, saved + 1)), trainer.tail()
        assert "stopped by Ctrl-C; rerun the same command to resume" in trainer.stdout
    else:  # the second Ctrl-C ended it during the save: at most that checkpoint, finalized
        assert rc == -signal.SIGINT, trainer.tail()
        assert "second Ctrl-C (SIGINT): exiting now" in err, trainer.tail()
        assert len(finalized(wd)) <= 1, trainer.tail()


# ------------------------------------------------------------------------------ 4. disk full
@contextlib.contextmanager
def _small_disk(where: Path, size: str):
    """A tmpfs of `size` mounted at `where` (skips the test where mounting is not allowed)."""
    where.mkdir(parents=True)
    r = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", f"mae-{uuid.uuid4().hex[:8]}", str(where)],
        capture_output=True,
        text=True,
    )
    if r.returncode:
        pytest.skip(f"cannot mount a {size} tmpfs here: {r.stderr.strip()}")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], capture_output=True)


def test_a_full_disk_is_one_error_and_leaves_no_partial_checkpoint(tmp_path):
    with _small_disk(tmp_path / "small", "2m") as disk:
        writer = wdir.Writer(disk / "wd", handle_sigterm=False)
        try:
            x = np.random.default_rng(0).standard_normal(1_000_000).astype(np.float32)
            writer.save(1, {"x": x}, {"step": 1})
            with pytest.raises(wdir.DiskFullError) as e:
                writer.wait()
        finally:
            writer.close()  # does not raise the same failure again
        text = str(e.value)
        assert f"no space left on the file system of {disk / 'wd' / 'checkpoints'}" in text
        assert "while saving checkpoint 1: one checkpoint is about 4.0 MB" in text
        assert "intact checkpoints: none" in text and "removed the half-written 1." in text
        assert checkpoint_names(disk / "wd") == []


@pytest.mark.slow
def test_training_onto_a_full_disk_says_so_and_keeps_the_intact_checkpoints(tmp_path, spawn):  # noqa: F811 - the fixture
    # a smoke checkpoint is about 10 MB: 25 MB hold two, the third does not fit
    with _small_disk(tmp_path / "small", "25m") as disk:
        wd = disk / "wd"
        trainer = spawn.run("train", wd, total_steps=6, checkpoint_every_steps=1)
        err = trainer.stderr
        assert trainer.popen.returncode == 1, trainer.tail()
        assert "Traceback" not in err, trainer.tail()
        errors = error_lines(err)
        assert len(errors) == 1, trainer.tail()
        kept = finalized(wd)
        assert kept and checkpoint_names(wd) == [str(s) for s in kept], trainer.tail()
        assert errors[0].startswith(
            f"error: no space left on the file system of {wd / 'checkpoints'} while saving "
            f"checkpoint {kept[-1] + 1}: one checkpoint is about 1"
        ), trainer.tail()
        assert f"intact checkpoints: {kept} in" in errors[0], trainer.tail()
        assert f"then rerun to resume from step {kept[-1]}" in errors[0], trainer.tail()


# ------------------------------------------------------------------------------ 5. long work
def test_the_eval_iterator_polls_should_stop_before_every_batch():
    cfg = schema.defaults(schema.DATA)
    cfg.image_size = 32
    cfg.embedded_eval_per_class = 10
    calls = []

    def should_stop():
        calls.append(1)
        return len(calls) > 2

    data = pipeline.create_eval_iterator(cfg, global_batch_size=16, should_stop=should_stop)
    assert len(data) == 7
    next(data), next(data)
    with pytest.raises(pipeline.Interrupted, match=r"eval: stopped at batch 2"):
        next(data)


_KNN_START = re.compile(r"eval: \d+ examples on process 0/1")


@pytest.mark.slow
def test_sigterm_during_the_knn_pass_stops_it_within_seconds(tmp_path, spawn):  # noqa: F811 - the fixture
    wd = tmp_path / "wd"
    # a kNN pass after step 2 over the 2400 train and 600 eval examples, 16 at a time
    # the line of step 2 comes after its kNN pass
    trainer, _ = spawn.until_step(
        "train", wd, 1, total_steps=400, knn_every_steps=2, knn_batch_size=16
    )
    deadline = time.monotonic() + START_TIMEOUT
    while not _KNN_START.search(trainer.stderr):
        assert trainer.running and time.monotonic() < deadline, trainer.tail()
        time.sleep(0.05)
    time.sleep(1.0)  # inside the pass
    sent = time.monotonic()
    trainer.signal(signal.SIGTERM)
    while not NOTICE.search(trainer.stdout):
        assert trainer.running and time.monotonic() - sent < RUN_TIMEOUT, trainer.tail()
        time.sleep(0.05)
    took = time.monotonic() - sent
    rc = trainer.wait(EXIT_TIMEOUT)
    print(f"SIGTERM during the kNN pass -> preemption notice: {took:.1f} s")
    assert rc == 0, trainer.tail()
    assert "kNN monitor at step 2" not in trainer.stdout, trainer.tail()  # it was cut short
    assert "step 2: periodic work interrupted (eval: stopped at batch" in trainer.stderr
    assert [int(n) for n, _ in NOTICE.findall(trainer.stdout)] == [2], trainer.tail()
    assert checkpoint_names(wd) == ["2"] and metric_steps(wd) == [1, 2], trainer.tail()
    assert took < 10, f"{took:.1f} s from SIGTERM to the notice" + trainer.tail()
