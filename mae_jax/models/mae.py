"""The MAE model: ViT encoder on visible patches + lightweight decoder, as the official release.

Attribute names mirror the official state dict (`cls_token`, `pos_embed`, `patch_embed`,
`blocks`, `norm`, `decoder_embed`, `mask_token`, `decoder_pos_embed`, `decoder_blocks`,
`decoder_norm`, `decoder_pred`).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from mae_jax import ops
from mae_jax.models.config import MAEConfig
from mae_jax.models.vit import (
    Block,
    FixedEmbedding,
    PatchEmbed,
    layer_norm,
    linear,
    normal,
    run_blocks,
)


class MAEOutput(NamedTuple):
    loss: jax.Array  # scalar, float32
    pred: jax.Array  # [N, L, p*p*C], float32
    mask: jax.Array  # [N, L], 1 = removed
    ids_restore: jax.Array  # [N, L]


class MAE(nnx.Module):
    """Masked autoencoder with a ViT backbone. Build through `mae_jax.models.create`."""

    def __init__(self, config: MAEConfig, *, rngs: nnx.Rngs):
        config.validate()
        self.config = config
        c = config
        kw = dict(dtype=c.compute_dtype, param_dtype=c.storage_dtype)
        d, dd = c.embed_dim, c.decoder_embed_dim

        self.patch_embed = PatchEmbed(c.patch_dim, d, rngs=rngs, **kw)
        self.cls_token = nnx.Param(
            normal(0.02, (None, None, "embed"))(rngs.params(), (1, 1, d), c.storage_dtype)
        )
        self.pos_embed = FixedEmbedding(
            jnp.asarray(ops.sincos_2d(d, c.grid_size))[None].astype(c.storage_dtype)
        )
        self.blocks = nnx.List(
            [
                Block(d, c.num_heads, c.mlp_ratio, attention_impl=c.attention_impl, rngs=rngs, **kw)
                for _ in range(c.depth)
            ]
        )
        self.norm = layer_norm(d, rngs=rngs, **kw)

        self.decoder_embed = linear(d, dd, ("embed", "embed"), rngs=rngs, **kw)
        self.mask_token = nnx.Param(
            normal(0.02, (None, None, "embed"))(rngs.params(), (1, 1, dd), c.storage_dtype)
        )
        self.decoder_pos_embed = FixedEmbedding(
            jnp.asarray(ops.sincos_2d(dd, c.grid_size))[None].astype(c.storage_dtype)
        )
        self.decoder_blocks = nnx.List(
            [
                Block(
                    dd,
                    c.decoder_num_heads,
                    c.mlp_ratio,
                    attention_impl=c.attention_impl,
                    rngs=rngs,
                    **kw,
                )
                for _ in range(c.decoder_depth)
            ]
        )
        self.decoder_norm = layer_norm(dd, rngs=rngs, **kw)
        self.decoder_pred = linear(dd, c.patch_dim, ("embed", None), rngs=rngs, **kw)
        # Own masking stream, used when neither noise nor rngs are given.
        self.rngs = nnx.Rngs(masking=rngs.masking())

    # ----------------------------------------------------------------------------- checks
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

    # ----------------------------------------------------------------------------- encoder
    def _embed(self, patches: jax.Array, ids: jax.Array | None) -> jax.Array:
        """Patch vectors -> tokens with position embeddings (optionally only `ids [N, K]`)."""
        pos = self.pos_embed.get_value()[:, 1:].astype(self.config.compute_dtype)
        if ids is None:
            return self.patch_embed(patches) + pos
        # Embedding is per patch, so embedding only the kept patches equals the reference's
        # embed-everything-then-gather, at a quarter of the cost.
        x = self.patch_embed(ops.gather_tokens(patches, ids))
        return x + ops.gather_tokens(jnp.broadcast_to(pos, (x.shape[0],) + pos.shape[1:]), ids)

    def _encode_tokens(self, x: jax.Array) -> jax.Array:
        """Prepend cls (+ its zero pos row), run the blocks and the final norm."""
        c = self.config
        cls = (self.cls_token.get_value() + self.pos_embed.get_value()[:, :1]).astype(
            c.compute_dtype
        )
        x = jnp.concatenate([jnp.broadcast_to(cls, (x.shape[0], 1, x.shape[-1])), x], axis=1)
        return self.norm(run_blocks(self.blocks, x, c.remat))

    def encode(self, images: jax.Array) -> jax.Array:
        """Encoder on all patches (no masking): images `[N, H, W, C]` -> `[N, 1+L, D]`."""
        self.check_images(images)
        patches = ops.patchify(images.astype(self.config.compute_dtype), self.config.patch_size)
        return self._encode_tokens(self._embed(patches, None))

    # ----------------------------------------------------------------------------- decoder
    def decode(self, latent: jax.Array, ids_restore: jax.Array) -> jax.Array:
        """`latent [N, 1+L_keep, D]` -> predictions `[N, L, p*p*C]` (float32)."""
        c = self.config
        x = self.decoder_embed(latent)
        tokens = ops.unshuffle(x[:, 1:], self.mask_token.get_value(), ids_restore)
        x = jnp.concatenate([x[:, :1], tokens], axis=1)
        x = x + self.decoder_pos_embed.get_value().astype(x.dtype)
        x = self.decoder_norm(run_blocks(self.decoder_blocks, x, c.remat))
        return self.decoder_pred(x)[:, 1:].astype(jnp.float32)

    # ----------------------------------------------------------------------------- forward
    def __call__(
        self,
        images: jax.Array,
        *,
        noise: jax.Array | None = None,
        mask_ratio: float | None = None,
        rngs: nnx.Rngs | None = None,
    ) -> MAEOutput:
        """Masked forward pass on normalized images `[N, H, W, C]`.

        The mask comes from `noise [N, L]` when given (fully determined, as the reference),
        else from `rngs` (its `masking` stream, or `default`), else from the model's own stream.
        """
        c = self.config
        ratio = c.mask_ratio if mask_ratio is None else mask_ratio
        ops.check_mask_ratio(ratio)
        self.check_images(images)
        n = images.shape[0]
        target = ops.patchify(images, c.patch_size)
        if noise is None:
            key = (rngs if rngs is not None else self.rngs).masking()
            ids_keep, mask, ids_restore = ops.random_masking(n, c.num_patches, ratio, key=key)
        else:
            ids_keep, mask, ids_restore = ops.random_masking(n, c.num_patches, ratio, noise=noise)
        x = self._embed(target.astype(c.compute_dtype), ids_keep)
        latent = self._encode_tokens(x)
        pred = self.decode(latent, ids_restore)
        loss = ops.mae_loss(pred, target, mask, c.norm_pix_loss)
        return MAEOutput(loss=loss, pred=pred, mask=mask, ids_restore=ids_restore)
