"""Linear-probing recipes: the paper's ImageNet-1K protocol (He et al., CVPR 2022, Appendix A.3;
the official `main_linprobe.py`) for ViT-B/16, ViT-L/16 and ViT-H/14, and a CPU smoke variant.
Pick one with `--config=configs/linprobe.py:VARIANT` (default `vit_base`).

  Frozen encoder, cls-token feature after the encoder's final norm, BatchNorm without affine
  parameters + a linear head, LARS (base lr 0.1 x batch / 256, momentum 0.9, weight decay 0),
  batch 16384, 90 epochs with 10 warm-up, RandomResizedCrop + flip.

Run:
  python -m mae_jax.main --config=configs/linprobe.py:vit_base --workdir=DIR \
      --config.init_from.path=PRETRAIN_WORKDIR
(PRETRAIN_WORKDIR: a pretraining workdir, one written by `python -m mae_jax.convert import`, or
an official / timm PyTorch file.) Needs the TFDS `imagenet2012` data set
(`--config.data.data_dir`); the global batch must be divisible by the data-parallel size.
Expected: top-1 68.0% (ViT-B), 75.8% (ViT-L), 76.6% (ViT-H) in DIR/eval_results.json.
Smoke: see configs/linprobe_smoke.py.
"""

from mae_jax import schema

VARIANTS = {
    "vit_base": "mae_vit_base_patch16",
    "vit_large": "mae_vit_large_patch16",
    "vit_huge": "mae_vit_huge_patch14",
    "smoke": "mae_vit_tiny_patch4_32",
}


def get_config(variant: str = "vit_base"):
    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r}; expected one of {sorted(VARIANTS)}")
    c = schema.defaults("linear_probe")  # every key, neutral values
    c.model = schema.model_block(
        VARIANTS[variant],
        dtype="bfloat16",
        param_dtype="float32",
        scan_layers=variant != "smoke",  # one scanned layer: compile time independent of depth
    )
    c.global_pool = False  # the paper's probe reads the cls token
    c.data.source = "tfds"
    c.data.name = "imagenet2012"
    c.data.image_size = 224
    c.data.train_crop_min_scale = 0.08  # RandomResizedCrop (torchvision's default scale)
    c.batch_size = 16384  # global
    c.epochs = 90
    c.warmup_epochs = 10
    c.optim.name = "lars"
    c.optim.base_lr = 0.1
    c.optim.weight_decay = 0.0
    c.optim.momentum = 0.9
    c.optim.min_lr = 0.0
    if variant == "smoke":
        # The tiny MAE of configs/smoke.py on the embedded photos (10 classes, 2400 / 600).
        # global_pool: after 150 smoke steps the cls token has learned little (the MAE loss
        # never reads it), so its probe is no better than the random encoder's. Absolute lr 6.4
        # (the paper's at batch 16384) over 1500 steps of 32: LARS steps are relative.
        c.model.dtype = "float32"
        c.global_pool = True
        c.data.source = "embedded"
        c.data.name = ""
        c.data.image_size = 32
        c.batch_size = 32
        c.eval_batch_size = 200
        c.epochs = 20
        c.warmup_epochs = 2
        c.optim.lr = 6.4
        c.checkpoint_every_steps = 500
        c.log_every_steps = 100
    return c
