"""The embedded default data set: labelled crops of real photos, offline.

Why this design: the project must run on a fresh machine with no network, and the linear probe needs
labels, a train and an eval split and hundreds of examples. scikit-image (a dependency) ships a
handful of real photographs inside its wheel (read from the package, never fetched). We pick 10 of
them; every example is a crop of one photo and its label is the photo it came from (10 classes: a
cat, an astronaut, coffee, coins, a rocket, ...). Classes differ in content, colour and texture, so
a probe on frozen features has something to learn, while crops make it far from trivial at 32x32.

Train and eval are spatially disjoint: along each photo's longer axis the first 75% only feeds
`train` crops and the last 25% only `validation` crops, so no eval pixel was ever seen in training.
Crop sizes are 15-35% of the photo's shorter side with aspect ratio in [3/4, 4/3] (clamped to the
region), the same distribution in both splits.

Examples are stored JPEG-encoded (so the default run exercises the same fused decode-and-crop path
as ImageNet) with shorter side `resolution` pixels, chosen by the pipeline from the requested image
size. Building is deterministic and takes a few seconds; results are cached in-process.
"""

from __future__ import annotations

import dataclasses
import functools
import io
import math

import numpy as np

# (class name, skimage.data loader name); all are bundled in the skimage wheel.
PHOTOS: tuple[tuple[str, str], ...] = (
    ("astronaut", "astronaut"),
    ("brick", "brick"),
    ("camera", "camera"),
    ("cat", "chelsea"),
    ("coffee", "coffee"),
    ("coins", "coins"),
    ("hubble_deep_field", "hubble_deep_field"),
    ("immunohistochemistry", "immunohistochemistry"),
    ("motorcycle", "stereo_motorcycle"),
    ("rocket", "rocket"),
)
CLASS_NAMES: tuple[str, ...] = tuple(name for name, _ in PHOTOS)
SPLITS = ("train", "validation")
TRAIN_FRACTION = 0.75  # of each photo's longer side feeds the train split
CROP_SIDE = (0.15, 0.35)  # crop side as a fraction of the photo's shorter side
CROP_RATIO = (3 / 4, 4 / 3)
MAX_PHOTO_SIDE = 512  # photos are first downscaled so the shorter side <= this
DEFAULT_TRAIN_PER_CLASS = 240
DEFAULT_EVAL_PER_CLASS = 60
JPEG_QUALITY = 95


@dataclasses.dataclass(frozen=True)
class EmbeddedSplit:
    """One split: `images[i]` JPEG bytes with label `labels[i]` (int64 [N])."""

    images: tuple[bytes, ...]
    labels: np.ndarray
    class_names: tuple[str, ...]

    def __len__(self) -> int:
        return len(self.images)


def embedded_resolution(image_size: int, crop_fraction: float = 0.875) -> int:
    """Stored shorter side for a requested `image_size` (eval resize size)."""
    return max(int(math.ceil(image_size / crop_fraction)), 16)


@functools.cache
def load_photo(loader: str) -> np.ndarray:
    """uint8 [H, W, 3] photo from skimage.data, shorter side <= MAX_PHOTO_SIDE."""
    from PIL import Image  # pylint: disable=g-import-not-at-top
    from skimage import data  # pylint: disable=g-import-not-at-top

    image = getattr(data, loader)()
    if loader == "stereo_motorcycle":
        image = image[0]  # (left, right, disparity): the left view
    image = np.asarray(image)
    if image.ndim == 2:
        image = np.repeat(image[:, :, None], 3, axis=2)
    image = image[:, :, :3].astype(np.uint8)
    h, w = image.shape[:2]
    if min(h, w) > MAX_PHOTO_SIDE:
        s = MAX_PHOTO_SIDE / min(h, w)
        image = np.asarray(
            Image.fromarray(image).resize((round(w * s), round(h * s)), Image.BICUBIC)
        )
    return image


def split_region(height: int, width: int, split: str) -> tuple[int, int, int, int]:
    """(y0, x0, h, w) of the part of a photo that feeds `split`."""
    if split not in SPLITS:
        raise ValueError(f"embedded split {split!r} unknown; expected one of {SPLITS}")
    if width >= height:
        cut = int(round(width * TRAIN_FRACTION))
        return (0, 0, height, cut) if split == "train" else (0, cut, height, width - cut)
    cut = int(round(height * TRAIN_FRACTION))
    return (0, 0, cut, width) if split == "train" else (cut, 0, height - cut, width)


def sample_crops(
    height: int, width: int, split: str, count: int, rng: np.random.Generator
) -> np.ndarray:
    """int [count, 4] crop boxes (y, x, h, w) inside the split's region."""
    ry, rx, rh, rw = split_region(height, width, split)
    side = rng.uniform(*CROP_SIDE, size=count) * min(height, width)
    ratio = np.exp(rng.uniform(math.log(CROP_RATIO[0]), math.log(CROP_RATIO[1]), size=count))
    h = np.clip(np.round(side / np.sqrt(ratio)), 8, rh).astype(np.int64)
    w = np.clip(np.round(side * np.sqrt(ratio)), 8, rw).astype(np.int64)
    y = ry + np.floor(rng.uniform(size=count) * (rh - h + 1)).astype(np.int64)
    x = rx + np.floor(rng.uniform(size=count) * (rw - w + 1)).astype(np.int64)
    return np.stack([y, x, h, w], axis=1)


def _encode_crop(photo: np.ndarray, box, resolution: int) -> bytes:
    from PIL import Image  # pylint: disable=g-import-not-at-top

    y, x, h, w = (int(v) for v in box)
    s = resolution / min(h, w)
    crop = Image.fromarray(photo[y : y + h, x : x + w])
    crop = crop.resize((max(1, round(w * s)), max(1, round(h * s))), Image.BICUBIC)
    buf = io.BytesIO()
    crop.save(buf, format="JPEG", quality=JPEG_QUALITY)
    return buf.getvalue()


@functools.lru_cache(maxsize=8)
def build_split(
    split: str, resolution: int, per_class: int | None = None, seed: int = 0
) -> EmbeddedSplit:
    """Builds (deterministically) one split of the embedded data set.

    Args:
      split: 'train' or 'validation'.
      resolution: shorter side of every stored crop, pixels.
      per_class: crops per class (default 240 train / 60 validation).
      seed: crop sampling seed (keep 0 for the canonical set).

    Returns:
      EmbeddedSplit with len = per_class * 10; example i has label i % 10, so
      any contiguous or strided part holds every class.
    """
    if split not in SPLITS:
        raise ValueError(f"embedded split {split!r} unknown; expected one of {SPLITS}")
    if per_class is None:
        per_class = DEFAULT_TRAIN_PER_CLASS if split == "train" else DEFAULT_EVAL_PER_CLASS
    if per_class < 1:
        raise ValueError(f"embedded per_class must be >= 1, got {per_class}")
    if resolution < 1:
        raise ValueError(f"embedded resolution must be >= 1, got {resolution}")
    per_photo = []
    for label, (_, loader) in enumerate(PHOTOS):
        photo = load_photo(loader)
        rng = np.random.default_rng([seed, SPLITS.index(split), label])
        boxes = sample_crops(photo.shape[0], photo.shape[1], split, per_class, rng)
        per_photo.append([_encode_crop(photo, b, resolution) for b in boxes])
    images = tuple(crops[i] for i in range(per_class) for crops in per_photo)
    labels = np.tile(np.arange(len(PHOTOS), dtype=np.int64), per_class)
    return EmbeddedSplit(images, labels, CLASS_NAMES)
