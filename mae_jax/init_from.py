"""Where a new run's weights come from: `config.init_from`, read by every training task.

    config.init_from.path   '' (fresh initialization), a workdir (a pretraining run, or one
                            written by `python -m mae_jax.convert import`), or a PyTorch file:
                            official MAE / timm `.pth`, `.safetensors`, a Hugging Face directory
    config.init_from.step   a workdir's checkpoint step (None: its newest intact checkpoint)
    config.init_from.parts  'all' (every parameter the model shares with the source) or
                            'encoder' (patch embedding, cls token, blocks, and the final norm
                            when the source holds one: a global-pool classifier has none)

It is used only when a run starts: resuming a workdir that holds checkpoints always wins.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os

import jax
import numpy as np
from absl import logging
from flax import nnx

from mae_jax import convert, models
from mae_jax import workdir as wdir
from mae_jax.convert import files, mapping
from mae_jax.models.classifier import ENCODER_KEYS

# The architecture fields that fix the encoder's parameter shapes, and the whole MAE's (the
# image size is not one: the position tables are fixed sin-cos, not parameters).
ENCODER_FIELDS = ("patch_size", "in_chans", "embed_dim", "depth", "num_heads", "mlp_ratio")
MAE_FIELDS = ENCODER_FIELDS + ("decoder_embed_dim", "decoder_depth", "decoder_num_heads")
_TORCH_FILES = (".pth", ".pt", ".bin", ".safetensors")


@dataclasses.dataclass(frozen=True)
class Source:
    """A located weight source; nothing but its metadata read yet."""

    path: str
    kind: str  # 'workdir' or 'pytorch'
    step: int | None
    model: models.MAEConfig | None  # what a workdir's checkpoint says it holds
    parts: str
    classifier: bool = False  # a workdir's checkpoint is a classifier's (no decoder)
    lacks: tuple[str, ...] = ()  # encoder parts it does not hold (a global-pool classifier's norm)

    def describe(self) -> str:
        return self.path if self.step is None else f"{self.path} (step {self.step})"


def locate(init_from, key: str = "config.init_from") -> Source | None:
    """Validate `config.init_from` (or another `{path, step}` group named `key`, such as
    evaluation's `config.checkpoint`) and find its source (reads a workdir's meta, no arrays)."""
    if init_from is None or not init_from.get("path"):
        if init_from is not None and init_from.get("step") is not None:
            raise ValueError(f"{key}.step is set but {key}.path is empty")
        return None
    parts = init_from.get("parts") or "all"  # checked by `schema.check`
    path = os.fspath(init_from.path)
    step = init_from.get("step")
    local = not wdir.is_remote(path)
    if (local and os.path.isfile(os.path.expanduser(path))) or path.endswith(_TORCH_FILES):
        if step is not None:
            raise ValueError(f"{key}.step applies to workdirs, not to PyTorch files")
        if local and not os.path.exists(os.path.expanduser(path)):
            raise ValueError(f"{key}.path={path!r} does not exist")
        return Source(os.path.expanduser(path), "pytorch", None, None, parts)
    if local and os.path.isdir(path) and os.path.exists(os.path.join(path, "config.json")):
        if not wdir.isdir(wdir.join(path, wdir.CHECKPOINTS)):  # a Hugging Face directory
            return Source(path, "pytorch", None, None, parts)
    try:
        reader = wdir.Reader(path)
    except wdir.WorkdirError as e:
        raise ValueError(f"{key}.path: {e}") from None
    steps = reader.steps()
    if not steps:
        raise ValueError(
            f"{key}.path={path!r} holds no finalized checkpoint; expected a "
            f"training workdir, one written by `python -m mae_jax.convert import`, or a PyTorch "
            f"file (.pth, .safetensors, Hugging Face directory)"
        )
    if step is not None and step not in steps:
        raise ValueError(f"{key}.step={step} is not a checkpoint of {path!r}; available: {steps}")
    chosen = steps[-1] if step is None else step
    meta = reader.meta(chosen)
    if "model" not in meta:
        raise ValueError(
            f"checkpoint {chosen} of {path!r} says nothing of its model (meta keys "
            f"{sorted(meta)}); is it an mae-jax checkpoint?"
        )
    model = models.resolve(meta["model"])
    classifier, lacks = wdir.is_classifier(meta), ()
    with contextlib.suppress(ValueError):  # a classifier's meta that does not say: no pooling
        if classifier and wdir.read_head(meta, reader, wdir.normalize(path), chosen).global_pool:
            lacks = ("norm",)  # global pooling normalizes with fc_norm instead
    return Source(reader.directory, "workdir", step, model, parts, classifier, lacks)


def differences(saved: models.MAEConfig, mcfg: models.MAEConfig, fields) -> str:
    """`fields` on which two model configs differ, as 'field: checkpoint A vs config B, ...'
    ('' when they agree)."""
    return ", ".join(
        f"{f}: checkpoint {getattr(saved, f)!r} vs config {getattr(mcfg, f)!r}"
        for f in fields
        if getattr(saved, f) != getattr(mcfg, f)
    )


def check_pretraining_source(source: Source | None, mcfg: models.MAEConfig) -> None:
    """Refuse, before anything is written, a workdir `source` that cannot initialize the MAE
    `mcfg` as `source.parts` asks: a classifier's for all parts (it has no decoder), or one
    whose architecture differs in the parts to copy. PyTorch files are checked when read."""
    if source is None or source.kind != "workdir" or source.model is None:
        return
    saved = source.model
    if source.classifier and source.parts == "all":
        raise ValueError(
            f"config.init_from.path={source.path!r} is a classifier's checkpoint (fine-tuning or "
            f"linear probing of {saved.name!r}): it holds an encoder but no decoder; take its "
            "encoder with config.init_from.parts=encoder"
        )
    fields = ENCODER_FIELDS if source.parts == "encoder" else MAE_FIELDS
    detail = differences(saved, mcfg, fields)
    if detail:
        raise ValueError(
            f"config.init_from.path={source.path!r} holds another model ({saved.name!r}; "
            f"{detail}) than config.model ({mcfg.name!r}); start from it with "
            f"config.model.name={saved.name!r}, or choose a source of {mcfg.name!r}"
        )


def wanted_keys(source: Source, available: list[str]) -> tuple[str, ...]:
    """Top-level parameter names to copy: all the model has, or the encoder's."""
    if source.parts == "encoder":
        return tuple(k for k in (*ENCODER_KEYS, "norm") if k in available and k not in source.lacks)
    return tuple(available)


def load(state: dict, shardings: dict, source: Source, keys: tuple[str, ...], mcfg) -> dict:
    """Copy parameters `keys` (top-level names) of `source` into `state`'s 'params' and/or
    'frozen' entries, straight into their shardings; other entries stay as initialized."""

    def placed(value, sharding):  # where a restored value goes
        return jax.ShapeDtypeStruct(value.shape, value.dtype, sharding=sharding)

    target, where = {}, {}
    for entry in (e for e in ("params", "frozen") if e in state):
        values, sh = nnx.to_pure_dict(state[entry]), nnx.to_pure_dict(shardings[entry])
        for top in (t for t in values if t in keys):
            target[top] = jax.tree.map(placed, values[top], sh[top])
            where[top] = entry
    missing = sorted(set(keys) - set(target))
    if missing:
        raise ValueError(f"the model has no parameters {missing} to load from {source.path}")
    if source.kind == "workdir":
        loaded = wdir.Reader(source.path).restore_params(target, step=source.step).state
    else:
        loaded = _from_pytorch(source, target, mcfg)
    absent = [
        "/".join(str(getattr(k, "key", k)) for k in path)
        for path, leaf in jax.tree_util.tree_flatten_with_path(loaded)[0]
        if isinstance(leaf, jax.ShapeDtypeStruct)
    ]
    if absent:
        raise ValueError(
            f"{source.describe()} lacks parameters the model has ({', '.join(absent[:5])}"
            f"{', ...' if len(absent) > 5 else ''}): is it a model of another depth or size?"
        )
    for top, entry in where.items():
        nnx.replace_by_pure_dict(state[entry], {top: loaded[top]})
    logging.info("initialized %s from %s", ", ".join(sorted(where)), source.describe())
    return state


def _from_pytorch(source: Source, target: dict, mcfg) -> dict:
    loaded = files.load_input(source.path)
    sd = loaded.state_dict
    head = mapping.classifier_head(sd)
    if head is not None and any(top.startswith(("decoder", "mask_token")) for top in target):
        raise ValueError(
            f"config.init_from.path={source.path!r} is "
            f"{mapping.describe(sd, mapping.detect_format(sd))}: it holds an encoder but no "
            "decoder; take its encoder with config.init_from.parts=encoder"
        )
    if head is not None and head.global_pool and "norm.weight" not in sd and "norm" in target:
        # Global pooling replaced the encoder's final norm by fc_norm: that norm starts anew.
        logging.info(
            "%s has no final norm (global pooling): norm starts as the identity", source.path
        )
        width = np.shape(sd["fc_norm.weight"])
        sd = {
            **sd,
            "norm.weight": np.ones(width, np.float32),
            "norm.bias": np.zeros(width, np.float32),
        }
        loaded = dataclasses.replace(loaded, state_dict=sd)
    converted = convert.read_pytorch(loaded, mcfg, strict=False)
    params = models.layout.like(converted.params, target)  # stacked blocks if the model scans
    for top in target:
        if top not in params:
            raise ValueError(
                f"{source.path} ({mapping.describe(sd, converted.format)}) has no {top!r} "
                "parameters; take its encoder with config.init_from.parts=encoder"
            )
    return wdir.place(params, target)  # straight into the target's shardings
