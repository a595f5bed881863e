"""The pretraining loop: config checks, init or resume, train steps, metrics, checkpoints.

`train_and_evaluate(config, workdir)` is what `python -m mae_jax.main` runs. Rerunning it on
the same workdir resumes from the latest complete checkpoint (parameters, optimizer state,
step, and the data position; the masking noise is a function of `(seed, step)`).
"""
from __future__ import annotations

import dataclasses
import json
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from flax import nnx

from mae_jax import checkpointing, flops, input_pipeline, metrics, models, optim
from mae_jax import sharding as shd
from mae_jax import train_step as ts

TOP_LEVEL_KEYS = frozenset({
    "seed", "model", "data", "batch_size", "grad_accum_steps", "epochs", "warmup_epochs",
    "total_steps", "optim", "mesh", "sharding_rules", "checkpoint_every_steps",
    "keep_checkpoints", "log_every_steps", "reconstruction_every_steps", "peak_tflops",
    "knn_every_steps",
})
# Model fields that define the parameter shapes: a workdir's checkpoint must agree on them.
ARCHITECTURE_FIELDS = ("img_size", "patch_size", "in_chans", "embed_dim", "depth", "num_heads",
                       "decoder_embed_dim", "decoder_depth", "decoder_num_heads", "mlp_ratio")


class TrainingError(RuntimeError):
    """A run that cannot continue (non-finite loss, mismatched workdir)."""


@dataclasses.dataclass(frozen=True)
class Plan:
    """Resolved numbers of a run."""
    model: models.MAEConfig
    total_steps: int
    warmup_steps: int
    steps_per_epoch: int | None
    optim: ml_collections.ConfigDict


def model_config(config) -> models.MAEConfig:
    return models.resolve(config.model)


def plan(config, num_train_examples: int | None) -> Plan:
    """Validate `config` and resolve step counts and the optimizer config (no compilation)."""
    unknown = sorted(set(config.keys()) - TOP_LEVEL_KEYS)
    if unknown:
        raise ValueError(f"unknown config key(s) {unknown}; known keys: {sorted(TOP_LEVEL_KEYS)}")
    mcfg = model_config(config)
    if config.batch_size <= 0:
        raise ValueError(f"config.batch_size must be positive, got {config.batch_size}")
    accum = config.grad_accum_steps
    if accum <= 0 or config.batch_size % accum:
        raise ValueError(f"config.grad_accum_steps={accum} must be positive and divide "
                         f"config.batch_size={config.batch_size}")
    steps_per_epoch = None
    if num_train_examples:
        steps_per_epoch = max(1, num_train_examples // config.batch_size)
    if config.total_steps is not None:
        if config.total_steps <= 0:
            raise ValueError(f"config.total_steps must be positive, got {config.total_steps}")
        total = int(config.total_steps)
        warmup = int(round(config.warmup_epochs / max(config.epochs, 1e-9) * total)) \
            if config.epochs else 0
    else:
        if steps_per_epoch is None:
            raise ValueError("the data set size is unknown: set config.total_steps")
        total = int(config.epochs * steps_per_epoch)
        warmup = int(config.warmup_epochs * steps_per_epoch)
    warmup = min(warmup, total)
    oc = ml_collections.ConfigDict(config.optim.to_dict())
    oc.batch_size = config.batch_size
    oc.total_steps = total
    oc.warmup_steps = warmup
    optim.learning_rate_fn(oc)  # validates the optimizer config
    return Plan(mcfg, total, warmup, steps_per_epoch, oc)


def check_mesh(config, mesh) -> None:
    dp = shd.data_parallel_size(mesh)
    per_step = config.batch_size // config.grad_accum_steps
    if per_step % dp:
        raise ValueError(
            f"global batch {config.batch_size} (micro-batch {per_step} with grad_accum_steps="
            f"{config.grad_accum_steps}) is not divisible by the data-parallel size {dp} "
            f"(mesh {dict(mesh.shape)}); change config.batch_size or config.mesh")
    if config.batch_size % jax.process_count():
        raise ValueError(f"global batch {config.batch_size} is not divisible by the process "
                         f"count {jax.process_count()}")


def check_workdir_model(meta: dict, mcfg: models.MAEConfig, ckpt_dir: str, step: int) -> None:
    saved = meta.get("model") or {}
    diffs = {k: (saved.get(k), getattr(mcfg, k)) for k in ARCHITECTURE_FIELDS
             if saved.get(k) != getattr(mcfg, k)}
    if diffs:
        detail = ", ".join(f"{k}: checkpoint {a!r} vs config {b!r}" for k, (a, b) in diffs.items())
        raise ValueError(
            f"the workdir's checkpoint {ckpt_dir} (step {step}) holds another model "
            f"({saved.get('name')!r}: {detail}); use a new --workdir or the matching config")


# ------------------------------------------------------------------------------ state I/O
def _strip(tree):
    """Variables -> their values (for Orbax); other leaves unchanged."""
    return jax.tree.map(lambda v: v.get_value() if isinstance(v, nnx.Variable) else v, tree,
                        is_leaf=lambda x: isinstance(x, nnx.Variable))


def _rewrap(template, values):
    return jax.tree.map(lambda v, x: v.replace(x) if isinstance(v, nnx.Variable) else x,
                        template, values, is_leaf=lambda x: isinstance(x, nnx.Variable))


def to_checkpoint(state: dict) -> dict:
    """Train state -> the on-disk layout: `params` a pure nested dict (as the converter and the
    evaluation tools read it), the rest with Variables stripped."""
    return {"params": nnx.to_pure_dict(state["params"]),
            "opt_state": _strip(state["opt_state"]),
            "step": state["step"], "nonfinite_step": state["nonfinite_step"]}


def abstract_checkpoint(abstract_state: dict, shardings: dict, params_only: bool = False):
    """ShapeDtypeStructs carrying the target shardings, in the on-disk layout."""
    def sds(a, s):
        return jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s)

    both = jax.tree.map(lambda a, s: sds(a, s), _strip(abstract_state), _strip(shardings))
    params = nnx.to_pure_dict(both["params"])
    if params_only:
        return {"params": params}
    return {"params": params, "opt_state": both["opt_state"], "step": both["step"],
            "nonfinite_step": both["nonfinite_step"]}


def from_checkpoint(restored: dict, abstract_state: dict) -> dict:
    params = jax.tree.map(lambda x: x, abstract_state["params"])
    nnx.replace_by_pure_dict(params, restored["params"])
    return {"params": params,
            "opt_state": _rewrap(abstract_state["opt_state"], restored["opt_state"]),
            "step": restored["step"], "nonfinite_step": restored["nonfinite_step"]}


# ------------------------------------------------------------------------------ the loop
def write_config(config, workdir: str) -> None:
    if jax.process_index() != 0:
        return
    os.makedirs(workdir, exist_ok=True)
    tmp = os.path.join(workdir, "config.json.tmp")
    with open(tmp, "w") as f:
        f.write(config.to_json_best_effort(indent=2, sort_keys=True))
    os.replace(tmp, os.path.join(workdir, "config.json"))


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
    """Pretrain MAE as `config` says, in `workdir`. Returns the last logged metrics."""
    info = input_pipeline.dataset_info(config.data)
    p = plan(config, info.num_train_examples if info else None)
    mesh = shd.make_mesh(config.mesh)
    check_mesh(config, mesh)
    ckpt_dir = os.path.join(workdir, "checkpoints")
    ckpt = checkpointing.Checkpointer(ckpt_dir, max_to_keep=config.keep_checkpoints,
                                      save_interval_steps=config.checkpoint_every_steps)
    latest = ckpt.latest_step()
    meta = {}
    if latest is not None:
        meta = ckpt.read_meta(latest)
        check_workdir_model(meta, p.model, ckpt_dir, latest)

    tx = optim.create_optimizer(p.optim)
    lr_fn = optim.learning_rate_fn(p.optim)
    rules = tuple(tuple(r) for r in config.sharding_rules) if config.get("sharding_rules") \
        else shd.DEFAULT_RULES
    fns = ts.build(lambda: models.create(p.model, seed=config.seed), tx, lr_fn, mesh,
                   accum_steps=config.grad_accum_steps, rules=rules)
    write_config(config, workdir)

    if latest is None:
        state = fns.init()
        data_position = 0
        logging.info("initialized %s (%s trainable parameters)", p.model.name,
                     f"{_count(state['params']):,}")
    else:
        params_only = bool(meta.get("params_only"))
        target = abstract_checkpoint(fns.abstract_state, fns.state_shardings, params_only)
        restored, meta = ckpt.restore(latest, target)
        if params_only:  # an imported checkpoint: fresh optimizer, step 0
            fresh = fns.init()
            nnx.replace_by_pure_dict(fresh["params"], restored["params"])
            state, data_position = fresh, 0
            logging.info("starting from imported parameters (%s)", meta.get("source"))
        else:
            state = from_checkpoint(restored, fns.abstract_state)
            data_position = int(meta.get("data_position", latest))
            logging.info("resumed from step %d (data position %d)", latest, data_position)
    start = int(jax.device_get(state["step"]))

    if jax.process_index() == 0:  # drop lines of steps after the checkpoint, before appending
        metrics.truncate_after(workdir, start)
    writer = metrics.MetricsWriter(workdir, is_primary=jax.process_index() == 0,
                                   total_steps=p.total_steps)
    writer.write_config(config)
    data = input_pipeline.create_pretrain_iterator(
        config.data, global_batch_size=config.batch_size, seed=config.seed,
        start_step=data_position)
    key = jax.random.key(config.seed)
    flops_per_image = flops.mae_train_flops_per_image(p.model)
    peak = config.get("peak_tflops") or flops.peak_tflops()
    last_good = latest
    last: dict = {}
    t_last, step_last = time.perf_counter(), start
    logging.info("training steps %d..%d on mesh %s", start, p.total_steps, dict(mesh.shape))

    def save(step, force=False):
        ok = ckpt.save(step, to_checkpoint(state), {
            "model": dataclasses.asdict(p.model), "data_position": data.position,
            "seed": config.seed, "step": step, "skipped_images": data.skipped}, force=force)
        return ok

    try:
        for step in range(start, p.total_steps):
            batch = next(data)
            images = shd.global_batch(batch["image"], mesh)
            state, m = fns.step(state, images, key)
            done = step + 1
            is_log = done % config.log_every_steps == 0 or done == p.total_steps or done == 1
            wants_save = ckpt.should_save(done) or done == p.total_steps
            if is_log or wants_save:
                bad = int(jax.device_get(state["nonfinite_step"]))
                if bad >= 0:
                    raise TrainingError(
                        f"non-finite loss at step {bad}; stopping. The last good checkpoint is "
                        f"step {last_good} in {ckpt_dir}" if last_good is not None else
                        f"non-finite loss at step {bad}; stopping (no checkpoint was saved yet)")
            if is_log:
                values = {k: float(v) for k, v in jax.device_get(m).items()}
                now = time.perf_counter()
                ips = (done - step_last) * config.batch_size / max(now - t_last, 1e-9)
                t_last, step_last = now, done
                values.update(images_per_sec=ips, skipped_images=data.skipped,
                              tflops_per_device=ips * flops_per_image / 1e12 / jax.device_count())
                if peak:
                    values["mfu"] = values["tflops_per_device"] / peak
                writer.write_scalars(done, values)
                last = {"step": done, **values}
            if config.reconstruction_every_steps and done % config.reconstruction_every_steps == 0:
                _log_reconstruction(writer, fns, state, batch, p.model, done)
            if wants_save:
                if save(done, force=done == p.total_steps or ckpt.preemption_requested):
                    last_good = done
            if ckpt.preemption_requested:
                logging.warning("preemption notice: saved step %d, exiting", done)
                break
    finally:
        ckpt.wait()
        ckpt.close()
        writer.close()
    return last


def _count(params) -> int:
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))


def _process_local(tree):
    """Global arrays -> arrays this process holds alone: a replicated array's local copy, a
    sharded one gathered to numpy (a collective: every process must call this together)."""
    from jax.experimental import multihost_utils

    def one(x):
        if not isinstance(x, jax.Array) or x.is_fully_addressable:
            return x
        if x.is_fully_replicated:
            return x.addressable_data(0)
        return multihost_utils.process_allgather(x, tiled=True)

    return jax.tree.map(one, tree)


def _log_reconstruction(writer, fns, state, batch, mcfg, step):
    """Reconstruction grid of the first images of the batch into TensorBoard.

    Called by every process (parameters sharded across processes are gathered first); only
    process 0 then runs the model, on its own devices, and writes the grid."""
    params, rest = _process_local(state["params"]), _process_local(fns.rest)
    if jax.process_index() != 0:
        return
    try:
        from mae_jax import visualize
    except ImportError:  # pragma: no cover - visualize is part of the package
        return
    model = nnx.merge(fns.graphdef, params, rest)
    images = jnp.asarray(batch["image"][:4])
    grid = visualize.reconstruction_grid(model, images, key=jax.random.key(step))
    writer.write_images(step, {"reconstruction": grid})
