"""Linear probing of a pretrained MAE ViT-L/16 on ImageNet-1K, the paper's recipe (see
configs/linprobe_vit_base.py): LARS base lr 0.1, batch 16384, 90 epochs, 10 warmup.

Run:
  python -m mae_jax.main --config=configs/linprobe_vit_large.py --workdir=DIR \
      --config.init_from.path=PRETRAIN_WORKDIR
Expected: top-1 75.8% (the paper's ViT-L linear probe), in DIR/eval_results.json.

The recipe: configs/linprobe.py, variant `vit_large` (the same as
`--config=configs/linprobe.py:vit_large`).
"""

from mae_jax.config_file import variant


def get_config():
    return variant(__file__, "linprobe.py", "vit_large")
