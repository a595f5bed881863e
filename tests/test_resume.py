"""Resuming pretraining: like an uninterrupted run (in process, after a notice while waiting for
data, after SIGKILLs of a real process), across block layouts, from checkpoints without a
metrics window, and extending a finished run's schedule."""

import json
import os
import shutil
import signal
import subprocess
import time

import numpy as np
import pytest
from config_files import ROOT, main_command, main_config
from config_files import tiny_pretrain as small

from mae_jax.data import pipeline
from mae_jax.metrics import read_jsonl
from mae_jax.tasks import pretrain


@pytest.mark.slow  # a run that extends a schedule
def test_extending_a_run_continues_its_learning_rate(copy_tiny_run):
    """The finished 6-step tiny run extended to 10 steps: the added steps stay at the floor,
    here the extension config's min_lr (nonzero, so that a floor is told from a zero lr), with
    no new warm-up or cosine."""
    workdir = copy_tiny_run  # small() trained: 6 steps, metrics at 2, 4, 6
    pretrain.train_and_evaluate(small(total_steps=10, **{"optim.min_lr": 1e-4}), workdir)
    lrs = {r["step"]: r["lr"] for r in read_jsonl(workdir)}
    # steps 1..6 followed the 6-step schedule; 7..10 stay at min_lr, no new warm-up
    assert lrs[4] > 1e-4
    assert lrs[8] == pytest.approx(1e-4, rel=1e-5) and lrs[10] == pytest.approx(1e-4, rel=1e-5)
    from mae_jax import workdir as wdir

    assert wdir.Reader(workdir).latest_meta()[1]["schedule"]["extensions"] == [[6, 6]]
    history = json.load(open(os.path.join(workdir, "config_history.json")))
    assert history[0]["replaced_at_step"] == 6 and history[0]["config"]["total_steps"] == 6


def test_resume_continues_like_an_uninterrupted_run(copy_tiny_run):
    workdir = copy_tiny_run  # small() trained
    expected = {r["step"]: r["loss"] for r in read_jsonl(workdir)}
    # as if the run had died after its step-3 checkpoint: drop the later checkpoint
    shutil.rmtree(os.path.join(workdir, "checkpoints", "6"))
    pretrain.train_and_evaluate(small(), workdir)
    got = {r["step"]: r["loss"] for r in read_jsonl(workdir)}
    assert sorted(got) == [1, 2, 4, 6]  # metrics after the checkpoint were replaced, not doubled
    for step in (4, 6):
        assert got[step] == pytest.approx(expected[step], rel=1e-6), step


def test_a_checkpoint_without_a_metrics_window_resumes(copy_tiny_run):
    """Checkpoints written before the logged metrics became window means have no `window` in
    their meta: they resume, the first window starting at the checkpoint."""
    workdir = copy_tiny_run
    shutil.rmtree(os.path.join(workdir, "checkpoints", "6"))
    path = os.path.join(workdir, "checkpoints", "3", "meta", "metadata")
    with open(path) as f:
        meta = json.load(f)
    del meta["window"]
    with open(path, "w") as f:
        json.dump(meta, f)
    pretrain.train_and_evaluate(small(), workdir)
    assert [r["step"] for r in read_jsonl(workdir)] == [1, 2, 4, 6]


@pytest.mark.slow
def test_a_run_resumes_and_is_read_across_block_layouts(copy_tiny_run):
    # A per-block checkpoint resumes into a scanned model (stacked blocks) and the stacked
    # checkpoints it writes are read back per block by the readers (export, init_from).
    import shutil

    from mae_jax import workdir as wdir

    workdir = copy_tiny_run  # small() trained
    expected = {r["step"]: r["loss"] for r in read_jsonl(workdir)}
    shutil.rmtree(os.path.join(workdir, "checkpoints", "6"))
    pretrain.train_and_evaluate(small(**{"model.scan_layers": True}), workdir)
    got = {r["step"]: r["loss"] for r in read_jsonl(workdir)}
    for step in (4, 6):
        assert got[step] == pytest.approx(expected[step], rel=1e-4), step
    step, _, params = wdir.read_mae(workdir)
    assert step == 6 and sorted(params["blocks"]) == [0, 1]  # read per block
    assert params["blocks"][1]["attn"]["qkv"]["kernel"].shape == (32, 96)


_KILLED_RUN = {"total_steps": 16, "log_every_steps": 1, "checkpoint_every_steps": 3}


def _main_cmd(workdir, *extra):
    steps = [f"--config.{k}={v}" for k, v in _KILLED_RUN.items()]
    return main_command(workdir, *steps, *extra)


@pytest.mark.slow
def test_sigkill_and_resume_matches_uninterrupted_run(tmp_path):
    # the uninterrupted reference in this process: the config of `_main_cmd`
    ref = str(tmp_path / "ref")
    pretrain.train_and_evaluate(main_config(**_KILLED_RUN), ref)
    expected = {r["step"]: r["loss"] for r in read_jsonl(ref)}
    work = str(tmp_path / "killed")
    rng = np.random.default_rng(0)
    for attempt in range(2):  # kill twice at random moments after a checkpoint
        proc = subprocess.Popen(
            _main_cmd(work),
            cwd=ROOT,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.time() + 120
        while time.time() < deadline:
            path = os.path.join(work, "metrics.jsonl")
            if os.path.exists(path) and len(open(path).readlines()) >= 4 + 5 * attempt:
                break
            time.sleep(0.2)
        time.sleep(float(rng.uniform(0, 0.5)))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    # the resume after the second kill in this process: the same config and devices as the
    # killed processes, one real process fewer
    pretrain.train_and_evaluate(main_config(**_KILLED_RUN), work)
    got = {r["step"]: r["loss"] for r in read_jsonl(work)}
    assert sorted(got) == sorted(expected)
    for step in expected:
        assert got[step] == pytest.approx(expected[step], rel=1e-5), step


class _NoticeWhileWaiting:
    """The pretraining iterator, with a SIGTERM arriving while the batch after `after` batches
    is awaited (the real iterator then raises `Interrupted`)."""

    def __init__(self, inner, after):
        self.inner, self.left = inner, after

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def __next__(self):
        if self.left == 0:
            signal.raise_signal(signal.SIGTERM)
            raise pipeline.Interrupted("stopped while waiting for data")
        self.left -= 1
        return next(self.inner)


def test_a_notice_while_waiting_for_data_saves_the_last_step_and_resumes_exactly(
    tiny_run, copy_tiny_run, monkeypatch, capsys
):
    real = pipeline.create_pretrain_iterator
    monkeypatch.setattr(
        pipeline, "create_pretrain_iterator", lambda *a, **k: _NoticeWhileWaiting(real(*a, **k), 2)
    )
    workdir = copy_tiny_run  # small() trained; as if it had died after its step-3 checkpoint
    shutil.rmtree(os.path.join(workdir, "checkpoints", "6"))
    pretrain.train_and_evaluate(small(), workdir)  # resumed at 3; stops after 5
    assert f"preemption notice: saved step 5 in {workdir}/checkpoints" in capsys.readouterr().out
    assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["3", "5"]
    assert [r["step"] for r in read_jsonl(workdir)] == [1, 2, 4]
    monkeypatch.setattr(pipeline, "create_pretrain_iterator", real)
    pretrain.train_and_evaluate(small(), workdir)  # step 6's window {5, 6} spans the stop
    expected = {r["step"]: r["loss"] for r in read_jsonl(tiny_run)}
    got = {r["step"]: r["loss"] for r in read_jsonl(workdir)}
    assert sorted(got) == [1, 2, 4, 6]
    assert got == pytest.approx(expected, rel=1e-6)
