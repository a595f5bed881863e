"""The MAE model: ViT encoder on visible patches + lightweight decoder, as the official release.

Attribute names mirror the official state dict (`cls_token`, `pos_embed`, `patch_embed`,
`blocks`, `norm`, `decoder_embed`, `mask_token`, `decoder_pos_embed`, `decoder_blocks`,
`decoder_norm`, `decoder_pred`). The encoder (`patch_embed` .. `blocks`) is the `Encoder` base
class shared with the classifier; in training it runs on the visible patches only.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from mae_jax import ops
from mae_jax.models.config import MAEConfig
from mae_jax.models.encoder import Encoder, learned_token, sincos_table, transformer
from mae_jax.models.vit import layer_norm, linear, run_blocks


class MAEOutput(NamedTuple):
    loss: jax.Array  # scalar, float32
    pred: jax.Array  # [N, L, p*p*C], float32
    mask: jax.Array  # [N, L], 1 = removed
    ids_restore: jax.Array  # [N, L]


class MAE(Encoder):
    """Masked autoencoder with a ViT backbone. Build through `mae_jax.models.create`."""

    def __init__(self, config: MAEConfig, *, rngs: nnx.Rngs):
        config.validate()
        super().__init__(config, rngs=rngs)  # patch_embed, cls_token, pos_embed, blocks
        c = config
        kw = dict(dtype=c.compute_dtype, param_dtype=c.storage_dtype)
        d, dd = c.embed_dim, c.decoder_embed_dim
        self.norm = layer_norm(d, rngs=rngs, **kw)

        self.decoder_embed = linear(d, dd, ("embed", "embed"), rngs=rngs, **kw)
        self.mask_token = learned_token(dd, c, rngs)
        self.decoder_pos_embed = sincos_table(dd, c)
        self.decoder_blocks = transformer(c, dd, c.decoder_num_heads, c.decoder_depth, rngs)
        self.decoder_norm = layer_norm(dd, rngs=rngs, **kw)
        self.decoder_pred = linear(dd, c.patch_dim, ("embed", None), rngs=rngs, **kw)
        # Own masking stream, used when neither noise nor rngs are given.
        self.rngs = nnx.Rngs(masking=rngs.masking())

    def encode(self, images: jax.Array) -> jax.Array:
        """Encoder on all patches (no masking): images `[N, H, W, C]` -> `[N, 1+L, D]`, normed."""
        return self.norm(self.encoder_tokens(images))

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
        ratio = c.mask_ratio if mask_ratio is None else mask_ratio  # checked by random_masking
        self.check_images(images)
        n = images.shape[0]
        target = ops.patchify(images, c.patch_size)
        key = None if noise is not None else (rngs if rngs is not None else self.rngs).masking()
        ids_keep, mask, ids_restore = ops.random_masking(
            n, c.num_patches, ratio, key=key, noise=noise
        )
        x = self.embed(target.astype(c.compute_dtype), ids_keep)  # [N, K, D], visible only
        latent = self.norm(self.run_encoder(x))  # [N, 1+K, D]
        pred = self.decode(latent, ids_restore)
        loss = ops.mae_loss(pred, target, mask, c.norm_pix_loss)
        return MAEOutput(loss=loss, pred=pred, mask=mask, ids_restore=ids_restore)
