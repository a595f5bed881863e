"""MAE ViT-L/16 pretraining on ImageNet-1K, the paper's recipe (800 epochs, batch 4096).

Run on a TPU pod (see launch/README.md), e.g.:
  python -m mae_jax.main --config=configs/mae_vit_large.py --workdir=gs://bucket/mae/vit_l \
      --config.data.data_dir=gs://bucket/tfds
Expected: 85.9% top-1 after fine-tuning (75.8% linear probe) in the paper.
"""

from mae_jax.pretrain_config import base_config


def get_config():
    return base_config("mae_vit_large_patch16")
