"""MAE pretraining as a `train.Task`: the plan of a pretraining config, the sharded MAE train
step, reconstruction pictures in TensorBoard and the kNN monitor (`evaluate.knn_monitor`).

`python -m mae_jax.main --config=configs/mae_vit_base.py --workdir=DIR` runs
`train_and_evaluate`; rerunning it on the same workdir resumes (see `mae_jax.train.run`).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import ml_collections
from absl import logging
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from mae_jax import flops, init_from, models, optim, schema, train, visualize
from mae_jax import sharding as shd
from mae_jax import train_step as ts
from mae_jax.data import pipeline
from mae_jax.evaluate import knn_monitor


@dataclasses.dataclass(frozen=True)
class Plan:
    """Resolved numbers of a pretraining run: the model and the common plan."""

    model: models.MAEConfig
    run: train.Plan
    knn: knn_monitor.Settings


def plan_without_data(config, total_steps: int) -> Plan:
    """The plan of `config` for a program that reads no data set (the benchmark, the AOT
    compile): epoch-based counts cannot be resolved, so `total_steps` (unless the config sets
    it), no warm-up (unless set in steps) and no milestones stand in for them."""
    c = ml_collections.ConfigDict(config.to_dict())
    c.total_steps = c.total_steps or total_steps
    for p in schema.PERIODS:  # periods in epochs: off
        if p.epochs_key in c:
            c[p.epochs_key] = None
    return plan(c, None)


def plan(
    config,
    num_train_examples: int | None,
    resume: train.Resume = None,
    where: str = "",
    info=None,
) -> Plan:
    """Validate `config` and resolve the model, steps, optimizer and kNN monitor (nothing
    compiled). `resume`: the workdir's newest checkpoint `(step, meta)`, whose schedule a rerun
    continues. `info`: `pipeline.dataset_info(config.data)` (caps the kNN bank and queries at
    the splits' sizes), None when no data set is read."""
    run_plan = train.plan(config, num_train_examples, resume, where)
    accum = config.grad_accum_steps
    if config.batch_size % accum:
        raise ValueError(
            f"config.grad_accum_steps={accum!r} does not divide config.batch_size="
            f"{config.batch_size}"
        )
    every = run_plan.periods["knn_every_steps"]
    knn = knn_monitor.settings(config, info, config.batch_size // accum, every)
    return Plan(models.resolve(config.model), run_plan, knn)


def check_mesh(config, mesh) -> None:
    micro = config.batch_size // config.grad_accum_steps
    train.check_batches(
        mesh,
        {
            "config.batch_size": config.batch_size,
            "the micro-batch config.batch_size / config.grad_accum_steps": micro,
        },
    )


def check_workdir_model(meta: dict, mcfg: models.MAEConfig, where: str, step: int) -> None:
    """Refuse a checkpoint of another architecture; warn when storage dtypes differ."""
    saved = meta.get("model") or {}
    diffs = {
        k: (saved.get(k), getattr(mcfg, k))
        for k in models.ARCHITECTURE_FIELDS
        if saved.get(k) != getattr(mcfg, k)
    }
    if diffs:
        detail = ", ".join(f"{k}: checkpoint {a!r} vs config {b!r}" for k, (a, b) in diffs.items())
        raise ValueError(
            f"the workdir's checkpoint {where} (step {step}) holds another model "
            f"({saved.get('name')!r}: {detail}); use a new --workdir or the matching config"
        )
    if saved.get("param_dtype") not in (None, mcfg.param_dtype):
        logging.warning(
            "checkpoint %d was trained with param_dtype %s, the config asks for %s: the "
            "parameters are converted to %s",
            step,
            saved["param_dtype"],
            mcfg.param_dtype,
            mcfg.param_dtype,
        )


def _loss(graphdef, rest, params, images, noise):
    return nnx.merge(graphdef, params, rest)(images, noise=noise).loss


def compute_grads(graphdef, rest, params, images, noise, accum_steps: int, mesh: Mesh | None):
    """Mean loss and gradients over the batch, in `accum_steps` sequential micro-batches.

    All samples mask the same number of patches, so the mean of the micro-batch losses
    (and gradients) equals the full-batch loss (and gradient).
    """
    grad_fn = jax.value_and_grad(lambda p, x, z: _loss(graphdef, rest, p, x, z))
    if accum_steps == 1:
        return grad_fn(params, images, noise)
    n = images.shape[0]
    micro = n // accum_steps

    def split(x):
        x = x.reshape((accum_steps, micro) + x.shape[1:])
        if mesh is not None:
            x = jax.lax.with_sharding_constraint(x, NamedSharding(mesh, P(None, shd.BATCH_AXES)))
        return x

    def body(carry, xs):
        loss_sum, grad_sum = carry
        loss, grads = grad_fn(params, *xs)
        return (loss_sum + loss, jax.tree.map(jnp.add, grad_sum, grads)), None

    zeros = jax.tree.map(jnp.zeros_like, params)
    (loss_sum, grad_sum), _ = jax.lax.scan(
        body, (jnp.zeros((), jnp.float32), zeros), (split(images), split(noise))
    )
    return loss_sum / accum_steps, jax.tree.map(lambda g: g / accum_steps, grad_sum)


def mae_step(
    state: dict,
    batch: dict,
    key: jax.Array,
    *,
    graphdef,
    rest,
    tx,
    lr_fn,
    num_patches: int,
    accum_steps: int = 1,
    mesh: Mesh | None = None,
) -> tuple[dict, dict]:
    """One optimizer update on the global batch `batch['image'] [B, H, W, C]` (normalized NHWC).

    The masking noise `[B, L]` is drawn on device from `fold_in(key, step)`, so a run is
    reproducible from `(seed, step)` alone and no host round-trip happens inside the step."""
    images = batch["image"]
    noise = jax.random.uniform(
        jax.random.fold_in(key, state["step"]), (images.shape[0], num_patches), jnp.float32
    )
    if mesh is not None:
        noise = jax.lax.with_sharding_constraint(noise, shd.batch_sharding(mesh))
    loss, grads = compute_grads(graphdef, rest, state["params"], images, noise, accum_steps, mesh)
    return ts.apply_gradients(state, loss, grads, tx, lr_fn)


def step_fns(config, p: Plan, mesh) -> ts.StepFns:
    """The jitted, sharded MAE train step of `config` (resolved as `p`) on `mesh`."""
    return build_step(
        p.model,
        p.run.optim,
        p.run.lr_fn,
        mesh,
        seed=config.seed,
        accum_steps=config.grad_accum_steps,
        rules=shd.rules(config.get("sharding_rules")),
        global_pool=p.knn.global_pool,
    )


def build_step(
    model,
    optim_config,
    lr_fn,
    mesh,
    *,
    seed: int = 0,
    accum_steps: int = 1,
    rules=shd.DEFAULT_RULES,
    global_pool: bool = False,
):
    """`train_step.build` for the MAE `model` (a preset name or an `MAEConfig`, initialized from
    `seed`) under the optimizer of `optim_config` at the learning rate `lr_fn` (an
    `optim.Schedule`: `train.Plan.lr_fn`, also logged); the eval program is the kNN monitor's
    feature forward (`knn_monitor.feature_step`, features pooled as `global_pool` says) on
    `{'image', 'label', 'mask'}`."""
    model = models.resolve(model)
    return ts.build(
        lambda: models.create(model, seed=seed),
        functools.partial(optim.create_optimizer, optim_config),
        lr_fn,
        mesh,
        step_fn=functools.partial(
            mae_step,
            num_patches=model.num_patches,
            accum_steps=accum_steps,
            mesh=mesh,
        ),
        eval_fn=functools.partial(knn_monitor.feature_step, global_pool=global_pool),
        eval_keys=("image", "label", "mask"),
        rules=rules,
    )


def checkpoint_meta(p: Plan) -> dict:
    """What every pretraining checkpoint records besides the state (the loop adds the step,
    seed and data position): the model config, the task and the schedule."""
    return {"model": dataclasses.asdict(p.model), "task": "pretrain", "schedule": p.run.schedule}


def task(config, mesh, resume: train.Resume = None, where: str = "") -> train.Task:
    """The MAE pretraining task of `config` on `mesh` (validated before anything compiles)."""
    info = pipeline.dataset_info(config.data)
    p = plan(config, info.num_train_examples if info else None, resume, where, info)
    check_mesh(config, mesh)
    if p.knn.every_steps:
        train.check_batches(mesh, {"config.knn_batch_size": p.knn.batch_size})
    source = init_from.locate(config.get("init_from"))
    if resume is None:  # a resumed run's weights come from its own checkpoint
        init_from.check_pretraining_source(source, p.model)
    fns = step_fns(config, p, mesh)

    def init():
        state = fns.init()
        if source is not None:
            keys = init_from.wanted_keys(source, list(nnx.to_pure_dict(state["params"])))
            state = init_from.load(state, fns.state_shardings, source, keys, p.model)
        return state

    def knn(writer, state, batch, step, should_stop):
        result = knn_monitor.evaluate(fns, state, config.data, p.knn, mesh, should_stop)
        return knn_monitor.log(result, p.knn, step)

    def reconstruct(writer, state, batch, step, should_stop):
        if not (should_stop and should_stop()):
            _log_reconstruction(writer, fns, state, batch, p.model, step)

    return train.Task(
        name=f"pretrain {p.model.name}",
        fns=fns,
        init=init,
        total_steps=p.run.total_steps,
        batch_size=config.batch_size,
        make_data=lambda start, should_stop=None: pipeline.create_pretrain_iterator(
            config.data,
            global_batch_size=config.batch_size,
            seed=config.seed,
            start_step=start,
            should_stop=should_stop,
        ),
        meta=lambda: checkpoint_meta(p),
        check_meta=lambda meta, step: check_workdir_model(meta, p.model, where, step),
        resolved=train.resolved_config(config, p.run),
        flops_per_image=flops.mae_train_flops_per_image(p.model),
        periodic=(
            (p.run.periods["reconstruction_every_steps"], reconstruct),
            (p.knn.every_steps, knn),
        ),
    )


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
    """Pretrain MAE as `config` says, in `workdir`. Returns the last logged metrics."""
    return train.run(config, workdir, lambda mesh, resume: task(config, mesh, resume, workdir))


def _log_reconstruction(writer, fns, state, batch, mcfg, step):
    """Reconstruction grid of the first images of the batch into TensorBoard.

    Called by every process (parameters sharded across processes are gathered first); only
    process 0 then runs the model, on its own devices, and writes the grid."""
    params, rest = shd.process_local(state["params"]), shd.process_local(fns.rest)
    if jax.process_index() != 0:
        return
    model = nnx.merge(fns.graphdef, params, rest)
    images = jnp.asarray(batch["image"][:4])
    grid = visualize.reconstruction_grid(model, images, key=jax.random.key(step))
    writer.write_images(step, {"reconstruction": grid})
