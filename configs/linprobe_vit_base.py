"""Linear probing of a pretrained MAE ViT-B/16 on ImageNet-1K, the paper's recipe: frozen
encoder, cls token, BatchNorm (no affine) + linear head, LARS base lr 0.1 (lr 6.4 at batch
16384), weight decay 0, 90 epochs with 10 warmup, RandomResizedCrop + flip.

Run:
  python -m mae_jax.main --config=configs/linprobe_vit_base.py --workdir=DIR \
      --config.init_from.path=PRETRAIN_WORKDIR
(PRETRAIN_WORKDIR: a pretraining workdir, or one written by `python -m mae_jax.convert import`
from the official checkpoint.) Needs the TFDS `imagenet2012` data set (`--config.data.data_dir`).
Expected: top-1 68.0% (the paper's ViT-B linear probe, 800-epoch pretraining), in
DIR/eval_results.json. The global batch 16384 must be divisible by the data-parallel size.

The recipe: configs/linprobe.py, variant `vit_base` (the same as
`--config=configs/linprobe.py:vit_base`).
"""

from mae_jax.config_file import variant


def get_config():
    return variant(__file__, "linprobe.py", "vit_base")
