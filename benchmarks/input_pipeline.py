"""Throughput of the MAE pretraining input pipeline on a folder of JPEGs.

Measures images/s of `create_pretrain_iterator` (file read, fused JPEG
decode + RandomResizedCrop, bicubic resize, flip, normalize, batching) with
tf.data restricted to `--threads` threads, and the process CPU time per image.

  python benchmarks/pipeline.py                 # generated 300-500 px JPEGs
  python benchmarks/pipeline.py --folder /data/imagenet/train --threads 8

Without --folder it writes `--num-images` JPEGs (sides 300-500 px, quality 90)
cropped from the photos bundled with scikit-image into a temporary folder.
It also times, on the same files and machine, a single-threaded PIL/numpy
version of the reference PyTorch pipeline (open, RandomResizedCrop bicubic,
flip, ToTensor, Normalize), since a shared or busy machine moves both numbers;
the torchvision original did about 435 images/s on one idle core of the
2-core dev machine on such images.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

PHOTOS = (
    "astronaut",
    "chelsea",
    "coffee",
    "rocket",
    "immunohistochemistry",
    "hubble_deep_field",
    "stereo_motorcycle",
)


def make_jpeg_folder(root: str, num_images: int, seed: int = 0) -> str:
    """Writes root/<photo>/img_i.jpg crops with both sides in [300, 500] px."""
    from PIL import Image
    from skimage import data

    rng = np.random.default_rng(seed)
    photos = {}
    for name in PHOTOS:
        img = getattr(data, name)()
        photos[name] = np.asarray(img[0] if name == "stereo_motorcycle" else img)
    for i in range(num_images):
        name = PHOTOS[i % len(PHOTOS)]
        photo = photos[name]
        h = int(rng.integers(300, min(500, photo.shape[0]) + 1))
        w = int(rng.integers(300, min(500, photo.shape[1]) + 1))
        y = int(rng.integers(0, photo.shape[0] - h + 1))
        x = int(rng.integers(0, photo.shape[1] - w + 1))
        os.makedirs(os.path.join(root, name), exist_ok=True)
        Image.fromarray(photo[y : y + h, x : x + w]).save(
            os.path.join(root, name, f"img_{i:05d}.jpg"), quality=90
        )
    return root


def pil_baseline(folder: str, image_size: int, max_images: int = 400, seed: int = 0) -> dict:
    """The reference pipeline's per-image work, single-threaded with PIL/numpy:
    open + RGB, torchvision's RandomResizedCrop (scale 0.2-1, bicubic), flip,
    ToTensor, Normalize. Same machine, same files: a fair yardstick."""
    import math
    import random

    from PIL import Image

    rnd = random.Random(seed)
    mean = np.array([0.485, 0.456, 0.406], np.float32)
    std = np.array([0.229, 0.224, 0.225], np.float32)
    files = sorted(os.path.join(r, f) for r, _, fs in os.walk(folder) for f in fs)
    files = files[:max_images]

    def one(path):
        with open(path, "rb") as f:
            img = Image.open(f).convert("RGB")
        width, height = img.size
        box = None
        for _ in range(10):
            area = width * height * rnd.uniform(0.2, 1.0)
            ratio = math.exp(rnd.uniform(math.log(3 / 4), math.log(4 / 3)))
            w, h = int(round(math.sqrt(area * ratio))), int(round(math.sqrt(area / ratio)))
            if 0 < w <= width and 0 < h <= height:
                i, j = rnd.randint(0, height - h), rnd.randint(0, width - w)
                box = (j, i, j + w, i + h)
                break
        img = img.resize((image_size, image_size), Image.BICUBIC, box=box)
        if rnd.random() < 0.5:
            img = img.transpose(Image.FLIP_LEFT_RIGHT)
        x = np.asarray(img, np.float32) / 255.0
        return ((x - mean) / std).transpose(2, 0, 1)

    for path in files[:20]:  # warm the file cache
        one(path)
    cpu = time.process_time()
    for path in files:
        one(path)
    cpu = time.process_time() - cpu
    return {"images": len(files), "images_per_cpu_s": round(len(files) / cpu, 1)}


def run(
    folder: str,
    batch_size: int,
    num_batches: int,
    threads: int,
    image_size: int,
    warmup: int,
    antialias: bool = True,
) -> dict:
    from mae_jax.data import pipeline

    cfg = pipeline.default_data_config()
    cfg.source = "folder"
    cfg.path = folder
    cfg.image_size = image_size
    cfg.threads = threads
    cfg.num_parallel_calls = threads
    cfg.antialias = antialias
    it = pipeline.create_pretrain_iterator(
        cfg, global_batch_size=batch_size, seed=0, process_index=0, process_count=1
    )
    for _ in range(warmup):
        next(it)
    wall, cpu = time.perf_counter(), time.process_time()
    for _ in range(num_batches):
        batch = next(it)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    assert batch["image"].shape == (batch_size, image_size, image_size, 3)
    images = batch_size * num_batches
    return {
        "images": images,
        "threads": threads,
        "image_size": image_size,
        "wall_s": round(wall, 3),
        "images_per_s": round(images / wall, 1),
        "images_per_s_per_thread": round(images / wall / threads, 1),
        "images_per_cpu_s": round(images / cpu, 1),
        "skipped": it.skipped,
    }


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--folder", default="", help="root/class_x/img.jpg folder")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--num-batches", type=int, default=20)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--warmup", type=int, default=3, help="batches not timed")
    parser.add_argument(
        "--num-images", type=int, default=512, help="images to generate when --folder is not given"
    )
    parser.add_argument(
        "--antialias",
        type=int,
        default=1,
        help="1: PIL-like antialiased bicubic (default), 0: plain bicubic",
    )
    parser.add_argument(
        "--no-baseline", action="store_true", help="skip the single-threaded PIL baseline"
    )
    args = parser.parse_args(argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    with tempfile.TemporaryDirectory() as tmp:
        folder = args.folder or make_jpeg_folder(os.path.join(tmp, "jpegs"), args.num_images)
        result = run(
            folder,
            args.batch_size,
            args.num_batches,
            args.threads,
            args.image_size,
            args.warmup,
            bool(args.antialias),
        )
        if not args.no_baseline:
            result["pil_baseline_images_per_cpu_s"] = pil_baseline(folder, args.image_size)[
                "images_per_cpu_s"
            ]
    result["folder"] = args.folder or f"generated ({args.num_images} JPEGs, 300-500 px)"
    print(json.dumps(result))
    line = (
        f"mae_jax: {result['images_per_s_per_thread']:.0f} images/s per thread, "
        f"{result['images_per_cpu_s']:.0f} images per CPU-second "
        f"({args.image_size}px, {args.threads} thread(s), antialias={bool(args.antialias)})"
    )
    if "pil_baseline_images_per_cpu_s" in result:
        line += (
            f"; PIL/torchvision-style baseline here: "
            f"{result['pil_baseline_images_per_cpu_s']:.0f} images per CPU-second"
        )
    print(line)


if __name__ == "__main__":
    main()
