"""Input pipeline: deterministic, resumable, per-process tf.data iterators.

Public API:
  cfg: a data config, `mae_jax.schema.defaults(schema.DATA)` or any part of it (the rest: defaults)
  create_pretrain_iterator(cfg, global_batch_size, seed, start_step, ...)
      yields {'image': float32 [B/P, S, S, 3]}           (RandomResizedCrop + flip)
  create_train_iterator(...)   yields {'image', 'label' int32 [B/P]}  (labelled;
      optional `augment_fn` for extra per-example augmentation, e.g. RandAugment)
  create_eval_iterator(cfg, global_batch_size, ...)
      one pass, yields {'image', 'label', 'mask' bool [B/P]} (resize + center crop);
      the last batch is padded, `mask` marks real examples.
  dataset_info(cfg) -> DatasetInfo(num_train_examples, num_eval_examples, num_classes)
  describe_source(cfg, split=None) -> str: a split (default: train) in words, as errors name it
  InputError (a ValueError): the data cannot be read (see below).
  Interrupted: `should_stop()` returned True (waiting for data, or before an eval batch).

Stream model. Each process p of P reads its own shard of n examples (disjoint shards covering
the split). Its stream is epoch 0, epoch 1, ... back to back, epoch e being the shard in an order
fixed by (seed, e). Local batch k is stream elements [k*b, (k+1)*b), b = global_batch / P.
Augmentation randomness of an element comes only from (seed, epoch, example key) through
stateless TF ops. So batch k is a pure function of (cfg, seed, k, p, P): starting an iterator at
`start_step=k` rebuilds the stream from epoch k*b // n, skips the first k*b % n undecoded records,
and yields exactly the batch a fresh iterator yields as its k-th. Save `it.position` with the
checkpoint and pass it back as `start_step` to resume.

Corrupt or unreadable images never stop a run. Batches come from a plain parallel map; when
fetching batch k fails, batch k is re-read by a guarded pipeline that decodes every example inside
its own tiny tf.data pipeline whose errors are caught (a bad file yields ok=False, not an
exception). The bad example's slot is filled with a copy of a good example of the same batch (so
batch positions, hence resumption, are unchanged; eval batches instead mark it with mask=False)
and `it.skipped` counts it. A batch with no good example is dropped (its position is still
consumed). Skips are logged for the first `_LOG_FIRST_SKIPS` batches, then summarized every
`_LOG_SKIPS_EVERY` such batches. More than `cfg.max_consecutive_bad` unreadable examples in a row
(across batches) raise `InputError`: the data set is broken, not merely dirty. While batches are
being dropped the iterator calls `should_stop()` (if given) between them and raises `Interrupted`
when it returns True (e.g. after a SIGTERM); a one-pass (eval) iterator calls it before every
batch, so a long pass stops within a batch.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable, Iterator
from typing import Any

import ml_collections
import numpy as np
from absl import logging

from mae_jax import schema
from mae_jax.data import augment
from mae_jax.data.lazy_tf import graph_fn, tf_module
from mae_jax.data.sources import DatasetInfo, Shard, make_source

# Every chunk of the stream (one tf.data pipeline) covers at least two epochs
# and, for in-memory index lists, this many batches; pipelines are rebuilt
# between chunks (TFDS: once per epoch).
_MIN_CHUNK_BATCHES = 200
_AUG_TAG = 0xA06
# Batches with skipped examples logged one by one, then one summary per this many.
_LOG_FIRST_SKIPS = 5
_LOG_SKIPS_EVERY = 100


class InputError(ValueError):
    """The configured data cannot be read (too many unreadable examples in a row)."""


# Seconds `DataIterator.close` waits for tf.data's worker threads before leaving them behind.
CLOSE_WAIT_S = 2.0


class Interrupted(Exception):
    """`should_stop()` returned True while waiting for data, or before a batch of a one-pass
    iterator (a stop was asked for, e.g. by a SIGTERM)."""


def _resolve(cfg) -> ml_collections.ConfigDict:
    """`cfg` checked (`schema.DATA`) over the defaults (partial configs work); unknown keys warn."""
    full = schema.defaults(schema.DATA)
    unknown = sorted(set(cfg.keys()) - set(full.keys()))
    if unknown:
        logging.warning("data config keys not used by the input pipeline: %s", unknown)
    schema.check(cfg, schema.DATA, "config.data", unknown=False)
    full.update(cfg)
    return full


def dataset_info(cfg) -> DatasetInfo:
    """Sizes and classes of the configured data set (all processes together)."""
    cfg = _resolve(cfg)
    return make_source(cfg).info(str(cfg.train_split), str(cfg.eval_split))


def describe_source(cfg, split: str | None = None) -> str:
    """A split (default: the training split) in words, as errors name it (e.g. "split
    'train' of image folder '/data/train'")."""
    cfg = _resolve(cfg)
    return make_source(cfg).describe(str(cfg.train_split if split is None else split))


def _process_layout(global_batch_size: int, process_index, process_count):
    if process_index is None or process_count is None:
        import jax  # pylint: disable=g-import-not-at-top

        process_index = jax.process_index() if process_index is None else process_index
        process_count = jax.process_count() if process_count is None else process_count
    process_index, process_count = int(process_index), int(process_count)
    if process_count < 1 or not 0 <= process_index < process_count:
        raise ValueError(f"process_index {process_index} must be in [0, {process_count})")
    if global_batch_size < 1 or global_batch_size % process_count:
        raise ValueError(
            f"global_batch_size {global_batch_size} must be a positive "
            f"multiple of process_count {process_count}"
        )
    return process_index, process_count, global_batch_size // process_count


def _options(cfg):
    options = tf_module().data.Options()
    options.deterministic = True
    options.threading.max_intra_op_parallelism = 1
    if int(cfg.threads) > 0:
        options.threading.private_threadpool_size = int(cfg.threads)
    return options


def _mark_valid(ds):
    """Adds `valid` True to every element (padding, added by eval, is valid=False)."""
    tf = tf_module()
    return ds.map(graph_fn(lambda elem: {**elem, "valid": tf.constant(True)}))


def _map_images(ds, shard: Shard, process: Callable, fallback: Callable, cfg, guarded: bool):
    """Maps `process(encoded_bytes, elem)` over elements, in order, adding ok.

    guarded=False: a plain parallel map; a corrupt or unreadable image raises a tf.errors.OpError
    when its batch is fetched. guarded=True: every element is processed in its own tiny pipeline
    whose errors are caught, so a failing element (or padding, valid=False) yields
    `fallback(elem)` with ok=False (about 20% slower, hence only used around failures).
    """
    tf = tf_module()
    n = int(cfg.num_parallel_calls)
    par = tf.data.AUTOTUNE if n < 0 else max(1, n)

    def good(elem):
        return {**process(shard.load(elem["data"]), elem), "ok": tf.constant(True)}

    def bad(elem):
        return {**fallback(elem), "ok": tf.constant(False)}

    if not guarded:
        return ds.map(graph_fn(good), num_parallel_calls=par, deterministic=True)

    def attempt(elem):
        one = tf.data.Dataset.from_tensors(elem)
        tried = one.filter(graph_fn(lambda e: e["valid"])).map(graph_fn(good))
        return tried.ignore_errors().concatenate(one.map(graph_fn(bad))).take(1)

    cycle = 4 if par == tf.data.AUTOTUNE else par
    return ds.interleave(
        graph_fn(attempt),
        cycle_length=cycle,
        block_length=1,
        num_parallel_calls=par,
        deterministic=True,
    )


def _process_fns(cfg, image_fn: Callable, fields: Callable):
    """(process, fallback) for `_map_images`: {'image': image_fn(data, elem) (fallback: zeros
    float32 [S, S, 3]), **fields(elem), 'key' if cfg.with_keys}."""
    tf = tf_module()
    size = int(cfg.image_size)

    def finish(image, elem):
        out = {"image": image, **fields(elem)}
        if cfg.with_keys:
            out["key"] = elem["key"]
        return out

    def process(data, elem):
        return finish(image_fn(data, elem), elem)

    def fallback(elem):
        return finish(tf.zeros([size, size, 3], tf.float32), elem)

    return process, fallback


def _label(elem):
    tf = tf_module()
    return {"label": tf.cast(elem["label"], tf.int32)}


def _train_process_fns(cfg, seed: int, with_labels: bool, augment_fn: Callable | None):
    tf = tf_module()
    size = int(cfg.image_size)
    ratio = tuple(float(r) for r in cfg.crop_ratio)
    scale = (float(cfg.train_crop_min_scale if with_labels else cfg.crop_min_scale), 1.0)
    flip, antialias = bool(cfg.flip), bool(cfg.antialias)
    augment.check_crop_params(scale, ratio)
    decode = {"dct_method": cfg.jpeg_dct_method, "reduced_scale": bool(cfg.jpeg_reduced_scale)}

    def crop(data, elem):
        base = tf.stack([tf.constant(seed, tf.int64), elem["epoch"]])
        base = tf.random.experimental.stateless_fold_in(base, _AUG_TAG)
        aug_seed = tf.random.experimental.stateless_fold_in(base, elem["key"])
        return augment.random_resized_crop(
            data, aug_seed, size, scale, ratio, flip, antialias, augment_fn, **decode
        )

    return _process_fns(cfg, crop, _label if with_labels else lambda elem: {})


class DataIterator:
    """Iterator over numpy batches with its stream position.

    Attributes:
      position: index of the next batch in the stream (= start_step + batches consumed); store
        it in checkpoints and pass it back as `start_step`.
      skipped: corrupt/unreadable examples met so far by this process.
      consecutive_bad: unreadable examples in a row up to the last batch.
      local_batch_size: examples per batch on this process.

    Batches come from a fast pipeline; when fetching one fails (a corrupt or unreadable image),
    the pipeline is rebuilt in guarded mode at the same batch for `GUARDED_WINDOW` batches, then
    fast again. Since batch k is a pure function of k, switching pipelines never changes the
    stream. After `MAX_FAST_FAILURES` failures the iterator stays guarded.

    More than `max_consecutive_bad` unreadable examples in a row raise `InputError` naming
    `source` (a description of the data). Between dropped batches (no readable example), and
    before every batch of a one-pass iterator (`total_batches` set), `should_stop()` is called,
    if given; True raises `Interrupted`.
    """

    GUARDED_WINDOW = 64
    MAX_FAST_FAILURES = 8

    def __init__(
        self,
        open_chunk: Callable[[int, bool], tuple[Any, int]],
        start_step: int,
        local_batch_size: int,
        total_batches: int | None = None,
        always_guarded: bool = False,
        name: str = "data",
        *,
        max_consecutive_bad: int = 1000,
        source: str = "the data set",
        should_stop: Callable[[], bool] | None = None,
    ):
        if should_stop is not None and not callable(should_stop):
            raise ValueError(f"should_stop must be a callable () -> bool, got {should_stop!r}")
        self._open_chunk = open_chunk
        self.position = int(start_step)
        self.local_batch_size = local_batch_size
        self._total = total_batches
        self._always_guarded = always_guarded
        self._name = name
        self._max_bad = int(max_consecutive_bad)
        self._source = source
        self._should_stop = should_stop
        self.skipped = self.consecutive_bad = self._fast_failures = 0
        self._skip_batches = 0  # batches with skipped examples
        # Not yet logged (after the first _LOG_FIRST_SKIPS): batches, examples, dropped.
        self._quiet_batches = self._quiet_skipped = self._quiet_dropped = 0
        self._it: Iterator | None = None
        self._chunk_left = 0

    def __iter__(self):
        return self

    def __len__(self) -> int:
        if self._total is None:
            raise TypeError(f"{self._name} iterator is infinite")
        return self._total

    def _open(self, guarded: bool):
        ds, n = self._open_chunk(self.position, guarded)
        if n < 1:
            raise RuntimeError(f"{self._name}: empty pipeline at batch {self.position}")
        if guarded and not self._always_guarded:
            n = min(n, self.GUARDED_WINDOW)
            ds = ds.take(n)
        self._it, self._chunk_left, self._guarded = ds.as_numpy_iterator(), n, guarded

    def _next_raw(self):
        tf = tf_module()
        if self._total is not None and self.position >= self._total:
            raise StopIteration
        if self._it is None or self._chunk_left == 0:
            self._open(self._always_guarded)
        try:
            batch = next(self._it)
        except tf.errors.OpError as e:
            if self._guarded:
                raise
            self._fast_failures += 1
            logging.info(
                f"{self._name}: batch {self.position} failed ({type(e).__name__}); "
                "re-reading it in guarded mode"
            )
            self._always_guarded = self._fast_failures >= self.MAX_FAST_FAILURES
            self._open(True)
            batch = next(self._it)
        self._chunk_left -= 1
        self.position += 1
        return batch

    def __next__(self) -> dict[str, np.ndarray]:
        while True:
            if self._total is not None and self._should_stop is not None and self._should_stop():
                raise Interrupted(
                    f"{self._name}: stopped at batch {self.position} of {self._total}"
                )
            batch = self._next_raw()
            ok = batch.pop("ok")
            if ok.all():  # the common case: nothing else to do
                self.consecutive_bad = 0
                return batch
            real = batch.get("mask", np.ones_like(ok))
            bad = int((~ok & real).sum())
            self._count_bad(ok[real], bad)
            if "mask" in batch:
                batch["mask"] = batch["mask"] & ok
                return batch
            good = np.flatnonzero(ok)
            if good.size == 0:
                if self._should_stop is not None and self._should_stop():
                    raise Interrupted(
                        f"{self._name}: stopped while waiting for readable data "
                        f"(at batch {self.position}, {self.skipped} examples skipped)"
                    )
                continue
            bad_rows = np.flatnonzero(~ok)
            src = good[np.arange(bad_rows.size) % good.size]
            for k in batch:
                batch[k] = np.array(batch[k])  # as_numpy_iterator arrays are read-only
                batch[k][bad_rows] = batch[k][src]
            return batch

    def _count_bad(self, ok: np.ndarray, bad: int):
        """Counts, logs and bounds the unreadable examples of a batch (`ok`: its real rows)."""
        good = np.flatnonzero(ok)
        if good.size == 0:
            longest = self.consecutive_bad = self.consecutive_bad + ok.size
        else:
            gaps = np.diff(good) - 1 if good.size > 1 else np.zeros(1, np.int64)
            longest = max(self.consecutive_bad + int(good[0]), int(gaps.max()))
            self.consecutive_bad = int(ok.size - 1 - good[-1])
            longest = max(longest, self.consecutive_bad)
        self.skipped += bad
        if longest > self._max_bad:
            raise InputError(
                f"{self._name}: {longest} examples in a row from {self._source} could not be "
                f"read or decoded (up to batch {self.position - 1}, {self.skipped} skipped in "
                f"all); check that the files are readable, valid JPEG/PNG images (not empty, "
                f"truncated or another format), or raise the data config key "
                f"max_consecutive_bad (now {self._max_bad}) if the data is merely dirty"
            )
        if not bad:
            return
        self._skip_batches += 1
        dropped = good.size == 0
        if self._skip_batches <= _LOG_FIRST_SKIPS:
            note = "; dropped it, no readable image" if dropped else ""
            end = "; further skips are summarized" if self._skip_batches == _LOG_FIRST_SKIPS else ""
            logging.warning(
                f"{self._name}: skipped {bad} corrupt or unreadable image(s) in batch "
                f"{self.position - 1}{note} ({self.skipped} skipped so far on this process){end}"
            )
            return
        self._quiet_batches += 1
        self._quiet_skipped += bad
        self._quiet_dropped += int(dropped)
        if self._quiet_batches >= _LOG_SKIPS_EVERY:
            logging.warning(
                f"{self._name}: skipped {self._quiet_skipped} corrupt or unreadable image(s) in "
                f"{self._quiet_batches} batches ({self._quiet_dropped} dropped) up to batch "
                f"{self.position - 1} ({self.skipped} skipped so far on this process, "
                f"{self.consecutive_bad} in a row)"
            )
            self._quiet_batches = self._quiet_skipped = self._quiet_dropped = 0

    def close(self, wait_s: float = CLOSE_WAIT_S):
        """Drops the tf.data iterator. Its destructor waits for every element its worker
        threads have started (measured: 10 to 24 s after a smoke run with the kNN monitor), so
        it runs in a daemon thread, waited for at most `wait_s` seconds: a run that is done
        or preempted exits without that wait."""
        if self._it is None:
            return
        held = [self._it]
        self._it = None
        ender = threading.Thread(target=held.clear, name=f"{self._name}-close", daemon=True)
        ender.start()
        ender.join(wait_s)
        if ender.is_alive():
            logging.info(
                "%s: not waiting for the input pipeline's threads to wind down", self._name
            )


def _labelled_source(cfg, name: str):
    source = make_source(cfg)
    if not source.has_labels:
        raise ValueError(
            f"{name} iterator needs labels, but data set {cfg.name!r} has "
            f"no label feature {cfg.get('label_key')!r}"
        )
    return source


def _stream_iterator(
    name: str,
    cfg,
    global_batch_size: int,
    seed: int,
    start_step: int,
    process_index,
    process_count,
    augment_fn: Callable | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> DataIterator:
    """The infinite iterator `name`: 'pretrain' (images) or 'train' (images and labels)."""
    tf = tf_module()
    cfg = _resolve(cfg)
    if start_step < 0:
        raise ValueError(f"start_step must be >= 0, got {start_step}")
    p, pc, b = _process_layout(global_batch_size, process_index, process_count)
    with_labels = name == "train"
    source = _labelled_source(cfg, name) if with_labels else make_source(cfg)
    shard = source.shard(str(cfg.train_split), p, pc)
    n = shard.num_examples
    if n < 1:
        raise ValueError(f"split {cfg.train_split!r} has no examples for process {p}")
    if augment_fn is not None and not callable(augment_fn):
        raise ValueError(f"augment_fn must be callable (image, seed) -> image, got {augment_fn!r}")
    process, fallback = _train_process_fns(cfg, int(seed), with_labels, augment_fn)
    options = _options(cfg)
    # A chunk spans >= 2 epochs and >= 1 batch; shards whose epochs are cheap
    # to list (in-memory index lists) take >= _MIN_CHUNK_BATCHES per chunk.
    min_batches = _MIN_CHUNK_BATCHES if shard.cheap_epochs else 1
    epochs_per_chunk = max(2, math.ceil(min_batches * b / n) + 1)
    logging.info(
        f"{name}: {n} examples on process {p}/{pc}, local batch {b}, start step {int(start_step)}"
    )

    def open_chunk(step: int, guarded: bool):
        epoch, offset = divmod(step * b, n)
        ds = shard.stream(epoch, epochs_per_chunk, int(seed)).skip(offset)
        if guarded:  # only the guarded map reads `valid` (one map stage less otherwise)
            ds = _mark_valid(ds)
        num_batches = (epochs_per_chunk * n - offset) // b
        ds = _map_images(ds, shard, process, fallback, cfg, guarded)
        ds = ds.batch(b, drop_remainder=True).take(num_batches)
        ds = ds.prefetch(tf.data.AUTOTUNE if cfg.prefetch < 0 else int(cfg.prefetch))
        return ds.with_options(options), num_batches

    return DataIterator(
        open_chunk,
        start_step,
        b,
        name=name,
        max_consecutive_bad=cfg.max_consecutive_bad,
        source=source.describe(str(cfg.train_split)),
        should_stop=should_stop,
    )


def create_pretrain_iterator(
    cfg,
    global_batch_size: int,
    seed: int = 0,
    start_step: int = 0,
    process_index: int | None = None,
    process_count: int | None = None,
    *,
    should_stop: Callable[[], bool] | None = None,
) -> DataIterator:
    """Infinite MAE pretraining batches {'image': float32 [B/P, S, S, 3]}.

    RandomResizedCrop(scale=(cfg.crop_min_scale, 1), ratio=cfg.crop_ratio, bicubic) + horizontal
    flip + ImageNet normalization, over `cfg.train_split`. `start_step=K` yields first the batch a
    fresh iterator yields as its K-th. process_index/process_count default to
    jax.process_index()/process_count(). `should_stop()` is polled between batches dropped as
    unreadable; True raises `Interrupted`. More than cfg.max_consecutive_bad unreadable examples
    in a row raise `InputError`.
    """
    args = (cfg, global_batch_size, seed, start_step, process_index, process_count)
    return _stream_iterator("pretrain", *args, should_stop=should_stop)


def create_train_iterator(
    cfg,
    global_batch_size: int,
    seed: int = 0,
    start_step: int = 0,
    process_index: int | None = None,
    process_count: int | None = None,
    augment_fn: Callable | None = None,
    *,
    should_stop: Callable[[], bool] | None = None,
) -> DataIterator:
    """Infinite labelled batches {'image': float32 [B/P,S,S,3], 'label': int32 [B/P]}.

    RandomResizedCrop(scale=(cfg.train_crop_min_scale, 1)) + flip, as the reference linear
    probe. Same determinism and resumption as pretraining.

    `augment_fn(image, seed) -> image` (optional, TF graph code) replaces the final normalization
    of every example: it receives the cropped, flipped float32 [S, S, 3] image in [0, 255] and a
    stateless int64 [2] seed (a pure function of the example's crop seed), and returns the
    normalized float32 [S, S, 3] model input. Fine-tuning uses it for RandAugment +
    RandomErasing (see `augment.random_resized_crop`).

    `should_stop` and unreadable data behave as in `create_pretrain_iterator`.
    """
    args = (cfg, global_batch_size, seed, start_step, process_index, process_count)
    return _stream_iterator("train", *args, augment_fn, should_stop)


def create_eval_iterator(
    cfg,
    global_batch_size: int,
    process_index: int | None = None,
    process_count: int | None = None,
    split: str | None = None,
    *,
    should_stop: Callable[[], bool] | None = None,
) -> DataIterator:
    """One pass over `split` (default cfg.eval_split), fixed order.

    Yields {'image': float32 [B/P, S, S, 3], 'label': int32 [B/P], 'mask': bool [B/P]}: shorter
    side resized to int(S / cfg.eval_crop_fraction) (bicubic), center crop S. Every process yields
    the same number of batches (`len(it)`); padding and unreadable images have mask False.
    `should_stop()` is polled before every batch; True raises `Interrupted`.
    """
    tf = tf_module()
    cfg = _resolve(cfg)
    p, pc, b = _process_layout(global_batch_size, process_index, process_count)
    split = str(cfg.eval_split if split is None else split)
    source = _labelled_source(cfg, "eval")
    shard = source.shard(split, p, pc)
    num_batches = max(math.ceil(max(source.shard_sizes(split, pc)) / b), 1)
    size, frac, antialias = int(cfg.image_size), float(cfg.eval_crop_fraction), bool(cfg.antialias)
    dct_method = cfg.jpeg_dct_method
    options = _options(cfg)
    # Padding (valid=False) never reaches `process`: eval iterators are always guarded.
    process, fallback = _process_fns(
        cfg,
        lambda data, elem: augment.center_crop_eval(data, size, frac, antialias, dct_method),
        lambda elem: {**_label(elem), "mask": elem["valid"]},
    )

    def open_chunk(step: int, guarded: bool):
        if step:
            raise ValueError("eval iterators always start at batch 0")
        ds = _mark_valid(shard.elements(None, 0))
        pad = num_batches * b - shard.num_examples
        if pad > 0:
            dummy = {
                "data": tf.constant(b""),
                "label": tf.constant(-1, tf.int64),
                "key": tf.constant(-1, tf.int64),
                "valid": tf.constant(False),
            }
            ds = ds.concatenate(tf.data.Dataset.from_tensors(dummy).repeat(pad))
        ds = _map_images(ds, shard, process, fallback, cfg, guarded)
        ds = ds.batch(b, drop_remainder=True).prefetch(2)
        return ds.with_options(options), num_batches

    logging.info(
        f"eval: {shard.num_examples} examples on process {p}/{pc} in {num_batches} batches of {b}"
    )
    return DataIterator(
        open_chunk,
        0,
        b,
        total_batches=num_batches,
        always_guarded=True,
        name="eval",
        max_consecutive_bad=cfg.max_consecutive_bad,
        source=source.describe(split),
        should_stop=should_stop,
    )
