"""Model configuration (`MAEConfig`), the named presets, and their validation."""

from __future__ import annotations

import dataclasses
import difflib
import typing
from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp

from mae_jax.spec import require

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
ATTENTION_IMPLS = (None, "xla", "cudnn")
REMAT_NAMES = ("none", "full", "dots_no_batch", "dots")  # `vit.REMAT_POLICIES`
DTYPE_FIELDS = ("dtype", "param_dtype")


def dtype_name(dtype: Any) -> Any:
    """The canonical name (`"bfloat16"`, ...) of a dtype given as a name, a JAX/NumPy scalar type
    (`jnp.bfloat16`, `np.float32`) or a `np.dtype`; anything else is returned unchanged (for
    `MAEConfig.validate` to refuse)."""
    try:
        name = jnp.dtype(dtype).name
    except (TypeError, ValueError):
        return dtype
    return name if name in _DTYPES else dtype


# The fields that fix the parameter shapes: checkpoints of one model agree on all of them.
ARCHITECTURE_FIELDS = (
    "img_size",
    "patch_size",
    "in_chans",
    "embed_dim",
    "depth",
    "num_heads",
    "decoder_embed_dim",
    "decoder_depth",
    "decoder_num_heads",
    "mlp_ratio",
)


@dataclasses.dataclass(frozen=True)
class MAEConfig:
    """Architecture and loss settings of an MAE model (defaults: the official ViT-B/16)."""

    name: str = "mae_vit_base_patch16"
    img_size: int = 224
    patch_size: int = 16
    in_chans: int = 3
    embed_dim: int = 768
    depth: int = 12
    num_heads: int = 12
    decoder_embed_dim: int = 512
    decoder_depth: int = 8
    decoder_num_heads: int = 16
    mlp_ratio: float = 4.0
    norm_pix_loss: bool = False
    mask_ratio: float = 0.75
    dtype: str = "float32"  # compute dtype
    param_dtype: str = "float32"  # storage dtype
    attention_impl: str | None = None  # None: cuDNN flash attention on GPUs (half), else XLA
    remat: str = "none"  # one of REMAT_NAMES; True/False (older configs) mean "full"/"none"
    scan_layers: bool = False  # blocks as one scanned layer: compile time independent of depth

    def __post_init__(self):
        for field in DTYPE_FIELDS:  # jnp.bfloat16, np.dtype("float32"), ... -> their names
            object.__setattr__(self, field, dtype_name(getattr(self, field)))
        if isinstance(self.remat, bool):
            object.__setattr__(self, "remat", "full" if self.remat else "none")

    @property
    def grid_size(self) -> int:
        return self.img_size // self.patch_size

    @property
    def num_patches(self) -> int:
        return self.grid_size**2

    @property
    def patch_dim(self) -> int:
        return self.patch_size**2 * self.in_chans

    @property
    def compute_dtype(self):
        return _DTYPES[self.dtype]

    @property
    def storage_dtype(self):
        return _DTYPES[self.param_dtype]

    def validate(self) -> MAEConfig:
        for field in ARCHITECTURE_FIELDS:
            require(field, getattr(self, field), "num>0" if field == "mlp_ratio" else "int>=1")
        if self.img_size % self.patch_size:
            raise ValueError(
                f"img_size {self.img_size} is not divisible by patch_size {self.patch_size}"
            )
        for what in ("embed_dim", "decoder_embed_dim"):
            heads_field = what.replace("embed_dim", "num_heads")
            dim, heads = getattr(self, what), getattr(self, heads_field)
            if dim % heads:
                raise ValueError(
                    f"{what} {dim} is not divisible by its number of heads ({heads_field} {heads})"
                )
            if dim % 4:
                raise ValueError(
                    f"{what} {dim} must be a multiple of 4 for 2-D sin-cos position embeddings"
                )
        if int(self.embed_dim * self.mlp_ratio) <= 0:
            raise ValueError(f"mlp_ratio {self.mlp_ratio!r} leaves the MLP of no width")
        require("mask_ratio", self.mask_ratio, "num[0,1)")
        for field in ("norm_pix_loss", "scan_layers"):
            require(field, getattr(self, field), "bool")
        for field, allowed, note in (
            ("remat", REMAT_NAMES, " (True/False mean full/none)"),
            *((field, sorted(_DTYPES), "") for field in DTYPE_FIELDS),
            ("attention_impl", ATTENTION_IMPLS, ""),
        ):
            if (value := getattr(self, field)) not in allowed:
                raise ValueError(f"{field} {value!r} is not one of {allowed}{note}")
        return self


PRESETS: dict[str, MAEConfig] = {
    c.name: c
    for c in (
        # The paper's models (official architectures).
        MAEConfig("mae_vit_base_patch16", embed_dim=768, depth=12, num_heads=12),
        MAEConfig("mae_vit_large_patch16", embed_dim=1024, depth=24, num_heads=16),
        MAEConfig("mae_vit_huge_patch14", patch_size=14, embed_dim=1280, depth=32, num_heads=16),
        # Smaller models for CPU work: a ViT-S/16 and tiny ones for smoke runs and tests.
        MAEConfig(
            "mae_vit_small_patch16",
            embed_dim=384,
            depth=12,
            num_heads=6,
            decoder_embed_dim=256,
            decoder_depth=4,
            decoder_num_heads=8,
        ),
        MAEConfig(
            "mae_vit_tiny_patch4_32",
            img_size=32,
            patch_size=4,
            embed_dim=128,
            depth=4,
            num_heads=4,
            decoder_embed_dim=64,
            decoder_depth=2,
            decoder_num_heads=4,
        ),
        MAEConfig(
            "mae_vit_test",
            img_size=32,
            patch_size=8,
            embed_dim=32,
            depth=2,
            num_heads=4,
            decoder_embed_dim=32,
            decoder_depth=1,
            decoder_num_heads=4,
        ),
    )
}

_FIELDS = {f.name for f in dataclasses.fields(MAEConfig)}


def _field_type(hint: Any) -> type:
    """`int` for `int`, `str` for `str | None`."""
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    return args[0] if args else hint


FIELD_TYPES: dict[str, type] = {
    name: _field_type(hint) for name, hint in typing.get_type_hints(MAEConfig).items()
}


def resolve(name_or_config: Any, **overrides) -> MAEConfig:
    """A validated `MAEConfig` from a preset name, an `MAEConfig`, or a mapping.

    A mapping (dict or `ConfigDict`, e.g. a config's `model` block) may hold `name` (a preset to
    start from) plus any field; its None-valued fields mean "the preset's value" and are ignored.
    `overrides` are applied as given (`attention_impl=None` selects the default attention).
    Dtypes may be names or JAX/NumPy dtypes (`jnp.bfloat16`); the config holds their names.
    """
    if isinstance(name_or_config, MAEConfig):
        base, extra = name_or_config, {}
    elif isinstance(name_or_config, str):
        base, extra = _lookup(name_or_config), {}
    elif isinstance(name_or_config, Mapping) or hasattr(name_or_config, "to_dict"):
        as_dict = name_or_config.to_dict() if hasattr(name_or_config, "to_dict") else name_or_config
        extra = {k: v for k, v in as_dict.items() if v is not None}
        base = _lookup(extra.pop("name")) if "name" in extra else MAEConfig()
    else:
        raise ValueError(
            f"expected a preset name, an MAEConfig or a mapping, got {type(name_or_config)}"
        )
    extra.update(overrides)
    unknown = sorted(set(extra) - _FIELDS)
    if unknown:
        hints = [
            f"{k!r} (did you mean {m[0]!r}?)"
            if (m := difflib.get_close_matches(k, _FIELDS, 1))
            else repr(k)
            for k in unknown
        ]
        raise ValueError(f"unknown model option(s) {', '.join(hints)}; known: {sorted(_FIELDS)}")
    return dataclasses.replace(base, **extra).validate()


def _lookup(name: str) -> MAEConfig:
    if name not in PRESETS:
        raise ValueError(f"unknown model preset {name!r}; known presets: {sorted(PRESETS)}")
    return PRESETS[name]
