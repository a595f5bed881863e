"""kNN monitor of a pretraining run: weighted k-NN top-1 of the encoder's features, every
`config.knn_every_steps` steps and at the end (`mae_jax.tasks.pretrain`).

The bank is the first `knn_bank_size` examples of the train split, the queries the first
`knn_num_queries` of the eval split, both read by `pipeline.create_eval_iterator` (resize and
centre crop, no augmentation) in batches of `knn_batch_size`, every process its own shard.
Features are computed by the task's jitted eval program (`train_step.StepFns.evaluate`, the
same state and batch shardings as the train step) and returned replicated, so every process
ends with the global bank and queries; padded or unreadable examples (`mask` False) are
dropped. The search (`evaluate.knn.knn_accuracy`: cosine, top-k, `exp(sim / T)` votes) then
runs on each process's first device over that bounded bank.

Which examples: process p's j-th example counts when `j * P + p < limit` (P processes). With
the embedded and folder sources (shards strided over the split) that is exactly the first
`limit` examples of the split whatever P is, so a pod and one process see the same bank; with
TFDS (contiguous shards per process) it is `limit / P` examples from each process's part.

Features: the cls token after the encoder's final norm by default (the token the paper's
linear probe and DINO's kNN read); `knn_global_pool=True` takes the mean of the normed patch
tokens instead (`evaluate.knn.encoder_features`).
"""

from __future__ import annotations

import dataclasses
import time

import jax
import numpy as np
from flax import nnx

from mae_jax import sharding as shd
from mae_jax.data import pipeline
from mae_jax.evaluate import knn


@dataclasses.dataclass(frozen=True)
class Settings:
    """The resolved `config.knn_*` keys of a run."""

    every_steps: int  # 0: off
    bank_size: int  # examples of the train split (capped at its size)
    num_queries: int  # examples of the eval split (capped at its size)
    k: int
    temperature: float
    batch_size: int  # global batch of the feature forward
    global_pool: bool
    num_classes: int | None


def settings(config, info, default_batch_size: int, every: int) -> Settings:
    """The `knn_*` keys of a pretraining `config` (checked by `schema.check`), its period
    `every` in steps (0: off), resolved against the data set `info` (`pipeline.dataset_info`;
    None: unknown sizes). `knn_batch_size=None` takes `default_batch_size` (the micro-batch)."""
    bank, queries, k = config.knn_bank_size, config.knn_num_queries, config.knn_k
    batch = config.knn_batch_size or default_batch_size
    num_classes = None
    if info is not None:
        bank = min(bank, info.num_train_examples)
        queries = min(queries, info.num_eval_examples)
        num_classes = info.num_classes
        if every and not num_classes:
            raise ValueError(
                f"config.knn_every_steps={every} needs a labelled data set, but "
                f"config.data (source {config.data.source!r}) has no labels; set it to 0"
            )
        if every and (bank < 1 or queries < 1):
            raise ValueError(
                f"config.knn_every_steps={every} needs examples in both splits: the train split "
                f"{config.data.train_split!r} has {info.num_train_examples}, the eval split "
                f"{config.data.eval_split!r} {info.num_eval_examples}"
            )
    if every and k > bank:  # off: the bank is never built, whatever the split's size
        raise ValueError(
            f"config.knn_k={k} is larger than the bank ({bank} examples: config.knn_bank_size="
            f"{config.knn_bank_size}, capped at the train split's size); lower config.knn_k"
        )
    temperature, pool = float(config.knn_temperature), bool(config.knn_global_pool)
    return Settings(every, bank, queries, k, temperature, batch, pool, num_classes)


def feature_step(state: dict, batch: dict, *, graphdef, rest, global_pool: bool) -> dict:
    """The eval program of pretraining: `{'features' [B, D] float32, 'label' [B], 'mask' [B]}`
    of the global batch `{'image' [B, H, W, C], 'label', 'mask'}` (no masking of patches)."""
    model = nnx.merge(graphdef, state["params"], rest)
    features = knn.encoder_features(model, batch["image"], global_pool=global_pool)
    return {"features": features, "label": batch["label"], "mask": batch["mask"]}


def collect(
    fns, state: dict, data_config, split: str, limit: int, batch_size: int, mesh, should_stop=None
):
    """`(features [N, D] float32, labels [N] int32)` of the first `limit` examples of `split`
    (see the module docstring), the same on every process (all must call this together).
    `should_stop()` is polled before every batch; True raises `pipeline.Interrupted`."""
    data = pipeline.create_eval_iterator(
        data_config, global_batch_size=batch_size, split=split, should_stop=should_stop
    )
    batches = ({k: b[k] for k in ("image", "label", "mask")} for b in data)
    try:
        out = shd.collect(fns.evaluate, state, batches, mesh, limit=limit)
    finally:
        data.close()
    if not out or not len(out["features"]):
        raise ValueError(f"kNN monitor: no readable example in the first {limit} of {split!r}")
    return np.asarray(out["features"], np.float32), np.asarray(out["label"], np.int32)


def evaluate(fns, state: dict, data_config, s: Settings, mesh, should_stop=None) -> dict:
    """`{'knn_top1': percent, 'knn_seconds': wall time}` of the state's encoder, plus the
    bank and query counts (`num_bank`, `num_queries`, real examples only). `should_stop()` is
    polled before every batch of both passes; True raises `pipeline.Interrupted`."""
    t0 = time.perf_counter()
    (bank, bank_labels), (queries, query_labels) = (
        collect(fns, state, data_config, split, limit, s.batch_size, mesh, should_stop)
        for split, limit in (
            (data_config.train_split, s.bank_size),
            (data_config.eval_split, s.num_queries),
        )
    )
    acc = knn.knn_accuracy(
        bank,
        bank_labels,
        queries,
        query_labels,
        num_classes=s.num_classes,
        k=min(s.k, len(bank)),
        temperature=s.temperature,
    )
    return {
        "knn_top1": 100.0 * acc["top1"],
        "knn_seconds": time.perf_counter() - t0,
        "num_bank": len(bank),
        "num_queries": len(queries),
    }


def log(result: dict, s: Settings, step: int) -> dict:
    """Says the result on the console (process 0) and returns the scalars to log."""
    chance = f" (chance {100.0 / s.num_classes:.1f}%)" if s.num_classes else ""
    line = (
        f"kNN monitor at step {step}: top-1 {result['knn_top1']:.2f}%{chance}, k={s.k}, "
        f"bank {result['num_bank']}, queries {result['num_queries']}, "
        f"{result['knn_seconds']:.2f} s"
    )
    if jax.process_index() == 0:
        print(line, flush=True)
    return {"knn_top1": result["knn_top1"], "knn_seconds": result["knn_seconds"]}
