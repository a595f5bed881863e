"""MAE ViT-L/16 pretraining on ImageNet-1K, the paper's recipe (800 epochs, batch 4096).

Run on a TPU pod (see launch/README.md), e.g.:
  python -m mae_jax.main --config=configs/mae_vit_large.py --workdir=gs://bucket/mae/vit_l \
      --config.data.data_dir=gs://bucket/tfds
Expected: 85.9% top-1 after fine-tuning (75.8% linear probe) in the paper.

The recipe: configs/mae_pretrain.py, variant `vit_large` (the same as
`--config=configs/mae_pretrain.py:vit_large`).
"""

from mae_jax.config_file import variant


def get_config():
    return variant(__file__, "mae_pretrain.py", "vit_large")
