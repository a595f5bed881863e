"""PyTorch interop of classifiers (fine-tuned or linear-probed ViTs, `models.classifier`).

    sd = classifier_to_pytorch(model, "official")           # {torch name: numpy array}
    save(sd, "ft.pth", "official", model.config)            # torch.save({'model': sd})
    model = classifier_from_pytorch("ft.pth", "mae_vit_base_patch16")

Formats (names: `mapping.classifier_rules`):
- "official": the `model` state dict the official `main_finetune.py` / `main_linprobe.py` save
  (`util/misc.py: save_model`): `models_vit.VisionTransformer` with `fc_norm` (global pooling)
  or `norm` (cls token) and `head`; a linear probe's head is `head.0` (BatchNorm1d without
  affine: `running_mean`, `running_var`, `num_batches_tracked`) + `head.1` (Linear). Files hold
  `{'model': state_dict}`, which the official `--resume FILE --eval` loads strictly; the
  'optimizer', 'scaler', 'epoch' and 'args' entries of its training checkpoints are left out
  (there is no PyTorch optimizer state, and `torch.load(weights_only=True)`, the default since
  torch 2.6, refuses the pickled `argparse.Namespace` of 'args').
- "timm": the same names, for timm's `VisionTransformer(global_pool='avg', fc_norm=True)`
  (global pooling, as timm's own MAE fine-tuned weights) or `global_pool='token'`
  (`timm_model`); loads with `strict=True`.
- "hf": Hugging Face `ViTForImageClassification` (cls token after `vit.layernorm`, then
  `classifier`) with a `config.json` from `hf_classifier_config`; a global-pooling model is
  refused (ValueError) rather than exported to different logits.

timm and HF heads are one Linear: a linear probe's BatchNorm is folded into it
(`fold_batchnorm`). Imports read the head's kind from the keys (`mapping.classifier_head`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mae_jax.convert import files, mapping, posembed
from mae_jax.models import layout, resolve
from mae_jax.models.classifier import BN_EPS, Head, ViTClassifier, from_head
from mae_jax.models.config import MAEConfig

_STATE = nnx.Any(nnx.Param, nnx.BatchStat)  # what a classifier's tree holds
# timm's ViT names by (embed_dim, depth, num_heads, patch_size): vit_{size}_patch{p}_224
_TIMM_NAMES = {
    (192, 12, 3, 16): "vit_tiny_patch16_224",
    (384, 12, 6, 16): "vit_small_patch16_224",
    (384, 12, 6, 32): "vit_small_patch32_224",
    (768, 12, 12, 16): "vit_base_patch16_224",
    (768, 12, 12, 32): "vit_base_patch32_224",
    (1024, 24, 16, 16): "vit_large_patch16_224",
    (1024, 24, 16, 32): "vit_large_patch32_224",
    (1280, 32, 16, 14): "vit_huge_patch14_224",
}


def classifier_tree(model: ViTClassifier) -> dict:
    """`model`'s Params and BatchNorm statistics as one pure dict of numpy arrays."""
    return jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(model, _STATE)))


def fold_batchnorm(tree: Mapping, eps: float = BN_EPS) -> dict:
    """A linear probe's tree with `head = {0: {mean, var}, 1: {kernel [D, C], bias [C]}}` ->
    one Linear `head = {kernel, bias}` computing the same logits with the running statistics:
    `((x - mean) / sqrt(var + eps)) @ K + b = x @ (s[:, None] * K) + (b - (mean * s) @ K)`,
    `s = 1 / sqrt(var + eps)` (computed in float64, stored float32)."""
    stats, linear = tree["head"][0], tree["head"][1]
    s = 1.0 / np.sqrt(np.asarray(stats["var"], np.float64) + eps)
    kernel = np.asarray(linear["kernel"], np.float64)
    mean = np.asarray(stats["mean"], np.float64)
    folded = {
        "kernel": (s[:, None] * kernel).astype(np.float32),
        "bias": (np.asarray(linear["bias"], np.float64) - (mean * s) @ kernel).astype(np.float32),
    }
    return {**tree, "head": folded}


def tree_to_pytorch(
    tree: Mapping,
    config: MAEConfig,
    head: Head,
    fmt: str = "official",
    *,
    img_size: int | None = None,
    pos_embed: Any = None,
    num_batches_tracked: int = 0,
) -> dict[str, np.ndarray]:
    """A classifier's tree (`classifier_tree`, or a checkpoint's entries merged) -> flat
    `{torch name: numpy array}` in `fmt` (float32; a linear probe's official
    `head.0.num_batches_tracked` int64). `pos_embed` `[1, 1+L, D]` (default: the fixed sin-cos
    table) is resized to `img_size`'s grid when given."""
    mapping.check_format(fmt)
    config = resolve(config)
    tree = layout.convert(tree, stacked=False)
    if head.linear_probe and fmt != "official":
        tree, head = fold_batchnorm(tree), dataclasses.replace(head, linear_probe=False)
    table = posembed.table_at(pos_embed, config.embed_dim, posembed.target_grid(config, img_size))
    rule_list = mapping.classifier_rules(config, head, fmt)
    sd = mapping.params_to_pytorch(tree, config, rule_list, {"pos_embed": table})
    if head.linear_probe:
        sd[f"head.0.{mapping.BN_COUNT}"] = np.asarray(num_batches_tracked, np.int64)
    return sd


def classifier_to_pytorch(
    model: ViTClassifier, format: str = "official", *, img_size: int | None = None
) -> dict[str, np.ndarray]:
    """`model` -> flat `{torch name: numpy array}` in `format` ('official', 'timm', 'hf'),
    with its own position table (resized to `img_size`'s grid when given)."""
    return tree_to_pytorch(
        classifier_tree(model),
        model.config,
        model.head_spec,
        format,
        img_size=img_size,
        pos_embed=np.asarray(model.pos_embed.get_value(), np.float32),
    )


# ----------------------------------------------------------------------------- import
@dataclasses.dataclass
class ConvertedClassifier:
    """A PyTorch classifier state dict read into our layout (see `read_classifier`)."""

    tree: dict  # Params and BatchNorm statistics (numpy), per-block layout
    head: Head
    pos_embed: np.ndarray  # [1, 1+L, D] at the model's grid
    format: str  # 'official' (also timm's names) or 'hf'
    source: str
    sincos: bool  # the file's position table is the fixed sin-cos one


def read_classifier(state_dict_or_path: Any, name_or_config: Any) -> ConvertedClassifier:
    """Read and validate a classifier state dict (or `.pth` / `.safetensors` file / HF
    directory) for the encoder `name_or_config`; the head (classes, pooling, linear probe) is
    read from the keys. Keys or shapes that do not fit raise ValueError listing them; a file
    without a classifier head raises ValueError. Position tables on another grid are resized."""
    config = resolve(name_or_config)
    sd, source, fmt = files.read_input(state_dict_or_path, config)
    fmt = "hf" if fmt == "hf" else "official"  # timm's classifier names are the official ones
    head = mapping.classifier_head(sd)
    if head is None:
        raise ValueError(
            f"{source} has no classifier head (no 'head.weight', 'head.1.weight' or "
            f"'classifier.weight'): it holds an MAE or a bare encoder; import it as MAE weights "
            f"(`python -m mae_jax.convert import`) or use it as config.init_from"
        )
    sd = {k: v for k, v in sd.items() if k != f"head.0.{mapping.BN_COUNT}"}
    rule_list = mapping.classifier_rules(config, head, fmt)
    wanted = mapping.classifier_shapes(config, head, fmt)
    problems = mapping.compare_shapes(sd, wanted, rule_list)  # missing, unexpected, mis-shaped
    if any(problems):
        kind = "linear-probe" if head.linear_probe else "fine-tuned"
        raise mapping.mismatch_error(
            f"{source} ({fmt} format, {kind} classifier, {head.num_classes} classes) for model "
            f"{config.name}",
            *problems,
        )
    tree, tables = mapping.pytorch_to_params(sd, rule_list, False)
    table = np.asarray(tables["pos_embed"], np.float32)
    sincos = posembed.is_sincos(table)
    return ConvertedClassifier(
        tree, head, posembed.resize_pos_embed(table, config.grid_size), fmt, source, sincos
    )


def build_classifier(converted: ConvertedClassifier, name_or_config: Any) -> ViTClassifier:
    """Our classifier holding `converted`'s weights, statistics and position table."""
    config = resolve(name_or_config)
    return set_classifier(from_head(config, converted.head), converted.tree, converted.pos_embed)


def set_classifier(model: ViTClassifier, tree: Mapping, pos_embed=None) -> ViTClassifier:
    """`model` holding a classifier tree (Params and BatchNorm statistics, either block layout)
    and, when given, a position table `[1, 1+L, D]` (resized to `model`'s grid); in place."""
    mapping.set_weights(model, tree, _STATE)
    if pos_embed is not None:
        table = posembed.resize_pos_embed(pos_embed, model.config.grid_size)
        model.pos_embed.set_value(jnp.asarray(table, dtype=model.pos_embed.get_value().dtype))
    return model


def classifier_from_pytorch(state_dict_or_path: Any, name_or_config: Any) -> ViTClassifier:
    """Our `ViTClassifier` from a PyTorch classifier (see `read_classifier`)."""
    return build_classifier(read_classifier(state_dict_or_path, name_or_config), name_or_config)


# ----------------------------------------------------------------------------- descriptions
def hf_classifier_config(config: MAEConfig, head: Head, img_size: int | None = None) -> dict:
    """A `ViTConfig` dict (`config.json`) for `ViTForImageClassification` of `config`/`head`."""
    out = {
        k: v
        for k, v in files.hf_config(config, img_size).items()
        if not k.startswith("decoder_") and k not in ("mask_ratio", "norm_pix_loss")
    }
    labels = {str(i): f"LABEL_{i}" for i in range(head.num_classes)}
    out.update(
        architectures=["ViTForImageClassification"],
        model_type="vit",
        id2label=labels,
        label2id={v: int(k) for k, v in labels.items()},
    )
    return out


def timm_model(config: MAEConfig, head: Head, img_size: int | None = None) -> tuple:
    """`(name, kwargs)` of the timm model that loads a 'timm' export strictly:
    `timm.create_model(name, **kwargs)` (`img_size` in `kwargs` when not 224); `name` is None
    for sizes timm does not name, then `VisionTransformer(**kwargs)` (every field given)."""
    key = (config.embed_dim, config.depth, config.num_heads, config.patch_size)
    img = config.img_size if img_size is None else img_size
    name = _TIMM_NAMES.get(key) if config.mlp_ratio == 4.0 and config.in_chans == 3 else None
    kwargs = dict(
        num_classes=head.num_classes,
        global_pool="avg" if head.global_pool else "token",
        fc_norm=head.global_pool,
    )
    if name is None:
        kwargs.update(vit_kwargs(config, img))
    elif img != 224:
        kwargs["img_size"] = img
    return name, kwargs


def vit_kwargs(config: MAEConfig, img_size: int | None = None) -> dict:
    """The architecture arguments of timm's `VisionTransformer` for `config`'s encoder."""
    fields = ("patch_size", "in_chans", "embed_dim", "depth", "num_heads", "mlp_ratio")
    img = config.img_size if img_size is None else img_size
    return dict(img_size=img, **{f: getattr(config, f) for f in fields})
