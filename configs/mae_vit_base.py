"""MAE ViT-B/16 pretraining on ImageNet-1K, the paper's recipe (800 epochs, batch 4096).

Run (data in TFDS format under $TFDS_DATA_DIR, e.g. gs://bucket/tfds):
  python -m mae_jax.main --config=configs/mae_vit_base.py --workdir=gs://bucket/mae/vit_b \
      --config.data.data_dir=$TFDS_DATA_DIR
Expected: the paper's ViT-B reaches 83.6% top-1 after fine-tuning (68.0% linear probe).

The recipe: configs/mae_pretrain.py, variant `vit_base` (the same as
`--config=configs/mae_pretrain.py:vit_base`).
"""

from mae_jax.config_file import variant


def get_config():
    return variant(__file__, "mae_pretrain.py", "vit_base")
