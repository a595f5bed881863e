"""Model presets and the stable entry point `create`."""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
from flax import nnx

from mae_jax.models import layout
from mae_jax.models.config import (
    ARCHITECTURE_FIELDS,
    PRESETS,
    MAEConfig,
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
    "abstract_params",
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


@functools.lru_cache(maxsize=16)
def _abstract_params(config: MAEConfig) -> dict:
    # Blocks of one stack all have the same shapes: trace a one-block model (tracing the
    # construction of a 32-block model takes seconds) and repeat its block.
    small = dataclasses.replace(config, depth=1, decoder_depth=1, scan_layers=False)
    model = nnx.eval_shape(lambda: MAE(small, rngs=nnx.Rngs(0)))
    tree = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    tree["blocks"] = {i: tree["blocks"][0] for i in range(config.depth)}
    tree["decoder_blocks"] = {i: tree["decoder_blocks"][0] for i in range(config.decoder_depth)}
    return tree


def abstract_params(config: MAEConfig) -> dict:
    """Our params tree of `config` with `jax.ShapeDtypeStruct` leaves (nothing allocated)."""
    tree = _abstract_params(config)
    return jax.tree.map(lambda x: x, tree)  # a fresh copy of the cached containers
