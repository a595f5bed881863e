"""Messages a user reads when something is refused or slow (issue 21, items 6-8): each says what
is wrong and what to do, and nothing that reads as damage when nothing is damaged."""

import contextlib
import io
import logging
import os
import re
import signal
import subprocess
import time

import jax
import numpy as np
import pytest
from config_files import ROOT, main_command, tiny_pretrain
from flax import nnx

from mae_jax import models
from mae_jax import workdir as wdir
from mae_jax.tasks import pretrain


def small(**kw):
    return tiny_pretrain(total_steps=2, log_every_steps=1, checkpoint_every_steps=2, **kw)


def _weights(path, name, **meta):
    """A weights workdir (as `convert import` writes) of model `name`."""
    params = nnx.to_pure_dict(nnx.state(models.create(name, seed=1), nnx.Param))
    meta = {"model": {"name": name}, "kind": "weights", **meta}
    wdir.write_weights(path, {"params": jax.tree.map(np.asarray, params)}, meta)
    return path


# ------------------------------------------------------------------ item 6: init_from sources
def test_init_from_another_architecture_names_both_models_and_writes_nothing(tmp_path):
    source = _weights(str(tmp_path / "tiny"), "mae_vit_tiny_patch4_32")
    run = tmp_path / "run"
    with pytest.raises(ValueError) as e:
        pretrain.train_and_evaluate(small(**{"init_from.path": source}), str(run))
    message = str(e.value)
    assert "holds another model ('mae_vit_tiny_patch4_32'" in message, message
    assert "embed_dim: checkpoint 128 vs config 32" in message, message
    assert "config.model.name='mae_vit_tiny_patch4_32'" in message, message
    assert "damaged" not in message and "intact" not in message, message
    assert not run.exists()  # refused before the workdir was created


def test_init_from_a_classifier_workdir_names_its_kind_and_the_encoder_part(tmp_path):
    source = _weights(str(tmp_path / "finetuned"), "mae_vit_test", num_classes=10)
    run = tmp_path / "run"
    with pytest.raises(ValueError) as e:
        pretrain.train_and_evaluate(small(**{"init_from.path": source}), str(run))
    message = str(e.value)
    assert "is a classifier's checkpoint" in message, message
    assert "config.init_from.parts=encoder" in message, message
    assert "depth or size" not in message, message
    assert not run.exists()


def _finetuned_pth(path, global_pool):
    """An official fine-tuned classifier `.pth` of `mae_vit_test` (as `main_finetune.py` saves)."""
    from mae_jax import convert
    from mae_jax.convert import classifier as cc
    from mae_jax.models.classifier import Head, from_head

    clf = from_head(models.resolve("mae_vit_test"), Head(10, global_pool, False), seed=3)
    convert.save(cc.classifier_to_pytorch(clf, "official"), path, "official", clf.config)
    return path, clf


def test_init_from_a_finetuned_pth_names_it_a_classifier_and_leaves_no_workdir(tmp_path):
    pth, _ = _finetuned_pth(str(tmp_path / "finetuned.pth"), global_pool=True)
    run = tmp_path / "run"
    with pytest.raises(ValueError) as e:
        pretrain.train_and_evaluate(small(**{"init_from.path": pth}), str(run))
    message = str(e.value)
    assert "is a fine-tuned classifier, official MAE / timm names" in message, message
    assert "config.init_from.parts=encoder" in message, message
    assert "timm format" not in message, message
    assert not run.exists()  # was: an empty checkpoints/ and a lock


@pytest.mark.slow
def test_pretraining_takes_the_encoder_of_a_global_pool_finetuned_pth(tmp_path):
    pth, clf = _finetuned_pth(str(tmp_path / "finetuned.pth"), global_pool=True)
    run = str(tmp_path / "run")
    config = small(**{"init_from.path": pth, "init_from.parts": "encoder", "optim.lr": 0.0})
    pretrain.train_and_evaluate(config, run)
    blocks = nnx.to_pure_dict(nnx.state(clf.blocks, nnx.Param))
    got = wdir.Reader(run).restore_params(
        {"blocks": jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), blocks)}
    )
    jax.tree.map(np.testing.assert_allclose, got.state["blocks"], blocks)


# ------------------------------------------------------------------ item 8: exit delays
def _main_cmd(workdir, *extra):
    # compilation_cache=none: the step compiles in full, as on a first run
    return main_command(
        workdir, "--config.total_steps=4", "--config.compilation_cache=none", *extra
    )


def _env():
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT)
    env.pop("XLA_FLAGS", None)  # one CPU device: the smoke config's mesh
    return env


@pytest.mark.slow
def test_a_preemption_notice_during_start_up_exits_without_compiling_the_step(tmp_path):
    workdir = tmp_path / "run"
    proc = subprocess.Popen(
        _main_cmd(workdir),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=_env(),
    )
    lines, sent = [], None
    for line in proc.stdout:
        lines.append(line)
        if sent is None and "initialized (" in line:  # the writer holds the workdir
            proc.send_signal(signal.SIGTERM)
            sent = time.monotonic()
    assert proc.wait(timeout=300) == 0, "".join(lines)
    took = time.monotonic() - sent
    out = "".join(lines)
    assert "preemption notice during start-up: exiting before step 1" in out, out
    assert "step 1/" not in out and os.listdir(workdir / "checkpoints") == [], out
    # was: the step compiled and ran, then step 1 was saved (25 s after the notice for the
    # smoke model on a cold cache; minutes for ViT-L)
    assert took < 15, f"{took:.1f} s from the notice to the exit\n{out}"


def test_closing_the_input_pipeline_does_not_wait_for_its_threads():
    """tf.data's iterator destructor waits for the elements its threads started: 10 to 24 s
    measured between a smoke run's last checkpoint and its `done` line (kNN monitor on)."""
    from mae_jax.data import pipeline

    class Winding:  # stands in for the tf.data iterator
        def __del__(self):
            time.sleep(8)

    it = pipeline.DataIterator(lambda step, guarded: None, 0, 1)
    it._it = Winding()
    t0 = time.monotonic()
    it.close()
    took = time.monotonic() - t0
    assert took < 5, f"{took:.1f} s"  # was 8 s: the whole wind-down


# ------------------------------------------------------------------ item 8: noise
def test_reading_an_intact_checkpoint_logs_no_missing_metadata_warning(tmp_path, caplog):

    source = _weights(str(tmp_path / "weights"), "mae_vit_test")
    with caplog.at_level(logging.INFO):
        step, config, _ = wdir.read_mae(source)
    assert step == 0 and config.name == "mae_vit_test"
    noise = [r.getMessage() for r in caplog.records if "does not exist" in r.getMessage()]
    assert not noise, noise


# ------------------------------------------------------------------ item 7: preflight
def _preflight(*args):
    """`preflight.main` in this process (its own flag values, never absl's global ones, as in
    `python -m mae_jax.preflight`): (exit status, stdout)."""
    from mae_jax import preflight

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        rc = preflight.main(["preflight", *args])
    return rc, out.getvalue()


def test_preflight_help_lists_its_flags(capsys):
    rc, out = _preflight("--help")
    err = capsys.readouterr().err
    assert rc == 0, out + err
    assert "--topology" in out and "--skip" in out and "python -m mae_jax.preflight" in out
    assert "Unknown command line flag" not in err, err


def test_preflight_is_ready_only_when_every_check_ran():
    rc, out = _preflight(
        "--config=configs/smoke.py", "--topology=v4-8", "--skip=data,model,compile,launch"
    )
    assert rc == 0, out  # nothing failed ...
    assert "-> ready" not in out, out  # ... but most is left open
    assert "-> nothing failed, but not checked: data, model, compile, memory, launch" in out, out


@pytest.mark.slow  # the preflight's model check or an AOT compile of a stand-in topology
def test_preflight_gives_no_fit_verdict_from_the_cpu_stand_in():
    """In this process: the stand-in compiles for v4-8 on 4 of its 8 CPU devices."""
    rc, out = _preflight(
        "--config=configs/smoke.py",
        "--config.model.name=mae_vit_test",
        "--topology=v4-8",
        "--backend=cpu",
        "--hbm_gib=0.001",  # the stand-in's figure is far over it
        "--skip=data,model,launch",
    )
    assert rc == 0, out
    assert "preflight [4/6] compile: PASS" in out, out
    assert "per-device total:" in out, out
    assert "DOES NOT FIT" not in out and "FITS" not in out, out  # was inside the PASS
    assert "memory: SKIP" in out, out


@pytest.mark.slow  # the preflight's model check or an AOT compile of a stand-in topology
def test_preflight_model_check_without_the_data_set_size_runs_at_the_peak_lr(tmp_path):
    rc, out = _preflight(
        "--config=configs/mae_vit_base.py",
        "--topology=v4-8",
        f"--config.data.data_dir={tmp_path}",  # no ImageNet: epochs cannot become steps
        "--config.model.name=mae_vit_test",
        "--config.data.image_size=32",
        "--skip=data,compile,launch",
    )
    assert "preflight [3/6] model: PASS" in out, out
    lrs = [
        float(x)
        for x in re.findall(r"step \d: loss [\d.]+, grad norm [\d.e+-]+, lr ([\d.e+-]+)", out)
    ]
    assert len(lrs) == 2 and lrs[1] > 0.9 * lrs[0] > 0, out  # was 1.17e-06 then 0
    assert "placeholder of 1000 steps" in out, out


def test_scalars_without_training_progress_print_no_bare_progress_line(tmp_path, capsys):
    from mae_jax import metrics

    with metrics.MetricsWriter(tmp_path / "a", total_steps=None, tensorboard=False) as w:
        w.write_scalars(180, {"eval_top1": 71.5, "eval_top5": 90.1})  # evaluate's record
    still = lambda: 0.0  # noqa: E731 - no step rate: no ETA
    with metrics.MetricsWriter(
        tmp_path / "b", total_steps=200, tensorboard=False, clock=still
    ) as w:
        w.write_scalars(100, {"knn_top1": 40.0, "knn_seconds": 2.0})  # a kNN result alone
        w.write_scalars(120, {"loss": 0.5, "lr": 1e-4})
    out = capsys.readouterr().out.splitlines()
    assert out == ["step 120/200  loss 0.5000  lr 1.0e-04  ETA ?"], out  # was also 'step 180'


@pytest.mark.slow
def test_pretraining_takes_the_encoder_of_a_global_pool_finetuning_workdir(tmp_path):
    from mae_jax.models.classifier import Head, from_head

    clf = from_head(models.resolve("mae_vit_test"), Head(10, True, False), seed=3)
    params = jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(clf, nnx.Param)))
    source = str(tmp_path / "finetuned")
    meta = {"model": {"name": "mae_vit_test"}, "kind": "weights", **clf.head_spec.meta()}
    wdir.write_weights(source, {"params": params}, meta)
    run = str(tmp_path / "run")
    config = small(**{"init_from.path": source, "init_from.parts": "encoder", "optim.lr": 0.0})
    pretrain.train_and_evaluate(config, run)  # was: 'lacks ... norm: another depth or size?'
    got = wdir.Reader(run).restore_params(
        {"blocks": jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params["blocks"])}
    )
    jax.tree.map(np.testing.assert_array_equal, got.state["blocks"], params["blocks"])
