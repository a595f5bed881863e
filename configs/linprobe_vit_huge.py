"""Linear probing of a pretrained MAE ViT-H/14 on ImageNet-1K, the paper's recipe (see
configs/linprobe_vit_base.py): LARS base lr 0.1, batch 16384, 90 epochs, 10 warmup.

Run:
  python -m mae_jax.main --config=configs/linprobe_vit_huge.py --workdir=DIR \
      --config.init_from.path=PRETRAIN_WORKDIR
Expected: top-1 76.6% (the paper's ViT-H linear probe), in DIR/eval_results.json.

The recipe: configs/linprobe.py, variant `vit_huge` (the same as
`--config=configs/linprobe.py:vit_huge`).
"""

from mae_jax.config_file import variant


def get_config():
    return variant(__file__, "linprobe.py", "vit_huge")
