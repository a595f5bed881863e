"""Fine-tuning recipes: the official ImageNet-1K recipe (He et al., CVPR 2022, Appendix A.1;
the official `main_finetune.py` and FINETUNE.md) for ViT-B/16, ViT-L/16 and ViT-H/14, and a CPU
smoke variant. Pick one with `--config=configs/finetune.py:VARIANT` (default `vit_base`).

  AdamW (0.9, 0.999), weight decay 0.05, layer-wise lr decay, drop path, RandAugment
  rand-m9-mstd0.5-inc1, mixup 0.8, cutmix 1.0, label smoothing 0.1, random erasing 0.25,
  global average pooling + fc_norm, batch 1024, 5 warm-up epochs then cosine to 1e-6.
  ViT-B: base lr 5e-4 (lr 2e-3 at batch 1024), layer decay 0.65, drop path 0.1, 100 epochs;
  ViT-L: 1e-3, 0.75, 0.2, 50 epochs; ViT-H: 1e-3, 0.75, 0.3, 50 epochs.

Run:
  python -m mae_jax.main --config=configs/finetune.py:vit_base --workdir=DIR \
      --config.init_from.path=PRETRAIN_WORKDIR
Expected: top-1 83.6% (ViT-B), 85.9% (ViT-L), 86.9% (ViT-H at 224 px) in DIR/eval_results.json.
Smoke: see configs/finetune_smoke.py.
"""

from mae_jax import schema

# model, base lr, layer-wise lr decay, drop path rate, epochs, remat policy
VARIANTS = {
    "vit_base": ("mae_vit_base_patch16", 5e-4, 0.65, 0.1, 100, "none"),
    "vit_large": ("mae_vit_large_patch16", 1e-3, 0.75, 0.2, 50, "full"),
    "vit_huge": ("mae_vit_huge_patch14", 1e-3, 0.75, 0.3, 50, "full"),
    "smoke": ("mae_vit_tiny_patch4_32", 1e-3, 0.75, 0.1, 10, "none"),
}


def get_config(variant: str = "vit_base"):
    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r}; expected one of {sorted(VARIANTS)}")
    name, base_lr, layer_decay, drop_path, epochs, remat = VARIANTS[variant]
    c = schema.defaults("finetune")  # every key, neutral values
    # remat: every token reaches the encoder in fine-tuning, so L/H recompute activations
    c.model = schema.model_block(
        name,
        dtype="bfloat16",
        param_dtype="float32",
        remat=remat,
        # one scanned layer (compile time independent of depth) where blocks keep only their
        # inputs; see configs/mae_pretrain.py
        scan_layers=remat == "full",
    )
    c.global_pool = True
    c.drop_path_rate = drop_path
    c.mixup = 0.8
    c.cutmix = 1.0
    c.mixup_prob = 1.0
    c.mixup_switch_prob = 0.5
    c.label_smoothing = 0.1
    c.rand_augment = "rand-m9-mstd0.5-inc1"
    c.reprob = 0.25
    c.data.source = "tfds"
    c.data.name = "imagenet2012"
    c.data.image_size = 224
    c.data.train_crop_min_scale = 0.08
    c.batch_size = 1024  # global
    c.epochs = epochs
    c.warmup_epochs = 5
    c.optim.name = "adamw"
    c.optim.base_lr = base_lr
    c.optim.b1, c.optim.b2 = 0.9, 0.999
    c.optim.weight_decay = 0.05
    c.optim.layer_decay = layer_decay
    c.optim.no_decay_names = ("pos_embed", "cls_token")
    c.optim.min_lr = 1e-6
    if variant == "smoke":  # the tiny MAE of configs/smoke.py on the embedded photos
        c.model.dtype = "float32"
        c.data.source = "embedded"
        c.data.name = ""
        c.data.image_size = 32
        c.batch_size = 128
        c.warmup_epochs = 1
        c.checkpoint_every_steps = 100
        c.log_every_steps = 20
    return c
