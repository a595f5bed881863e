"""What linear probing and fine-tuning share: the sharded classification train step, evaluation,
loading a pretrained encoder, config checks, and the `train.Task` both run through `train.run`.

The train state is a dict (checkpointed and restored generically by `train.run`):
  params          nnx.State of the trainable `nnx.Param`s (fine-tuning: all of them; linear
                  probing: the head's only)
  frozen          (linear probing) the other Params, i.e. the encoder: never updated, but kept
                  in the state so a run's checkpoints are self-contained
  batch_stats     (linear probing) the head's BatchNorm running mean/var (`nnx.BatchStat`),
                  updated by the step
  opt_state, step (int32), nonfinite_step (int32, -1 = none yet)
Every entry is sharded by its variables' `logical_axes` (`mae_jax.sharding.state_shardings`).
The graph and the remaining variables (the fixed position table, drop-path RNG streams) are
passed separately, as in pretraining (`StepFns.graphdef`, `StepFns.rest`).

Randomness of step `t` comes from `fold_in(key, t)` only (mixup/cutmix and drop path), so a
resumed run is the same as an uninterrupted one.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging
from flax import nnx

from mae_jax import init_from, models, optim, schema, train
from mae_jax import sharding as shd
from mae_jax import train_step as ts
from mae_jax import workdir as wdir
from mae_jax.data import pipeline
from mae_jax.data.mixup import soft_target_cross_entropy
from mae_jax.evaluate.metrics import topk_correct
from mae_jax.models.classifier import ENCODER_KEYS, Head, ViTClassifier, from_head

# prepare(key, images [B,H,W,C], labels [B] int) -> (images [B,H,W,C], targets [B,C] float32)
Prepare = Callable[[jax.Array, jax.Array, jax.Array], tuple[jax.Array, jax.Array]]

_DROP_PATH_TAG = 1  # fold_in tags of the per-step key
_PREPARE_TAG = 2


# ----------------------------------------------------------------------------- step functions
def split_classifier(model: ViTClassifier, trainable: nnx.filterlib.Filter):
    """`model` -> `(graphdef, parts, rest)`: `parts` maps 'params' (the `trainable` Params),
    'frozen' (the other Params) and 'batch_stats' (BatchStats) to `nnx.State`s, empty ones left
    out; `rest` holds everything else (fixed tables, RNG streams)."""
    graphdef, params, frozen, stats, rest = nnx.split(
        model, trainable, nnx.Param, nnx.BatchStat, ...
    )
    optional = {"frozen": frozen, "batch_stats": stats}
    parts = {"params": params, **{k: v for k, v in optional.items() if jax.tree.leaves(v)}}
    return graphdef, parts, rest


def _merge(graphdef, state: dict, rest, params=None):
    parts = [state["params"] if params is None else params]
    parts += [state[k] for k in ("frozen", "batch_stats") if k in state]
    return nnx.merge(graphdef, *parts, rest, copy=True)


def loss_and_grads(
    state: dict,
    images: jax.Array,
    targets: jax.Array,
    drop_key: jax.Array,
    *,
    graphdef,
    rest,
    drop_path: bool,
):
    """`((loss, (logits, batch_stats or None)), grads)` of the soft-target cross-entropy of
    `images [B, H, W, C]` against `targets [B, C]`, w.r.t. `state['params']` only; the model
    runs in training mode (drop path from `drop_key`, BatchNorm on batch statistics)."""

    def loss_fn(params):
        model = _merge(graphdef, state, rest, params)
        if drop_path:
            nnx.reseed(model, dropout=drop_key, policy="match_shape")  # stacked: a key per block
        logits = model(images, train=True)
        stats = nnx.state(model, nnx.BatchStat) if "batch_stats" in state else None
        return soft_target_cross_entropy(logits, targets), (logits, stats)

    return jax.value_and_grad(loss_fn, has_aux=True)(state["params"])


def train_step(
    state: dict,
    batch: dict,
    key: jax.Array,
    *,
    graphdef,
    rest,
    tx: optax.GradientTransformation,
    lr_fn,
    prepare: Prepare,
    drop_path: bool,
) -> tuple[dict, dict]:
    """One update on the global batch: `batch['image'] [B, H, W, C]` normalized NHWC,
    `batch['label'] [B]` int.

    `prepare` turns labels into soft targets (mixup/cutmix/label smoothing) with its own key;
    the loss is the soft-target cross-entropy. BatchNorm statistics (if any) are updated.
    """
    step_key = jax.random.fold_in(key, state["step"])
    prepare_key = jax.random.fold_in(step_key, _PREPARE_TAG)
    images, targets = prepare(prepare_key, batch["image"], batch["label"])
    drop_key = jax.random.fold_in(step_key, _DROP_PATH_TAG)
    (loss, (logits, stats)), grads = loss_and_grads(
        state, images, targets, drop_key, graphdef=graphdef, rest=rest, drop_path=drop_path
    )
    updates = {} if stats is None else {"batch_stats": stats}
    new_state, metrics = ts.apply_gradients(state, loss, grads, tx, lr_fn, **updates)
    correct = topk_correct(logits, targets, ks=(1,))["top1"]
    metrics["train_top1"] = 100.0 * correct / images.shape[0]
    return new_state, metrics


def eval_step(state: dict, batch: dict, *, graphdef, rest) -> dict:
    """Sums over the real (`batch['mask']`) examples of a batch: top1/top5 hits, loss, count."""
    images, labels, mask = batch["image"], batch["label"], batch["mask"]
    model = _merge(graphdef, state, rest)
    logits = model(images, train=False)
    weight = mask.astype(jnp.float32)
    safe = jnp.where(mask, labels, 0)
    logp = jax.nn.log_softmax(logits, axis=-1)
    nll = -jnp.take_along_axis(logp, safe[:, None], axis=1)[:, 0]
    sums = topk_correct(logits, safe, ks=(1, 5), mask=mask)
    sums.update(loss=jnp.sum(nll * weight), count=jnp.sum(weight))
    return sums


def build(
    model_fn: Callable[[], ViTClassifier],
    trainable: nnx.filterlib.Filter,
    optim_config,
    lr_fn,
    mesh,
    *,
    prepare: Prepare,
    drop_path: bool = False,
    rules=shd.DEFAULT_RULES,
) -> ts.StepFns:
    """`train_step.build` for a classifier: train step on `{'image', 'label'}`, eval step on
    `{'image', 'label', 'mask'}`; only the `trainable` parameters are optimized, at the
    learning rate `lr_fn` (an `optim.Schedule`: `train.Plan.lr_fn`, also logged)."""
    return ts.build(
        model_fn,
        functools.partial(optim.create_optimizer, optim_config),
        lr_fn,
        mesh,
        step_fn=functools.partial(train_step, prepare=prepare, drop_path=drop_path),
        split=functools.partial(split_classifier, trainable=trainable),
        batch_keys=("image", "label"),
        eval_fn=eval_step,
        eval_keys=("image", "label", "mask"),
        rules=rules,
        means=(*ts.MEAN_METRICS, "train_top1"),
    )


def build_eval(model_fn: Callable[[], ViTClassifier], mesh, *, rules=shd.DEFAULT_RULES):
    """An evaluation-only `train_step.build` (no optimizer state, no train step) of a
    classifier: state `{'params', 'batch_stats' (linear probe), 'step', 'nonfinite_step'}`,
    eval step on `{'image', 'label', 'mask'}` (`eval_step`)."""
    return ts.build(
        model_fn,
        None,
        None,
        mesh,
        step_fn=None,
        split=functools.partial(split_classifier, trainable=nnx.Param),
        batch_keys=(),
        eval_fn=eval_step,
        eval_keys=("image", "label", "mask"),
        rules=rules,
    )


def evaluate(
    fns: ts.StepFns,
    state: dict,
    data_config,
    batch_size: int,
    mesh,
    num_classes: int | None = None,
    should_stop=None,
) -> dict:
    """Top-1 / top-5 accuracy (percent) and mean cross-entropy over one pass of the eval split
    (every process reads its own shard; padding is masked out) of a `num_classes` model; a
    label outside its classes is an error (`check_labels`; None: not checked, such a label is
    never a hit). `should_stop()` is polled before every batch; True raises
    `pipeline.Interrupted`."""
    data = pipeline.create_eval_iterator(
        data_config, global_batch_size=batch_size, should_stop=should_stop
    )
    info = pipeline.dataset_info(data_config)
    where = pipeline.describe_source(data_config, data_config.eval_split)
    totals: dict[str, float] = {}
    try:
        for batch in data:
            if num_classes is not None:
                labels = np.asarray(batch["label"])[np.asarray(batch["mask"], bool)]
                check_labels(labels, num_classes, info.num_classes if info else None, where)
            arrays = {k: shd.global_batch(batch[k], mesh) for k in ("image", "label", "mask")}
            sums = jax.device_get(fns.evaluate(state, arrays))
            for k, v in sums.items():
                totals[k] = totals.get(k, 0.0) + float(v)
    finally:
        data.close()
    n = totals.get("count", 0.0)
    if n <= 0:
        raise ValueError(f"the eval split {data_config.eval_split!r} has no examples")
    accuracy = {k: 100.0 * totals[k] / n for k in ("top1", "top5")}
    return {**accuracy, "loss": totals["loss"] / n, "num_examples": int(n)}


def eval_scalars(r: dict) -> dict:
    """`evaluate`'s result `r` as the logged scalars `eval_top1`, `eval_top5`, `eval_loss`."""
    return {f"eval_{k}": r[k] for k in ("top1", "top5", "loss")}


def check_labels(labels, num_classes: int, data_classes: int | None, where: str) -> None:
    """Refuse class ids outside `[0, num_classes)` (the model's classes) among `labels` (ints,
    any shape) read from `where`; `data_classes`: what the data set says it has (None: unknown).
    A cheap host check of every batch (an out-of-range id would read as a zero target in the
    loss and as a hit in top-k)."""
    labels = np.asarray(labels)
    if not labels.size:
        return
    low, high = int(labels.min()), int(labels.max())
    if low >= 0 and high < num_classes:
        return
    has = f"{data_classes} classes" if data_classes else "an unknown number of classes"
    raise ValueError(
        f"{where} holds class id {high if high >= num_classes else low}, outside [0, "
        f"{num_classes}) of the model's {num_classes} classes (the data set says it has "
        f"{has}); set config.num_classes to the data set's class count"
    )


def check_num_classes(num_classes: int, info, where: str) -> None:
    """Refuse a model with fewer classes than the data set `info` (`pipeline.dataset_info`)
    has: its labels would fall outside the model's classes. Checked when a run starts."""
    data_classes = info.num_classes if info is not None else None
    if data_classes and num_classes < data_classes:
        raise ValueError(
            f"{where} has {num_classes} classes, fewer than the {data_classes} of the data set "
            f"(labels 0..{data_classes - 1}); set config.num_classes={data_classes} (or leave "
            f"it unset to take the data set's)"
        )


# ----------------------------------------------------------------------------- pretrained
def encoder_keys(global_pool: bool) -> tuple[str, ...]:
    """Top-level parameter names taken over from the MAE: the encoder, and its final `norm`
    when the classifier pools the cls token (with global pooling `fc_norm` is new)."""
    return ENCODER_KEYS + (() if global_pool else ("norm",))


# ----------------------------------------------------------------------------- config
@dataclasses.dataclass(frozen=True)
class Plan:
    """Resolved numbers of a classification run: model, classes, weights and the common plan."""

    model: models.MAEConfig
    num_classes: int
    eval_batch_size: int
    source: init_from.Source | None
    run: train.Plan


def resolve_model(config, source: init_from.Source | None) -> models.MAEConfig:
    """The encoder config: `config.model` (a preset name plus overrides), whose architecture
    must match the `config.init_from` checkpoint's; with `config.model.name` empty it is taken
    from the checkpoint's meta (the other `config.model` fields still apply)."""
    pretrained = source if source is not None and source.model is not None else None
    fields = (
        dict(config.model.to_dict()) if hasattr(config.model, "to_dict") else {"name": config.model}
    )
    if not fields.get("name"):
        if pretrained is None:
            raise ValueError(
                "config.model.name is empty and there is no config.init_from workdir to take "
                "the architecture from; set config.model.name"
            )
        base = pretrained.model
        fields.pop("name", None)
        mcfg = models.resolve(base, **{k: v for k, v in fields.items() if v is not None})
    else:
        mcfg = models.resolve(fields)
    if pretrained is not None:
        saved = pretrained.model
        detail = init_from.differences(saved, mcfg, init_from.ENCODER_FIELDS)
        if detail:
            raise ValueError(
                f"config.init_from holds another encoder ({saved.name!r}; {detail}); set "
                f"config.model.name={saved.name!r} (or empty to take it from the checkpoint)"
            )
    size = int(config.data.image_size)
    if mcfg.img_size != size:
        raise ValueError(
            f"model img_size {mcfg.img_size} != config.data.image_size {size}; "
            f"set config.model.img_size={size} (position tables are fixed sin-cos, "
            f"any multiple of the patch size {mcfg.patch_size} works)"
        )
    return mcfg


def plan(config, resume: train.Resume = None, where: str = "") -> Plan:
    """Validate `config` (`schema.check` of its task) and resolve the model, classes, steps
    and optimizer (reads the `config.init_from` checkpoint's meta, no arrays; nothing compiled)."""
    schema.check(config, config.get("task"))
    source = init_from.locate(config.get("init_from"))
    mcfg = resolve_model(config, source)
    info = pipeline.dataset_info(config.data)
    num_classes = config.num_classes
    if num_classes is None:
        num_classes = info.num_classes if info else None
        if not num_classes:
            raise ValueError(
                "the data set does not say how many classes it has: set config.num_classes"
            )
    check_num_classes(num_classes, info, f"config.num_classes={num_classes}")
    layers = {}
    if config.optim.get("layer_decay") is not None and config.optim.get("num_layers") is None:
        layers = {"num_layers": mcfg.depth}
    n = info.num_train_examples if info else None
    run_plan = train.plan(config, n, resume, where, optim_overrides=layers)
    return Plan(mcfg, num_classes, config.eval_batch_size or config.batch_size, source, run_plan)


# ----------------------------------------------------------------------------- the task
def check_workdir(meta: dict, expected: dict, where: str, step: int) -> None:
    """Refuse a workdir whose checkpoint holds another task / encoder / number of classes."""
    saved_model = meta.get("model") or {}
    pairs = [(k, meta.get(k), expected[k]) for k in ("task", "num_classes")]
    for f in init_from.ENCODER_FIELDS + ("img_size",):
        pairs.append((f, saved_model.get(f), expected["model"].get(f)))
    diffs = [f"{k}: checkpoint {a!r} vs config {b!r}" for k, a, b in pairs if a != b]
    if diffs:
        raise ValueError(
            f"the workdir's checkpoint {where} (step {step}) is of another run "
            f"({'; '.join(diffs)}); use a new --workdir or the matching config"
        )


def classification_task(
    config,
    mesh,
    workdir: str,
    *,
    name: str,
    p: Plan,
    trainable,
    prepare: Prepare,
    head: Head,
    drop_path_rate: float,
    flops_per_image: float | None,
    augment_fn: Callable | None = None,
) -> train.Task:
    """The `train.Task` of a linear probe / fine-tuning run in `workdir` (both differ only in
    the classifier's `head` and `drop_path_rate`, the trainable filter, `prepare`, the optimizer
    config and `augment_fn`). The checkpoints' meta holds the model config and `head.meta()`.

    Evaluation (top-1/top-5 on the eval split) runs every `config.eval_every_steps` (0: never)
    and at the end; the final one is also written to `workdir/eval_results.json`.
    """
    train.check_batches(
        mesh, {"config.batch_size": config.batch_size, "config.eval_batch_size": p.eval_batch_size}
    )
    fns = build(
        lambda: from_head(p.model, head, seed=config.seed, drop_path_rate=drop_path_rate),
        trainable,
        p.run.optim,
        p.run.lr_fn,
        mesh,
        prepare=prepare,
        drop_path=drop_path_rate > 0,
        rules=shd.rules(config.get("sharding_rules")),
    )

    def init():
        state = fns.init()
        if p.source is None:
            logging.warning(
                "config.init_from.path is empty: the encoder is RANDOMLY INITIALIZED "
                "(a baseline, not an evaluation of a pretrained model)"
            )
            return state
        return init_from.load(
            state, fns.state_shardings, p.source, encoder_keys(head.global_pool), p.model
        )

    meta = {
        "model": dataclasses.asdict(p.model),
        "task": config.task,
        **head.meta(),  # num_classes, global_pool, linear_probe
        "init_from": p.source.describe() if p.source else "",
        "schedule": p.run.schedule,
    }

    def run_eval(writer, state, batch, step, should_stop):
        """The evaluation every `config.eval_every_steps` and at the end (then also written to
        `eval_results.json`)."""
        r = evaluate(fns, state, config.data, p.eval_batch_size, mesh, p.num_classes, should_stop)
        what = (name, step, r["top1"], r["top5"], r["num_examples"])
        logging.info("%s: step %d: eval top-1 %.2f%%, top-5 %.2f%% on %d examples", *what)
        if step == p.run.total_steps and jax.process_index() == 0:
            run = {"task": config.task, "model": p.model.name, "num_classes": p.num_classes}
            wdir.write_results(workdir, {**r, "step": step, **run, "init_from": meta["init_from"]})
        return eval_scalars(r)

    info = pipeline.dataset_info(config.data)
    train_split = pipeline.describe_source(config.data)

    def check_batch(batch):
        check_labels(batch["label"], p.num_classes, info.num_classes if info else None, train_split)

    return train.Task(
        name=name,
        fns=fns,
        init=init,
        total_steps=p.run.total_steps,
        batch_size=config.batch_size,
        make_data=lambda start, should_stop=None: pipeline.create_train_iterator(
            config.data,
            global_batch_size=config.batch_size,
            seed=config.seed,
            start_step=start,
            augment_fn=augment_fn,
            should_stop=should_stop,
        ),
        meta=lambda: meta,
        check_meta=lambda m, step: check_workdir(m, meta, workdir, step),
        resolved=train.resolved_config(config, p.run),
        device_keys=("image", "label"),
        flops_per_image=flops_per_image,
        periodic=((p.run.periods["eval_every_steps"] or p.run.total_steps, run_eval),),  # 0: end
        check_batch=check_batch,
    )
