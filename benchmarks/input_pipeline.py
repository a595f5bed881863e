"""Throughput of the MAE pretraining input pipeline on a folder of JPEGs.

Measures images/s of `create_pretrain_iterator` (file read, fused JPEG
decode + RandomResizedCrop, bicubic resize, flip, normalize, batching) with
tf.data restricted to `--threads` threads, and the process CPU time per image.

  python benchmarks/input_pipeline.py           # generated 300-500 px JPEGs
  python benchmarks/input_pipeline.py --folder /data/imagenet/train --threads 8
  python benchmarks/input_pipeline.py --data jpeg_reduced_scale=False \
      --data jpeg_dct_method=INTEGER_FAST      # data config overrides

Without --folder it writes `--num-images` JPEGs (quality 90, both sides in
`--sides`, default 300-500 px) cropped from the photos bundled with
scikit-image (photos smaller than the requested side are first upscaled,
bicubic) into a temporary folder. It also times, on the same files and
machine, a single-threaded PIL/numpy version of the reference PyTorch
pipeline (open, RandomResizedCrop bicubic, flip, ToTensor, Normalize) in a
child process, in `--rounds` chunks alternating with ours, since a shared or
busy machine moves both numbers: compare the ratio, not the figures.
The torchvision original did about 435 images/s on one idle core of the
2-core dev machine on 300-500 px images.
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


def make_jpeg_folder(
    root: str, num_images: int, seed: int = 0, sides: tuple[int, int] = (300, 500)
) -> str:
    """Writes root/<photo>/img_i.jpg crops with both sides in [sides[0], sides[1]] px."""
    from PIL import Image
    from skimage import data

    lo, hi = sides
    if not 16 <= lo <= hi:
        raise ValueError(f"--sides {lo},{hi}: need 16 <= min <= max")
    rng = np.random.default_rng(seed)
    photos = {}
    for name in PHOTOS:
        img = getattr(data, name)()
        img = np.asarray(img[0] if name == "stereo_motorcycle" else img)
        grow = hi / min(img.shape[:2])
        if grow > 1:  # too small for the requested sides: upscale (bicubic)
            size = (round(img.shape[1] * grow), round(img.shape[0] * grow))
            img = np.asarray(Image.fromarray(img).resize(size, Image.BICUBIC))
        photos[name] = img
    for i in range(num_images):
        name = PHOTOS[i % len(PHOTOS)]
        photo = photos[name]
        h = int(rng.integers(lo, min(hi, photo.shape[0]) + 1))
        w = int(rng.integers(lo, min(hi, photo.shape[1]) + 1))
        y = int(rng.integers(0, photo.shape[0] - h + 1))
        x = int(rng.integers(0, photo.shape[1] - w + 1))
        os.makedirs(os.path.join(root, name), exist_ok=True)
        Image.fromarray(photo[y : y + h, x : x + w]).save(
            os.path.join(root, name, f"img_{i:05d}.jpg"), quality=90
        )
    return root


def _pil_transform(image_size: int, seed: int):
    """The reference pipeline's per-image work with PIL/numpy: open + RGB,
    torchvision's RandomResizedCrop (scale 0.2-1, ratio 3/4-4/3, bicubic), flip,
    ToTensor, Normalize. Returns path -> float32 [3, S, S]."""
    import math
    import random

    from PIL import Image

    rnd = random.Random(seed)
    mean = np.array([0.485, 0.456, 0.406], np.float32)
    std = np.array([0.229, 0.224, 0.225], np.float32)

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

    return one


def _pil_worker(conn, folder: str, image_size: int, seed: int = 0) -> None:
    """Child process: for each n received, transforms the next n files (cycling)
    single-threaded and sends back its CPU seconds; None stops it."""
    one = _pil_transform(image_size, seed)
    files = sorted(os.path.join(r, f) for r, _, fs in os.walk(folder) for f in fs)
    k = 0
    while (n := conn.recv()) is not None:
        cpu = time.process_time()
        for _ in range(n):
            one(files[k % len(files)])
            k += 1
        conn.send(time.process_time() - cpu)


class PilBaseline:
    """The PIL/numpy baseline in a child process, run in chunks between ours.

    Its CPU time is its own process's, so nothing of tf.data's background
    threads leaks into it (nor the reverse); alternating chunks expose both to
    the same load on a shared machine.
    """

    def __init__(self, folder: str, image_size: int):
        import multiprocessing

        ctx = multiprocessing.get_context("spawn")
        self._conn, child = ctx.Pipe()
        self._proc = ctx.Process(target=_pil_worker, args=(child, folder, image_size), daemon=True)
        self._proc.start()
        self.images, self.cpu_s = 0, 0.0

    def run(self, n: int, timed: bool = True) -> float:
        """Transforms n images; returns (and, if timed, adds up) their CPU seconds."""
        self._conn.send(n)
        cpu = self._conn.recv()
        if timed:
            self.images += n
            self.cpu_s += cpu
        return cpu

    def close(self):
        self._conn.send(None)
        self._proc.join(timeout=30)


def run(
    folder: str,
    batch_size: int,
    num_batches: int,
    threads: int,
    image_size: int,
    warmup: int,
    antialias: bool = True,
    overrides: dict | None = None,
    baseline_images: int = 0,
    rounds: int = 5,
) -> dict:
    """Times `create_pretrain_iterator` over `num_batches` batches in `rounds`
    chunks; with `baseline_images` > 0 the PIL baseline runs that many images
    in as many chunks between ours.

    Each chunk of ours ends once tf.data's background prefetching has caught up
    (buffers full, as at the start), so the two never run at the same time;
    ours' CPU time is the whole process's over all its chunks, its wall time
    includes the catching up (polled every 0.2 s, so slightly pessimistic).
    """
    from mae_jax import schema
    from mae_jax.data import pipeline, throughput

    if rounds < 1 or num_batches < rounds:
        raise ValueError(f"need 1 <= --rounds ({rounds}) <= --num-batches ({num_batches})")
    cfg = schema.defaults(schema.DATA)
    cfg.source = "folder"
    cfg.path = folder
    cfg.image_size = image_size
    cfg.threads = threads
    cfg.num_parallel_calls = threads
    cfg.antialias = antialias
    cfg.update(overrides or {})
    baseline = PilBaseline(folder, image_size) if baseline_images > 0 else None
    it = pipeline.create_pretrain_iterator(
        cfg, global_batch_size=batch_size, seed=0, process_index=0, process_count=1
    )
    try:
        for _ in range(warmup):
            next(it)
        if baseline is not None:
            baseline.run(20, timed=False)  # warm the file cache and imports
        throughput.wait_idle()
        wall = 0.0
        cpu = 0.0
        for r in range(rounds):
            # each span ends once prefetching caught up, before the baseline runs
            span_wall, span_cpu, batch = throughput.time_batches(
                it, num_batches * (r + 1) // rounds - num_batches * r // rounds
            )
            wall += span_wall
            cpu += span_cpu
            if baseline is not None:
                n = baseline_images * (r + 1) // rounds - baseline_images * r // rounds
                baseline.run(n)
    finally:
        if baseline is not None:
            baseline.close()
    assert batch["image"].shape == (batch_size, image_size, image_size, 3)
    images = batch_size * num_batches
    result = {
        "images": images,
        "threads": threads,
        "image_size": image_size,
        "rounds": rounds,
        "wall_s": round(wall, 3),
        "images_per_s": round(images / wall, 1),
        "images_per_s_per_thread": round(images / wall / threads, 1),
        "images_per_cpu_s": round(images / cpu, 1),
        "skipped": it.skipped,
        "data": {k: cfg.get(k) for k in ("jpeg_dct_method", "jpeg_reduced_scale")}
        | dict(overrides or {}),
    }
    if baseline is not None:
        result["pil_baseline_images"] = baseline.images
        result["pil_baseline_images_per_cpu_s"] = round(baseline.images / baseline.cpu_s, 1)
        result["ratio"] = round(
            result["images_per_cpu_s"] / result["pil_baseline_images_per_cpu_s"], 3
        )
    return result


def parse_override(text: str) -> tuple[str, object]:
    """'key=value' -> (key, value), value parsed as a Python literal when it is one."""
    import ast

    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"--data {text!r}: expected key=value")
    try:
        return key, ast.literal_eval(value)
    except (ValueError, SyntaxError):
        return key, value


def _loadavg() -> str:
    """The 1/5/15-minute load averages (Linux), '' elsewhere: a busy machine skews figures."""
    try:
        with open("/proc/loadavg") as f:
            return " ".join(f.read().split()[:3])
    except OSError:
        return ""


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
        "--sides",
        default="300,500",
        help="MIN,MAX side in px of the generated JPEGs (without --folder)",
    )
    parser.add_argument(
        "--data",
        action="append",
        default=[],
        type=parse_override,
        metavar="KEY=VALUE",
        help="data config override, e.g. jpeg_reduced_scale=False (repeatable)",
    )
    parser.add_argument(
        "--no-baseline", action="store_true", help="skip the single-threaded PIL baseline"
    )
    parser.add_argument(
        "--baseline-images", type=int, default=800, help="images the PIL baseline transforms"
    )
    parser.add_argument(
        "--rounds",
        type=int,
        default=5,
        help="alternate ours and the baseline in this many chunks (same load for both)",
    )
    args = parser.parse_args(argv)
    try:
        sides = tuple(int(v) for v in args.sides.split(","))
    except ValueError:
        sides = ()
    if len(sides) != 2:
        parser.error(f"--sides {args.sides!r}: expected MIN,MAX (two integers)")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    load_start = _loadavg()
    with tempfile.TemporaryDirectory() as tmp:
        folder = args.folder or make_jpeg_folder(
            os.path.join(tmp, "jpegs"), args.num_images, sides=sides
        )
        result = run(
            folder,
            args.batch_size,
            args.num_batches,
            args.threads,
            args.image_size,
            args.warmup,
            bool(args.antialias),
            dict(args.data),
            0 if args.no_baseline else args.baseline_images,
            args.rounds,
        )
    result["folder"] = args.folder or (
        f"generated ({args.num_images} JPEGs, {sides[0]}-{sides[1]} px)"
    )
    result["loadavg"] = f"{load_start} -> {_loadavg()}"
    print(json.dumps(result))
    line = (
        f"mae_jax: {result['images_per_s_per_thread']:.0f} images/s per thread, "
        f"{result['images_per_cpu_s']:.0f} images per CPU-second "
        f"({args.image_size}px, {args.threads} thread(s), antialias={bool(args.antialias)})"
    )
    if "pil_baseline_images_per_cpu_s" in result:
        line += (
            f"; PIL/torchvision-style baseline here: "
            f"{result['pil_baseline_images_per_cpu_s']:.0f} images per CPU-second "
            f"(ratio {result['ratio']:.2f}x)"
        )
    print(line + f"; load average {result['loadavg']}")


if __name__ == "__main__":
    main()
