"""CPU smoke run: a tiny MAE (32x32 images, patch 4) trained for real on the embedded default
data (crops of real photos bundled with scikit-image).

Run:
  python -m mae_jax.main --config=configs/smoke.py --workdir=/tmp/mae_smoke
Expected: the loss (norm_pix_loss) falls from about 2 at step 1 to about 0.5; metrics in
/tmp/mae_smoke/metrics.jsonl, checkpoints in /tmp/mae_smoke/checkpoints.

Measured (the one place for this run's numbers: the README and docs are checked against it by
tests/test_readme_numbers.py): 2.0 min for the whole command (118 s), on 1 CPU device (the
default without XLA_FLAGS) of a 2-core machine shared with other jobs (load average 0.2 at the
start, 5.3 at the end), 2026-12-04. The logged loss (the mean over the steps since the last
line): 2.1229 at step 1, 0.4999 at step 150 (steps 141-150; the single step 150 was 0.4745), from a
fresh clone and venv, 2026-12-04.

The recipe: configs/mae_pretrain.py, variant `smoke` (the same as
`--config=configs/mae_pretrain.py:smoke`).
"""

from mae_jax.config_file import variant


def get_config():
    return variant(__file__, "mae_pretrain.py", "smoke")
