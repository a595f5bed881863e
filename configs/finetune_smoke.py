"""CPU smoke fine-tuning: the tiny MAE of configs/smoke.py (32x32 images, patch 4) fine-tuned with
the full official recipe (mixup/cutmix, label smoothing, RandAugment, random erasing, drop path,
layer-wise lr decay) on the embedded default data (10 classes, 2400 train / 600 eval).

Run (after the pretraining smoke run):
  python -m mae_jax.main --config=configs/smoke.py --workdir=/tmp/mae_smoke
  python -m mae_jax.main --config=configs/finetune_smoke.py --workdir=/tmp/mae_finetune_smoke \
      --config.init_from.path=/tmp/mae_smoke
About 3.5 minutes on 2 CPU cores (180 steps of 128).
Expected: eval top-1 about 66-68%, top-5 93-99% (measured: 66.5% from the 150-step smoke
pretraining, 68.2% from a random encoder: at this scale the run checks the machinery, not the
benefit of pretraining), in /tmp/mae_finetune_smoke/eval_results.json.

The recipe: configs/finetune.py, variant `smoke` (the same as
`--config=configs/finetune.py:smoke`).
"""

from mae_jax.config_file import variant


def get_config():
    return variant(__file__, "finetune.py", "smoke")
