"""The config schema: every key of every task declared once, with its type, range or choices,
default and meaning. The tasks' `defaults()` are generated from it (`defaults`), and a config
is validated against it in one place, at the boundary before anything is written (`check`, run
by `train.plan` and the evaluate command); the modules below trust what it let through.

A table maps a key to `(default, spec, meaning)` or to a nested table (a group such as `optim`); the tasks' tables
(`TASKS`) are composed from shared blocks. A period (`PERIODS`) is a pair of keys, `<name>_steps`
and `<name>_epochs`, of which one may be set (0 and None: not set); `steps` converts it.
"""

from __future__ import annotations

import dataclasses
import difflib

import ml_collections
from ml_collections import config_dict

from mae_jax import models
from mae_jax.models import config as mc
from mae_jax.spec import kind, require

# A key is `(default, spec, meaning)`; spec: `mae_jax.spec`.


# ------------------------------------------------------------------------------ periods
@dataclasses.dataclass(frozen=True)
class Period:
    """A length or an interval, given as `steps_key` or as `epochs_key`, not both."""

    steps_key: str
    epochs_key: str
    what: str


PERIODS = (
    Period("total_steps", "epochs", "the run's length"),
    Period("warmup_steps", "warmup_epochs", "the warm-up"),
    Period("checkpoint_every_steps", "checkpoint_every_epochs", "the checkpoint interval"),
    Period("keep_every_steps", "keep_every_epochs", "the interval of milestones kept for good"),
    Period("log_every_steps", "log_every_epochs", "the metrics interval"),
    Period("knn_every_steps", "knn_every_epochs", "the kNN monitor's interval"),
    Period("reconstruction_every_steps", "reconstruction_every_epochs", "the images' interval"),
    Period("eval_every_steps", "eval_every_epochs", "the evaluation interval"),
)


def period(name: str, steps: int | None, epochs: float | None) -> dict:
    """The two keys of the period `name` (`total`: `total_steps` / `epochs`) and defaults."""
    p = next(p for p in PERIODS if p.steps_key == f"{name}_steps")
    return {
        p.steps_key: (steps, "?int>=0", f"{p.what}, in steps (0 or None: not given)"),
        p.epochs_key: (epochs, "?num>=0", f"{p.what}, in epochs (0 or None: not given)"),
    }


def steps(config, p: Period, steps_per_epoch: int | None) -> int | None:
    """The period `p` of `config` in steps: `<name>_steps`, or `<name>_epochs` x steps per epoch
    (rounded, at least 1); None when neither is set. Both set, or epochs without a known data
    set size, is a ValueError naming the keys."""
    s, e = config.get(p.steps_key), config.get(p.epochs_key)
    if s and e:
        raise ValueError(
            f"config.{p.steps_key}={s!r} and config.{p.epochs_key}={e!r} both set {p.what}: "
            f"set one of them and the other to 0"
        )
    if s:
        return int(s)
    if not e:
        return None
    if steps_per_epoch is None:
        raise ValueError(
            f"config.{p.epochs_key}={e!r} needs the data set size, which is unknown: set "
            f"config.{p.steps_key} instead"
        )
    return max(1, int(round(e * steps_per_epoch)))


# ------------------------------------------------------------------------------ blocks
def model_block(name: str, **fields) -> ml_collections.ConfigDict:
    """The `model` block of a config file: the preset `name` and the `MAEConfig` fields given
    (checked and normalized by `models.resolve`: dtype names, remat names), the others None
    (the preset's), every key typed so that `--config.model.FIELD=VALUE` parses."""
    resolved = models.resolve(name, **fields)
    block = defaults(_model())
    block.update(name=name, **{k: getattr(resolved, k) for k in fields})
    return block


def _model() -> dict:
    kinds = {int: "?int", float: "?num", bool: "?bool", str: "?str"}
    return {
        "name": ("", "str", "preset (models.PRESETS); '': the checkpoint's"),
        **{
            f: (None, kinds[t], f"MAEConfig.{f} (None: the preset's; checked by models.resolve)")
            for f, t in mc.FIELD_TYPES.items()
            if f != "name"
        },
    }


UNIT, PROB = "num[0,1]", "num[0,1)"
DATA = {
    "source": ("embedded", ("embedded", "tfds", "folder"), "where the images come from"),
    "name": ("", "?str", "TFDS name, e.g. 'imagenet2012' (source='tfds')"),
    "data_dir": ("", "?str", "TFDS data_dir, local or gs:// ('': TFDS default)"),
    "path": ("", "?str", "folder root: path/class_x/img.jpg or path/<split>/..."),
    "train_split": ("train", "str", "training split"),
    "eval_split": ("validation", "str", "evaluation split"),
    "image_key": ("image", "str", "TFDS image feature"),
    "label_key": ("label", "str", "TFDS label feature"),
    "image_size": (224, "int>=1", "side of the model's input images"),
    "crop_min_scale": (0.2, "num(0,1]", "pretraining RandomResizedCrop scale (min, 1)"),
    "train_crop_min_scale": (0.08, "num(0,1]", "labelled train RandomResizedCrop min scale"),
    "crop_ratio": ((3 / 4, 4 / 3), "seq", "RandomResizedCrop aspect ratio range"),
    "flip": (True, "bool", "random horizontal flip"),
    "antialias": (True, "bool", "PIL-like antialiased bicubic when downscaling"),
    "jpeg_dct_method": (
        "INTEGER_ACCURATE",
        ("INTEGER_ACCURATE", "INTEGER_FAST"),
        "libjpeg IDCT (INTEGER_ACCURATE: PIL's, bit-identical)",
    ),
    "jpeg_reduced_scale": (True, "bool", "decode crops >= 2x/4x/8x image_size at 1/2, 1/4, 1/8"),
    "eval_crop_fraction": (0.875, "num(0,1]", "eval: resize shorter side to size / this"),
    "shuffle_buffer": (10_000, "int>=1", "TFDS shuffle buffer; other sources shuffle fully"),
    "num_parallel_calls": (-1, "int>=-1", "images decoded in parallel (-1: autotune)"),
    "threads": (0, "int>=0", "private tf.data threadpool size (0: shared pool)"),
    "prefetch": (2, "int>=-1", "batches prefetched (-1: autotune)"),
    "cache": (False, "bool", "hold the encoded shard in memory (small sets)"),
    "with_keys": (False, "bool", "add 'key' int64 [B/P]: each example's stable id"),
    "folder_eval_fraction": (0.0, PROB, "flat folders: fraction held out as eval"),
    "embedded_resolution": (0, "int>=0", "embedded set: stored crop side (0: from image_size)"),
    "embedded_train_per_class": (240, "int>=1", "embedded set: train examples per class"),
    "embedded_eval_per_class": (60, "int>=0", "embedded set: eval examples per class"),
    "max_consecutive_bad": (1000, "int>=1", "unreadable examples in a row that stop the run"),
}

OPTIM = {
    "name": ("adamw", ("adamw", "lars", "sgd"), "optimizer"),
    "base_lr": (1.5e-4, "num>=0", "peak lr per 256 examples: lr = base_lr x batch_size / 256"),
    "lr": (None, "?num>=0", "absolute peak lr; overrides base_lr (None: from base_lr)"),
    "min_lr": (0.0, "num>=0", "the cosine's floor"),
    "b1": (0.9, PROB, "Adam beta1"),
    "b2": (0.95, PROB, "Adam beta2"),
    "eps": (1e-8, "num>=0", "Adam epsilon"),
    "weight_decay": (0.05, "num>=0", "weight decay (ndim > 1 params; adamw: decoupled)"),
    "momentum": (0.9, "num>=0", "momentum (lars, sgd)"),
    "trust_coefficient": (0.001, "num>=0", "LARS trust coefficient"),
    "grad_clip_norm": (None, "?num>=0", "global-norm clipping (None or 0: off)"),
    "layer_decay": (None, "?num(0,1]", "layer-wise lr decay (None: off)"),
    "num_layers": (None, "?int>=0", "encoder depth for layer_decay (None: the model's)"),
    "no_decay_names": ((), "seq", "names without weight decay, e.g. ('cls_token', 'pos_embed')"),
}

# Keys of the optimizer that the run's plan sets: refused with the key to set instead.
PLAN_OWNED = {
    "optim.batch_size": "set config.batch_size instead",
    "optim.total_steps": "set config.total_steps or config.epochs instead",
    "optim.warmup_steps": "set config.warmup_steps or config.warmup_epochs instead",
    "optim.extensions": "a run's extensions are recorded by its checkpoints when it is resumed "
    "with another length",
}

PARTS = ("all", "encoder")
INIT_FROM = {
    "path": ("", "str", "weights to start from: a workdir or a PyTorch file ('': none)"),
    "step": (None, "?int>=0", "the workdir's checkpoint (None: the newest)"),
    "parts": ("all", PARTS, "what to copy: all, or the encoder only"),
}

MESH = {
    axis: (-1 if axis == "data" else 1, "int>=-1", "devices (-1: the rest)")
    for axis in ("data", "fsdp", "tensor")
}

COMMON = {
    "task": ("pretrain", ("pretrain", "linear_probe", "finetune", "evaluate"), "what runs"),
    "seed": (0, "int", "seed of the initialization, the data order and the noise"),
    "model": "model",  # `_model()`, filled in by `table`
    "data": DATA,
    "init_from": INIT_FROM,
    "batch_size": (None, "int>=1", "global batch size"),
    **period("total", None, None),
    **period("warmup", None, 0.0),
    "optim": OPTIM,
    "mesh": MESH,
    "sharding_rules": (None, "?seq", "logical axis rules (None: sharding.DEFAULT_RULES)"),
    **period("checkpoint_every", 1000, None),
    "keep_checkpoints": (3, "int>=1", "newest checkpoints kept"),
    **period("keep_every", None, 0.0),
    **period("log_every", 50, None),
    "peak_tflops": (None, "?num>0", "peak TFLOP/s per device for the MFU (None: known)"),
    "compilation_cache": ("auto", "str", "persistent compilation cache dir ('none' or '': off)"),
    "profile_steps": (None, "?seq", "(start_step, num_steps) traced (None: off)"),
}

PRETRAIN = {
    **COMMON,
    "task": ("pretrain", ("pretrain",), "MAE pretraining"),
    "grad_accum_steps": (1, "int>=1", "micro-batches per step (dividing batch_size)"),
    **period("reconstruction_every", 0, None),
    **period("knn_every", 0, None),
    "knn_bank_size": (10_000, "int>=1", "labelled bank: the first N of data.train_split"),
    "knn_num_queries": (10_000, "int>=1", "queries: the first N of data.eval_split"),
    "knn_k": (20, "int>=1", "neighbours"),
    "knn_temperature": (0.07, "num>0", "votes weighted exp(cosine / T)"),
    "knn_batch_size": (None, "?int>=1", "feature batch (None: the micro-batch)"),
    "knn_global_pool": (False, "bool", "features: mean of the patch tokens (False: cls token)"),
}

CLASSIFY = {
    **COMMON,
    "init_from": {**INIT_FROM, "parts": ("encoder", PARTS, "what to copy")},
    "num_classes": (None, "?int>=1", "classes of the head (None: the data set's)"),
    "global_pool": (False, "bool", "mean of the patch tokens + fc_norm (False: the cls token)"),
    "eval_batch_size": (None, "?int>=1", "evaluation batch (None: batch_size)"),
    **period("eval_every", 0, None),
}

FINETUNE = {
    **CLASSIFY,
    "task": ("finetune", ("finetune",), "fine-tuning"),
    "global_pool": (True, "bool", "mean of the patch tokens + fc_norm (False: the cls token)"),
    "drop_path_rate": (0.0, PROB, "stochastic depth rate"),
    "mixup": (0.0, "num>=0", "mixup alpha (0: off)"),
    "cutmix": (0.0, "num>=0", "cutmix alpha (0: off)"),
    "mixup_prob": (1.0, UNIT, "probability of mixing a batch"),
    "mixup_switch_prob": (0.5, UNIT, "probability of cutmix when both are on"),
    "label_smoothing": (0.0, PROB, "label smoothing"),
    "rand_augment": ("", "str", "timm RandAugment spec, e.g. 'rand-m9-mstd0.5-inc1' ('': off)"),
    "reprob": (0.0, UNIT, "random erasing probability"),
}

EVALUATE = {
    "task": ("evaluate", ("evaluate",), "evaluation of a classifier"),
    "checkpoint": {k: INIT_FROM[k] for k in ("path", "step")},
    "model": "model",
    "data": DATA,
    "eval_batch_size": (256, "int>=1", "global evaluation batch"),
    **{k: COMMON[k] for k in ("mesh", "sharding_rules", "compilation_cache")},
}

TASKS = {
    "pretrain": PRETRAIN,
    "linear_probe": {**CLASSIFY, "task": ("linear_probe", ("linear_probe",), "linear probing")},
    "finetune": FINETUNE,
    "evaluate": EVALUATE,
}


def table(name: str) -> dict:
    """The table of the task `name` (the model block filled in)."""
    if name not in TASKS:
        raise ValueError(f"config.task={name!r} is not one of {sorted(TASKS)}")
    return {k: _model() if v == "model" else v for k, v in TASKS[name].items()}


# ------------------------------------------------------------------------------ use
def defaults(tab: dict | str) -> ml_collections.ConfigDict:
    """The config of every key of `tab` (a table or a task's name) at its default, typed so
    that `--config.KEY=VALUE` parses (None defaults are placeholders of the key's type)."""
    out = {}
    for k, v in (table(tab) if isinstance(tab, str) else tab).items():
        if isinstance(v, dict):
            out[k] = defaults(v)
        elif v[0] is None:
            out[k] = config_dict.placeholder(kind(v[1]))
        else:
            out[k] = v[0]
    return ml_collections.ConfigDict(out)


def refusal(path: str) -> str | None:
    """The sentence refusing the plan-owned key `path` (e.g. 'optim.batch_size'), or None."""
    if path in PLAN_OWNED:
        return f"config.{path} is set by the run's plan, not by hand: {PLAN_OWNED[path]}"
    return None


def check(config, tab: dict | str, prefix: str = "config", *, unknown: bool = True) -> None:
    """Refuse (ValueError, one sentence) a key of `config` that `tab` (a table or a task's
    name) does not know (with a 'did you mean'; plan-owned keys with the key to set instead)
    or a value of the wrong type or range. Keys missing from `config` take their defaults.
    `unknown=False` leaves unknown keys alone."""
    tab = table(tab) if isinstance(tab, str) else tab
    extra = sorted(set(config.keys()) - set(tab)) if unknown else []
    where = [f"{prefix}.{k}".removeprefix("config.") for k in extra]
    for said in filter(None, map(refusal, where)):
        raise ValueError(said)
    if extra:
        close = difflib.get_close_matches(extra[0], list(tab), n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        task = f" for task {config.get('task')!r}" if prefix == "config" else ""
        raise ValueError(
            f"unknown config key(s) {where}{task}{hint} (known keys of {prefix}: {sorted(tab)})"
        )
    for k, spec in tab.items():
        value = config[k] if k in config else None
        if k not in config or (isinstance(spec, dict) and value is None):
            continue
        if isinstance(spec, dict):
            check(value, spec, f"{prefix}.{k}", unknown=unknown)
            if k == "model" and value.get("name"):  # the architecture: `models.resolve` checks
                _resolve_model(value, f"{prefix}.{k}")
        else:
            require(f"{prefix}.{k}", value, spec[1])


def _resolve_model(block, where: str) -> None:
    try:
        models.resolve(block)
    except ValueError as e:
        raise ValueError(f"{where}: {e}") from None
