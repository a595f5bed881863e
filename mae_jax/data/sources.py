"""Data sources for the input pipeline: the embedded set, image folders, TFDS.

A source turns (split, process_index, process_count) into a `Shard`: this
process's disjoint part of the split, which can list its examples in a
deterministic order for any epoch. Elements are dicts
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
            part = self.elements(e, seed).map(
                graph_fn(lambda x, epoch=epoch: {**x, "epoch": epoch})
            )
            ds = part if ds is None else ds.concatenate(part)
        return ds

    def load(self, data):
        """Encoded bytes from an element's `data` (may raise: caught per example)."""
        return data


class ArrayShard(Shard):
    """Examples held in memory: encoded bytes or file paths, with labels and keys."""

    cheap_epochs = True

    def __init__(
        self,
        data: Sequence[bytes] | Sequence[str],
        labels: np.ndarray,
        keys: np.ndarray,
        is_path: bool,
    ):
        tf = tf_module()
        if len(data) != len(labels) or len(data) != len(keys):
            raise ValueError(
                f"data/labels/keys lengths differ: {len(data)}, {len(labels)}, {len(keys)}"
            )
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
        if self._is_path:
            return tf_module().io.read_file(data)
        return data


# ----------------------------------------------------------------- embedded


class EmbeddedSource:
    """The embedded default set (see `embedded_data`); splits 'train'/'validation'."""

    has_labels = True

    def __init__(self, cfg):
        self._cfg = cfg

    def _resolution(self) -> int:
        res = int(self._cfg.get("embedded_resolution", 0) or 0)
        return res or embedded.embedded_resolution(
            int(self._cfg.image_size), float(self._cfg.get("eval_crop_fraction", 0.875))
        )

    def _per_class(self, split: str) -> int:
        if split == "train":
            return int(self._cfg.get("embedded_train_per_class", embedded.DEFAULT_TRAIN_PER_CLASS))
        return int(self._cfg.get("embedded_eval_per_class", embedded.DEFAULT_EVAL_PER_CLASS))

    def describe(self, split: str) -> str:
        """Names the data in error messages."""
        return f"split {split!r} of the embedded data set"

    def _split(self, split: str) -> embedded.EmbeddedSplit:
        return embedded.build_split(split, self._resolution(), self._per_class(split))

    def num_examples(self, split: str) -> int:
        if split not in embedded.SPLITS:
            raise ValueError(f"embedded split {split!r} unknown; expected one of {embedded.SPLITS}")
        return self._per_class(split) * len(embedded.PHOTOS)

    def info(self, train_split: str, eval_split: str) -> DatasetInfo:
        return DatasetInfo(
            self.num_examples(train_split),
            self.num_examples(eval_split),
            len(embedded.CLASS_NAMES),
            embedded.CLASS_NAMES,
        )

    def shard_sizes(self, split: str, process_count: int) -> list[int]:
        n = self.num_examples(split)
        return [len(strided_indices(n, p, process_count)) for p in range(process_count)]

    def shard(self, split: str, process_index: int, process_count: int) -> Shard:
        s = self._split(split)
        idx = strided_indices(len(s), process_index, process_count)
        return ArrayShard([s.images[i] for i in idx], s.labels[idx], idx, is_path=False)


# ------------------------------------------------------------------- folder


def _is_dir(path: str) -> bool:
    return tf_module().io.gfile.isdir(path)


def _list_images(class_dir: str) -> list[str]:
    gfile = tf_module().io.gfile
    return sorted(f for f in gfile.listdir(class_dir) if f.lower().endswith(IMAGE_EXTENSIONS))


class FolderSource:
    """Images in `path/class_x/img.jpg` or `path/<split>/class_x/img.jpg`.

    With split subdirectories each split is its directory (classes are the
    sorted subdirectory names of the train split). Without them all images form
    the train split, and `folder_eval_fraction` > 0 holds out that fraction
    (chosen by a stable hash of the relative path) as the eval split.
    """

    has_labels = True

    def __init__(self, cfg):
        self._cfg = cfg
        self._root = str(cfg.path or "")
        if not self._root:
            raise ValueError("data source 'folder' needs cfg.path, the image folder root")
        if not _is_dir(self._root):
            raise ValueError(f"image folder {self._root!r} does not exist or is not a directory")
        self._train_split = str(cfg.train_split)
        self._fraction = float(cfg.get("folder_eval_fraction", 0.0))
        if not 0.0 <= self._fraction < 1.0:
            raise ValueError(f"folder_eval_fraction must be in [0, 1), got {self._fraction}")
        self._cache: dict[str, tuple[list[str], np.ndarray]] = {}
        self._classes = self._class_names()

    def describe(self, split: str) -> str:
        """Names the data in error messages."""
        root = self._split_root(split)
        if root is not None:
            return f"split {split!r} of image folder {root!r}"
        return f"split {split!r} of image folder {self._root!r}"

    def _split_root(self, split: str) -> str | None:
        root = os.path.join(self._root, split)
        return root if _is_dir(root) else None

    def _class_names(self) -> tuple[str, ...]:
        base = self._split_root(self._train_split) or self._root
        gfile = tf_module().io.gfile
        names = sorted(
            d.rstrip("/") for d in gfile.listdir(base) if _is_dir(os.path.join(base, d.rstrip("/")))
        )
        if not names:
            raise ValueError(
                f"image folder {base!r} has no class subdirectories (expected root/class_x/img.jpg)"
            )
        return tuple(names)

    def _files(self, split: str) -> tuple[list[str], np.ndarray]:
        if split in self._cache:
            return self._cache[split]
        root = self._split_root(split)
        holdout = None
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
            for f in _list_images(class_dir):
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
        try:
            n_eval = self.num_examples(eval_split)
        except ValueError:
            n_eval = 0
        return DatasetInfo(
            self.num_examples(train_split), n_eval, len(self._classes), self._classes
        )

    def shard_sizes(self, split: str, process_count: int) -> list[int]:
        n = self.num_examples(split)
        return [len(strided_indices(n, p, process_count)) for p in range(process_count)]

    def shard(self, split: str, process_index: int, process_count: int) -> Shard:
        paths, labels = self._files(split)
        idx = strided_indices(len(paths), process_index, process_count)
        if self._cfg.get("cache", False):
            data, n_bad = [], 0
            for i in idx:
                try:
                    with tf_module().io.gfile.GFile(paths[i], "rb") as f:
                        data.append(f.read())
                except Exception:  # pylint: disable=broad-except
                    data.append(b"")  # fails decoding later: skipped and counted
                    n_bad += 1
            logging.info(
                "cached %d images of %r (%.1f MB), %d unreadable",
                len(data),
                self._root,
                sum(map(len, data)) / 1e6,
                n_bad,
            )
            return ArrayShard(data, labels[idx], idx, is_path=False)
        return ArrayShard([paths[i] for i in idx], labels[idx], idx, is_path=True)


# --------------------------------------------------------------------- TFDS


class TfdsShard(Shard):
    """A TFDS split slice read with tf.data: per-epoch file shuffle + buffer shuffle."""

    def __init__(
        self,
        builder,
        split,
        num_examples: int,
        image_key: str,
        label_key: str | None,
        shuffle_buffer: int,
    ):
        self._builder = builder
        self._split = split
        self.num_examples = num_examples
        self._image_key = image_key
        self._label_key = label_key
        self._shuffle_buffer = shuffle_buffer

    def raw_dataset(self, shuffle_seed: int | None):
        tfds = tfds_module()
        keys = {self._image_key: True}
        if self._label_key:
            keys[self._label_key] = True
        decoders = tfds.decode.PartialDecoding(
            keys, decoders={self._image_key: tfds.decode.SkipDecoding()}
        )
        read_config = tfds.ReadConfig(
            add_tfds_id=True, shuffle_seed=shuffle_seed, try_autocache=False
        )
        return self._builder.as_dataset(
            split=self._split,
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
            if self._shuffle_buffer > 1:
                ds = ds.shuffle(
                    self._shuffle_buffer, seed=epoch_seed(seed, epoch, _SHUFFLE_TAG + 1) % (2**31)
                )
        image_key, label_key = self._image_key, self._label_key

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
        data_dir = cfg.get("data_dir") or None
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
        self._image_key = str(cfg.get("image_key", "image"))
        if self._image_key not in features:
            raise ValueError(
                f"TFDS dataset {self._name!r} has no feature "
                f"{self._image_key!r}; features: {list(features.keys())}"
            )
        label_key = str(cfg.get("label_key", "label") or "")
        self._label_key = label_key if label_key in features else None

    @property
    def has_labels(self) -> bool:
        return self._label_key is not None

    def describe(self, split: str) -> str:
        """Names the data in error messages."""
        where = f"data_dir {self._data_dir!r}" if self._data_dir else "the default data_dir"
        return f"split {split!r} of TFDS dataset {self._name!r} in {where}"

    def _check_split(self, split):
        try:
            ds = TfdsShard(
                self._builder, split, 0, self._image_key, self._label_key, 0
            ).raw_dataset(None)
        except AssertionError as e:  # TFDS: "could not find data in data_dir"
            raise ValueError(
                f"TFDS dataset {self._name!r} is not prepared in data_dir {self._data_dir!r}: {e}"
            ) from None
        except (ValueError, KeyError) as e:
            raise ValueError(
                f"TFDS dataset {self._name!r}: cannot read split {split!r}: {e}"
            ) from None
        return ds

    def _count(self, split) -> int:
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
        if n < 0:
            n = sum(1 for _ in ds)
        return n

    def num_examples(self, split: str) -> int:
        return self._count(split)

    @property
    def num_classes(self) -> int | None:
        if not self._label_key:
            return None
        return getattr(self._builder.info.features[self._label_key], "num_classes", None)

    def info(self, train_split: str, eval_split: str) -> DatasetInfo:
        try:
            n_eval = self._count(eval_split)
        except ValueError:
            n_eval = 0
        names = None
        if self._label_key:
            names = getattr(self._builder.info.features[self._label_key], "names", None)
        return DatasetInfo(
            self._count(train_split), n_eval, self.num_classes, tuple(names) if names else None
        )

    def _process_split(self, split: str, process_index: int, process_count: int):
        if process_count == 1:
            return split
        return tfds_module().even_splits(split, n=process_count)[process_index]

    def shard_sizes(self, split: str, process_count: int) -> list[int]:
        return [
            self._count(self._process_split(split, p, process_count)) for p in range(process_count)
        ]

    def shard(self, split: str, process_index: int, process_count: int) -> Shard:
        self._check_split(split)
        psplit = self._process_split(split, process_index, process_count)
        shard = TfdsShard(
            self._builder,
            psplit,
            self._count(psplit),
            self._image_key,
            self._label_key,
            int(self._cfg.get("shuffle_buffer", 10_000)),
        )
        if not self._cfg.get("cache", False):
            return shard
        data, labels, keys = [], [], []
        for ex in shard.elements(None, 0).as_numpy_iterator():
            data.append(ex["data"])
            labels.append(ex["label"])
            keys.append(ex["key"])
        logging.info(
            "cached %d examples of %s[%s] (%.1f MB)",
            len(data),
            self._name,
            psplit,
            sum(map(len, data)) / 1e6,
        )
        return ArrayShard(
            data, np.asarray(labels, np.int64), np.asarray(keys, np.int64), is_path=False
        )


SOURCES = {"embedded": EmbeddedSource, "folder": FolderSource, "tfds": TfdsSource}


def make_source(cfg):
    """The source object for `cfg.source` (one of SOURCES: checked by `schema.check`)."""
    return SOURCES[str(cfg.source)](cfg)
