"""End-to-end fine-tuning as the official recipe (`main_finetune.py`): global average pooling
with its norm (`fc_norm`), drop path, mixup 0.8 / cutmix 1.0 with label smoothing 0.1,
RandAugment `rand-m9-mstd0.5-inc1`, random erasing 0.25, AdamW (0.9, 0.999), weight decay 0.05
(none on 1-D parameters, `pos_embed`, `cls_token`), layer-wise lr decay, base lr x batch / 256,
warmup then cosine to `min_lr` 1e-6; top-1 / top-5 on the eval split.

    python -m mae_jax.main --config=configs/finetune_vit_base.py --workdir=DIR \\
        --config.init_from.path=PRETRAIN_WORKDIR

Every parameter is trained (`state['params']`). RandAugment and random erasing run per example
in the tf.data input pipeline (`pipeline.create_train_iterator(augment_fn=...)`), mixup /
cutmix on device inside the train step. Checkpoints, resume, sharding and metrics are
pretraining's (`mae_jax.train.run`).
"""

from __future__ import annotations

import re

import ml_collections
from flax import nnx

from mae_jax import flops, train
from mae_jax.data import augment, lazy_tf, randaugment
from mae_jax.data.mixup import mixup_cutmix, smooth_one_hot
from mae_jax.models.classifier import Head
from mae_jax.tasks import classify as cs

TASK = "finetune"


# ----------------------------------------------------------------------------- augmentation
def parse_rand_augment(spec: str | None) -> dict | None:
    """timm's RandAugment spec, e.g. `'rand-m9-mstd0.5-inc1'`, -> keyword arguments of
    `mae_jax.data.randaugment.rand_augment` (`None` for '' / None = off).

    Fields: `m` magnitude (0-10), `n` ops per image (default 2), `mstd` magnitude std, `p`
    probability of each op (default 0.5), `inc` must be 1 (the "increasing" op set, which is
    what `augment` implements).
    """
    if not spec:
        return None
    parts = spec.split("-")
    if parts[0] != "rand":
        raise ValueError(f"rand_augment {spec!r} must start with 'rand-' (timm's format)")
    out = {"num_ops": 2, "magnitude": 10.0, "magnitude_std": 0.0, "prob": 0.5}
    fields = {"m": "magnitude", "n": "num_ops", "mstd": "magnitude_std", "p": "prob"}
    increasing = False
    for part in parts[1:]:
        m = re.fullmatch(r"([a-z]+)(\d+(?:\.\d*)?)", part)
        if not m:
            raise ValueError(f"rand_augment {spec!r}: cannot parse {part!r}")
        key, value = m.group(1), float(m.group(2))
        if key in fields:
            out[fields[key]] = int(value) if key == "n" else value
        elif key == "inc":
            increasing = bool(int(value))
        else:
            raise ValueError(
                f"rand_augment {spec!r}: unsupported field {key!r} (supported: m, n, mstd, p, inc)"
            )
    if not increasing:
        raise ValueError(
            f"rand_augment {spec!r}: only the increasing op set is implemented; "
            f"add '-inc1' (the official recipe's setting)"
        )
    if not 0 <= out["magnitude"] <= 10 or out["magnitude_std"] < 0 or not 0 <= out["prob"] <= 1:
        raise ValueError(f"rand_augment {spec!r}: need 0 <= m <= 10, mstd >= 0, 0 <= p <= 1")
    return out


def make_augment_fn(rand_augment: str | None, reprob: float):
    """`augment_fn(image, seed)` for the input pipeline: RandAugment on the rounded uint8
    pixels, ImageNet normalization, then random erasing (as timm's training transform);
    `None` when both are off."""
    ra = parse_rand_augment(rand_augment)
    if ra is None and reprob == 0:
        return None

    def augment_fn(image, seed):
        tf = lazy_tf.tf_module()
        s_ra, s_erase = tf.unstack(tf.random.experimental.stateless_split(seed, 2))
        if ra is not None:
            pixels = tf.cast(tf.round(tf.clip_by_value(image, 0.0, 255.0)), tf.uint8)
            image = randaugment.rand_augment(pixels, s_ra, **ra)
        image = augment.normalize(image)
        if reprob > 0:
            image = randaugment.random_erasing(image, s_erase, prob=float(reprob))
        return image

    return augment_fn


def finetune_task(config, mesh, workdir: str, resume: train.Resume = None) -> train.Task:
    """The fine-tuning `train.Task` of `config` on `mesh` (validated before compiling)."""
    if config.get("task") != TASK:
        raise ValueError(
            f"config.task must be {TASK!r} for fine-tuning, got {config.get('task')!r}"
        )
    p = cs.plan(config, resume, workdir)
    mix = dict(
        mixup_alpha=float(config.mixup),
        cutmix_alpha=float(config.cutmix),
        prob=float(config.mixup_prob),
        switch_prob=float(config.mixup_switch_prob),
        label_smoothing=float(config.label_smoothing),
    )

    def prepare(key, images, labels):
        """Mixup / cutmix (timm batch mode) with label smoothing, or only label smoothing."""
        if mix["mixup_alpha"] > 0 or mix["cutmix_alpha"] > 0:
            return mixup_cutmix(key, images, labels, p.num_classes, **mix)
        return images, smooth_one_hot(labels, p.num_classes, mix["label_smoothing"])

    return cs.classification_task(
        config,
        mesh,
        workdir,
        name=f"finetune {p.model.name}",
        p=p,
        trainable=nnx.Param,
        prepare=prepare,
        head=Head(p.num_classes, bool(config.global_pool), linear_probe=False),
        drop_path_rate=float(config.drop_path_rate),
        flops_per_image=3.0 * flops.classifier_flops_per_image(p.model, p.num_classes),
        augment_fn=make_augment_fn(config.rand_augment, config.reprob),
    )


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
    """Fine-tune the encoder of `config.init_from.path` in `workdir` (resumes if it holds a run).
    Returns the last logged metrics; the final evaluation is in `workdir/eval_results.json`."""
    return train.run(
        config, workdir, lambda mesh, resume: finetune_task(config, mesh, workdir, resume)
    )
