"""Fine-tuning of a pretrained MAE ViT-B/16 on ImageNet-1K, the official recipe: AdamW
(0.9, 0.999), base lr 5e-4 (lr 2e-3 at batch 1024), layer-wise lr decay 0.65, weight decay 0.05,
drop path 0.1, 100 epochs with 5 warmup, RandAugment rand-m9-mstd0.5-inc1, mixup 0.8, cutmix 1.0,
label smoothing 0.1, random erasing 0.25, global average pooling.

Run:
  python -m mae_jax.main --config=configs/finetune_vit_base.py --workdir=DIR \
      --config.init_from.path=PRETRAIN_WORKDIR
(PRETRAIN_WORKDIR: a pretraining workdir, or one written by `python -m mae_jax.convert import`
from the official checkpoint.) Needs the TFDS `imagenet2012` data set (`--config.data.data_dir`).
Expected: top-1 83.6% (the paper's fine-tuned ViT-B), in DIR/eval_results.json.

The recipe: configs/finetune.py, variant `vit_base` (the same as
`--config=configs/finetune.py:vit_base`).
"""

from mae_jax.config_file import variant


def get_config():
    return variant(__file__, "finetune.py", "vit_base")
