"""The kNN monitor of pretraining (`config.knn_every_steps`): logged by a real run, equal to
`knn_accuracy` on independently computed features, padding excluded, bad keys refused."""

import os

import jax
import numpy as np
import pytest
from config_files import load_config, override
from flax import nnx

from mae_jax import metrics
from mae_jax import sharding as shd
from mae_jax.data import pipeline
from mae_jax.evaluate import knn
from mae_jax.tasks import pretrain


def small(**kw):
    c = load_config()
    c.model.name = "mae_vit_test"
    c.batch_size = 16
    c.total_steps = 4
    c.warmup_steps = 0
    c.log_every_steps = 2
    c.checkpoint_every_steps = 4
    c.reconstruction_every_steps = 0
    c.mesh.data, c.mesh.fsdp = 2, 4  # parameters sharded
    c.knn_every_steps = 2
    # 40 of the 2400 train examples (the last batch of 16 is cut at 40), and an eval split
    # of 50 (4 batches of 16: 14 padded rows)
    c.knn_bank_size = 40
    c.knn_num_queries = 1000
    c.data.embedded_eval_per_class = 5
    return override(c, **kw)


def _first(config, split, limit):
    """images [N, S, S, 3], labels [N] of the first `limit` real examples of `split`, read by
    one process."""
    it = pipeline.create_eval_iterator(config.data, global_batch_size=40, split=split)
    images, labels = [], []
    for batch in it:
        images.append(batch["image"][batch["mask"]])
        labels.append(batch["label"][batch["mask"]])
        if sum(map(len, labels)) >= limit:
            break
    it.close()
    return np.concatenate(images)[:limit], np.concatenate(labels)[:limit]


@pytest.mark.slow  # a real run with two kNN passes
def test_a_run_logs_knn_top1_equal_to_knn_accuracy_on_the_same_features(tmp_path, capsys):
    config = small()
    workdir = str(tmp_path / "run")
    pretrain.train_and_evaluate(config, workdir)
    rows = metrics.read_jsonl(workdir)
    logged = {r["step"]: r["knn_top1"] for r in rows if "knn_top1" in r}
    assert sorted(logged) == [2, 4]
    for value in logged.values():
        assert 0.0 <= value <= 100.0
    assert all(r["knn_seconds"] > 0 for r in rows if "knn_top1" in r)
    out = capsys.readouterr().out
    assert "kNN monitor at step 4: top-1" in out
    assert "(chance 10.0%), k=20, bank 40, queries 50," in out

    # The final parameters (read back through init_from) in the model, unsharded.
    c = small(**{"init_from.path": workdir})
    mesh = shd.make_mesh(c.mesh)
    task = pretrain.task(c, mesh)
    state = task.init()
    model = nnx.merge(task.fns.graphdef, state["params"], task.fns.rest)
    features = nnx.jit(knn.encoder_features, static_argnames="global_pool")
    pool = c.knn_global_pool

    # The eval program gives the features of the whole global batch, replicated on every
    # device, with its labels and mask in order.
    images = np.asarray(jax.random.normal(jax.random.key(0), (16, 32, 32, 3)))
    labels = np.arange(16, dtype=np.int32)
    batch = {"image": images, "label": labels, "mask": labels % 3 != 0}
    out = task.fns.evaluate(state, shd.global_batch(batch, mesh))
    assert out["features"].sharding.is_fully_replicated
    np.testing.assert_array_equal(np.asarray(out["label"]), labels)
    np.testing.assert_array_equal(np.asarray(out["mask"]), batch["mask"])

    # kNN on the unsharded model's features of the same examples gives the logged number (one
    # forward for these, the bank and the queries: one program)
    bank_images, bank_labels = _first(c, "train", 40)
    query_images, query_labels = _first(c, "validation", 1000)
    assert len(bank_images) == 40 and len(query_images) == 50
    all_images = np.concatenate([images, bank_images, query_images])
    everything = np.asarray(features(model, all_images, global_pool=pool))
    np.testing.assert_allclose(np.asarray(out["features"]), everything[:16], rtol=1e-5, atol=1e-6)
    both = everything[16:]
    acc = knn.knn_accuracy(
        both[:40],
        bank_labels,
        both[40:],
        query_labels,
        num_classes=10,
        k=20,
        temperature=0.07,
    )
    assert logged[4] == pytest.approx(100.0 * acc["top1"], abs=1e-9)


@pytest.mark.parametrize(
    "overrides,match",
    [
        (
            {"knn_every_steps": -1},
            r"config.knn_every_steps must be an integer >= 0 or None, got -1",
        ),
        ({"knn_bank_size": 0}, r"config.knn_bank_size must be a positive integer, got 0"),
        ({"knn_num_queries": -3}, r"config.knn_num_queries must be a positive integer, got -3"),
        ({"knn_k": 0}, r"config.knn_k must be a positive integer, got 0"),
        ({"knn_k": 41}, r"config.knn_k=41 is larger than the bank \(40 examples"),
        ({"knn_bank_size": 5000, "knn_k": 2401}, r"bank \(2400 examples"),
        ({"knn_temperature": 0.0}, r"config.knn_temperature must be a number > 0, got 0.0"),
        ({"knn_batch_size": 12}, r"config.knn_batch_size=12 is not divisible by the data-par"),
    ],
)
def test_bad_knn_keys_fail_before_anything_is_written(tmp_path, overrides, match):
    workdir = tmp_path / "bad"
    with pytest.raises(ValueError, match=match):
        pretrain.train_and_evaluate(small(**overrides), str(workdir))
    assert not os.path.exists(workdir)
