"""kNN classifier (DINO-style weighted votes, cosine similarity, chunked) and top-k metrics."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from mae_jax import models
from mae_jax.evaluate import knn, metrics


def brute_force(train, train_labels, test, test_labels, num_classes, k, temperature, weighting):
    """Reference in plain numpy (float64): full similarity matrix, stable sorts."""
    train = train / np.linalg.norm(train, axis=1, keepdims=True)
    test = test / np.linalg.norm(test, axis=1, keepdims=True)
    sims = test @ train.T
    idx = np.argsort(-sims, axis=1, kind="stable")[:, :k]
    top = np.take_along_axis(sims, idx, axis=1)
    weights = np.exp(top / temperature) if weighting == "temperature" else np.ones_like(top)
    scores = np.zeros((len(test), num_classes))
    for q in range(len(test)):
        for j in range(k):
            scores[q, train_labels[idx[q, j]]] += weights[q, j]
    order = np.argsort(-scores, axis=1, kind="stable")
    top5 = min(5, k, num_classes)
    hit1 = order[:, 0] == test_labels
    hit5 = np.array(
        [
            test_labels[q] in order[q, :top5] and scores[q, test_labels[q]] > 0
            for q in range(len(test))
        ]
    )
    return scores, idx, hit1.mean(), hit5.mean()


def test_separable_clusters_are_classified_perfectly():
    rng = np.random.default_rng(0)
    centers = rng.normal(size=(6, 16))
    train_labels, test_labels = np.repeat(np.arange(6), 30), np.repeat(np.arange(6), 10)
    train = (centers[train_labels] + 0.1 * rng.normal(size=(180, 16))).astype(np.float32)
    test = (centers[test_labels] + 0.1 * rng.normal(size=(60, 16))).astype(np.float32)
    for weighting in knn.WEIGHTINGS:
        acc = knn.knn_accuracy(
            train,
            train_labels,
            test,
            test_labels,
            k=20,
            weighting=weighting,
            query_chunk=16,
            bank_chunk=64,
        )
        assert acc == {"top1": 1.0, "top5": 1.0}


def test_random_labels_give_chance_accuracy():
    rng = np.random.default_rng(1)
    train = rng.normal(size=(2000, 32)).astype(np.float32)
    test = rng.normal(size=(600, 32)).astype(np.float32)
    train_labels = rng.integers(0, 10, 2000)
    test_labels = rng.integers(0, 10, 600)
    acc = knn.knn_accuracy(train, train_labels, test, test_labels, num_classes=10)
    assert 0.05 < acc["top1"] < 0.16
    assert 0.38 < acc["top5"] < 0.62


@pytest.mark.parametrize("weighting", knn.WEIGHTINGS)
def test_matches_brute_force_with_chunking(weighting):
    rng = np.random.default_rng(2)
    train = rng.normal(size=(101, 12)).astype(np.float32)
    test = rng.normal(size=(37, 12)).astype(np.float32)
    train_labels = rng.integers(0, 7, 101)
    test_labels = rng.integers(0, 7, 37)
    k, temperature = 9, 0.07
    scores_ref, idx_ref, top1, top5 = brute_force(
        train, train_labels, test, test_labels, 7, k, temperature, weighting
    )
    # chunk sizes that do not divide the sizes: padding of both queries and bank
    sims, ids = knn.nearest_neighbors(test, train, k, query_chunk=8, bank_chunk=13)
    np.testing.assert_array_equal(ids, idx_ref)
    scores = knn.knn_classify(
        train,
        train_labels,
        test,
        num_classes=7,
        k=k,
        temperature=temperature,
        weighting=weighting,
        query_chunk=8,
        bank_chunk=13,
    )
    np.testing.assert_allclose(scores, scores_ref, rtol=2e-4)
    acc = knn.knn_accuracy(
        train,
        train_labels,
        test,
        test_labels,
        num_classes=7,
        k=k,
        temperature=temperature,
        weighting=weighting,
        query_chunk=8,
        bank_chunk=13,
    )
    assert acc["top1"] == pytest.approx(top1) and acc["top5"] == pytest.approx(top5)
    # one chunk gives the same
    assert (
        knn.knn_accuracy(
            train, train_labels, test, test_labels, num_classes=7, k=k, weighting=weighting
        )
        == acc
    )


def test_temperature_weighting_differs_from_majority():
    # 3 neighbours of class 0 far away vs 2 of class 1 very close: majority says 0,
    # exp(sim / 0.07) weighting says 1.
    sims = jnp.array([[0.99, 0.98, 0.2, 0.2, 0.2]])
    labels = jnp.array([[1, 1, 0, 0, 0]])
    assert int(jnp.argmax(knn.vote(sims, labels, 2, weighting="majority"))) == 0
    assert int(jnp.argmax(knn.vote(sims, labels, 2))) == 1


def test_knn_bad_input():
    x = np.ones((5, 4), np.float32)
    with pytest.raises(ValueError, match="k must be"):
        knn.nearest_neighbors(x, x, k=6)
    with pytest.raises(ValueError, match="same D"):
        knn.nearest_neighbors(x, np.ones((5, 3)), k=2)
    with pytest.raises(ValueError, match="weighting"):
        knn.knn_accuracy(x, np.zeros(5, int), x, np.zeros(5, int), k=2, weighting="vote")
    with pytest.raises(ValueError, match="test_labels"):
        knn.knn_accuracy(x, np.zeros(5, int), x, np.zeros(4, int), k=2)
    with pytest.raises(ValueError, match=r"\[0, 3\)"):
        knn.knn_accuracy(x, np.array([0, 1, 2, 3, 0]), x, np.zeros(5, int), num_classes=3, k=2)


def test_encoder_features_from_mae():
    m = models.create("mae_vit_test", seed=0)
    images = jax.random.normal(jax.random.key(0), (3, 32, 32, 3))
    features = nnx.jit(knn.encoder_features, static_argnames="global_pool")
    cls = features(m, images)
    tokens = nnx.jit(lambda m, x: m.encode(x))(m, images)
    np.testing.assert_allclose(cls, tokens[:, 0], rtol=1e-6)
    gap = features(m, images, global_pool=True)
    np.testing.assert_allclose(gap, tokens[:, 1:].mean(1), rtol=1e-5, atol=1e-6)
    assert cls.shape == gap.shape == (3, 32) and gap.dtype == jnp.float32


# ----------------------------------------------------------------------------- metrics


def test_topk_accuracy():
    scores = jnp.array(
        [
            [0.1, 0.5, 0.2, 0.0, 0.0, 0.0, 0.0],
            [0.9, 0.05, 0.01, 0.02, 0.03, 0.04, -1.0],
            [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7],
        ]
    )
    labels = jnp.array([1, 6, 1])
    acc = metrics.topk_accuracy(scores, labels)
    assert float(acc["top1"]) == pytest.approx(1 / 3)
    assert float(acc["top5"]) == pytest.approx(1 / 3)  # label 6 is last; label 1 is 6th of 7
    counts = metrics.topk_correct(scores, labels, ks=(1, 6, 7))
    assert [float(counts[k]) for k in ("top1", "top6", "top7")] == [1, 2, 3]
    # soft labels use their argmax; a mask drops padded rows
    soft = jax.nn.one_hot(labels, 7) * 0.9 + 0.1 / 7
    assert float(metrics.topk_accuracy(scores, soft)["top1"]) == pytest.approx(1 / 3)
    masked = metrics.topk_accuracy(scores, labels, mask=jnp.array([1, 0, 0]))
    assert float(masked["top1"]) == 1.0
    jitted = jax.jit(metrics.topk_correct)(scores, labels)
    assert float(jitted["top5"]) == 1.0
    with pytest.raises(ValueError, match="ks"):
        metrics.topk_accuracy(scores, labels, ks=(0,))
    with pytest.raises(ValueError, match="labels"):
        metrics.topk_accuracy(scores, labels.astype(jnp.float32))
