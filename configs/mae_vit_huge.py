"""MAE ViT-H/14 pretraining on ImageNet-1K, the paper's recipe (800 epochs, batch 4096).

Run on a TPU pod (see launch/README.md), e.g.:
  python -m mae_jax.main --config=configs/mae_vit_huge.py --workdir=gs://bucket/mae/vit_h \
      --config.data.data_dir=gs://bucket/tfds --config.mesh.fsdp=8
Expected: 86.9% top-1 after fine-tuning at 224 (76.6% linear probe) in the paper.

The recipe: configs/mae_pretrain.py, variant `vit_huge` (the same as
`--config=configs/mae_pretrain.py:vit_huge`).
"""

from mae_jax.config_file import variant


def get_config():
    return variant(__file__, "mae_pretrain.py", "vit_huge")
