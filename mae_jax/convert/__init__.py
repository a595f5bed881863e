"""PyTorch interop: export our MAE to the official release's format, timm or Hugging Face, and
build our MAE from any of them.

    sd = to_pytorch(model, format="official")         # {torch name: float32 numpy array}
    save(sd, "mae.pth", "official", model.config)     # torch.save({'model': ...})
    model = from_pytorch("mae_pretrain_vit_base.pth", "mae_vit_base_patch16")

Formats:
- "official": every tensor of the official `MaskedAutoencoderViT` state dict (decoder and the
  fixed position tables included), as `{'model': state_dict}` `.pth` files (official code, timm).
- "timm": the encoder only, named as timm's `VisionTransformer` (`vit_*_224`, created with
  `num_classes=0`): loads with `strict=True`.
- "hf": Hugging Face `ViTMAEForPreTraining` (hub naming, `vit.encoder.layer.{i}...`,
  `decoder.decoder_layers.{i}...`) with a `config.json` from `hf_config`.

Classifiers (fine-tuned / linear-probed ViTs) go through `mae_jax.convert.classifier`
(`classifier_to_pytorch`, `classifier_from_pytorch`: official fine-tuning format, timm
`VisionTransformer` with its head, HF `ViTForImageClassification`).

Only numpy and jax are needed to convert; torch (for `.pth`) and safetensors are imported
lazily by the file functions. `.pth` files are read with `torch.load(weights_only=True)` only.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp
import numpy as np
from flax import nnx

from mae_jax.convert import files, mapping, posembed
from mae_jax.convert.classifier import (
    classifier_from_pytorch,
    classifier_to_pytorch,
    read_classifier,
)
from mae_jax.convert.files import check_hf_config, hf_config, load_state_dict, save
from mae_jax.convert.mapping import FORMATS, detect_format, pytorch_shapes
from mae_jax.convert.posembed import interpolate_pos_embed, resize_pos_embed, target_grid
from mae_jax.models import MAE, create, layout, resolve
from mae_jax.models.config import MAEConfig

__all__ = [
    "FORMATS",
    "Converted",
    "build_model",
    "check_hf_config",
    "classifier_from_pytorch",
    "classifier_to_pytorch",
    "detect_format",
    "from_pytorch",
    "hf_config",
    "interpolate_pos_embed",
    "load_state_dict",
    "params_to_pytorch",
    "pytorch_shapes",
    "read_classifier",
    "read_pytorch",
    "resize_pos_embed",
    "save",
    "target_grid",
    "to_pytorch",
]


# ----------------------------------------------------------------------------- export
def params_to_pytorch(
    params: Mapping,
    config: MAEConfig,
    format: str = "official",
    *,
    img_size: int | None = None,
    pos_embed: Any = None,
    decoder_pos_embed: Any = None,
) -> dict[str, np.ndarray]:
    """Our params tree (`nnx.to_pure_dict(nnx.state(model, nnx.Param))`, blocks per block or
    stacked) -> flat float32 numpy state dict in `format`. Position tables (`[1, 1+L, D]`,
    default: fixed sin-cos) are resized to `img_size`'s grid when given (see
    `resize_pos_embed`)."""
    config = resolve(config)
    params = layout.convert(params, stacked=False)
    grid = target_grid(config, img_size)
    tables = {
        "pos_embed": posembed.table_at(pos_embed, config.embed_dim, grid),
        "decoder_pos_embed": posembed.table_at(decoder_pos_embed, config.decoder_embed_dim, grid),
    }
    return mapping.params_to_pytorch(params, config, mapping.rules(config, format), tables)


def to_pytorch(
    model: MAE, format: str = "official", *, img_size: int | None = None
) -> dict[str, np.ndarray]:
    """`model` -> flat `{torch name: float32 numpy array}` in `format` ('official', 'timm',
    'hf'). With `img_size`, position tables are those of that image size's grid (the exact
    sin-cos table for the fixed embeddings, else bicubic interpolation)."""
    mapping.check_format(format)
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    names = ("pos_embed", "decoder_pos_embed")
    tables = {k: np.asarray(getattr(model, k).get_value(), np.float32) for k in names}
    return params_to_pytorch(params, model.config, format, img_size=img_size, **tables)


# ----------------------------------------------------------------------------- import
@dataclasses.dataclass
class Converted:
    """A PyTorch state dict read into our layout (see `read_pytorch`)."""

    params: dict  # our params tree (numpy), decoder entries only if `has_decoder`
    pos_tables: dict  # {'pos_embed': [1,1+L,D], 'decoder_pos_embed': ...} at our grid
    format: str  # detected: 'official', 'timm' or 'hf'
    has_decoder: bool
    source: str
    sincos: bool  # all position tables read are the fixed sin-cos ones


def read_pytorch(state_dict_or_path: Any, name_or_config: Any, *, strict: bool = True) -> Converted:
    """Read and validate a PyTorch state dict (or a `.pth` / `.safetensors` file / HF directory)
    for the model `name_or_config`; the format is detected from the keys.

    An encoder-only input (published MAE files, timm) gives `has_decoder=False` and a warning.
    Keys that do not match raise ValueError listing the missing, unexpected and mis-shaped ones
    (with `strict=False`, unexpected keys such as a classifier `head.*` are dropped with a
    warning instead). Position tables on another grid are resized (`resize_pos_embed`). Empty,
    truncated or damaged files, and a directory without a valid `config.json`, raise ValueError.
    """
    config = resolve(name_or_config)
    sd, source, fmt = files.read_input(state_dict_or_path, config)
    full = "hf" if fmt == "hf" else "official"  # timm's names are the official encoder's
    rule_list = mapping.rules(config, full)
    decoder_keys = {k for r in rule_list if r.decoder for k in r.torch_keys()}
    has_decoder = any(k in sd for k in decoder_keys)
    kind = mapping.describe(sd, fmt)
    expected = mapping.pytorch_shapes(config, full).items()
    wanted = {k: s for k, s in expected if has_decoder or k not in decoder_keys}
    missing, unexpected, misshaped = mapping.compare_shapes(sd, wanted, rule_list)
    if unexpected and not strict:
        warnings.warn(
            f"{source}: ignoring {len(unexpected)} unexpected key(s): "
            f"{mapping.format_list(unexpected)}",
            stacklevel=2,
        )
        unexpected = []
    if missing or unexpected or misshaped:
        raise mapping.mismatch_error(
            f"{source} ({kind}) for model {config.name}", missing, unexpected, misshaped
        )
    if not has_decoder:
        warnings.warn(
            f"{source} holds the encoder only ({kind}): the decoder of {config.name} is "
            f"freshly initialized",
            stacklevel=2,
        )
    params, tables = mapping.pytorch_to_params(sd, rule_list, has_decoder)
    sincos = all(posembed.is_sincos(t) for t in tables.values())
    tables = {k: resize_pos_embed(t, config.grid_size) for k, t in tables.items()}
    return Converted(params, tables, fmt, has_decoder, source, sincos)


def build_model(converted: Converted, name_or_config: Any, *, seed: int = 0) -> MAE:
    """Our model holding `converted`'s weights (parts it lacks: initialized from `seed`)."""
    model = create(resolve(name_or_config), seed=seed)
    mapping.set_weights(model, converted.params)
    for name, table in converted.pos_tables.items():
        var = getattr(model, name)
        var.set_value(jnp.asarray(table, dtype=var.get_value().dtype))
    return model


def from_pytorch(
    state_dict_or_path: Any, name_or_config: Any, *, seed: int = 0, strict: bool = True
) -> MAE:
    """Our MAE (`mae_jax.models.create(name_or_config, seed=seed)`) with the weights of a
    PyTorch state dict, a `.pth` / `.safetensors` file or a Hugging Face directory, in any of
    `FORMATS` (detected). See `read_pytorch` for validation, encoder-only inputs and position
    tables."""
    return build_model(
        read_pytorch(state_dict_or_path, name_or_config, strict=strict), name_or_config, seed=seed
    )
