"""CPU smoke run: a tiny MAE (32x32 images, patch 4) trained for real on the embedded default
data (crops of real photos bundled with scikit-image), about a minute on 2 CPU cores.

Run:
  python -m mae_jax.main --config=configs/smoke.py --workdir=/tmp/mae_smoke
Expected: the loss (norm_pix_loss) falls from about 2 at step 1 to about 0.5; metrics in
/tmp/mae_smoke/metrics.jsonl, checkpoints in /tmp/mae_smoke/checkpoints.

The recipe: configs/mae_pretrain.py, variant `smoke` (the same as
`--config=configs/mae_pretrain.py:smoke`).
"""

from mae_jax.config_file import variant


def get_config():
    return variant(__file__, "mae_pretrain.py", "smoke")
