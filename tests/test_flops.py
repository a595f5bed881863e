"""FLOP counts (`mae_jax.flops`) against hand counts of ViT-B/16."""

import pytest

from mae_jax import flops, models


def test_classifier_flops_vit_b16_hand_count():
    """ViT-B/16 at 224 px, 1000 classes: L = 14*14 = 196 patches, T = 1 + L = 197 tokens,
    D = 768, patch vector P = 16*16*3 = 768, MLP hidden 4D = 3072, 12 blocks; 2 FLOPs per
    multiply-add, matrix products only.

    per block: qkv 2*T*D*3D + proj 2*T*D*D + fc1, fc2 2 * 2*T*D*4D = 24*T*D^2 = 2,788,687,872
               q@k^T, attn@v 2 * 2*T*T*D                             =   119,221,248
    12 blocks                                                        = 34,894,909,440
    patch embedding 2*L*P*D                                          =    231,211,008
    head 2*D*1000                                                    =      1,536,000
    total                                                            = 35,127,656,448
    i.e. 17.56 G multiply-adds (timm / fvcore's 17.6 GMACs for vit_base_patch16_224).
    """
    t, d, n = 197, 768, 1000
    per_block = 24 * t * d * d + 4 * t * t * d
    assert per_block == 2_788_687_872 + 119_221_248
    hand = 12 * per_block + 2 * 196 * 768 * d + 2 * d * n
    assert hand == 35_127_656_448
    cfg = models.resolve("mae_vit_base_patch16")
    assert flops.classifier_flops_per_image(cfg, n) == hand
    # the encoder part is the MAE's encoder count without masking
    assert flops.encoder_flops(cfg, t) == hand - 2 * d * n
    # a fine-tuning step (3x forward) and another resolution: T = 1 + 24*24 at 384 px
    big = models.resolve("mae_vit_base_patch16", img_size=384)
    t = 1 + 24 * 24
    hand = 12 * (24 * t * d * d + 4 * t * t * d) + 2 * 576 * 768 * d + 2 * d * n
    assert 3 * flops.classifier_flops_per_image(big, n) == pytest.approx(3 * hand, rel=1e-15)


def test_mae_flops_unchanged_by_shared_encoder_count():
    """MAE ViT-B/16, mask ratio 0.75: encoder on 1 + 49 tokens, decoder (512 wide, 8 blocks)
    on 197; train step = 3x forward = 58.7 GFLOP."""
    cfg = models.resolve("mae_vit_base_patch16")
    d, dd, p = 768, 512, 768
    enc = 2 * 196 * p * d + 12 * (24 * 50 * d * d + 4 * 50 * 50 * d)
    dec = 2 * 50 * d * dd + 8 * (24 * 197 * dd * dd + 4 * 197 * 197 * dd) + 2 * 197 * dd * p
    assert flops.mae_forward_flops_per_image(cfg) == enc + dec
    assert flops.mae_train_flops_per_image(cfg) / 1e9 == pytest.approx(58.7, abs=0.05)
