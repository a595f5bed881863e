"""Top-k accuracy helpers (jittable), for classifier logits or any per-class scores."""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp

from mae_jax.spec import ok


def _as_int_labels(labels: jax.Array, num_classes: int) -> jax.Array:
    if labels.ndim == 2:  # one-hot / soft targets: the largest entry is the label
        if labels.shape[1] != num_classes:
            raise ValueError(
                f"soft labels have {labels.shape[1]} classes, the scores {num_classes}"
            )
        return jnp.argmax(labels, axis=-1)
    if labels.ndim != 1 or not jnp.issubdtype(labels.dtype, jnp.integer):
        raise ValueError(
            f"labels must be int class ids [N] or soft targets [N, C], got shape {labels.shape} "
            f"dtype {labels.dtype}"
        )
    return labels


def label_rank(scores: jax.Array, labels: jax.Array) -> jax.Array:
    """Rank of the true class, `[N]` int32: how many classes score strictly higher than it
    (0 = top-1 correct). `scores [N, C]`, `labels [N]` int; a label outside `[0, C)` has
    the largest int32 rank (never a hit, whatever k)."""
    num_classes = scores.shape[1]
    labels = labels.astype(jnp.int32)
    valid = (labels >= 0) & (labels < num_classes)
    true = jnp.take_along_axis(scores, jnp.clip(labels, 0, num_classes - 1)[:, None], axis=1)
    rank = jnp.sum(scores > true, axis=1).astype(jnp.int32)
    return jnp.where(valid, rank, jnp.iinfo(jnp.int32).max)


def topk_correct(
    scores: jax.Array, labels: jax.Array, ks: Sequence[int] = (1, 5), mask: jax.Array | None = None
) -> dict[str, jax.Array]:
    """Number of correct top-k predictions per k: `{'top1': n1, 'top5': n5}` float32 scalars.

    `scores [N, C]` (logits or probabilities); `labels [N]` int or `[N, C]` soft (argmax);
    `mask [N]` (optional, 1 = count, 0 = padding). A sample is top-k correct when fewer than k
    classes score strictly higher than its label (ties count in its favour). k >= C is always
    correct for a label in `[0, C)`; one outside is never correct.
    """
    ks = tuple(ks)
    if not ks or not all(ok("int>=1", k) for k in ks):
        raise ValueError(f"ks must be positive integers, got {ks!r}")
    if scores.ndim != 2:
        raise ValueError(f"scores must be [N, C], got shape {scores.shape}")
    labels = _as_int_labels(labels, scores.shape[1])
    if labels.shape[0] != scores.shape[0]:
        raise ValueError(f"{labels.shape[0]} labels for {scores.shape[0]} score rows")
    rank = label_rank(scores.astype(jnp.float32), labels)
    weight = jnp.ones(rank.shape, jnp.float32) if mask is None else mask.astype(jnp.float32)
    return {f"top{k}": jnp.sum((rank < k).astype(jnp.float32) * weight) for k in ks}


def topk_accuracy(
    scores: jax.Array, labels: jax.Array, ks: Sequence[int] = (1, 5), mask: jax.Array | None = None
) -> dict[str, jax.Array]:
    """Fraction of correct top-k predictions per k (in [0, 1]); see `topk_correct`."""
    counts = topk_correct(scores, labels, ks, mask)
    total = jnp.float32(scores.shape[0]) if mask is None else jnp.sum(mask.astype(jnp.float32))
    return {name: c / jnp.maximum(total, 1.0) for name, c in counts.items()}
