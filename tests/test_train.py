"""Pretraining: sharded step equivalence, gradient accumulation, the loop, resume, bad configs."""

import functools
import json
import os
import shutil
import signal
import subprocess
import time

import jax
import numpy as np
import pytest
from config_files import ROOT, load_config, main_command
from config_files import tiny_pretrain as small
from flax import nnx

from mae_jax import models, optim, schema, train
from mae_jax import sharding as shd
from mae_jax.data import pipeline
from mae_jax.tasks import pretrain


def _optim_config():
    # SGD keeps the update proportional to the gradient. (Adam would turn float noise of the
    # exactly-zero gradients, e.g. of the key biases, into +-lr updates on any mesh change.)
    oc = schema.defaults(schema.OPTIM)
    oc.name, oc.weight_decay = "sgd", 0.05
    return oc


LR = optim.warmup_cosine_schedule(0.5, 10, 1)


@functools.cache  # the (2, 4, 1) run serves both tests below
def _run_steps(mesh_shape, accum=1, steps=1, batch=16):
    mesh = shd.make_mesh(dict(zip(shd.MESH_AXES, mesh_shape)))
    fns = pretrain.build_step(
        lambda: models.create("mae_vit_test", seed=0), _optim_config(), LR, mesh, accum_steps=accum
    )
    state = fns.init()
    images = np.asarray(jax.random.normal(jax.random.key(0), (batch, 32, 32, 3)))
    losses = []
    for _ in range(steps):
        state, m = fns.step(state, {"image": shd.global_batch(images, mesh)}, jax.random.key(1))
        losses.append(float(m["loss"]))
    params = {
        "/".join(map(str, k)): np.asarray(v)
        for k, v in jax.tree_util.tree_flatten_with_path(nnx.to_pure_dict(state["params"]))[0]
    }
    return losses, params, float(m["grad_norm"])


@pytest.mark.slow  # three meshes compiled
def test_one_step_is_the_same_on_every_mesh():
    ref_loss, ref_params, ref_gn = _run_steps((8, 1, 1), steps=2)
    for shape in [(2, 4, 1), (2, 2, 2)]:
        loss, params, gn = _run_steps(shape, steps=2)
        np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
        np.testing.assert_allclose(gn, ref_gn, rtol=1e-4)
        for k in ref_params:
            np.testing.assert_allclose(
                params[k], ref_params[k], rtol=1e-4, atol=1e-5, err_msg=f"{shape}: {k}"
            )


@pytest.mark.slow  # two meshes compiled (one shared)
def test_gradient_accumulation_equals_full_batch():
    full_loss, full_params, _ = _run_steps((2, 4, 1), steps=2)
    acc_loss, acc_params, _ = _run_steps((2, 4, 1), accum=2, steps=2)  # 2 x 8 images
    np.testing.assert_allclose(acc_loss, full_loss, rtol=1e-5)
    for k in full_params:
        np.testing.assert_allclose(acc_params[k], full_params[k], rtol=1e-4, atol=1e-5, err_msg=k)


def test_params_and_optimizer_state_are_fsdp_sharded():
    mesh = shd.make_mesh({"data": 2, "fsdp": 4, "tensor": 1})
    fns = pretrain.build_step(lambda: models.create("mae_vit_test"), _optim_config(), LR, mesh)
    state = fns.init()
    kernel = state["params"]["blocks"][0]["mlp"]["fc1"]["kernel"].get_value()
    assert kernel.sharding.spec == jax.sharding.PartitionSpec("fsdp", None)
    mu = state["opt_state"][1].trace["blocks"][0]["mlp"]["fc1"]["kernel"].get_value()
    assert mu.sharding.spec == jax.sharding.PartitionSpec("fsdp", None)
    assert len(kernel.addressable_shards) == 8
    assert kernel.addressable_shards[0].data.shape == (8, 128)


def test_stacked_blocks_are_fsdp_sharded_with_a_replicated_layers_axis():
    mesh = shd.make_mesh({"data": 2, "fsdp": 4, "tensor": 1})
    fns = pretrain.build_step(
        lambda: models.create("mae_vit_test", scan_layers=True), _optim_config(), LR, mesh
    )
    state = fns.init()
    kernel = state["params"]["blocks"]["mlp"]["fc1"]["kernel"].get_value()
    assert kernel.shape == (2, 32, 128)
    assert kernel.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", None)
    mu = state["opt_state"][1].trace["blocks"]["mlp"]["fc1"]["kernel"].get_value()
    assert mu.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", None)
    assert kernel.addressable_shards[0].data.shape == (2, 8, 128)


def _metrics(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f if line.strip()]


def test_training_loop_writes_metrics_config_and_checkpoints(copy_tiny_run):
    workdir = copy_tiny_run  # small() trained
    rows = _metrics(workdir)
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


@pytest.mark.slow  # three real runs
def test_extending_a_run_continues_its_learning_rate(tmp_path):
    workdir = str(tmp_path / "run")
    pretrain.train_and_evaluate(small(total_steps=4, **{"optim.min_lr": 1e-4}), workdir)
    pretrain.train_and_evaluate(small(total_steps=8, **{"optim.min_lr": 1e-4}), workdir)
    lrs = {r["step"]: r["lr"] for r in _metrics(workdir)}
    # steps 1..4 followed the 4-step schedule down to min_lr; 5..8 stay there, no new warm-up
    assert lrs[4] > 1e-4
    assert lrs[6] == pytest.approx(1e-4, rel=1e-5) and lrs[8] == pytest.approx(1e-4, rel=1e-5)
    from mae_jax import workdir as wdir

    assert wdir.Reader(workdir).latest_meta()[1]["schedule"]["extensions"] == [[4, 4]]
    history = json.load(open(os.path.join(workdir, "config_history.json")))
    assert history[0]["replaced_at_step"] == 4 and history[0]["config"]["total_steps"] == 4


def test_resuming_with_another_param_dtype_warns_naming_both(copy_tiny_run, warnings_log):
    config = small(total_steps=7, **{"model.param_dtype": "bfloat16"})
    pretrain.train_and_evaluate(config, copy_tiny_run)
    assert any("param_dtype float32" in m and "bfloat16" in m for m in warnings_log)


def _garbage_folder(root):
    for c in ("a", "b"):
        os.makedirs(os.path.join(root, c))
        for i in range(8):
            with open(os.path.join(root, c, f"{i}.jpg"), "wb") as f:
                f.write(b"not an image" * (i + 1))
    return root


@pytest.mark.slow
def test_input_that_is_all_bad_stops_with_a_sentence_and_honours_sigterm(tmp_path):
    folder = _garbage_folder(str(tmp_path / "garbage"))
    data = ["--config.data.source=folder", f"--config.data.path={folder}"]
    t0 = time.monotonic()
    out = subprocess.run(
        _main_cmd(str(tmp_path / "a"), *data, "--config.data.max_consecutive_bad=20"),
        cwd=ROOT,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 1, out.stderr[-2000:]
    errors = [line for line in out.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and folder in errors[0] and "max_consecutive_bad" in errors[0]
    assert "Traceback" not in out.stderr and time.monotonic() - t0 < 300
    # waiting for data that never comes: a SIGTERM is honoured
    workdir = str(tmp_path / "b")
    proc = subprocess.Popen(
        _main_cmd(workdir, *data, "--config.data.max_consecutive_bad=1000000000"),
        cwd=ROOT,
        env=_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        lines = []
        for line in proc.stdout:
            lines.append(line)
            if "skipped" in line:  # the iterator is dropping batches
                break
        proc.send_signal(signal.SIGTERM)
        rest, _ = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 0, "".join(lines)[-2000:] + rest[-2000:]
    assert "preemption notice: saved step 0" in rest


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


def test_resume_continues_like_an_uninterrupted_run(copy_tiny_run):
    workdir = copy_tiny_run  # small() trained
    expected = {r["step"]: r["loss"] for r in _metrics(workdir)}
    # as if the run had died after its step-3 checkpoint: drop the later checkpoint
    shutil.rmtree(os.path.join(workdir, "checkpoints", "6"))
    pretrain.train_and_evaluate(small(), workdir)
    got = {r["step"]: r["loss"] for r in _metrics(workdir)}
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
    assert [r["step"] for r in _metrics(workdir)] == [1, 2, 4, 6]


@pytest.mark.slow
def test_a_run_resumes_and_is_read_across_block_layouts(copy_tiny_run):
    # A per-block checkpoint resumes into a scanned model (stacked blocks) and the stacked
    # checkpoints it writes are read back per block by the readers (export, init_from).
    import shutil

    from mae_jax import workdir as wdir

    workdir = copy_tiny_run  # small() trained
    expected = {r["step"]: r["loss"] for r in _metrics(workdir)}
    shutil.rmtree(os.path.join(workdir, "checkpoints", "6"))
    pretrain.train_and_evaluate(small(**{"model.scan_layers": True}), workdir)
    got = {r["step"]: r["loss"] for r in _metrics(workdir)}
    for step in (4, 6):
        assert got[step] == pytest.approx(expected[step], rel=1e-4), step
    step, _, params = wdir.read_mae(workdir)
    assert step == 6 and sorted(params["blocks"]) == [0, 1]  # read per block
    assert params["blocks"][1]["attn"]["qkv"]["kernel"].shape == (32, 96)


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
    before = sorted(os.listdir(os.path.join(workdir, "checkpoints")))
    with pytest.raises(
        train.TrainingError, match=r"non-finite loss at step 8; .*last good checkpoint is step 6"
    ):
        # the extension continues the finished schedule at its floor, min_lr: make that huge
        pretrain.train_and_evaluate(small(total_steps=9, **{"optim.min_lr": 1e30}), workdir)
    assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == before


def _main_cmd(workdir, *extra):
    steps = ("--config.total_steps=16", "--config.log_every_steps=1")
    return main_command(workdir, *steps, "--config.checkpoint_every_steps=3", *extra)


def _env():
    env = dict(os.environ)
    env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
    env["JAX_PLATFORMS"] = "cpu"
    return env


@pytest.mark.slow
def test_sigkill_and_resume_matches_uninterrupted_run(tmp_path):
    ref = str(tmp_path / "ref")
    subprocess.run(_main_cmd(ref), check=True, env=_env(), cwd=ROOT, capture_output=True)
    expected = {r["step"]: r["loss"] for r in _metrics(ref)}
    work = str(tmp_path / "killed")
    rng = np.random.default_rng(0)
    for attempt in range(2):  # kill twice at random moments after a checkpoint
        proc = subprocess.Popen(
            _main_cmd(work),
            env=_env(),
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
    subprocess.run(_main_cmd(work), check=True, env=_env(), cwd=ROOT, capture_output=True)
    got = {r["step"]: r["loss"] for r in _metrics(work)}
    assert sorted(got) == sorted(expected)
    for step in expected:
        assert got[step] == pytest.approx(expected[step], rel=1e-5), step


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
    one = {r["step"]: r for r in _metrics(per_step)}
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
    check({r["step"]: r for r in _metrics(tiny_run)}, {1: [1], 2: [2], 4: [3, 4], 6: [5, 6]})
    # log_every 5: {1}, {2..5} (across the step-3 checkpoint), {6}
    five = str(tmp_path / "five")
    pretrain.train_and_evaluate(small(log_every_steps=5), five)
    check({r["step"]: r for r in _metrics(five)}, {1: [1], 5: [2, 3, 4, 5], 6: [6]})


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
    tiny_run, tmp_path, monkeypatch, capsys
):
    real = pipeline.create_pretrain_iterator
    monkeypatch.setattr(
        pipeline, "create_pretrain_iterator", lambda *a, **k: _NoticeWhileWaiting(real(*a, **k), 5)
    )
    workdir = str(tmp_path / "run")
    pretrain.train_and_evaluate(small(), workdir)  # checkpoints at 3 and 6; stops after 5
    assert f"preemption notice: saved step 5 in {workdir}/checkpoints" in capsys.readouterr().out
    assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["3", "5"]
    assert [r["step"] for r in _metrics(workdir)] == [1, 2, 4]
    monkeypatch.setattr(pipeline, "create_pretrain_iterator", real)
    pretrain.train_and_evaluate(small(), workdir)  # step 6's window {5, 6} spans the stop
    expected = {r["step"]: r["loss"] for r in _metrics(tiny_run)}
    got = {r["step"]: r["loss"] for r in _metrics(workdir)}
    assert sorted(got) == [1, 2, 4, 6]
    assert got == pytest.approx(expected, rel=1e-6)
