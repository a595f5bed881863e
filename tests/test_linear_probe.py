"""Linear probing: only the head learns, the encoder comes from a checkpoint, resume, errors (the
learning signal: test_learning_signal.py)."""

import json
import os
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest
from config_files import ROOT, load_config, override, write_params_checkpoint
from flax import nnx

from mae_jax import models
from mae_jax import sharding as shd
from mae_jax import workdir as wdir
from mae_jax.tasks import classify as cs
from mae_jax.tasks import linear_probe


def small(**kw):
    """The smoke probe on the 2-block test model, a few steps, evaluated on 100 examples in
    batches of 80 (one eval program for the runs of this file)."""
    c = load_config("configs/linprobe_smoke.py")
    c.model.name = "mae_vit_test"
    c.batch_size = 16
    c.eval_batch_size = 80
    c.data.embedded_eval_per_class = 10
    c.total_steps, c.warmup_steps, c.epochs, c.warmup_epochs = 6, 1, None, None
    c.log_every_steps = 2
    c.checkpoint_every_steps = 3
    return override(c, **kw)


def _flat(tree):
    """nnx.State or nested dict -> {'blocks/0/attn/qkv/kernel': numpy array}."""
    if isinstance(tree, nnx.State):
        tree = nnx.to_pure_dict(tree)
    return {
        "/".join(str(getattr(k, "key", k)) for k in path): np.asarray(v)
        for path, v in jax.tree_util.tree_flatten_with_path(jax.device_get(tree))[0]
    }


def _metrics(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f if line.strip()]


def test_only_the_head_learns_and_batchnorm_statistics_move(tmp_path):
    pre = str(tmp_path / "pre")
    mae = models.create("mae_vit_test", seed=3)
    saved = write_params_checkpoint(pre, mae)
    config = small(**{"init_from.path": pre}, global_pool=False)  # the paper's cls-token probe
    mesh = shd.make_mesh({"data": 2, "fsdp": 4, "tensor": 1})
    task = linear_probe.linear_probe_task(config, mesh, str(tmp_path / "run"))
    state = task.init()
    parts = {"params", "frozen", "batch_stats"}
    assert set(state) == parts | {"opt_state", "step", "nonfinite_step", "window"}
    assert set(nnx.to_pure_dict(state["params"])) == {"head"}
    frozen0, head0 = _flat(state["frozen"]), _flat(state["params"])
    stats0 = _flat(state["batch_stats"])
    # the encoder (and its final norm: cls-token pooling) is the checkpoint's, bit for bit
    want = {
        k: v
        for k, v in _flat(saved).items()
        if k.split("/")[0] in ("patch_embed", "cls_token", "blocks", "norm")
    }
    assert frozen0.keys() == want.keys()
    for k in want:
        np.testing.assert_array_equal(frozen0[k], want[k], err_msg=k)
    kernel = state["frozen"]["blocks"][0]["mlp"]["fc1"]["kernel"].get_value()
    assert kernel.sharding.spec == jax.sharding.PartitionSpec("fsdp", None)
    data = task.make_data(0)
    for _ in range(3):
        batch = next(data)
        arrays = {k: shd.global_batch(batch[k], mesh) for k in task.device_keys}
        state, m = task.fns.step(state, arrays, jax.random.key(0))
        assert np.isfinite(float(m["loss"]))
    frozen1, head1, stats1 = (_flat(state[k]) for k in ("frozen", "params", "batch_stats"))
    for k in frozen0:
        np.testing.assert_array_equal(frozen1[k], frozen0[k], err_msg=k)
    for k in head0:
        assert not np.array_equal(head1[k], head0[k]), k
    for k in stats0:
        assert not np.allclose(stats1[k], stats0[k]), k


def test_probe_run_evaluates_writes_results_and_resumes_like_an_uninterrupted_run(tmp_path):
    workdir = str(tmp_path / "run")
    config = small(eval_every_steps=3)
    last = linear_probe.train_and_evaluate(config, workdir)
    rows = _metrics(workdir)
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 6]
    assert "eval_top1" in rows[2] and "eval_top1" in rows[-1]
    results = wdir.read_results(workdir)
    assert results["num_examples"] == 100 and results["step"] == 6
    assert 0 <= results["top1"] <= results["top5"] <= 100
    assert results["top1"] == pytest.approx(last["eval_top1"])
    expected = {r["step"]: r["loss"] for r in rows if "loss" in r}
    # as if the run had died after its step-3 checkpoint
    shutil.rmtree(os.path.join(workdir, "checkpoints", "6"))
    os.remove(os.path.join(workdir, wdir.RESULTS))
    linear_probe.train_and_evaluate(config, workdir)
    rows = _metrics(workdir)
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 6]  # replaced after step 3, not doubled
    got = {r["step"]: r["loss"] for r in rows if "loss" in r}
    for step in (4, 6):
        assert got[step] == pytest.approx(expected[step], rel=1e-6), step
    assert wdir.read_results(workdir)["top1"] == pytest.approx(results["top1"], abs=1e-6)


def test_bad_pretrained_paths_and_models_are_clear_errors(tmp_path):
    missing = str(tmp_path / "nope")
    with pytest.raises(ValueError, match="config.init_from.path: .*nope does not exist"):
        cs.plan(small(**{"init_from.path": missing}))
    assert not os.path.exists(missing)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="holds no finalized checkpoint"):
        cs.plan(small(**{"init_from.path": str(empty)}))
    pre = str(tmp_path / "pre")
    write_params_checkpoint(pre, models.create("mae_vit_test"))
    with pytest.raises(ValueError, match="init_from.step=7 .*available: \\[0\\]"):
        cs.plan(small(**{"init_from.path": pre, "init_from.step": 7}))
    with pytest.raises(ValueError, match="another encoder.*embed_dim: checkpoint 32 vs config 128"):
        cs.plan(small(**{"init_from.path": pre}, **{"model.name": "mae_vit_tiny_patch4_32"}))
    # an empty model name takes the architecture from the checkpoint
    p = cs.plan(small(**{"init_from.path": pre}, **{"model.name": ""}))
    assert p.model.embed_dim == 32 and p.model.depth == 2 and p.num_classes == 10
    with pytest.raises(ValueError, match="unknown config key.*mixup"):
        c = small()
        c.mixup = 0.8
        cs.plan(c)
    with pytest.raises(ValueError, match="img_size 32 != config.data.image_size 64"):
        cs.plan(small(**{"data.image_size": 64}))


def test_workdir_of_another_run_is_refused(tmp_path):
    workdir = str(tmp_path / "run")
    linear_probe.train_and_evaluate(small(total_steps=1), workdir)
    with pytest.raises(ValueError, match="another run.*num_classes: checkpoint 10 vs config 12"):
        linear_probe.train_and_evaluate(small(total_steps=2, num_classes=12), workdir)


@pytest.mark.slow  # a real process
def test_main_reports_a_bad_pretrained_path(tmp_path):
    env = dict(os.environ, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="2")
    missing = str(tmp_path / "missing")
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "mae_jax.main",
            "--config=configs/linprobe_smoke.py",
            f"--workdir={tmp_path / 'run'}",
            f"--config.init_from.path={missing}",
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 1
    assert f"error: config.init_from.path: {missing} does not exist" in out.stderr
