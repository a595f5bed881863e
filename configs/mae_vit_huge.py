"""MAE ViT-H/14 pretraining on ImageNet-1K, the paper's recipe (800 epochs, batch 4096).

Run on a TPU pod (see launch/README.md), e.g.:
  python -m mae_jax.main --config=configs/mae_vit_huge.py --workdir=gs://bucket/mae/vit_h \
      --config.data.data_dir=gs://bucket/tfds --config.mesh.fsdp=8
Expected: 86.9% top-1 after fine-tuning at 224 (76.6% linear probe) in the paper.
"""

from mae_jax.pretrain_config import base_config


def get_config():
    c = base_config("mae_vit_huge_patch14")
    c.model.remat = True
    return c
