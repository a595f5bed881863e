"""Pretraining: the loop (metrics, checkpoints, milestones, per-step decisions, window means), bad
configs, non-finite losses, imported weights."""

import json
import os
import shutil

import jax
import numpy as np
import pytest
from config_files import load_config
from config_files import tiny_pretrain as small
from flax import nnx

from mae_jax import models, optim, train
from mae_jax.metrics import read_jsonl
from mae_jax.tasks import pretrain


def test_training_loop_writes_metrics_config_and_checkpoints(copy_tiny_run):
    workdir = copy_tiny_run  # small() trained
    rows = read_jsonl(workdir)
    assert [r["step"] for r in rows] == [1, 2, 4, 6]
    for r in rows:
        for key in ("loss", "lr", "grad_norm", "images_per_sec"):
            assert key in r and np.isfinite(r[key])
    saved = json.load(open(os.path.join(workdir, "config.json")))
    assert saved["model"]["name"] == "mae_vit_test" and saved["batch_size"] == 16
    assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["3", "6"]
    assert any(f.startswith("events.out.tfevents") for f in os.listdir(workdir))
    # config.json holds the numbers the run used, not the recipe's defaults
    assert saved["total_steps"] == 6 and saved["epochs"] is None and saved["warmup_steps"] == 0
    assert saved["batch_size"] == 16 and saved["optim"]["lr"] == pytest.approx(1e-3)
    assert saved["checkpoint_every_steps"] == 3 and saved["keep_every_steps"] == 0
    # rerunning the finished run says so and writes nothing at all
    before = {f: os.path.getmtime(os.path.join(workdir, f)) for f in os.listdir(workdir)}
    assert pretrain.train_and_evaluate(small(), workdir) == {"step": 6, "complete": True}
    assert {f: os.path.getmtime(os.path.join(workdir, f)) for f in os.listdir(workdir)} == before
    # fewer steps than done: refused with a sentence, nothing written
    with pytest.raises(ValueError, match="already done 6 steps; the config asks for 4"):
        pretrain.train_and_evaluate(small(total_steps=4), workdir)
    assert {f: os.path.getmtime(os.path.join(workdir, f)) for f in os.listdir(workdir)} == before


def test_milestones_are_kept_beside_the_newest_checkpoints(tmp_path):
    workdir = str(tmp_path / "run")
    pretrain.train_and_evaluate(small(keep_every_steps=2, keep_checkpoints=1), workdir)
    assert sorted(int(n) for n in os.listdir(os.path.join(workdir, "checkpoints"))) == [2, 4, 6]


@pytest.mark.slow
def test_resuming_with_another_param_dtype_warns_naming_both(copy_tiny_run, warnings_log):
    """The float32 run extended in bfloat16: the warning, and a real step on the converted state
    (slow tier: its bfloat16 step is a program no other test compiles, ~10-15 s)."""
    config = small(total_steps=7, **{"model.param_dtype": "bfloat16"})
    pretrain.train_and_evaluate(config, copy_tiny_run)
    assert any("param_dtype float32" in m and "bfloat16" in m for m in warnings_log)


def test_extension_schedule_is_continuous_midway_and_after_warmup():
    old = optim.extended_schedule(1.0, 100, 10, 0.01)
    mid = optim.extended_schedule(1.0, 300, 10, 0.01, extensions=[(50, 100)])
    for t in range(0, 51):
        assert float(mid(t)) == pytest.approx(float(old(t)), rel=1e-6)
    steps = np.arange(50, 301)
    values = np.array([float(mid(t)) for t in steps])
    assert values[0] == pytest.approx(float(old(50)), rel=1e-6)
    assert np.all(np.diff(values) <= 1e-7) and values[-1] == pytest.approx(0.01, rel=1e-5)
    # an extension during warm-up keeps the warm-up and stretches the cosine
    early = optim.extended_schedule(1.0, 300, 10, 0.01, extensions=[(5, 100)])
    plain = optim.warmup_cosine_schedule(1.0, 300, 10, 0.01)
    for t in (0, 5, 9, 10, 150, 299):
        assert float(early(t)) == pytest.approx(float(plain(t)), rel=1e-6)


def test_paper_config_plans_from_epochs():
    """configs/mae_vit_base.py on a 2,400-image set at batch 64: 37 steps per epoch, 800 epochs,
    40 warm-up epochs, milestones every 100 epochs; lr 1.5e-4 x 64 / 256."""
    c = load_config("configs/mae_vit_base.py")
    c.batch_size = 64
    p = pretrain.plan(c, num_train_examples=2400)
    r = p.run
    assert r.steps_per_epoch == 37
    assert r.total_steps == 800 * 37 and r.warmup_steps == 40 * 37
    assert r.milestone_every == 100 * 37
    assert r.optim.lr == pytest.approx(1.5e-4 * 64 / 256)
    assert float(r.lr_fn(40 * 37)) == pytest.approx(r.optim.lr)


def test_pretraining_starts_from_imported_weights_and_readers_of_a_real_run(tmp_path):
    from mae_jax import visualize as V
    from mae_jax import workdir as wdir

    source = models.create("mae_vit_test", seed=42)
    weights = str(tmp_path / "weights")
    params = jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(source, nnx.Param)))
    wdir.write_weights(
        weights, {"params": params}, {"model": {"name": "mae_vit_test"}, "kind": "weights"}
    )
    # the weights workdir is a source, not a run to resume
    with pytest.raises(ValueError, match="holds imported weights"):
        pretrain.train_and_evaluate(small(), weights)
    run = str(tmp_path / "run")
    pretrain.train_and_evaluate(
        small(total_steps=2, **{"init_from.path": weights, "optim.lr": 0.0}), run
    )
    got = wdir.Reader(run).restore_params(
        jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params)
    )
    assert got.step == 2
    jax.tree.map(np.testing.assert_array_equal, got.state, params)
    # export and visualize read the real trainer's checkpoint
    from mae_jax.convert import cli

    out = str(tmp_path / "mae.safetensors")
    assert cli.main(["export", "--workdir", run, "--format", "timm", "--output", out]) == 0
    model, step = V.restore_mae(run)
    assert step == 2 and model.config.name == "mae_vit_test"


@pytest.mark.parametrize(
    "overrides,match",
    [
        ({"batch_size": 12}, "not divisible by the data-parallel size 8"),
        ({"mesh.data": 16}, "needs 16 devices but 8 are available"),
        ({"grad_accum_steps": 3}, "grad_accum_steps=3"),
        ({"model.name": "mae_vit_gigantic"}, "unknown model preset"),
        ({"optim.name": "adam_w"}, r"config.optim.name must be one of \('adamw', 'lars'"),
        ({"checkpoint_every_epochs": 2.0}, "config.checkpoint_every_steps=3 and config.checkp"),
    ],
)
def test_bad_configs_fail_before_compiling(tmp_path, overrides, match):
    with pytest.raises(ValueError, match=match):
        pretrain.train_and_evaluate(small(**overrides), str(tmp_path / "bad"))


def test_unknown_top_level_key_is_rejected(tmp_path):
    c = small()
    c.unlock()
    c.bach_size = 3
    with pytest.raises(ValueError, match=r"unknown config key\(s\) \['bach_size'\]"):
        pretrain.train_and_evaluate(c, str(tmp_path / "bad"))


def test_workdir_with_another_model_is_refused(tiny_run):
    before = sorted(os.listdir(tiny_run))
    for steps in (7, 6):  # an extension, and the finished run's own length
        with pytest.raises(ValueError, match="holds another model"):
            config = small(total_steps=steps, **{"model.name": "mae_vit_tiny_patch4_32"})
            pretrain.train_and_evaluate(config, tiny_run)
    assert sorted(os.listdir(tiny_run)) == before


def test_nonfinite_loss_stops_with_step_and_last_checkpoint(copy_tiny_run):
    workdir = copy_tiny_run  # small() trained: checkpoints 3 and 6
    shutil.rmtree(os.path.join(workdir, "checkpoints", "6"))  # as if it had died after 3
    with pytest.raises(
        train.TrainingError, match=r"non-finite loss at step 5; .*last good checkpoint is step 4"
    ):
        # resumed at 3 (the same run length: tiny_run's step program) with a huge peak lr and a
        # checkpoint every step: step 4 (a finite loss) is saved, then blows the weights up;
        # step 5's loss is not finite, and the run stops before saving it
        config = small(checkpoint_every_steps=1, **{"optim.lr": 1e30})
        pretrain.train_and_evaluate(config, workdir)
    assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["3", "4"]


# ------------------------------------------------------------------------------ the loop
_C = train.Cadence(
    total_steps=100,
    checkpoint_every=20,
    log_every=10,
    milestone_every=30,
    periodic=((25, "knn"), (0, "off"), (40, "pictures")),
)
_D = train.Decision


@pytest.mark.parametrize(
    "done,preempted,waiting,expected",
    [
        (1, False, False, _D(log=True)),  # the first step is logged
        (7, False, False, _D()),
        (10, False, False, _D(log=True)),
        (20, False, False, _D(log=True, save=True)),  # a periodic save
        (30, False, False, _D(log=True, save=True)),  # a milestone
        (25, False, False, _D(periodic=("knn",))),  # periodic work, off when its period is 0
        (40, False, False, _D(log=True, save=True, periodic=("pictures",))),
        (50, False, False, _D(log=True, periodic=("knn",))),
        # the last step: logged, saved, and every periodic work that is on
        (100, False, False, _D(log=True, save=True, periodic=("knn", "pictures"), final=True)),
        (7, True, False, _D(save=True, stop=True)),  # a preemption between save steps
        (20, True, False, _D(log=True, save=True, stop=True)),  # ... and at a save step
        (100, True, False, _D(True, True, ("knn", "pictures"), final=True, stop=True)),
        # a notice while waiting for the next batch: save the last completed step, stop
        (7, True, True, _D(save=True, stop=True)),
        (0, True, True, _D(save=True, stop=True)),
    ],
)
def test_decide(done, preempted, waiting, expected):
    assert train.decide(done, _C, preempted, waiting) == expected


def test_the_last_step_is_logged_when_the_period_does_not_divide_it():
    c = train.Cadence(total_steps=99, checkpoint_every=1000, log_every=50)
    assert [d for d in range(1, 100) if train.decide(d, c, False).log] == [1, 50, 99]
    assert [d for d in range(1, 100) if train.decide(d, c, False).save] == [99]


def test_logged_loss_is_the_mean_of_the_window(tiny_run, tmp_path):
    per_step = str(tmp_path / "every")
    pretrain.train_and_evaluate(small(log_every_steps=1), per_step)
    one = {r["step"]: r for r in read_jsonl(per_step)}
    assert sorted(one) == [1, 2, 3, 4, 5, 6] and len({one[s]["loss"] for s in one}) == 6

    def check(rows, windows):
        assert sorted(rows) == sorted(windows)
        for step, window in windows.items():
            for k in ("loss", "grad_norm"):
                mean = np.mean([one[s][k] for s in window])
                assert rows[step][k] == pytest.approx(mean, rel=1e-5), (step, k)
            for k in ("lr", "param_norm"):  # as of the logged step
                assert rows[step][k] == pytest.approx(one[step][k], rel=1e-6), (step, k)

    # log_every 2 (tiny_run): windows {1}, {2}, {3, 4}, {5, 6}
    check({r["step"]: r for r in read_jsonl(tiny_run)}, {1: [1], 2: [2], 4: [3, 4], 6: [5, 6]})
    # log_every 5: {1}, {2..5} (across the step-3 checkpoint), {6}
    five = str(tmp_path / "five")
    pretrain.train_and_evaluate(small(log_every_steps=5), five)
    check({r["step"]: r for r in read_jsonl(five)}, {1: [1], 5: [2, 3, 4, 5], 6: [6]})
