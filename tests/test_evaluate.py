"""task=evaluate: a classifier workdir (fine-tuning and linear-probing layouts, written through the
real task and workdir API) and the same classifier exported to / imported from the official
`.pth` give the numbers of the training runs' eval loop; bad inputs are refused."""

import json
import os

import jax
import numpy as np
import pytest
from config_files import load_config, override

from mae_jax import sharding as shd
from mae_jax import workdir as wdir
from mae_jax.optim import path_names
from mae_jax.tasks import classify as cs
from mae_jax.tasks import evaluate, finetune, linear_probe

TASKS = {"finetune": finetune, "linear_probe": linear_probe}
STEP = 3


def small(task):
    """The smoke recipe of `task` on the 2-block test model (cls token for the probe)."""
    c = load_config(
        "configs/finetune_smoke.py" if task == "finetune" else "configs/linprobe_smoke.py"
    )
    c.model.name = "mae_vit_test"
    c.batch_size = 16
    c.eval_batch_size = 80
    c.data.embedded_eval_per_class = 10  # 100 eval examples: a short eval loop
    c.total_steps, c.warmup_steps, c.epochs, c.warmup_epochs = 4, 0, None, None
    if task == "linear_probe":
        c.global_pool = False
    return c


def randomize(tree, seed):
    """Every array of a state entry random (BatchNorm variances positive)."""
    rng = np.random.default_rng(seed)

    def draw(path, x):
        value = 0.3 * rng.standard_normal(x.shape)
        if path_names(path)[-1] == "var":
            value = np.abs(value) + 0.5
        return np.asarray(value, x.dtype)

    return jax.tree_util.tree_map_with_path(draw, tree)


@pytest.fixture(scope="module", params=list(TASKS))
def run_dir(request, tmp_path_factory):
    """A classifier workdir as the task writes it (a random state saved at step 3 with the
    task's meta), and the task's own eval loop's results on that state."""
    task_name = request.param
    config = small(task_name)
    mesh = shd.make_mesh(config.mesh)
    root = str(tmp_path_factory.mktemp(task_name))
    maker = getattr(TASKS[task_name], f"{task_name}_task")
    task = maker(config, mesh, root)
    state = task.init()
    for i, key in enumerate(("params", "frozen", "batch_stats")):
        if key in state:
            state[key] = randomize(state[key], seed=i)
    reference = cs.evaluate(task.fns, state, config.data, config.eval_batch_size, mesh)
    with wdir.Writer(root, keep=None, async_save=False, handle_sigterm=False) as writer:
        writer.save(STEP, wdir.to_checkpoint(state), {**task.meta(), "step": STEP})
        writer.wait()
    return task_name, root, reference


def eval_config(path, **kw):
    c = load_config("configs/evaluate.py:smoke")
    c.checkpoint.path = path
    c.eval_batch_size = 80
    c.data.embedded_eval_per_class = 10
    return override(c, **kw)


def assert_same_numbers(got, want):
    assert got["num_examples"] == want["num_examples"] == 100
    assert got["top1"] == want["top1"] and got["top5"] == want["top5"]
    assert got["loss"] == pytest.approx(want["loss"], rel=1e-6)


def test_evaluate_a_workdir_gives_the_eval_loop_numbers(run_dir, tmp_path, capsys):
    task_name, root, reference = run_dir
    assert 0 < reference["top5"] < 100  # a random classifier, not a degenerate one
    out = str(tmp_path / "eval")
    results = evaluate.run(eval_config(root), out)
    assert_same_numbers(results, reference)
    assert results["step"] == STEP and results["linear_probe"] == (task_name == "linear_probe")
    saved = wdir.read_results(out)
    assert saved["top1"] == reference["top1"] and saved["checkpoint"].startswith(root)
    with open(os.path.join(out, "metrics.jsonl")) as f:
        (row,) = [json.loads(line) for line in f if line.strip()]
    assert row["step"] == STEP and row["eval_top1"] == reference["top1"]
    assert row["eval_examples"] == 100
    assert f"top-1 {reference['top1']:.2f}%" in capsys.readouterr().out


def test_evaluate_the_official_pth_and_its_import(run_dir, tmp_path, capsys):
    """Workdir -> official .pth (CLI export) -> evaluated directly, and imported (CLI import)
    -> evaluated: the same numbers; the imported weights equal the workdir's exactly."""
    torch = pytest.importorskip("torch")
    from mae_jax.convert import cli

    task_name, root, reference = run_dir
    pth = str(tmp_path / "classifier.pth")
    assert cli.main(["export", "--workdir", root, "--format", "official", "--output", pth]) == 0
    keys = set(torch.load(pth, map_location="cpu", weights_only=True)["model"])
    assert ("head.1.weight" in keys) == (task_name == "linear_probe")
    results = evaluate.run(eval_config(pth, **{"model.name": "mae_vit_test"}), str(tmp_path / "e1"))
    assert_same_numbers(results, reference)

    imported = str(tmp_path / "imported")
    args = ["import", "--input", pth, "--model", "mae_vit_test", "--workdir", imported]
    assert cli.main(args) == 0
    assert "configs/evaluate.py" in capsys.readouterr().out
    a, b = wdir.read_classifier(root), wdir.read_classifier(imported)
    assert a.head == b.head and b.pos_embed is None  # sin-cos: not stored
    fa = jax.tree_util.tree_flatten_with_path(a.tree)[0]
    fb = {path_names(p): v for p, v in jax.tree_util.tree_flatten_with_path(b.tree)[0]}
    assert len(fa) == len(fb)
    for p, v in fa:
        np.testing.assert_array_equal(v, fb[path_names(p)], err_msg=str(path_names(p)))
    results = evaluate.run(eval_config(imported), str(tmp_path / "e2"))
    assert_same_numbers(results, reference)


def test_evaluate_refuses_bad_sources_and_workdirs(run_dir, tmp_path):
    _, root, _ = run_dir
    with pytest.raises(ValueError, match="holds checkpoints"):
        evaluate.run(eval_config(root), root)  # would replace the run's eval_results.json
    with pytest.raises(ValueError, match="config.checkpoint.path is empty"):
        evaluate.run(eval_config(""), str(tmp_path / "e"))
    with pytest.raises(ValueError, match="config.checkpoint.step=9 is not a checkpoint"):
        evaluate.run(eval_config(root, **{"checkpoint.step": 9}), str(tmp_path / "e"))
    with pytest.raises(ValueError, match="img_size 32 != config.data.image_size 48"):
        evaluate.run(eval_config(root, **{"data.image_size": 48}), str(tmp_path / "e"))
    pth = tmp_path / "x.pth"
    pth.write_bytes(b"")
    with pytest.raises(ValueError, match="set config.model.name"):
        evaluate.run(eval_config(str(pth)), str(tmp_path / "e"))
    mae = str(tmp_path / "mae")
    from test_convert import _save_run, randomized

    _save_run(mae, [(1, randomized("mae_vit_test"))])
    with pytest.raises(ValueError, match="not a classifier's"):
        evaluate.run(eval_config(mae), str(tmp_path / "e"))
    assert not os.path.exists(tmp_path / "e")  # nothing written by a refused evaluation


def test_workdirs_older_than_the_head_meta_take_the_pooling_from_config_json(tmp_path):
    """Runs written before checkpoints recorded `global_pool` (their config.json has it)."""
    import dataclasses

    from test_convert import randomized_classifier

    from mae_jax.convert import classifier as cc

    model = randomized_classifier("mae_vit_test", 4, seed=3, global_pool=False)
    root = str(tmp_path / "old")
    meta = {"model": dataclasses.asdict(model.config), "task": "finetune", "num_classes": 4}
    with wdir.Writer(root, keep=None, async_save=False, handle_sigterm=False) as writer:
        params = jax.tree.map(np.asarray, cc.classifier_tree(model))
        writer.save(5, {"params": params}, meta)
        writer.wait()
    with pytest.raises(ValueError, match="says nothing of the classifier's global_pool"):
        wdir.read_classifier(root)
    wdir.write_json(os.path.join(root, wdir.CONFIG), {"task": "finetune", "global_pool": False})
    found = wdir.read_classifier(root)
    assert found.step == 5 and not found.head.global_pool and not found.head.linear_probe
    np.testing.assert_array_equal(found.tree["head"]["kernel"], params["head"]["kernel"])
