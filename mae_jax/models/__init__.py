"""Model presets and the stable entry point `create`."""

from __future__ import annotations

from typing import Any

from flax import nnx

from mae_jax.models import layout
from mae_jax.models.config import (
    ARCHITECTURE_FIELDS,
    PRESETS,
    MAEConfig,
    config_block,
    dtype_name,
    resolve,
)
from mae_jax.models.mae import MAE, MAEOutput

__all__ = [
    "ARCHITECTURE_FIELDS",
    "MAE",
    "MAEConfig",
    "MAEOutput",
    "PRESETS",
    "config_block",
    "create",
    "dtype_name",
    "layout",
    "resolve",
]


def create(name_or_config: Any, *, seed: int = 0, **overrides) -> MAE:
    """Build an MAE model.

    `name_or_config`: a preset name (`mae_vit_base_patch16`, `mae_vit_large_patch16`,
    `mae_vit_huge_patch14`, `mae_vit_small_patch16`, `mae_vit_tiny_patch4_32`, `mae_vit_test`),
    an `MAEConfig`, or a mapping with `name` plus fields. `overrides` replace config fields,
    e.g. `norm_pix_loss=True, img_size=112, dtype="bfloat16"` (or `dtype=jnp.bfloat16`); None
    keeps the preset's value. Initialization is the official one and is determined by `seed`.
    """
    config = resolve(name_or_config, **overrides)
    return MAE(config, rngs=nnx.Rngs(seed))
