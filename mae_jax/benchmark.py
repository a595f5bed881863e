"""Throughput benchmark of the real pretraining step on synthetic device-resident data.

  python -m mae_jax.benchmark --config=configs/mae_vit_base.py --config.batch_size=256 \
      [--config.model.name=mae_vit_large_patch16] [--steps 10] [--warmup 2] \
      [--peak_tflops 800] [--json out.json]

Builds the step exactly as training does (`mae_jax.pretrain.plan` for the model and optimizer,
`mae_jax.train_step.build` on the config's mesh), feeds it random normalized images generated
on the devices and sharded over the batch axes (no input pipeline, no TensorFlow), times the
first call (tracing + lowering + XLA compilation + one step), runs `--warmup` steps, then times
`--steps` steps one by one with `block_until_ready`, and prints images/s, step time (median,
min/max, p10/p90), model TFLOP/s (`flops.mae_train_flops_per_image` x images/s), MFU against
`--peak_tflops` or the known per-device peak, peak memory, compile time, device and versions.
The persistent compilation cache (`--config.compilation_cache`, `mae_jax.compile_cache`) is on
by default: a second start loads the step from it and says "cache hit".

On a CPU, pick the number of simulated devices with
`XLA_FLAGS=--xla_force_host_platform_device_count=N` (default 1).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import platform
import resource
import sys
import time
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from mae_jax import aot, compile_cache, flops
from mae_jax import sharding as shd
from mae_jax.tasks import pretrain


def throughput(
    step_times_s: Sequence[float],
    batch_size: int,
    flops_per_image: float,
    num_devices: int,
    peak_tflops: float | None,
) -> dict:
    """Figures from per-step wall times (seconds) of a global batch of `batch_size`.

    images/s uses the median step time. Model TFLOP/s counts the whole mesh; MFU divides the
    per-device rate by `peak_tflops` (per device, dense bf16), or is None when it is unknown.
    """
    t = np.asarray(step_times_s, dtype=np.float64)
    if t.size == 0 or np.any(t <= 0):
        raise ValueError(f"need at least one positive step time, got {list(step_times_s)}")
    if batch_size <= 0 or num_devices <= 0 or flops_per_image <= 0:
        raise ValueError(
            f"batch_size ({batch_size}), num_devices ({num_devices}) and "
            f"flops_per_image ({flops_per_image}) must be positive"
        )
    if peak_tflops is not None and peak_tflops <= 0:
        raise ValueError(f"peak_tflops must be positive, got {peak_tflops}")
    median = float(np.median(t))
    ips = batch_size / median
    tflops = ips * flops_per_image / 1e12
    per_device = tflops / num_devices
    return {
        "step_time_median_s": median,
        "step_time_min_s": float(t.min()),
        "step_time_max_s": float(t.max()),
        "step_time_p10_s": float(np.percentile(t, 10)),
        "step_time_p90_s": float(np.percentile(t, 90)),
        "images_per_sec": ips,
        "images_per_sec_per_device": ips / num_devices,
        "model_tflops": tflops,
        "model_tflops_per_device": per_device,
        "peak_tflops_per_device": peak_tflops,
        "mfu": per_device / peak_tflops if peak_tflops else None,
    }


def peak_memory(devices: Sequence[jax.Device]) -> tuple[int, str]:
    """(bytes, what): the largest `peak_bytes_in_use` over `devices`, or, where devices give no
    memory statistics (CPU), this process's max resident set size."""
    peaks = []
    for d in devices:
        with contextlib.suppress(Exception):  # backends without memory stats (None or raising)
            peaks.append(int(d.memory_stats()["peak_bytes_in_use"]))
    if peaks:
        return max(peaks), f"peak device memory (max over {len(peaks)} devices)"
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    rss *= 1 if sys.platform == "darwin" else 1024  # Linux reports KiB
    return int(rss), "process max RSS (host memory; these devices report no memory stats)"


@dataclasses.dataclass
class Prepared:
    """What `prepare` builds: the plan, mesh and step functions, a fresh train state, a batch of
    synthetic device-resident images and the step key."""

    plan: pretrain.Plan
    mesh: Any
    fns: Any
    state: dict
    batch: dict
    key: jax.Array


def prepare(
    config: ml_collections.ConfigDict,
    total_steps: int,
    devices: Sequence[jax.Device] | None = None,
) -> Prepared:
    """The train step of `config` on its mesh over `devices` (default: all), a fresh state and
    random normalized images, ready to run (nothing compiled yet)."""
    p = pretrain.plan_without_data(config, total_steps)
    mesh = shd.make_mesh(config.mesh, devices)
    pretrain.check_mesh(config, mesh)
    fns = pretrain.step_fns(config, p, mesh)
    state = fns.init()
    c = p.model
    shape = (config.batch_size, c.img_size, c.img_size, c.in_chans)
    images = jax.jit(
        lambda k: jax.random.normal(k, shape, jnp.float32), out_shardings=shd.batch_sharding(mesh)
    )(jax.random.key(config.seed + 1))
    jax.block_until_ready((state, images))
    return Prepared(p, mesh, fns, state, {"image": images}, jax.random.key(config.seed))


def run(
    config: ml_collections.ConfigDict,
    *,
    steps: int = 10,
    warmup: int = 2,
    peak_tflops: float | None = None,
    prepared: Prepared | None = None,
    profile_steps: int = 0,
    profile_dir: str | None = None,
) -> dict:
    """Build the train step for `config` (or take `prepared`, made by `prepare` from the same
    config), run and time it; return every figure as a dict. With `profile_dir`, the
    `profile_steps` steps after the timed ones are traced there (`jax.profiler`: a TensorBoard
    profile run and its `perfetto_trace.json.gz`; `mae_jax.profiler.top_ops` sums it)."""
    if steps < 1:
        raise ValueError(f"--steps must be at least 1, got {steps}")
    if warmup < 0:
        raise ValueError(f"--warmup must be >= 0, got {warmup}")
    pr = prepared or prepare(config, 1 + warmup + steps)
    mesh, fns, state, batch, key = pr.mesh, pr.fns, pr.state, pr.batch, pr.key
    pr.state = None  # donated to the first step
    c = pr.plan.model

    with compile_cache.CompileEvents() as events:
        t0 = time.perf_counter()
        state, metrics = fns.step(state, batch, key)
        jax.block_until_ready((state, metrics))
        first_call = time.perf_counter() - t0
    first_loss = float(jax.device_get(metrics["loss"]))
    for _ in range(warmup):
        state, metrics = fns.step(state, batch, key)
    jax.block_until_ready((state, metrics))
    times = []
    cpu0 = time.process_time()
    for _ in range(steps):
        t0 = time.perf_counter()
        state, metrics = fns.step(state, batch, key)
        jax.block_until_ready((state, metrics))
        times.append(time.perf_counter() - t0)
    cpu_per_step = (time.process_time() - cpu0) / steps
    loss = float(jax.device_get(metrics["loss"]))
    if profile_dir and profile_steps > 0:
        with jax.profiler.trace(profile_dir, create_perfetto_trace=True):
            for _ in range(profile_steps):
                with jax.profiler.StepTraceAnnotation("train"):
                    state, metrics = fns.step(state, batch, key)
                    jax.block_until_ready((state, metrics))

    devices = list(mesh.devices.flat)
    if peak_tflops is None:
        peak_tflops = config.get("peak_tflops") or flops.peak_tflops(devices[0])
    flops_per_image = flops.mae_train_flops_per_image(c)
    mem, mem_what = peak_memory(devices)
    result = {
        "model": c.name,
        **{k: getattr(c, k) for k in ("dtype", "param_dtype", "remat", "scan_layers")},
        **{k: getattr(c, k) for k in ("attention_impl", "norm_pix_loss", "mask_ratio")},
        "global_batch": int(config.batch_size),
        "grad_accum_steps": int(config.grad_accum_steps),
        "mesh": {k: int(v) for k, v in mesh.shape.items()},
        "num_devices": len(devices),
        "backend": jax.default_backend(),
        "device_kind": devices[0].device_kind,
        "jax_version": jax.__version__,
        "host": platform.machine(),
        "steps": steps,
        "warmup": warmup,
        "step_times_s": times,
        "first_call_s": first_call,
        "process_cpu_s_per_step": cpu_per_step,
        "load_average_1min": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        "flops_per_image": flops_per_image,
        "peak_memory_bytes": mem,
        "peak_memory_kind": mem_what,
        "first_loss": first_loss,
        "final_loss": loss,
        "profile_dir": profile_dir if profile_steps > 0 else None,
    }
    result.update(events.summary())
    result.update(throughput(times, config.batch_size, flops_per_image, len(devices), peak_tflops))
    return result


def format_report(r: dict) -> str:
    """Human-readable lines, one figure each (`label: value`)."""
    mfu = (
        f"{100 * r['mfu']:.2f}% (peak {r['peak_tflops_per_device']:g} TFLOP/s per device)"
        if r["mfu"] is not None
        else "n/a (peak unknown; pass --peak_tflops)"
    )
    load = "n/a" if r["load_average_1min"] is None else f"{r['load_average_1min']:.2f}"
    return "\n".join(
        [
            f"model: {r['model']} ({r['dtype']} compute, {r['param_dtype']} params, "
            f"remat={r['remat']}, attention={r['attention_impl'] or 'default'})",
            f"global batch: {r['global_batch']} (grad_accum_steps {r['grad_accum_steps']}) on mesh "
            f"{r['mesh']}",
            f"device: {r['num_devices']} x {r['device_kind']} (backend {r['backend']}, "
            f"jax {r['jax_version']})",
            f"compile: first call {r['first_call_s']:.2f} s (trace {r['trace_s']:.2f} s, lower "
            f"{r['lower_s']:.2f} s, {compile_cache.describe(r)}, plus one step)",
            f"step time: median {r['step_time_median_s'] * 1e3:.1f} ms, min "
            f"{r['step_time_min_s'] * 1e3:.1f} ms, max {r['step_time_max_s'] * 1e3:.1f} ms, p10 "
            f"{r['step_time_p10_s'] * 1e3:.1f} ms, p90 {r['step_time_p90_s'] * 1e3:.1f} ms "
            f"({r['steps']} steps after {r['warmup']} warm-up)",
            f"host: {r['process_cpu_s_per_step']:.3f} CPU-s of this process per step, 1-min load "
            f"average {load} (on a CPU backend, wall times grow with other "
            f"load; CPU-s much less)",
            f"images/s: {r['images_per_sec']:.2f} ({r['images_per_sec_per_device']:.2f} per device)",
            f"model TFLOP/s: {r['model_tflops']:.4f} ({r['model_tflops_per_device']:.4f} per "
            f"device; {r['flops_per_image'] / 1e9:.4g} GFLOP per image per step)",
            f"MFU: {mfu}",
            f"memory: {aot.gib(r['peak_memory_bytes'])} {r['peak_memory_kind']}",
            f"final loss: {r['final_loss']:.4f}",
        ]
    )


# ------------------------------------------------------------------------------ CLI
def _define_flags():
    from absl import flags
    from ml_collections import config_flags

    cfg = config_flags.DEFINE_config_file(
        "config", None, "Pretraining config file.", lock_config=True
    )
    flags.DEFINE_integer("steps", 10, "Timed steps.")
    flags.DEFINE_integer("warmup", 2, "Untimed steps after the first (compiling) call.")
    flags.DEFINE_float(
        "peak_tflops",
        None,
        "Per-device peak TFLOP/s for MFU (default: known per device, else n/a).",
    )
    flags.DEFINE_string("json", None, "Also write every figure as JSON to this path.")
    flags.mark_flags_as_required(["config"])
    return cfg


def main(argv: Sequence[str]) -> None:
    from absl import app, flags

    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    f = flags.FLAGS
    try:
        compile_cache.enable(_CONFIG.value.get("compilation_cache", compile_cache.AUTO))
        result = run(_CONFIG.value, steps=f.steps, warmup=f.warmup, peak_tflops=f.peak_tflops)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        sys.exit(2)
    print(format_report(result), flush=True)
    if f.json:
        with open(f.json, "w") as fh:
            json.dump(result, fh, indent=2, sort_keys=True)


if __name__ == "__main__":
    from absl import app as _app

    _CONFIG: Any = _define_flags()
    _app.run(main)
