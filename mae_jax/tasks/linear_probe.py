"""Linear probing as the paper (official `main_linprobe.py`): frozen encoder, cls-token feature
(after the encoder's final norm), BatchNorm without affine parameters before a linear head, LARS
(base lr 0.1 x batch / 256, weight decay 0, momentum 0.9), batch 16384, 90 epochs with 10 warmup
then cosine, RandomResizedCrop + flip; top-1 / top-5 on the eval split.

    python -m mae_jax.main --config=configs/linprobe_vit_base.py --workdir=DIR \\
        --config.init_from.path=PRETRAIN_WORKDIR

Only the head's Linear is trained (`state['params']`); the encoder sits in `state['frozen']`
(loaded from the pretrained checkpoint, never updated) and the BatchNorm running statistics in
`state['batch_stats']`. Checkpoints, resume, sharding and metrics are pretraining's
(`mae_jax.train.run`).
"""

from __future__ import annotations

import ml_collections

from mae_jax import flops, train
from mae_jax.data.mixup import smooth_one_hot
from mae_jax.models.classifier import LINEAR_PROBE_TRAINABLE, Head
from mae_jax.tasks import classify as cs

TASK = "linear_probe"


def linear_probe_task(config, mesh, workdir: str, resume: train.Resume = None) -> train.Task:
    """The linear-probing `train.Task` of `config` on `mesh` (validated before compiling)."""
    if config.get("task") != TASK:
        raise ValueError(
            f"config.task must be {TASK!r} for linear probing, got {config.get('task')!r}"
        )
    p = cs.plan(config, resume, workdir)
    if p.run.optim.get("layer_decay") is not None:
        raise ValueError(
            "config.optim.layer_decay does not apply to linear probing (only the "
            "head is trained); leave it None"
        )
    return cs.classification_task(
        config,
        mesh,
        workdir,
        name=f"linear probe {p.model.name}",
        p=p,
        trainable=LINEAR_PROBE_TRAINABLE,  # the head's Linear (`head.1`)
        # Plain one-hot targets (cross-entropy), no mixing.
        prepare=lambda key, x, y: (x, smooth_one_hot(y, p.num_classes, 0.0)),
        head=Head(p.num_classes, bool(config.global_pool), linear_probe=True),
        drop_path_rate=0.0,
        # Forward only through the frozen encoder; the head's backward is negligible.
        flops_per_image=flops.classifier_flops_per_image(p.model, p.num_classes),
    )


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
    """Linear-probe the encoder of `config.init_from.path` in `workdir` (resumes if it holds a run).
    Returns the last logged metrics; the final evaluation is in `workdir/eval_results.json`."""
    return train.run(
        config, workdir, lambda mesh, resume: linear_probe_task(config, mesh, workdir, resume)
    )
