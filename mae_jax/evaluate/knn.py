"""k-nearest-neighbour classification of encoder features (DINO's weighted kNN), in JAX.

Features are L2-normalized, similarity is the dot product (cosine). Each query takes its `k`
most similar bank entries (default 20); each neighbour votes for its label with weight
`exp(sim / T)` (T = 0.07, `weighting='temperature'`) or 1 (`weighting='majority'`). The class
scores are ranked, ties broken towards the lower class id; a class with no vote is never a
correct prediction. Both the queries and the bank are processed in chunks (a running top-k is
merged chunk by chunk), so neither the similarity matrix nor the bank needs to fit at once.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from mae_jax.spec import require

WEIGHTINGS = ("temperature", "majority")


def l2_normalize(x: jax.Array, eps: float = 1e-12) -> jax.Array:
    """Rows scaled to unit L2 norm (float32); zero rows stay zero."""
    x = jnp.asarray(x, jnp.float32)
    return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), eps)


@functools.partial(jax.jit, static_argnames=("k",))
def _chunk_topk(queries, bank, bank_valid, best_sims, best_ids, offset, *, k):
    """Merge the top-k of `queries [Q, D] @ bank.T [D, B]` into the running `(sims, ids)`."""
    sims = jnp.dot(queries, bank.T, precision=jax.lax.Precision.HIGHEST)
    sims = jnp.where(bank_valid[None, :], sims, -jnp.inf)
    kk = min(k, bank.shape[0])
    top_sims, top_idx = jax.lax.top_k(sims, kk)
    all_sims = jnp.concatenate([best_sims, top_sims], axis=1)
    all_ids = jnp.concatenate([best_ids, top_idx.astype(jnp.int32) + offset], axis=1)
    new_sims, pos = jax.lax.top_k(all_sims, k)
    return new_sims, jnp.take_along_axis(all_ids, pos, axis=1)


def nearest_neighbors(
    queries,
    bank,
    k: int = 20,
    *,
    query_chunk: int = 1024,
    bank_chunk: int = 65536,
    normalize: bool = True,
):
    """Top-`k` cosine neighbours of each query: `(sims [Q, k] float32, ids [Q, k] int32)`,
    most similar first. `queries [Q, D]`, `bank [M, D]` (numpy or jax arrays)."""
    queries = jnp.asarray(queries, jnp.float32)
    bank = jnp.asarray(bank, jnp.float32)
    if queries.ndim != 2 or bank.ndim != 2 or queries.shape[1] != bank.shape[1]:
        raise ValueError(
            f"queries [Q, D] and bank [M, D] must be 2-D with the same D, got {queries.shape} "
            f"and {bank.shape}"
        )
    require("k", k, f"int[1,{bank.shape[0]}]")
    require("query_chunk", query_chunk, "int>=1")
    require("bank_chunk", bank_chunk, "int>=1")
    if normalize:
        queries, bank = l2_normalize(queries), l2_normalize(bank)
    m = bank.shape[0]
    bank_chunk = min(bank_chunk, m)
    query_chunk = min(query_chunk, queries.shape[0])
    # Pad the bank to whole chunks (padding masked out) so every chunk compiles once.
    nb = -(-m // bank_chunk)
    bank = jnp.pad(bank, ((0, nb * bank_chunk - m), (0, 0)))
    valid = jnp.arange(nb * bank_chunk) < m
    out_sims, out_ids = [], []
    for start in range(0, queries.shape[0], query_chunk):
        q = queries[start : start + query_chunk]
        n = q.shape[0]
        if n < query_chunk:  # the last chunk to the full size
            q = jnp.pad(q, ((0, query_chunk - n), (0, 0)))
        sims = jnp.full((query_chunk, k), -jnp.inf, jnp.float32)
        ids = jnp.zeros((query_chunk, k), jnp.int32)
        for lo in range(0, nb * bank_chunk, bank_chunk):
            chunk = slice(lo, lo + bank_chunk)
            sims, ids = _chunk_topk(q, bank[chunk], valid[chunk], sims, ids, jnp.int32(lo), k=k)
        out_sims.append(sims[:n])
        out_ids.append(ids[:n])
    return jnp.concatenate(out_sims), jnp.concatenate(out_ids)


def vote(
    neighbor_sims,
    neighbor_labels,
    num_classes: int,
    *,
    temperature: float = 0.07,
    weighting: str = "temperature",
) -> jax.Array:
    """Class scores `[Q, C]` from neighbours' similarities and labels `[Q, k]`."""
    if weighting not in WEIGHTINGS:
        raise ValueError(f"weighting must be one of {WEIGHTINGS}, got {weighting!r}")
    require("temperature", temperature, "num>0")
    if weighting == "temperature":
        weights = jnp.exp(jnp.asarray(neighbor_sims, jnp.float32) / temperature)
    else:
        weights = jnp.ones(neighbor_sims.shape, jnp.float32)
    onehot = jax.nn.one_hot(neighbor_labels, num_classes, dtype=jnp.float32)
    return jnp.einsum("qk,qkc->qc", weights, onehot)


def knn_classify(
    train_features,
    train_labels,
    test_features,
    *,
    num_classes: int,
    k: int = 20,
    temperature: float = 0.07,
    weighting: str = "temperature",
    query_chunk: int = 1024,
    bank_chunk: int = 65536,
) -> jax.Array:
    """Class scores `[Q, num_classes]` of each test feature by kNN over the labelled bank."""
    train_labels = jnp.asarray(train_labels)
    if train_labels.ndim != 1 or train_labels.shape[0] != np.shape(train_features)[0]:
        raise ValueError(
            f"train_labels must be [M] with M = {np.shape(train_features)[0]} features, got "
            f"shape {train_labels.shape}"
        )
    if not jnp.issubdtype(train_labels.dtype, jnp.integer):
        raise ValueError(f"train_labels must be integers, got dtype {train_labels.dtype}")
    sims, ids = nearest_neighbors(
        test_features, train_features, k, query_chunk=query_chunk, bank_chunk=bank_chunk
    )
    return vote(sims, train_labels[ids], num_classes, temperature=temperature, weighting=weighting)


def knn_accuracy(
    train_features,
    train_labels,
    test_features,
    test_labels,
    *,
    num_classes: int | None = None,
    k: int = 20,
    temperature: float = 0.07,
    weighting: str = "temperature",
    query_chunk: int = 1024,
    bank_chunk: int = 65536,
) -> dict[str, float]:
    """kNN top-1 / top-5 accuracy (fractions in [0, 1]) of `test_features [Q, D]` against the
    bank `train_features [M, D]` with int labels. Top-5 uses the `min(5, k, C)` best classes.
    `num_classes` defaults to 1 + the largest label seen."""
    train_labels = np.asarray(train_labels)
    test_labels = np.asarray(test_labels)
    if test_labels.ndim != 1 or test_labels.shape[0] != np.shape(test_features)[0]:
        raise ValueError(
            f"test_labels must be [Q] with Q = {np.shape(test_features)[0]} features, got "
            f"shape {test_labels.shape}"
        )
    if num_classes is None:
        num_classes = int(max(train_labels.max(), test_labels.max())) + 1
    require("num_classes", num_classes, "int>=1")
    for name, lab in (("train_labels", train_labels), ("test_labels", test_labels)):
        if lab.size and (lab.min() < 0 or lab.max() >= num_classes):
            raise ValueError(
                f"{name} must be in [0, {num_classes}), got range [{lab.min()}, {lab.max()}]"
            )
    scores = knn_classify(
        train_features,
        train_labels,
        test_features,
        num_classes=num_classes,
        k=k,
        temperature=temperature,
        weighting=weighting,
        query_chunk=query_chunk,
        bank_chunk=bank_chunk,
    )
    top = min(5, k, num_classes)
    best_scores, best = jax.lax.top_k(scores, top)
    hit = (best == jnp.asarray(test_labels)[:, None]) & (best_scores > 0)
    n = max(test_labels.shape[0], 1)
    return {"top1": float(jnp.sum(hit[:, 0])) / n, "top5": float(jnp.sum(hit)) / n}


def encoder_features(mae_model, images: jax.Array, *, global_pool: bool = False) -> jax.Array:
    """kNN features from an `MAE`'s encoder (no masking), `[N, D]` float32: the cls token after
    the final norm, or (`global_pool`) the mean of the normed patch tokens."""
    tokens = mae_model.encode(images).astype(jnp.float32)
    return jnp.mean(tokens[:, 1:], axis=1) if global_pool else tokens[:, 0]
