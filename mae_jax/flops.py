"""Model FLOPs per image of the MAE and of the classifier, and the peak throughput of known
devices (for MFU).

Counting convention (the reference's, so numbers compare across implementations): matrix
products only, a multiply-add is 2 FLOPs, a training step is 3x the forward pass, the patch
embedding is counted on all L patches (as the reference's convolution computes it) and the
decoder on its 1 + L tokens. ViT-B/16 at mask ratio 0.75: 58.7 GFLOP per MAE training step;
the ViT-B/16 classifier forward at 224 px (1000 classes): 35.1 GFLOP (17.6 G multiply-adds).
"""

from __future__ import annotations

import jax

from mae_jax import ops
from mae_jax.models import MAEConfig

# Dense bf16 matrix-product peak per device, TFLOP/s. H100/H200: what large bf16 products reach
# (about 800, docs/performance.md), not the 989 of the data sheet; TPUs: the published peaks.
PEAK_TFLOPS = {
    "H100": 800.0,
    "H200": 800.0,
    "A100": 312.0,
    "TPU v4": 275.0,
    "TPU v5 lite": 197.0,
    "TPU v5e": 197.0,
    "TPU v5p": 459.0,
    "TPU v5": 459.0,
    "TPU v6 lite": 918.0,
    "TPU v6e": 918.0,
}


def block_flops(t: int, d: int, mlp_ratio: float) -> float:
    """Forward FLOPs of one transformer block on `t` tokens of width `d`."""
    linear = 2 * t * d * (3 * d) + 2 * t * d * d + 2 * 2 * t * d * int(d * mlp_ratio)
    attention = 2 * 2 * t * t * d  # q @ k^T and attn @ v
    return float(linear + attention)


def encoder_flops(c: MAEConfig, tokens: int) -> float:
    """Forward FLOPs of the encoder: patch embedding of all L patches + `depth` blocks on
    `tokens` tokens (1 + visible patches in the MAE, 1 + L in the classifier)."""
    patch_embed = 2 * c.num_patches * c.patch_dim * c.embed_dim
    return patch_embed + c.depth * block_flops(tokens, c.embed_dim, c.mlp_ratio)


def mae_forward_flops_per_image(c: MAEConfig) -> float:
    """Forward FLOPs of the MAE on one image: encoder on 1 + kept tokens, decoder on 1 + L."""
    enc_tokens = 1 + ops.num_kept(c.num_patches, c.mask_ratio)
    dec_tokens = 1 + c.num_patches
    total = encoder_flops(c, enc_tokens)
    total += 2 * enc_tokens * c.embed_dim * c.decoder_embed_dim  # decoder_embed
    total += c.decoder_depth * block_flops(dec_tokens, c.decoder_embed_dim, c.mlp_ratio)
    total += 2 * dec_tokens * c.decoder_embed_dim * c.patch_dim  # decoder_pred
    return float(total)


def mae_train_flops_per_image(c: MAEConfig) -> float:
    """Model FLOPs of one training step per image: 3 x forward."""
    return 3.0 * mae_forward_flops_per_image(c)


def classifier_flops_per_image(c: MAEConfig, num_classes: int) -> float:
    """Forward FLOPs of the classifier on one image: encoder on all 1 + L tokens + the linear
    head (pooling, norms and the linear probe's BatchNorm are not matrix products). A
    fine-tuning step is 3x this; linear probing (frozen encoder) counts the forward only."""
    return float(encoder_flops(c, 1 + c.num_patches) + 2 * c.embed_dim * num_classes)


def peak_tflops(device: jax.Device | None = None) -> float | None:
    """Known bf16 peak of `device` (default: the first device), or None (e.g. CPU)."""
    device = device or jax.devices()[0]
    kind = getattr(device, "device_kind", "") or ""
    for name, value in sorted(PEAK_TFLOPS.items(), key=lambda kv: -len(kv[0])):
        if name.lower() in kind.lower():
            return value
    return None
