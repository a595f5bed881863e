"""CPU smoke linear probe: the tiny MAE of configs/smoke.py (32x32 images, patch 4) probed on the
embedded default data (10 classes of crops of real photos, 2400 train / 600 eval), with the
paper's protocol (frozen encoder, BatchNorm without affine + linear head, LARS, RandomResizedCrop
+ flip) at a small scale. Differences from the ImageNet configs, and why:
  - global_pool=True (mean patch token + a fresh, frozen fc_norm) instead of the cls token:
    after the 150-step smoke pretraining the cls token has learned little (the MAE loss never
    reads it), and its probe is no better than the random encoder's;
  - absolute lr 6.4 (the paper's lr at batch 16384) at batch 32, over 1500 steps: LARS steps are
    relative (lr x 0.001 of each weight's norm), so the head needs about that many to converge.

Run (after the pretraining smoke run):
  python -m mae_jax.main --config=configs/smoke.py --workdir=/tmp/mae_smoke
  python -m mae_jax.main --config=configs/linprobe_smoke.py --workdir=/tmp/mae_linprobe_smoke \
      --config.init_from.path=/tmp/mae_smoke
The result is in /tmp/mae_linprobe_smoke/eval_results.json; the same probe of the encoder at its
random initialization scores several points lower (docs/evaluation.md).

Measured (the one place for this run's numbers: the README and docs are checked against it by
tests/test_readme_numbers.py): top-1 74.17%, top-5 100.00%, loss 0.8820 in 3.9 min for the
command (235 s), from the smoke pretraining, on 1 CPU device (the default without XLA_FLAGS; the
numbers depend on the device count) of a 2-core machine shared with other jobs (load average
7.6), 2026-12-04.

The recipe: configs/linprobe.py, variant `smoke` (the same as
`--config=configs/linprobe.py:smoke`).
"""

from mae_jax.config_file import variant


def get_config():
    return variant(__file__, "linprobe.py", "smoke")
