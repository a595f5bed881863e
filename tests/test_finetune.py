"""Fine-tuning: a sharded step on 8 simulated devices, gradients reach every parameter, pretrained
weights are taken over, the input pipeline's augmentation hook, the RandAugment spec, a short
run with evaluation."""

import json
import os

import jax
import numpy as np
import pytest
from config_files import load_config, override, write_params_checkpoint
from flax import nnx

from mae_jax import models, schema
from mae_jax import sharding as shd
from mae_jax import workdir as wdir
from mae_jax.data import pipeline
from mae_jax.data.mixup import smooth_one_hot
from mae_jax.tasks import classify as cs
from mae_jax.tasks import finetune


def small(**kw):
    """The smoke fine-tuning recipe (everything on) on the 2-block test model."""
    c = load_config("configs/finetune_smoke.py")
    c.model.name = "mae_vit_test"
    c.batch_size = 16
    c.eval_batch_size = 200
    c.total_steps, c.warmup_steps, c.epochs, c.warmup_epochs = 4, 0, None, None
    c.log_every_steps = 2
    c.checkpoint_every_steps = 2
    return override(c, **kw)


def _flat(tree):
    """nnx.State or nested dict -> {'blocks/0/attn/qkv/kernel': numpy array}."""
    if isinstance(tree, nnx.State):
        tree = nnx.to_pure_dict(tree)
    return {
        "/".join(str(getattr(k, "key", k)) for k in path): np.asarray(v)
        for path, v in jax.tree_util.tree_flatten_with_path(jax.device_get(tree))[0]
    }


def test_plan_takes_the_recipe_numbers(tmp_path):
    c = load_config("configs/finetune_vit_large.py")
    c.data.source, c.data.name, c.data.image_size = "embedded", None, 224
    p = cs.plan(c)
    assert p.model.depth == 24 and p.run.optim.num_layers == 24
    assert p.run.optim.layer_decay == 0.75 and p.run.optim.base_lr == 1e-3
    assert p.run.steps_per_epoch == 2400 // 1024 and p.run.total_steps == 50 * 2
    assert c.drop_path_rate == 0.2 and c.optim.no_decay_names == ("pos_embed", "cls_token")
    with pytest.raises(ValueError, match="config.mixup must be a number >= 0, got -1.0"):
        finetune.finetune_task(small(mixup=-1.0), shd.make_mesh(small().mesh), str(tmp_path))
    with pytest.raises(ValueError, match="config.task must be 'finetune'"):
        finetune.finetune_task(
            small(task="linear_probe"), shd.make_mesh(small().mesh), str(tmp_path)
        )


def test_rand_augment_spec():
    assert finetune.parse_rand_augment("rand-m9-mstd0.5-inc1") == {
        "num_ops": 2,
        "magnitude": 9.0,
        "magnitude_std": 0.5,
        "prob": 0.5,
    }
    assert finetune.parse_rand_augment("rand-n3-m7-p0.8-inc1")["num_ops"] == 3
    assert finetune.parse_rand_augment("") is None
    for bad, match in [
        ("rand-m9", "increasing op set"),
        ("auto-m9-inc1", "start with 'rand-'"),
        ("rand-m9-w0-inc1", "unsupported field 'w'"),
        ("rand-mx-inc1", "parse"),
        ("rand-m12-inc1", "0 <= m <= 10"),
    ]:
        with pytest.raises(ValueError, match=match):
            finetune.parse_rand_augment(bad)
    with pytest.raises(ValueError, match=r"config.reprob must be a number in \[0, 1\], got 1.5"):
        schema.check(small(reprob=1.5), "finetune")
    assert finetune.make_augment_fn("", 0.0) is None


def test_input_pipeline_augment_hook():
    cfg = schema.defaults(schema.DATA)
    cfg.source, cfg.name, cfg.image_size = "embedded", None, 32

    def batches(augment_fn, start=0, n=2):
        it = pipeline.create_train_iterator(cfg, 8, seed=3, start_step=start, augment_fn=augment_fn)
        return [next(it) for _ in range(n)]

    from mae_jax.data import augment

    plain = batches(None)
    same = batches(lambda image, seed: augment.normalize(image))
    for a, b in zip(plain, same):  # the hook does not change the crop / flip randomness
        np.testing.assert_array_equal(a["image"], b["image"])
        np.testing.assert_array_equal(a["label"], b["label"])
    fn = finetune.make_augment_fn("rand-m9-mstd0.5-inc1", 1.0)
    aug = batches(fn)
    resumed = batches(fn, start=1, n=1)  # deterministic: batch 1 is the same when resumed
    np.testing.assert_array_equal(resumed[0]["image"], aug[1]["image"])
    assert aug[0]["image"].shape == (8, 32, 32, 3) and aug[0]["image"].dtype == np.float32
    assert not np.array_equal(aug[0]["image"], plain[0]["image"])
    with pytest.raises(ValueError, match="augment_fn must be callable"):
        pipeline.create_train_iterator(cfg, 8, augment_fn="rand-m9")


def _rows(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f if line.strip()]


def test_short_finetune_run_logs_evaluation_and_writes_results(tmp_path):
    workdir = str(tmp_path / "run")
    # 100 eval examples at eval batch 80 (the eval program of test_evaluate and test_load)
    config = small(eval_every_steps=2, checkpoint_every_steps=4, eval_batch_size=80)
    config.data.embedded_eval_per_class = 10
    last = finetune.train_and_evaluate(config, workdir)
    rows = _rows(workdir)
    assert [r["step"] for r in rows] == [1, 2, 4]
    assert "eval_top1" in rows[1] and "eval_top5" in rows[2]
    for r in rows:
        assert np.isfinite(r["loss"]) and np.isfinite(r["grad_norm"])
    results = wdir.read_results(workdir)
    assert results["task"] == "finetune" and results["num_examples"] == 100
    assert results["top5"] == pytest.approx(last["eval_top5"])
    assert results["init_from"] == ""


@pytest.mark.slow  # two meshes compiled: ~40 s
# (after the short run: its step is this test's data-parallel one, loaded from the cache)
def test_finetune_step_on_a_2x4_mesh_reaches_every_parameter_and_matches_data_parallel(tmp_path):
    pre = str(tmp_path / "pre")
    saved = _flat(write_params_checkpoint(pre, models.create("mae_vit_test", seed=5)))
    config = small(**{"init_from.path": pre}, **{"mesh.data": 2, "mesh.fsdp": 4})
    mesh = shd.make_mesh(config.mesh)
    task = finetune.finetune_task(config, mesh, str(tmp_path / "run"))
    state = task.init()
    assert set(state) == {"params", "opt_state", "step", "nonfinite_step", "window"}
    params0 = _flat(state["params"])
    # the encoder is the checkpoint's; global pooling: a new fc_norm, the MAE's norm unused
    assert {k.split("/")[0] for k in params0} == {
        "patch_embed",
        "cls_token",
        "blocks",
        "fc_norm",
        "head",
    }
    for k, v in params0.items():
        if k.split("/")[0] in ("patch_embed", "cls_token", "blocks"):
            np.testing.assert_array_equal(v, saved[k], err_msg=k)
    kernel = state["params"]["blocks"][1]["attn"]["qkv"]["kernel"].get_value()
    assert kernel.sharding.spec == jax.sharding.PartitionSpec("fsdp", None)

    batch = next(task.make_data(0))
    arrays = {k: shd.global_batch(batch[k], mesh) for k in task.device_keys}
    # gradients of the training loss (drop path on, mixed soft targets) reach every parameter
    graphdef, rest = task.fns.graphdef, task.fns.rest
    targets = smooth_one_hot(arrays["label"], 10, 0.1)
    grads_fn = jax.jit(
        lambda s, x, t: cs.loss_and_grads(
            s, x, t, jax.random.key(1), graphdef=graphdef, rest=rest, drop_path=True
        )[1]
    )
    grads = _flat(grads_fn(state, arrays["image"], targets))
    assert grads.keys() == params0.keys()
    for k, g in grads.items():
        assert np.all(np.isfinite(g)) and np.any(g != 0), k

    state, m = task.fns.step(state, arrays, jax.random.key(0))
    assert np.isfinite(float(m["loss"])) and float(m["grad_norm"]) > 0
    assert int(state["step"]) == 1
    params1 = _flat(state["params"])
    assert all(not np.array_equal(params1[k], params0[k]) for k in params0)
    # mixup / cutmix / drop path are a function of (key, step) only: a resumed run redraws them
    again, m_again = task.fns.step(task.init(), arrays, jax.random.key(0))
    assert float(m_again["loss"]) == float(m["loss"])
    for k, v in _flat(again["params"]).items():
        np.testing.assert_array_equal(v, params1[k], err_msg=k)

    # the same step on a pure data-parallel mesh gives the same loss and gradient norm
    dp_config = small(**{"init_from.path": pre}, **{"mesh.data": 8, "mesh.fsdp": 1})
    dp_mesh = shd.make_mesh(dp_config.mesh)
    dp_task = finetune.finetune_task(dp_config, dp_mesh, str(tmp_path / "run_dp"))
    dp_arrays = {k: shd.global_batch(batch[k], dp_mesh) for k in dp_task.device_keys}
    _, dp_m = dp_task.fns.step(dp_task.init(), dp_arrays, jax.random.key(0))
    np.testing.assert_allclose(
        [float(dp_m["loss"]), float(dp_m["grad_norm"])],
        [float(m["loss"]), float(m["grad_norm"])],
        rtol=1e-4,
    )
