"""The ViT encoder shared by the MAE (`mae.py`) and the classifier (`classifier.py`).

`Encoder` is a base class: its `__init__` puts the encoder's submodules on the model itself,
so the parameter tree stays flat, with the official names: `patch_embed.proj`, `cls_token`,
`blocks.{i}` (and the fixed table `pos_embed [1, 1+L, D]`, cls row first and zero). The final
norm is the host's (`norm` in the MAE, `norm` or `fc_norm` in the classifier), created right
after the blocks, so the parameter initialization draws keys in the same order as before.

Tokens are `[N, T, D]` in the compute dtype, the cls token first.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mae_jax import ops
from mae_jax.models.config import MAEConfig
from mae_jax.models.vit import (
    Block,
    FixedEmbedding,
    PatchEmbed,
    normal,
    run_blocks,
    stack_blocks,
)

# Parameter subtrees of the encoder that a classifier takes over from a pretrained MAE; the
# final `norm` too when it pools the cls token (`mae_jax.init_from`, `mae_jax.tasks.classify`).
ENCODER_KEYS = ("patch_embed", "cls_token", "blocks")


def drop_path_rates(drop_path_rate: float, depth: int) -> list[float]:
    """Stochastic depth per block, linearly increasing from 0 to `drop_path_rate` (timm's
    `torch.linspace(0, rate, depth)`)."""
    return [float(r) for r in np.linspace(0.0, drop_path_rate, depth)]


def learned_token(dim: int, c: MAEConfig, rngs: nnx.Rngs) -> nnx.Param:
    """A `[1, 1, dim]` token initialized normal(0.02): the official `cls_token`, `mask_token`."""
    init = normal(0.02, (None, None, "embed"))
    return nnx.Param(init(rngs.params(), (1, 1, dim), c.storage_dtype))


def sincos_table(dim: int, c: MAEConfig) -> FixedEmbedding:
    """The fixed 2-D sin-cos position table `[1, 1+L, dim]`, the cls row zero."""
    table = jnp.asarray(ops.sincos_2d(dim, c.grid_size))[None]
    return FixedEmbedding(table.astype(c.storage_dtype))


def transformer(c: MAEConfig, dim: int, num_heads: int, depth: int, rngs, drop_path_rate=0.0):
    """`depth` blocks, with drop path when `drop_path_rate` > 0 (`drop_path_rates`), stacked
    when `c.scan_layers` (the same initial values, one array per parameter), else a list."""
    kw = dict(dtype=c.compute_dtype, param_dtype=c.storage_dtype, rngs=rngs)
    rates = drop_path_rates(drop_path_rate, depth) if drop_path_rate > 0 else [None] * depth
    blocks = [
        Block(dim, num_heads, c.mlp_ratio, attention_impl=c.attention_impl, drop_path=r, **kw)
        for r in rates
    ]
    return stack_blocks(blocks) if c.scan_layers else nnx.List(blocks)


class Encoder(nnx.Module):
    """ViT encoder stem and blocks: patch vectors -> `[N, 1+K, D]` tokens before the final norm.

    Subclasses call `super().__init__(config, rngs=rngs)` (after setting `self.config` or not;
    it is set here) and then create their final norm.

    Args:
      config: an `MAEConfig` (its encoder fields).
      drop_path_rate: stochastic depth of the last block (0 .. rate over the blocks, see
        `drop_path_rates`; every block gets a DropPath, the first with rate 0); 0 builds none.
      rngs: the `params` stream for the initialization (and `dropout` for drop path).
    """

    def __init__(self, config: MAEConfig, *, rngs: nnx.Rngs, drop_path_rate: float = 0.0):
        self.config = c = config
        kw = dict(dtype=c.compute_dtype, param_dtype=c.storage_dtype)
        self.patch_embed = PatchEmbed(c.patch_dim, c.embed_dim, rngs=rngs, **kw)
        self.cls_token = learned_token(c.embed_dim, c, rngs)
        self.pos_embed = sincos_table(c.embed_dim, c)
        self.blocks = transformer(c, c.embed_dim, c.num_heads, c.depth, rngs, drop_path_rate)

    def check_images(self, images) -> None:
        """Raise ValueError unless `images` is `[N, img_size, img_size, in_chans]`."""
        c = self.config
        shape = tuple(images.shape)
        if len(shape) != 4:
            raise ValueError(f"images must be NHWC [N, H, W, C], got shape {shape}")
        _, h, w, ch = shape
        if ch != c.in_chans:
            raise ValueError(
                f"images have {ch} channels (shape {shape}), the model expects {c.in_chans} "
                f"(NHWC layout)"
            )
        if h % c.patch_size or w % c.patch_size:
            raise ValueError(
                f"image size {h}x{w} is not divisible by the patch size {c.patch_size}"
            )
        if h != w:
            raise ValueError(
                f"images are {h}x{w}, a non-square patch grid; the model needs square "
                f"{c.img_size}x{c.img_size} images"
            )
        if h != c.img_size:
            raise ValueError(
                f"images are {h}x{w}, the model was built for {c.img_size}x{c.img_size}; "
                f"create it with img_size={h} (position embeddings are interpolated on import)"
            )

    def embed(self, patches: jax.Array, ids: jax.Array | None = None) -> jax.Array:
        """Patch vectors `[N, L, p*p*C]` (compute dtype) -> tokens + position embeddings:
        `[N, L, D]`, or `[N, K, D]` for only the patches `ids [N, K]` (no cls token)."""
        pos = self.pos_embed.get_value()[:, 1:].astype(self.config.compute_dtype)
        if ids is None:
            return self.patch_embed(patches) + pos
        # Embedding is per patch, so embedding only the kept patches equals the reference's
        # embed-everything-then-gather, at a quarter of the cost.
        x = self.patch_embed(ops.gather_tokens(patches, ids))
        return x + ops.gather_tokens(jnp.broadcast_to(pos, (x.shape[0],) + pos.shape[1:]), ids)

    def run_encoder(self, x: jax.Array) -> jax.Array:
        """Embedded patch tokens `[N, K, D]` -> prepend cls (+ its zero position row), run the
        blocks: `[N, 1+K, D]`, before the final norm."""
        c = self.config
        cls = (self.cls_token.get_value() + self.pos_embed.get_value()[:, :1]).astype(
            c.compute_dtype
        )
        x = jnp.concatenate([jnp.broadcast_to(cls, (x.shape[0], 1, x.shape[-1])), x], axis=1)
        return run_blocks(self.blocks, x, c.remat)

    def encoder_tokens(self, images: jax.Array) -> jax.Array:
        """All patches, no masking: images `[N, H, W, C]` -> `[N, 1+L, D]` before the final norm."""
        self.check_images(images)
        c = self.config
        patches = ops.patchify(images.astype(c.compute_dtype), c.patch_size)
        return self.run_encoder(self.embed(patches))
