"""MAE pretraining recipes: the paper's ImageNet-1K recipe (He et al., CVPR 2022, Appendix A.1;
the official `main_pretrain.py` defaults) for ViT-B/16, ViT-L/16 and ViT-H/14, and a CPU smoke
variant. Pick one with `--config=configs/mae_pretrain.py:VARIANT` (default `vit_base`);
configs/mae_vit_{base,large,huge}.py and configs/smoke.py are these variants under their own
names.

  AdamW (0.9, 0.95), weight decay 0.05, base lr 1.5e-4 x global batch / 256, batch 4096,
  800 epochs with 40 warm-up epochs then half-cosine to 0, mask ratio 0.75, norm_pix_loss,
  RandomResizedCrop(0.2-1) + horizontal flip, bf16 compute with fp32 parameters.

Run (data in TFDS format, e.g. gs://bucket/tfds):
  python -m mae_jax.main --config=configs/mae_pretrain.py:vit_large --workdir=gs://bucket/run \
      --config.data.data_dir=gs://bucket/tfds
Expected (the paper, after fine-tuning / linear probing): ViT-B 83.6% / 68.0%, ViT-L 85.9% /
75.8%, ViT-H 86.9% / 76.6% top-1. Smoke: see configs/smoke.py.
"""

from mae_jax import schema

# What differs between the variants (everything else is the common recipe below).
VARIANTS = {
    "vit_base": dict(model="mae_vit_base_patch16"),
    "vit_large": dict(model="mae_vit_large_patch16"),
    "vit_huge": dict(model="mae_vit_huge_patch14", remat="full"),
    "smoke": dict(model="mae_vit_tiny_patch4_32"),
}


def get_config(variant: str = "vit_base"):
    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r}; expected one of {sorted(VARIANTS)}")
    v = VARIANTS[variant]
    c = schema.defaults("pretrain")  # every key, neutral values
    c.model = schema.model_block(
        v["model"],
        norm_pix_loss=True,
        mask_ratio=0.75,
        dtype="bfloat16",  # compute; parameters and optimizer state stay float32
        param_dtype="float32",
        remat=v.get("remat", "none"),
        # The blocks as one scanned layer (XLA compiles one block, whatever the depth) where
        # each block keeps only its input: without remat a scan stacks every block's
        # activations, which the compiler cannot rematerialize across iterations (ViT-L on
        # v4-32 at the paper's batch: 55 GiB of temporaries scanned, 24.8 GiB per block;
        # docs/performance.md).
        scan_layers=v.get("remat", "none") == "full",
    )
    c.data.source = "tfds"
    c.data.name = "imagenet2012"
    c.data.image_size = 224
    c.data.crop_min_scale = 0.2
    c.batch_size = 4096  # global
    c.epochs = 800
    c.warmup_epochs = 40
    c.optim.name = "adamw"
    c.optim.base_lr = 1.5e-4  # lr = base_lr x batch_size / 256
    c.optim.b1, c.optim.b2 = 0.9, 0.95
    c.optim.weight_decay = 0.05
    c.optim.min_lr = 0.0
    c.checkpoint_every_steps = 1000
    c.keep_checkpoints = 3
    c.keep_every_epochs = 100  # milestones kept for good, for 400/800/1600-epoch comparisons
    c.log_every_steps = 50
    c.reconstruction_every_steps = 5000
    # kNN monitor (mae_jax.evaluate.knn_monitor), off unless asked for with
    # --config.knn_every_steps=N: weighted 20-NN top-1 of the cls token, a bank of the first
    # 10k train images and the first 10k validation images (docs/performance.md: cost).
    c.knn_every_steps = 0
    c.knn_bank_size = 10_000
    c.knn_num_queries = 10_000
    if variant == "smoke":  # a tiny MAE on the embedded photos (time: configs/smoke.py)
        c.model.dtype = "float32"  # CPUs gain nothing from bf16
        c.data.source = "embedded"
        c.data.name = ""
        c.data.image_size = 32
        c.batch_size = 64
        c.total_steps, c.epochs = 150, None  # in steps (a period is given one way)
        c.warmup_steps, c.warmup_epochs = 8, None
        c.optim.lr = 1e-3  # absolute peak lr (the paper's scaling gives 3.75e-5 at batch 64)
        c.checkpoint_every_steps = 50
        c.keep_every_epochs = 0
        c.log_every_steps = 20
        c.reconstruction_every_steps = 50
        # kNN over the whole embedded set (2400 bank, 600 queries; the caps of 10k), on the
        # mean of the patch tokens: the MAE loss never reads the cls token, which moved from
        # 73.0% at initialization to 73.8% after 150 steps (the mean: 71.8% to 75.0%).
        c.knn_global_pool = True
    return c
