"""`mae_jax.load`: a model with its weights, from wherever they are, in one call.

    import mae_jax
    loaded = mae_jax.load("/tmp/mae_finetune_smoke")       # a workdir: its newest checkpoint
    logits = loaded.model(images)                           # classifier: [N, classes] float32
    loaded = mae_jax.load("mae_pretrain_vit_base.pth", model="mae_vit_base_patch16")
    tokens = loaded.model.encode(images)                    # MAE: [N, 1+L, D], normed

Sources (`path`):
- a workdir of any run (pretraining, fine-tuning, linear probing; `step`: default the newest
  intact checkpoint), or a weights workdir written by `python -m mae_jax.convert import`: the
  architecture and head come from the checkpoint's meta;
- a PyTorch file: an official MAE or fine-tuned / linear-probed `.pth`, a timm `.pth` /
  `.safetensors`, a Hugging Face directory (`ViTMAEForPreTraining` or
  `ViTForImageClassification`); `model` (a preset name) gives the architecture, the keys tell
  an MAE from a classifier and give its head. An encoder-only file (timm, the published MAE
  encoders) gives an MAE whose decoder is freshly initialized (a warning says so).

`overrides` replace model config fields (`img_size=448`, `dtype="bfloat16"`,
`attention_impl="xla"`, ...; the position tables are fixed sin-cos, so any multiple of the patch
size works). Images are NHWC, ImageNet-normalized, at the model's `img_size`. Nothing is
written, so a run in progress can be read.
"""

from __future__ import annotations

import dataclasses
import os

import ml_collections

from mae_jax import convert, init_from, models
from mae_jax import workdir as wdir
from mae_jax.convert import classifier as cc
from mae_jax.convert import files, mapping
from mae_jax.models.classifier import Head, ViTClassifier, from_head


@dataclasses.dataclass(frozen=True)
class Loaded:
    """A model with its weights (`load`) and what it is."""

    model: models.MAE | ViTClassifier
    kind: str  # 'mae' (`model(images, noise=...)`, `.encode`) or 'classifier' (`model(images)`)
    task: str  # 'pretrain', 'finetune', 'linear_probe' (a run), 'weights' (imported), 'file'
    preset: str  # the model config's name, e.g. 'mae_vit_base_patch16'
    head: Head | None  # a classifier's classes, pooling and probe head; None for an MAE
    step: int | None  # the checkpoint's step; None for a PyTorch file
    source: str  # the path read

    @property
    def num_classes(self) -> int | None:
        return None if self.head is None else self.head.num_classes

    def describe(self) -> str:
        """One line: what was loaded from where."""
        what = "MAE"
        if self.head is not None:
            pool = "global pool + fc_norm" if self.head.global_pool else "cls token"
            probe = ", linear probe" if self.head.linear_probe else ""
            what = f"classifier with {self.head.num_classes} classes ({pool}{probe})"
        at = "" if self.step is None else f" at step {self.step}"
        return f"{self.preset} {what}, {self.task}, from {self.source}{at}"


def load(path, *, step: int | None = None, model: str | None = None, **overrides) -> Loaded:
    """The model of `path` with its weights (see the module docstring); `step` picks a
    workdir's checkpoint, `model` names a PyTorch file's architecture (a preset)."""
    group = ml_collections.ConfigDict({"path": os.fspath(path), "step": step})
    source = init_from.locate(group, key="load")
    if source is None:
        raise ValueError("load: path is empty; expected a workdir or a PyTorch file")
    if source.kind == "pytorch":
        if not model:
            raise ValueError(
                f"{source.path!r} is a PyTorch file, which does not say its architecture: pass "
                f"model= a preset name, one of {sorted(models.PRESETS)}"
            )
        config = models.resolve(model, **overrides)
        loaded = files.load_input(source.path)
        if mapping.classifier_head(loaded.state_dict) is not None:
            converted = cc.read_classifier(loaded, config)
            net = cc.build_classifier(converted, config)
            return Loaded(net, "classifier", "file", config.name, converted.head, None, source.path)
        net = convert.build_model(convert.read_pytorch(loaded, config), config)
        return Loaded(net, "mae", "file", config.name, None, None, source.path)
    if model and model != source.model.name:
        raise ValueError(
            f"model={model!r} does not match {source.describe()}, which holds "
            f"{source.model.name!r}; leave model unset for a workdir"
        )
    _, meta = wdir.checkpoint_meta(wdir.Reader(source.path), step, "mae-jax")
    task = meta.get("task") or meta.get("kind") or "pretrain"
    if wdir.is_classifier(meta):
        found = wdir.read_classifier(source.path, step)
        config = models.resolve(found.config, **overrides)
        net = cc.set_classifier(from_head(config, found.head), found.tree, found.pos_embed)
        return Loaded(net, "classifier", task, config.name, found.head, found.step, source.path)
    found_step, config, params = wdir.read_mae(source.path, step, **overrides)
    net = models.create(config)
    mapping.set_weights(net, params)
    return Loaded(net, "mae", task, config.name, None, found_step, source.path)
