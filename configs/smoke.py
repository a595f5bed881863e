"""CPU smoke run: a tiny MAE (32x32 images, patch 4) trained for real on the embedded default
data (crops of real photos bundled with scikit-image), about a minute on 2 CPU cores.

Run:
  python -m mae_jax.main --config=configs/smoke.py --workdir=/tmp/mae_smoke
Expected: the loss (norm_pix_loss) falls from about 2 at step 1 to about 0.5; metrics in
/tmp/mae_smoke/metrics.jsonl, checkpoints in /tmp/mae_smoke/checkpoints.
"""

from mae_jax.pretrain_config import base_config


def get_config():
    c = base_config("mae_vit_tiny_patch4_32")
    c.model.dtype = "float32"  # CPUs gain nothing from bf16
    c.data.source = "embedded"
    c.data.name = None
    c.data.image_size = 32
    c.batch_size = 64
    c.total_steps = 150
    c.epochs = 100  # only sets the warmup fraction when total_steps is given
    c.warmup_epochs = 5
    c.optim.lr = 1e-3  # absolute peak lr (the paper's scaling gives 3.75e-5 at batch 64)
    c.checkpoint_every_steps = 50
    c.log_every_steps = 20
    c.reconstruction_every_steps = 50
    c.keep_every_epochs = 0
    return c
