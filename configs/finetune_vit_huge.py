"""Fine-tuning of a pretrained MAE ViT-H/14 on ImageNet-1K, the official recipe (see
configs/finetune_vit_base.py) with base lr 1e-3, layer-wise lr decay 0.75, drop path 0.3,
50 epochs (5 warmup).

Run:
  python -m mae_jax.main --config=configs/finetune_vit_huge.py --workdir=DIR \
      --config.init_from.path=PRETRAIN_WORKDIR
Expected: top-1 86.9% (the paper's fine-tuned ViT-H at 224 px), in DIR/eval_results.json.

The recipe: configs/finetune.py, variant `vit_huge` (the same as
`--config=configs/finetune.py:vit_huge`).
"""

from mae_jax.config_file import variant


def get_config():
    return variant(__file__, "finetune.py", "vit_huge")
