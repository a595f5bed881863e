"""The pretraining loop: config checks, init or resume, train steps, metrics, checkpoints.

`train_and_evaluate(config, workdir)` is what `python -m mae_jax.main` runs. Rerunning it on
the same workdir resumes from the latest complete checkpoint (parameters, optimizer state,
step, and the data position; the masking noise is a function of `(seed, step)`).
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Callable
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

TOP_LEVEL_KEYS = frozenset(
    {
        "seed",
        "model",
        "data",
        "batch_size",
        "grad_accum_steps",
        "epochs",
        "warmup_epochs",
        "total_steps",
        "optim",
        "mesh",
        "sharding_rules",
        "checkpoint_every_steps",
        "keep_checkpoints",
        "log_every_steps",
        "reconstruction_every_steps",
        "peak_tflops",
        "knn_every_steps",
        "task",
    }
)
# Model fields that define the parameter shapes: a workdir's checkpoint must agree on them.
ARCHITECTURE_FIELDS = (
    "img_size",
    "patch_size",
    "in_chans",
    "embed_dim",
    "depth",
    "num_heads",
    "decoder_embed_dim",
    "decoder_depth",
    "decoder_num_heads",
    "mlp_ratio",
)


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
        raise ValueError(
            f"config.grad_accum_steps={accum} must be positive and divide "
            f"config.batch_size={config.batch_size}"
        )
    steps_per_epoch = None
    if num_train_examples:
        steps_per_epoch = max(1, num_train_examples // config.batch_size)
    if config.total_steps is not None:
        if config.total_steps <= 0:
            raise ValueError(f"config.total_steps must be positive, got {config.total_steps}")
        total = int(config.total_steps)
        warmup = (
            int(round(config.warmup_epochs / max(config.epochs, 1e-9) * total))
            if config.epochs
            else 0
        )
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
            f"(mesh {dict(mesh.shape)}); change config.batch_size or config.mesh"
        )
    if config.batch_size % jax.process_count():
        raise ValueError(
            f"global batch {config.batch_size} is not divisible by the process "
            f"count {jax.process_count()}"
        )


def check_workdir_model(meta: dict, mcfg: models.MAEConfig, ckpt_dir: str, step: int) -> None:
    saved = meta.get("model") or {}
    diffs = {
        k: (saved.get(k), getattr(mcfg, k))
        for k in ARCHITECTURE_FIELDS
        if saved.get(k) != getattr(mcfg, k)
    }
    if diffs:
        detail = ", ".join(f"{k}: checkpoint {a!r} vs config {b!r}" for k, (a, b) in diffs.items())
        raise ValueError(
            f"the workdir's checkpoint {ckpt_dir} (step {step}) holds another model "
            f"({saved.get('name')!r}: {detail}); use a new --workdir or the matching config"
        )


# ------------------------------------------------------------------------------ state I/O
def _is_var(x) -> bool:
    return isinstance(x, nnx.Variable)


def _strip(tree):
    """Variables -> their values (for Orbax); other leaves unchanged."""
    return jax.tree.map(lambda v: v.get_value() if _is_var(v) else v, tree, is_leaf=_is_var)


def _rewrap(template, values):
    return jax.tree.map(
        lambda v, x: v.replace(x) if _is_var(v) else x, template, values, is_leaf=_is_var
    )


def to_checkpoint(state: dict) -> dict:
    """Train state -> the on-disk layout: `params` a pure nested dict (as the converter and the
    evaluation tools read it), every other entry with its Variables stripped."""
    out = {k: _strip(v) for k, v in state.items() if k != "params"}
    out["params"] = nnx.to_pure_dict(state["params"])
    return out


def abstract_checkpoint(abstract_state: dict, shardings: dict, params_only: bool = False):
    """ShapeDtypeStructs carrying the target shardings, in the on-disk layout."""
    both = jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
        _strip(abstract_state),
        _strip(shardings),
    )
    out = {"params": nnx.to_pure_dict(both["params"])}
    if not params_only:
        out.update({k: v for k, v in both.items() if k != "params"})
    return out


def from_checkpoint(restored: dict, abstract_state: dict) -> dict:
    params = jax.tree.map(lambda x: x, abstract_state["params"])
    nnx.replace_by_pure_dict(params, restored["params"])
    out = {k: _rewrap(abstract_state[k], restored[k]) for k in abstract_state if k != "params"}
    out["params"] = params
    return out


# ------------------------------------------------------------------------------ the loop
def write_config(config, workdir: str) -> None:
    if jax.process_index() != 0:
        return
    os.makedirs(workdir, exist_ok=True)
    tmp = os.path.join(workdir, "config.json.tmp")
    with open(tmp, "w") as f:
        f.write(config.to_json_best_effort(indent=2, sort_keys=True))
    os.replace(tmp, os.path.join(workdir, "config.json"))


@dataclasses.dataclass
class Task:
    """What the generic training loop needs from one kind of training.

    `fns.step(state, batch, key)` takes the global batch (a dict of sharded arrays, from
    `device_keys` of the host batch) and returns `(state, metrics)`; the state is a dict with
    at least `params`, `step` and `nonfinite_step`. `meta()` is stored with every checkpoint;
    `check_meta(meta, step, ckpt_dir)` refuses a workdir of another model. `periodic(writer, state,
    host_batch, step)` may log extras (reconstructions, evaluation) and return scalars.
    """

    name: str
    fns: ts.StepFns
    total_steps: int
    batch_size: int
    make_data: Callable[[int], Any]
    meta: Callable[[], dict]
    check_meta: Callable[[dict, int, str], None]
    device_keys: tuple[str, ...] = ("image",)
    flops_per_image: float | None = None
    periodic: Callable[[Any, dict, dict, int], dict | None] | None = None
    final: Callable[[Any, dict, int], dict | None] | None = None


def run(config: ml_collections.ConfigDict, workdir: str, make_task: Callable[[Any], Task]) -> dict:
    """Init or resume `make_task(mesh)`'s state in `workdir` and train it to the end.

    Common config keys: seed, mesh, checkpoint_every_steps, keep_checkpoints, log_every_steps,
    peak_tflops. Returns the last logged metrics.
    """
    mesh = shd.make_mesh(config.mesh)
    task = make_task(mesh)
    ckpt_dir = os.path.join(workdir, "checkpoints")
    ckpt = checkpointing.Checkpointer(
        ckpt_dir,
        max_to_keep=config.keep_checkpoints,
        save_interval_steps=config.checkpoint_every_steps,
    )
    latest = ckpt.latest_step()
    meta = {}
    if latest is not None:
        meta = ckpt.read_meta(latest)
        task.check_meta(meta, latest, ckpt_dir)
    fns = task.fns
    write_config(config, workdir)

    if latest is None:
        state = fns.init()
        data_position = 0
        logging.info(
            "%s: initialized (%s trainable parameters)", task.name, f"{_count(state['params']):,}"
        )
    else:
        params_only = bool(meta.get("params_only"))
        target = abstract_checkpoint(fns.abstract_state, fns.state_shardings, params_only)
        restored, meta = ckpt.restore(latest, target)
        if params_only:  # an imported checkpoint: fresh optimizer, step 0
            state = fns.init()
            nnx.replace_by_pure_dict(state["params"], restored["params"])
            data_position = 0
            logging.info("starting from imported parameters (%s)", meta.get("source"))
        else:
            state = from_checkpoint(restored, fns.abstract_state)
            data_position = int(meta.get("data_position", latest))
            logging.info("resumed from step %d (data position %d)", latest, data_position)
    start = int(jax.device_get(state["step"]))

    if jax.process_index() == 0:  # drop lines of steps after the checkpoint, before appending
        metrics.truncate_after(workdir, start)
    writer = metrics.MetricsWriter(
        workdir, is_primary=jax.process_index() == 0, total_steps=task.total_steps
    )
    writer.write_config(config)
    data = task.make_data(data_position)
    key = jax.random.key(config.seed)
    peak = config.get("peak_tflops") or flops.peak_tflops()
    last_good = latest
    last: dict = {}
    t_last, step_last = time.perf_counter(), start
    logging.info(
        "%s: steps %d..%d on mesh %s", task.name, start, task.total_steps, dict(mesh.shape)
    )

    def save(step, force=False):
        return ckpt.save(
            step,
            to_checkpoint(state),
            {
                **task.meta(),
                "data_position": data.position,
                "seed": config.seed,
                "step": step,
                "skipped_images": data.skipped,
            },
            force=force,
        )

    try:
        for step in range(start, task.total_steps):
            batch = next(data)
            arrays = {k: shd.global_batch(batch[k], mesh) for k in task.device_keys}
            state, m = fns.step(state, arrays, key)
            done = step + 1
            is_log = done % config.log_every_steps == 0 or done == task.total_steps or done == 1
            wants_save = ckpt.should_save(done) or done == task.total_steps
            if is_log or wants_save:
                bad = int(jax.device_get(state["nonfinite_step"]))
                if bad >= 0:
                    raise TrainingError(
                        f"non-finite loss at step {bad}; stopping. The last good checkpoint is "
                        f"step {last_good} in {ckpt_dir}"
                        if last_good is not None
                        else f"non-finite loss at step {bad}; stopping (no checkpoint was saved yet)"
                    )
            values = {}
            if is_log:
                values = {k: float(v) for k, v in jax.device_get(m).items()}
                now = time.perf_counter()
                ips = (done - step_last) * task.batch_size / max(now - t_last, 1e-9)
                t_last, step_last = now, done
                values.update(images_per_sec=ips, skipped_images=data.skipped)
                if task.flops_per_image:
                    values["tflops_per_device"] = (
                        ips * task.flops_per_image / 1e12 / jax.device_count()
                    )
                    if peak:
                        values["mfu"] = values["tflops_per_device"] / peak
            if task.periodic is not None:
                values.update(task.periodic(writer, state, batch, done) or {})
            if task.final is not None and done == task.total_steps:
                values.update(task.final(writer, state, done) or {})
            if values:
                writer.write_scalars(done, values)
                last = {"step": done, **values}
            if wants_save:
                if save(done, force=done == task.total_steps or ckpt.preemption_requested):
                    last_good = done
            if ckpt.preemption_requested:
                logging.warning("preemption notice: saved step %d, exiting", done)
                break
    finally:
        ckpt.wait()
        ckpt.close()
        writer.close()
    return last


def pretrain_step_fns(config, p: Plan, mesh) -> ts.StepFns:
    """The jitted, sharded MAE train step of `config` (resolved as `p`) on `mesh`."""
    tx = optim.create_optimizer(p.optim)
    lr_fn = optim.learning_rate_fn(p.optim)
    rules = (
        tuple(tuple(r) for r in config.sharding_rules)
        if config.get("sharding_rules")
        else shd.DEFAULT_RULES
    )
    return ts.build(
        lambda: models.create(p.model, seed=config.seed),
        tx,
        lr_fn,
        mesh,
        accum_steps=config.grad_accum_steps,
        rules=rules,
    )


def pretrain_task(config, mesh) -> Task:
    """The MAE pretraining task of `config` on `mesh` (validated before anything compiles)."""
    info = input_pipeline.dataset_info(config.data)
    p = plan(config, info.num_train_examples if info else None)
    check_mesh(config, mesh)
    fns = pretrain_step_fns(config, p, mesh)

    def periodic(writer, state, batch, step):
        every = config.reconstruction_every_steps
        if every and step % every == 0:
            _log_reconstruction(writer, fns, state, batch, p.model, step)
        return None

    return Task(
        name=f"pretrain {p.model.name}",
        fns=fns,
        total_steps=p.total_steps,
        batch_size=config.batch_size,
        make_data=lambda start: input_pipeline.create_pretrain_iterator(
            config.data, global_batch_size=config.batch_size, seed=config.seed, start_step=start
        ),
        meta=lambda: {"model": dataclasses.asdict(p.model), "task": "pretrain"},
        check_meta=lambda meta, step, ckpt_dir: check_workdir_model(meta, p.model, ckpt_dir, step),
        flops_per_image=flops.mae_train_flops_per_image(p.model),
        periodic=periodic,
    )


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
    """Pretrain MAE as `config` says, in `workdir`. Returns the last logged metrics."""
    return run(config, workdir, lambda mesh: pretrain_task(config, mesh))


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
