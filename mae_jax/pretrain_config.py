"""The pretraining config every `configs/*.py` recipe starts from (the paper's recipe)."""

from __future__ import annotations

import ml_collections
from ml_collections import config_dict

from mae_jax import init_from, models, optim
from mae_jax.data import pipeline


def base_config(model_name: str) -> ml_collections.ConfigDict:
    """The paper's ImageNet-1K pretraining recipe for `model_name` (REFERENCE.md):
    AdamW (0.9, 0.95), wd 0.05, base lr 1.5e-4 x batch/256, batch 4096, 40 warmup epochs then
    cosine over 800 epochs, mask ratio 0.75, norm_pix_loss, RandomResizedCrop(0.2-1) + flip."""
    c = ml_collections.ConfigDict()
    c.task = "pretrain"
    c.seed = 0
    # every MAEConfig field; the architecture ones default (None) to the preset's
    c.model = models.config_block(
        model_name,
        norm_pix_loss=True,
        mask_ratio=0.75,
        dtype="bfloat16",
        param_dtype="float32",
        remat=False,
    )
    c.data = pipeline.default_data_config()
    c.data.source = "tfds"
    c.data.name = "imagenet2012"
    c.data.image_size = 224
    c.data.crop_min_scale = 0.2
    c.batch_size = 4096  # global
    c.grad_accum_steps = 1
    c.epochs = 800
    c.warmup_epochs = 40
    c.total_steps = config_dict.placeholder(int)  # when set, overrides epochs
    c.optim = optim.default_optim_config()
    c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1))
    c.sharding_rules = config_dict.placeholder(tuple)  # None: mae_jax.sharding.DEFAULT_RULES
    # Starting weights of a new run (a workdir or a PyTorch file; '' = fresh init). Resuming
    # the run's own workdir always wins.
    c.init_from = init_from.default_config(parts="all")
    c.checkpoint_every_steps = 1000
    c.keep_checkpoints = 3
    c.keep_every_epochs = 100  # milestones kept for good (0: none), e.g. for 400/800/1600 runs
    c.log_every_steps = 50
    c.reconstruction_every_steps = 5000
    c.knn_every_steps = 0
    c.peak_tflops = config_dict.placeholder(float)  # None: known per device (mae_jax.flops)
    return c
