"""Data sources for the input pipeline: the embedded set, image folders, TFDS.

A source turns (split, process_index, process_count) into a `Shard`: this process's disjoint part
of the split, which can list its examples in a deterministic order for any epoch. Elements are dicts
  data:  tf.string scalar, encoded image bytes (or a file path; see `load`)
  label: int64 scalar (-1 when the data set has no labels)
  key:   int64 scalar, a stable identity of the example (augmentation seed)
Augmentation, batching and resumption live in `pipeline`.
"""

from __future__ import annotations

import dataclasses
import os
import zlib
from collections.abc import Sequence
from typing import Any

import numpy as np
from absl import logging

from mae_jax.data import embedded
from mae_jax.data.lazy_tf import graph_fn, tf_module, tfds_module

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp")
_SHUFFLE_TAG = 0x5EED  # separates the shuffle stream from augmentation seeds


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
    """Sizes of a configured data set (dict-style access works too)."""

    num_train_examples: int
    num_eval_examples: int
    num_classes: int | None
    class_names: tuple[str, ...] | None = None

    def __getitem__(self, key: str) -> Any:
        return getattr(self, key)

    def keys(self):
        return [f.name for f in dataclasses.fields(self)]


def epoch_seed(seed: int, epoch: int, tag: int) -> int:
    """A 63-bit integer seed derived from (seed, epoch, tag)."""
    ss = np.random.SeedSequence([int(seed) & 0xFFFFFFFFFFFFFFFF, int(epoch), tag])
    return int(ss.generate_state(1, np.uint64)[0] >> np.uint64(1))


def strided_indices(num: int, process_index: int, process_count: int) -> np.ndarray:
    """Indices i with i % process_count == process_index (disjoint, covering)."""
    return np.arange(process_index, num, process_count, dtype=np.int64)


class Shard:
    """One process's part of a split."""

    num_examples: int
    cheap_epochs = False  # True when many epochs fit in one small tf.data graph

    def elements(self, epoch: int | None, seed: int):
        """tf.data.Dataset of {data, label, key}, shuffled for `epoch` (None: fixed order)."""
        raise NotImplementedError

    def stream(self, first_epoch: int, num_epochs: int, seed: int):
        """Epochs first_epoch .. first_epoch + num_epochs - 1 back to back, each
        element with an extra int64 `epoch`."""
        tf = tf_module()
        ds = None
        for e in range(first_epoch, first_epoch + num_epochs):
            epoch = tf.constant(e, tf.int64)
            add_epoch = graph_fn(lambda x, epoch=epoch: {**x, "epoch": epoch})
            part = self.elements(e, seed).map(add_epoch)
            ds = part if ds is None else ds.concatenate(part)
        return ds

    def load(self, data):
        """Encoded bytes from an element's `data` (may raise: caught per example)."""
        return data


class ArrayShard(Shard):
    """Examples held in memory: encoded bytes or file paths, with labels and keys."""

    cheap_epochs = True

    def __init__(self, data: Sequence[bytes] | Sequence[str], labels, keys, is_path: bool):
        tf = tf_module()
        self.num_examples = len(data)
        self._data = tf.constant(list(data), tf.string)
        self._labels = tf.constant(np.asarray(labels, np.int64))
        self._keys = tf.constant(np.asarray(keys, np.int64))
        self._is_path = is_path

    def _order(self, epoch: int, seed: int) -> np.ndarray:
        rng = np.random.default_rng(epoch_seed(seed, epoch, _SHUFFLE_TAG))
        return rng.permutation(self.num_examples).astype(np.int64)

    def _lookup(self, i):
        tf = tf_module()
        return {
            "data": tf.gather(self._data, i),
            "label": tf.gather(self._labels, i),
            "key": tf.gather(self._keys, i),
        }

    def elements(self, epoch, seed):
        tf = tf_module()
        if epoch is None:
            order = np.arange(self.num_examples, dtype=np.int64)
        else:
            order = self._order(epoch, seed)
        return tf.data.Dataset.from_tensor_slices(order).map(graph_fn(self._lookup))

    def stream(self, first_epoch, num_epochs, seed):
        # One flat index list instead of one dataset per epoch: cheap for many epochs.
        tf = tf_module()
        epochs = range(first_epoch, first_epoch + num_epochs)
        order = np.concatenate([self._order(e, seed) for e in epochs])
        epoch = np.repeat(np.asarray(epochs, np.int64), self.num_examples)
        return tf.data.Dataset.from_tensor_slices((order, epoch)).map(
            graph_fn(lambda i, e: {**self._lookup(i), "epoch": e})
        )

    def load(self, data):
        return tf_module().io.read_file(data) if self._is_path else data


def _count_or_zero(source, split: str) -> int:
    """Examples in `split`, 0 where it cannot be read (an eval split is optional)."""
    try:
        return source.num_examples(split)
    except ValueError:
        return 0


class _ListedSource:
    """A source whose splits are lists of examples, strided over the processes."""

    has_labels = True

    def __init__(self, cfg):
        self._cfg = cfg

    def shard_sizes(self, split: str, process_count: int) -> list[int]:
        n = self.num_examples(split)
        return [len(strided_indices(n, p, process_count)) for p in range(process_count)]


# ----------------------------------------------------------------- embedded


class EmbeddedSource(_ListedSource):
    """The embedded default set (see `mae_jax.data.embedded`); splits 'train'/'validation'."""

    def _per_class(self, split: str) -> int:
        if split == "train":
            return int(self._cfg.embedded_train_per_class)
        return int(self._cfg.embedded_eval_per_class)

    def describe(self, split: str) -> str:
        """Names the data in error messages."""
        return f"split {split!r} of the embedded data set"

    def num_examples(self, split: str) -> int:
        if split not in embedded.SPLITS:
            raise ValueError(f"embedded split {split!r} unknown; expected one of {embedded.SPLITS}")
        return self._per_class(split) * len(embedded.PHOTOS)

    def info(self, train_split: str, eval_split: str) -> DatasetInfo:
        n_train, n_eval = self.num_examples(train_split), self.num_examples(eval_split)
        return DatasetInfo(n_train, n_eval, len(embedded.CLASS_NAMES), embedded.CLASS_NAMES)

    def shard(self, split: str, process_index: int, process_count: int) -> Shard:
        cfg = self._cfg
        resolution = int(cfg.embedded_resolution) or embedded.embedded_resolution(
            int(cfg.image_size), float(cfg.eval_crop_fraction)
        )
        s = embedded.build_split(split, resolution, self._per_class(split))
        idx = strided_indices(len(s), process_index, process_count)
        return ArrayShard([s.images[i] for i in idx], s.labels[idx], idx, is_path=False)


# ------------------------------------------------------------------- folder


def _is_dir(path: str) -> bool:
    return tf_module().io.gfile.isdir(path)


class FolderSource(_ListedSource):
    """Images in `path/class_x/img.jpg` or `path/<split>/class_x/img.jpg`.

    With split subdirectories each split is its directory (classes are the sorted subdirectory
    names of the train split). Without them all images form the train split, and
    `folder_eval_fraction` > 0 holds out that fraction (chosen by a stable hash of the relative
    path) as the eval split.
    """

    def __init__(self, cfg):
        super().__init__(cfg)
        self._root = str(cfg.path or "")
        if not self._root:
            raise ValueError("data source 'folder' needs cfg.path, the image folder root")
        if not _is_dir(self._root):
            raise ValueError(f"image folder {self._root!r} does not exist or is not a directory")
        self._train_split = str(cfg.train_split)
        self._fraction = float(cfg.folder_eval_fraction)  # in [0, 1): schema.DATA
        self._cache: dict[str, tuple[list[str], np.ndarray]] = {}
        base = self._split_root(self._train_split) or self._root
        listed = (d.rstrip("/") for d in tf_module().io.gfile.listdir(base))
        self._classes = tuple(sorted(d for d in listed if _is_dir(os.path.join(base, d))))
        if not self._classes:
            raise ValueError(
                f"image folder {base!r} has no class subdirectories (expected root/class_x/img.jpg)"
            )

    def describe(self, split: str) -> str:
        """Names the data in error messages."""
        return f"split {split!r} of image folder {self._split_root(split) or self._root!r}"

    def _split_root(self, split: str) -> str | None:
        root = os.path.join(self._root, split)
        return root if _is_dir(root) else None

    def _files(self, split: str) -> tuple[list[str], np.ndarray]:
        if split in self._cache:
            return self._cache[split]
        root = self._split_root(split)
        holdout = None  # None: every image; True / False: the held-out ones / the others
        if root is None:
            if self._split_root(self._train_split) is not None:
                raise ValueError(f"image folder {self._root!r} has no split directory {split!r}")
            root = self._root
            if split != self._train_split:
                if self._fraction <= 0:
                    raise ValueError(
                        f"image folder {self._root!r} has no split directory {split!r}; "
                        "set folder_eval_fraction > 0 to hold out part of the images"
                    )
                holdout = True
            elif self._fraction > 0:
                holdout = False
        paths, labels = [], []
        for label, name in enumerate(self._classes):
            class_dir = os.path.join(root, name)
            if not _is_dir(class_dir):
                continue
            for f in sorted(tf_module().io.gfile.listdir(class_dir)):
                if not f.lower().endswith(IMAGE_EXTENSIONS):
                    continue
                if holdout is not None:
                    h = zlib.crc32(f"{name}/{f}".encode()) % 1_000_000
                    if (h < self._fraction * 1_000_000) != holdout:
                        continue
                paths.append(os.path.join(class_dir, f))
                labels.append(label)
        if not paths:
            raise ValueError(
                f"image folder {root!r} holds no images for split {split!r} "
                f"(extensions {IMAGE_EXTENSIONS})"
            )
        self._cache[split] = (paths, np.asarray(labels, np.int64))
        return self._cache[split]

    def num_examples(self, split: str) -> int:
        return len(self._files(split)[0])

    def info(self, train_split: str, eval_split: str) -> DatasetInfo:
        n_train, n_eval = self.num_examples(train_split), _count_or_zero(self, eval_split)
        return DatasetInfo(n_train, n_eval, len(self._classes), self._classes)

    def shard(self, split: str, process_index: int, process_count: int) -> Shard:
        paths, labels = self._files(split)
        idx = strided_indices(len(paths), process_index, process_count)
        if not self._cfg.cache:
            return ArrayShard([paths[i] for i in idx], labels[idx], idx, is_path=True)
        data, n_bad = [], 0
        for i in idx:
            try:
                with tf_module().io.gfile.GFile(paths[i], "rb") as f:
                    data.append(f.read())
            except Exception:  # pylint: disable=broad-except
                data.append(b"")  # fails decoding later: skipped and counted
                n_bad += 1
        size_mb = sum(map(len, data)) / 1e6
        logging.info(
            f"cached {len(data)} images of {self._root!r} ({size_mb:.1f} MB), {n_bad} unreadable"
        )
        return ArrayShard(data, labels[idx], idx, is_path=False)


# --------------------------------------------------------------------- TFDS


@dataclasses.dataclass
class TfdsShard(Shard):
    """A TFDS split slice read with tf.data: per-epoch file shuffle + buffer shuffle."""

    builder: Any
    split: Any  # a split name or a `tfds.even_splits` part
    num_examples: int
    image_key: str
    label_key: str | None
    shuffle_buffer: int

    def raw_dataset(self, shuffle_seed: int | None):
        tfds = tfds_module()
        keys = {k: True for k in (self.image_key, self.label_key) if k}
        decoders = tfds.decode.PartialDecoding(
            keys, decoders={self.image_key: tfds.decode.SkipDecoding()}
        )
        read_config = tfds.ReadConfig(
            add_tfds_id=True, shuffle_seed=shuffle_seed, try_autocache=False
        )
        return self.builder.as_dataset(
            split=self.split,
            shuffle_files=shuffle_seed is not None,
            read_config=read_config,
            decoders=decoders,
        )

    def elements(self, epoch, seed):
        tf = tf_module()
        if epoch is None:
            ds = self.raw_dataset(None)
        else:
            ds = self.raw_dataset(epoch_seed(seed, epoch, _SHUFFLE_TAG) % (2**31))
            if self.shuffle_buffer > 1:
                ds = ds.shuffle(
                    self.shuffle_buffer, seed=epoch_seed(seed, epoch, _SHUFFLE_TAG + 1) % (2**31)
                )
        image_key, label_key = self.image_key, self.label_key

        def convert(ex):
            label = tf.cast(ex[label_key], tf.int64) if label_key else tf.constant(-1, tf.int64)
            key = tf.strings.to_hash_bucket_fast(ex["tfds_id"], 2**62)
            return {"data": ex[image_key], "label": label, "key": key}

        return ds.map(graph_fn(convert))


class TfdsSource:
    """Any TFDS image data set by name, from `data_dir` (local or gs://)."""

    def __init__(self, cfg):
        tfds = tfds_module()
        self._cfg = cfg
        self._name = str(cfg.name or "")
        if not self._name:
            raise ValueError("data source 'tfds' needs cfg.name, e.g. 'imagenet2012'")
        data_dir = cfg.data_dir or None
        if data_dir and not tf_module().io.gfile.isdir(data_dir):
            raise ValueError(f"TFDS data_dir {data_dir!r} does not exist")
        try:
            self._builder = tfds.builder(self._name, data_dir=data_dir)
        except tfds.core.registered.DatasetNotFoundError as e:
            raise ValueError(
                f"TFDS dataset {self._name!r} not found: {str(e).splitlines()[0]}"
            ) from None
        self._data_dir = data_dir
        features = self._builder.info.features
        self._image_key = str(cfg.image_key)
        if self._image_key not in features:
            raise ValueError(
                f"TFDS dataset {self._name!r} has no feature "
                f"{self._image_key!r}; features: {list(features.keys())}"
            )
        label_key = str(cfg.label_key or "")
        self._label_key = label_key if label_key in features else None
        self.has_labels = self._label_key is not None

    def describe(self, split: str) -> str:
        """Names the data in error messages."""
        where = f"data_dir {self._data_dir!r}" if self._data_dir else "the default data_dir"
        return f"split {split!r} of TFDS dataset {self._name!r} in {where}"

    def _shard(self, split, num_examples: int, shuffle_buffer: int) -> TfdsShard:
        return TfdsShard(
            self._builder, split, num_examples, self._image_key, self._label_key, shuffle_buffer
        )

    def _check_split(self, split):
        try:
            ds = self._shard(split, 0, 0).raw_dataset(None)
        except AssertionError as e:  # TFDS: "could not find data in data_dir"
            raise ValueError(
                f"TFDS dataset {self._name!r} is not prepared in data_dir {self._data_dir!r}: {e}"
            ) from None
        except (ValueError, KeyError) as e:
            raise ValueError(
                f"TFDS dataset {self._name!r}: cannot read split {split!r}: {e}"
            ) from None
        return ds

    def num_examples(self, split) -> int:
        splits = self._builder.info.splits
        if splits:
            try:
                return int(splits[split].num_examples)
            except (KeyError, ValueError) as e:
                raise ValueError(
                    f"TFDS dataset {self._name!r} has no split {split!r}; "
                    f"splits: {list(splits.keys())}"
                ) from e
        # Split metadata unavailable (e.g. tfds.testing.mock_data): ask tf.data.
        ds = self._check_split(split)
        n = int(ds.cardinality())
        return n if n >= 0 else sum(1 for _ in ds)

    def info(self, train_split: str, eval_split: str) -> DatasetInfo:
        n_eval = _count_or_zero(self, eval_split)
        label = self._builder.info.features[self._label_key] if self._label_key else None
        names, num_classes = getattr(label, "names", None), getattr(label, "num_classes", None)
        names = tuple(names) if names else None
        return DatasetInfo(self.num_examples(train_split), n_eval, num_classes, names)

    def _process_split(self, split: str, process_index: int, process_count: int):
        if process_count == 1:
            return split
        return tfds_module().even_splits(split, n=process_count)[process_index]

    def shard_sizes(self, split: str, process_count: int) -> list[int]:
        return [
            self.num_examples(self._process_split(split, p, process_count))
            for p in range(process_count)
        ]

    def shard(self, split: str, process_index: int, process_count: int) -> Shard:
        self._check_split(split)
        psplit = self._process_split(split, process_index, process_count)
        shard = self._shard(psplit, self.num_examples(psplit), int(self._cfg.shuffle_buffer))
        if not self._cfg.cache:
            return shard
        examples = list(shard.elements(None, 0).as_numpy_iterator())
        data = [ex["data"] for ex in examples]
        size_mb = sum(map(len, data)) / 1e6
        logging.info(f"cached {len(data)} examples of {self._name}[{psplit}] ({size_mb:.1f} MB)")
        labels, keys = [ex["label"] for ex in examples], [ex["key"] for ex in examples]
        return ArrayShard(data, labels, keys, is_path=False)


SOURCES = {"embedded": EmbeddedSource, "folder": FolderSource, "tfds": TfdsSource}


def make_source(cfg):
    """The source object for `cfg.source` (one of SOURCES: checked by `schema.check`)."""
    return SOURCES[str(cfg.source)](cfg)
