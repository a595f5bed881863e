"""CPU smoke fine-tuning: the tiny MAE of configs/smoke.py (32x32 images, patch 4) fine-tuned with
the full official recipe (mixup/cutmix, label smoothing, RandAugment, random erasing, drop path,
layer-wise lr decay) on the embedded default data (10 classes, 2400 train / 600 eval).

Run (after the pretraining smoke run):
  python -m mae_jax.main --config=configs/smoke.py --workdir=/tmp/mae_smoke
  python -m mae_jax.main --config=configs/finetune_smoke.py --workdir=/tmp/mae_finetune_smoke \
      --config.init_from.path=/tmp/mae_smoke
180 steps of 128; the result is in /tmp/mae_finetune_smoke/eval_results.json. At this scale the
run checks the machinery, not the benefit of pretraining (a random encoder scores about the
same).

Measured (the one place for this run's numbers: the README and docs are checked against it by
tests/test_readme_numbers.py): top-1 65.50%, top-5 91.83%, loss 1.5085 in 11.4 min for the
command (682 s), from the smoke pretraining above, on 1 CPU device (the default without
XLA_FLAGS; the numbers depend on the device count: on another count expect other numbers) of a
2-core machine shared with other jobs (load average 7.2), 2026-12-04.

The recipe: configs/finetune.py, variant `smoke` (the same as
`--config=configs/finetune.py:smoke`).
"""

from mae_jax.config_file import variant


def get_config():
    return variant(__file__, "finetune.py", "smoke")
