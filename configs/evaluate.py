"""Evaluation alone (`task=evaluate`, `mae_jax.tasks.evaluate`): top-1 / top-5 of a fine-tuned or
linear-probed classifier on a validation split, without training. Variants:
`--config=configs/evaluate.py:VARIANT`, `imagenet` (default: TFDS `imagenet2012` validation at
224 px, resize to 256 + center crop, as the official `main_finetune.py --eval`) or `smoke` (the
embedded photos at 32 px, for the smoke fine-tuning / linear-probing workdirs).

Run:
  python -m mae_jax.main --config=configs/evaluate.py --workdir=DIR \
      --config.checkpoint.path=FINETUNE_WORKDIR
  python -m mae_jax.main --config=configs/evaluate.py --workdir=DIR \
      --config.checkpoint.path=mae_finetuned_vit_base.pth --config.model.name=mae_vit_base_patch16
Writes DIR/eval_results.json and a line of DIR/metrics.jsonl, and prints top-1 / top-5 / loss.
Expected for the official fine-tuned ViT-B/16 on ImageNet-1K: top-1 83.6%.
"""

from mae_jax import schema

VARIANTS = ("imagenet", "smoke")


def get_config(variant: str = "imagenet"):
    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r}; expected one of {list(VARIANTS)}")
    c = schema.defaults("evaluate")  # every key
    c.data.source = "tfds"
    c.data.name = "imagenet2012"
    c.data.image_size = 224
    c.eval_batch_size = 1024
    if variant == "smoke":
        c.data.source = "embedded"
        c.data.name = ""
        c.data.image_size = 32
        c.eval_batch_size = 200
    return c
