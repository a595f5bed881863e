"""Fine-tuning of a pretrained MAE ViT-L/16 on ImageNet-1K, the official recipe (see
configs/finetune_vit_base.py) with base lr 1e-3, layer-wise lr decay 0.75, drop path 0.2,
50 epochs (5 warmup).

Run:
  python -m mae_jax.main --config=configs/finetune_vit_large.py --workdir=DIR \
      --config.init_from.path=PRETRAIN_WORKDIR
Expected: top-1 85.9% (the paper's fine-tuned ViT-L), in DIR/eval_results.json.
"""

from mae_jax.tasks.finetune import base_config


def get_config():
    c = base_config("mae_vit_large_patch16")
    c.optim.base_lr = 1e-3
    c.optim.layer_decay = 0.75
    c.drop_path_rate = 0.2
    c.epochs = 50
    c.model.remat = True  # all tokens reach the encoder: recompute activations
    return c
