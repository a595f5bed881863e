"""`mae_jax.load` on every kind of source, checked against what the training code itself
computed: the kNN monitor's top-1 of a pretraining run (at two steps), the final evaluation of a
fine-tuning and a linear-probing run, and the same models through official / timm / Hugging Face
files and weights workdirs."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from config_files import load_config, main_config, override
from flax import nnx

import mae_jax
from mae_jax import visualize
from mae_jax import workdir as wdir
from mae_jax.convert import cli as convert_cli
from mae_jax.data import pipeline
from mae_jax.evaluate import knn
from mae_jax.tasks import finetune, linear_probe, pretrain

pytestmark = pytest.mark.slow  # trains three tiny runs (one module fixture)

KNN = dict(knn_every_steps=2, knn_bank_size=64, knn_num_queries=40, knn_batch_size=16, knn_k=5)


def _data(c):
    c.data.embedded_eval_per_class = 10  # 100 eval examples
    return c


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Workdirs of a 4-step pretraining (kNN monitor at steps 2 and 4), a fine-tuning and a
    cls-token linear probe started from it, and their config files' data blocks."""
    root = tmp_path_factory.mktemp("load")
    pre = _data(
        main_config(
            total_steps=4, warmup_steps=1, checkpoint_every_steps=2, log_every_steps=2, **KNN
        )
    )
    pretrain.train_and_evaluate(pre, str(root / "pre"))
    out = {"pre": str(root / "pre"), "pre_config": pre}
    for task, module in (("finetune", finetune), ("linear_probe", linear_probe)):
        name = "finetune_smoke" if task == "finetune" else "linprobe_smoke"
        c = _data(load_config(f"configs/{name}.py"))
        override(
            c,
            **{"model.name": "mae_vit_test", "init_from.path": out["pre"]},
            batch_size=16,
            eval_batch_size=200,  # test_finetune's (its eval program, from the cache)
            total_steps=4,
            warmup_steps=0,
            epochs=None,
            warmup_epochs=None,
        )
        if task == "linear_probe":
            c.global_pool = False  # the paper's probe: cls token, exportable to Hugging Face
        module.train_and_evaluate(c, str(root / task))
        out[task], out[task + "_config"] = str(root / task), c
    return out


_forward = nnx.jit(lambda model, x: model(x))  # traced once per model structure and shape
_encoder_features = nnx.jit(knn.encoder_features, static_argnames="global_pool")


def _logits(model, images):
    return _forward(model, jnp.asarray(images))


def _evaluate(model, data_config, batch_size=100):
    """Top-1 (percent) and mean cross-entropy of `model` on the eval split, as eval_results."""
    hits, nll, n = 0.0, 0.0, 0
    data = pipeline.create_eval_iterator(data_config, global_batch_size=batch_size)
    for batch in data:
        mask = np.asarray(batch["mask"], bool)
        logits = np.asarray(_logits(model, batch["image"]))[mask]
        labels = np.asarray(batch["label"])[mask]
        logp = np.asarray(jax.nn.log_softmax(logits, axis=-1))
        hits += float(np.sum(np.argmax(logits, 1) == labels))
        nll -= float(np.sum(logp[np.arange(len(labels)), labels]))
        n += len(labels)
    data.close()
    return 100.0 * hits / n, nll / n


def _features(model, data_config, split, limit, global_pool):
    data = pipeline.create_eval_iterator(data_config, global_batch_size=16, split=split)
    feats, labels = [], []
    for batch in data:
        f = _encoder_features(model, jnp.asarray(batch["image"]), global_pool=global_pool)
        feats.append(np.asarray(f)[batch["mask"]])
        labels.append(np.asarray(batch["label"])[batch["mask"]])
        if sum(len(x) for x in labels) >= limit:
            break
    data.close()
    return np.concatenate(feats)[:limit], np.concatenate(labels)[:limit]


def _knn_top1(model, c):
    bank = _features(model, c.data, c.data.train_split, c.knn_bank_size, c.knn_global_pool)
    queries = _features(model, c.data, c.data.eval_split, c.knn_num_queries, c.knn_global_pool)
    acc = knn.knn_accuracy(*bank, *queries, num_classes=10, k=c.knn_k)
    return 100.0 * acc["top1"]


def _logged(workdir, key):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    return {r["step"]: r[key] for r in rows if key in r}


def _export(workdir, fmt, output):
    args = ["export", "--workdir", workdir, "--format", fmt, "--output", output]
    assert convert_cli.main(args) == 0


def _noise(model):
    return jax.random.uniform(jax.random.key(3), (4, model.config.num_patches))


def _images(model):
    s = model.config.img_size
    return jax.random.normal(jax.random.key(1), (4, s, s, 3))


def test_pretraining_workdir_at_any_step_gives_the_knn_monitor_s_numbers(runs):
    logged = _logged(runs["pre"], "knn_top1")
    assert sorted(logged) == [2, 4]
    models = {}
    for step in (None, 2):
        loaded = mae_jax.load(runs["pre"], step=step)
        assert (loaded.kind, loaded.task, loaded.preset) == ("mae", "pretrain", "mae_vit_test")
        assert loaded.step == (step or 4) and loaded.head is None
        top1 = _knn_top1(loaded.model, runs["pre_config"])
        assert top1 == pytest.approx(logged[loaded.step], abs=1e-6)
        models[step] = loaded.model
    older, newer = models[2], models[None]
    assert not np.array_equal(older.cls_token.get_value(), newer.cls_token.get_value())
    assert newer.encode(_images(newer)).shape == (4, 1 + 16, 32)


@pytest.mark.parametrize("task", ["finetune", "linear_probe"])
def test_classifier_workdir_gives_the_run_s_own_evaluation(runs, task):
    loaded = mae_jax.load(runs[task])
    assert (loaded.kind, loaded.task, loaded.step, loaded.num_classes) == (
        "classifier",
        task,
        4,
        10,
    )
    assert loaded.head.linear_probe == (task == "linear_probe")
    results = wdir.read_results(runs[task])
    top1, loss = _evaluate(loaded.model, runs[task + "_config"].data)
    assert top1 == pytest.approx(results["top1"], abs=1e-6)
    assert loss == pytest.approx(results["loss"], rel=1e-4)
    assert "classifier with 10 classes" in loaded.describe()


def test_mae_files_give_the_workdir_s_model(runs, tmp_path):
    ref = mae_jax.load(runs["pre"]).model
    images = _images(ref)
    expected = ref(images, noise=_noise(ref)).loss
    for fmt, name in (("official", "mae.pth"), ("hf", "mae-hf")):
        path = str(tmp_path / name)
        _export(runs["pre"], fmt, path)
        # the files do not say the loss: the smoke recipe's norm_pix_loss is an override
        loaded = mae_jax.load(path, model="mae_vit_test", norm_pix_loss=True)
        assert (loaded.kind, loaded.task, loaded.step) == ("mae", "file", None)
        np.testing.assert_allclose(
            loaded.model(images, noise=_noise(ref)).loss, expected, rtol=1e-5
        )
    path = str(tmp_path / "encoder.safetensors")
    _export(runs["pre"], "timm", path)
    with pytest.warns(UserWarning, match="decoder .* freshly initialized"):
        loaded = mae_jax.load(path, model="mae_vit_test")
    np.testing.assert_allclose(loaded.model.encode(images), ref.encode(images), atol=1e-5)
    # an imported weights workdir
    weights = str(tmp_path / "weights")
    args = ["import", "--input", str(tmp_path / "mae.pth"), "--model", "mae_vit_test"]
    assert convert_cli.main([*args, "--set", "norm_pix_loss=true", "--workdir", weights]) == 0
    loaded = mae_jax.load(weights)
    assert (loaded.kind, loaded.task, loaded.step) == ("mae", "weights", 0)
    np.testing.assert_allclose(loaded.model(images, noise=_noise(ref)).loss, expected, rtol=1e-5)


@pytest.mark.parametrize(
    "task, formats", [("finetune", ("official", "timm")), ("linear_probe", ("official", "hf"))]
)
def test_classifier_files_and_weights_workdirs_give_the_workdir_s_logits(runs, task, formats):
    ref = mae_jax.load(runs[task]).model
    images = _images(ref)
    expected = _logits(ref, images)
    root = wdir.normalize(runs[task]) + "_files"
    os.makedirs(root, exist_ok=True)
    for fmt in formats:
        path = os.path.join(root, {"official": "c.pth", "timm": "c.safetensors", "hf": "c-hf"}[fmt])
        _export(runs[task], fmt, path)
        loaded = mae_jax.load(path, model="mae_vit_test")
        assert (loaded.kind, loaded.num_classes) == ("classifier", 10)
        np.testing.assert_allclose(_logits(loaded.model, images), expected, rtol=1e-4, atol=1e-5)
        if fmt == "official":
            weights = os.path.join(root, "weights")
            args = ["import", "--input", path, "--model", "mae_vit_test", "--workdir", weights]
            assert convert_cli.main(args) == 0
            w = mae_jax.load(weights)
            assert (w.kind, w.task, w.head) == ("classifier", "weights", loaded.head)
            np.testing.assert_allclose(_logits(w.model, images), expected, rtol=1e-4, atol=1e-5)


def test_what_cannot_be_loaded_is_one_sentence(runs, tmp_path):
    path = str(tmp_path / "mae.pth")
    _export(runs["pre"], "official", path)
    with pytest.raises(ValueError, match="does not say its architecture: pass model="):
        mae_jax.load(path)
    with pytest.raises(ValueError, match="model='mae_vit_base_patch16' does not match"):
        mae_jax.load(runs["pre"], model="mae_vit_base_patch16")
    with pytest.raises(ValueError, match=r"load.step=3 is not a checkpoint .* available: \[2, 4\]"):
        mae_jax.load(runs["pre"], step=3)
    with pytest.raises(ValueError, match="load.path"):
        mae_jax.load(str(tmp_path / "nothing"))
    with pytest.raises(ValueError, match="a classifier has no decoder to reconstruct with"):
        visualize.restore_mae(runs["finetune"])
