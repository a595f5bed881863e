"""Fine-tuning of a pretrained MAE ViT-L/16 on ImageNet-1K, the official recipe (see
configs/finetune_vit_base.py) with base lr 1e-3, layer-wise lr decay 0.75, drop path 0.2,
50 epochs (5 warmup).

Run:
  python -m mae_jax.main --config=configs/finetune_vit_large.py --workdir=DIR \
      --config.init_from.path=PRETRAIN_WORKDIR
Expected: top-1 85.9% (the paper's fine-tuned ViT-L), in DIR/eval_results.json.

The recipe: configs/finetune.py, variant `vit_large` (the same as
`--config=configs/finetune.py:vit_large`).
"""

from mae_jax.config_file import variant


def get_config():
    return variant(__file__, "finetune.py", "vit_large")
