"""Evaluation alone: top-1 / top-5 accuracy and mean cross-entropy of a classifier on the eval
split, without training.

    python -m mae_jax.main --config=configs/evaluate.py --workdir=DIR \\
        --config.checkpoint.path=CLASSIFIER [--config.model.name=PRESET]

CLASSIFIER: a fine-tuning or linear-probing workdir (its newest intact checkpoint, or
`config.checkpoint.step`), a classifier weights workdir (`python -m mae_jax.convert import` of
a file with a head), or a PyTorch file with a classifier head: the official fine-tuned or
linear-probed `.pth`, a timm `.safetensors`, a Hugging Face `ViTForImageClassification`
directory (`mae_jax.convert.classifier`). Workdirs carry their architecture and head in their
meta; for a file, `config.model.name` (a preset, plus any `config.model` field) gives the
architecture and the keys give the head.

The eval step and loop are the training runs' (`tasks.classify.eval_step`, `evaluate`), sharded
over `config.mesh` (no optimizer state is allocated). DIR receives `eval_results.json`
(`{top1, top5, loss, num_examples, checkpoint, step, model, num_classes, ...}`) and one line of
`metrics.jsonl` (`eval_top1`, `eval_top5`, `eval_loss`, `eval_examples` at the checkpoint's
step; TensorBoard too); the numbers are printed. A DIR holding a training run's checkpoints is
refused (its own `eval_results.json` would be replaced).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from mae_jax import compile_cache, init_from, metrics, models, schema, train
from mae_jax import sharding as shd
from mae_jax import workdir as wdir
from mae_jax.convert import classifier as cc
from mae_jax.data import pipeline
from mae_jax.models import layout
from mae_jax.models.classifier import Head, from_head
from mae_jax.tasks import classify as cs

TASK = "evaluate"
KEY = "config.checkpoint"


@dataclasses.dataclass(frozen=True)
class Weights:
    """A classifier read to the host, whatever its source."""

    config: models.MAEConfig
    head: Head
    tree: dict  # Params and BatchNorm statistics (numpy)
    pos_embed: np.ndarray | None  # a trained table; None: the fixed sin-cos one
    step: int  # the checkpoint's step (0 for a file)
    source: str


def read_weights(config) -> Weights:
    """The classifier of `config.checkpoint`, its architecture resolved against `config.model`
    and `config.data.image_size` (`tasks.classify.resolve_model`)."""
    source = init_from.locate(config.checkpoint, key=KEY)
    if source is None:
        raise ValueError(
            f"{KEY}.path is empty: set it to a fine-tuning or linear-probing workdir, a "
            f"classifier imported with `python -m mae_jax.convert import`, or a PyTorch "
            f"classifier file (official fine-tuned .pth, timm .safetensors, HF directory)"
        )
    if source.kind == "workdir":
        found = wdir.read_classifier(source.path, source.step)
        mcfg = cs.resolve_model(config, source)
        return Weights(mcfg, found.head, found.tree, found.pos_embed, found.step, source.describe())
    if not config.model.get("name"):
        raise ValueError(
            f"{KEY}.path={source.path!r} is a PyTorch file, which does not say its "
            f"architecture: set config.model.name (e.g. mae_vit_base_patch16)"
        )
    mcfg = cs.resolve_model(config, None)
    converted = cc.read_classifier(source.path, mcfg)
    table = None if converted.sincos else converted.pos_embed
    return Weights(mcfg, converted.head, converted.tree, table, 0, source.describe())


def load_state(fns, weights: Weights) -> dict:
    """The evaluation state of `fns` holding `weights`, placed into its shardings."""
    target = wdir.abstract_checkpoint(fns.abstract_state, fns.state_shardings)
    tree = layout.like(weights.tree, target["params"])  # stacked when the model scans
    values = {
        "params": tree,
        "batch_stats": tree,  # looked up by path: only the statistics are taken
        "step": np.asarray(weights.step, np.int32),
        "nonfinite_step": np.asarray(-1, np.int32),
    }
    return wdir.from_checkpoint(wdir.place(values, target), fns.abstract_state)


def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
    """Evaluate `config.checkpoint` on `config.data`'s eval split; write and print the results
    (see the module docstring) and return them."""
    if config.get("task") != TASK:
        raise ValueError(f"config.task must be {TASK!r} for evaluation, got {config.get('task')!r}")
    schema.check(config, TASK)
    root = wdir.normalize(workdir)
    if wdir.exists(root) and wdir.isdir(root) and wdir.Reader(root).steps():
        raise ValueError(
            f"--workdir {root} holds checkpoints (a run or imported weights); an evaluation "
            f"writes eval_results.json and metrics.jsonl into its own --workdir: use another"
        )
    batch = config.eval_batch_size
    mesh = shd.make_mesh(config.mesh)
    train.check_batches(mesh, {"config.eval_batch_size": batch})
    compile_cache.enable(config.get("compilation_cache", compile_cache.AUTO), jax.process_count())
    weights = read_weights(config)
    cs.check_num_classes(
        weights.head.num_classes,
        pipeline.dataset_info(config.data),
        f"the classifier {weights.source}",
    )

    def model_fn():
        model = from_head(weights.config, weights.head)
        if weights.pos_embed is not None:
            var = model.pos_embed
            var.set_value(jnp.asarray(weights.pos_embed, var.get_value().dtype))
        return model

    fns = cs.build_eval(model_fn, mesh, rules=shd.rules(config.get("sharding_rules")))
    state = load_state(fns, weights)
    r = cs.evaluate(fns, state, config.data, batch, mesh, weights.head.num_classes)
    results = {
        **r,
        "task": TASK,
        "checkpoint": weights.source,
        "step": weights.step,
        "model": weights.config.name,
        **weights.head.meta(),
        "eval_split": config.data.eval_split,
    }
    if jax.process_index() == 0:
        wdir.makedirs(root)
        with metrics.MetricsWriter(root, total_steps=None) as writer:
            scalars = {**cs.eval_scalars(r), "eval_examples": r["num_examples"]}
            writer.write_scalars(weights.step, scalars)
        path = wdir.write_results(root, results)
        print(
            f"evaluate {weights.source} ({weights.config.name}, {weights.head.num_classes} "
            f"classes): top-1 {r['top1']:.2f}%, top-5 {r['top5']:.2f}%, loss {r['loss']:.4f} "
            f"on {r['num_examples']} examples of {config.data.eval_split!r}; results: {path}",
            flush=True,
        )
    return results
