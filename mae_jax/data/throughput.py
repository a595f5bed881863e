"""Cost of the input pipeline on this host: images per CPU-second of a batch iterator.

tf.data decodes in background threads that keep prefetching after a batch is handed over, so a
timed span of batches ends only once those threads are idle again (buffers full, as at its
start), and its cost is the whole process's CPU time over the span. Used by the preflight
(`mae_jax.preflight`) and `benchmarks/input_pipeline.py`.
"""

from __future__ import annotations

import time
from collections.abc import Iterator


def wait_idle(max_s: float = 5.0, poll_s: float = 0.2) -> None:
    """Return once this process has used (almost) no CPU for `poll_s` seconds (background
    prefetching caught up), or after `max_s` seconds."""
    deadline = time.perf_counter() + max_s
    last = time.process_time()
    while time.perf_counter() < deadline:
        time.sleep(poll_s)
        now = time.process_time()
        if now - last < 0.01:
            return
        last = now


def time_batches(it: Iterator[dict], num_batches: int) -> tuple[float, float, dict]:
    """Read `num_batches` batches of `it`, then wait until prefetching is idle; returns
    `(wall seconds, process CPU seconds, the last batch)` of the span (the wait included, polled
    every 0.2 s, so slightly pessimistic). Call `wait_idle()` once before the first span."""
    if num_batches < 1:
        raise ValueError(f"need at least one batch to time, got {num_batches}")
    start, start_cpu = time.perf_counter(), time.process_time()
    for _ in range(num_batches):
        batch = next(it)
    wait_idle()
    return time.perf_counter() - start, time.process_time() - start_cpu, batch


def cores_needed(images_per_sec: float, images_per_cpu_s: float) -> float:
    """Host CPU cores the input pipeline needs to deliver `images_per_sec` at a measured cost of
    `images_per_cpu_s` (one core gives one CPU-second per second)."""
    if images_per_cpu_s <= 0:
        raise ValueError(f"images per CPU-second must be positive, got {images_per_cpu_s}")
    return images_per_sec / images_per_cpu_s
