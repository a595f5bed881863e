"""Learning signal (slow): a short real pretraining of the smoke recipe beats its own random
initialization under a linear probe."""

import pytest
from config_files import load_config, write_params_checkpoint

from mae_jax import models
from mae_jax import workdir as wdir
from mae_jax.tasks import linear_probe, pretrain


@pytest.mark.slow
def test_pretrained_encoder_beats_its_random_initialization(tmp_path):
    """configs/smoke.py pretraining cut to 100 of its 150 steps, then a short probe of the
    pretrained encoder and of the same encoder at its initialization (the pretraining's step-0
    weights).

    The probe is configs/linprobe_smoke.py with AdamW (lr 0.01, no weight decay) for 3 epochs
    (1 of warm-up) instead of LARS for 20: LARS steps are relative to each weight's norm and
    need the 20 to converge (after 2 or 5 LARS epochs the random encoder still scored higher),
    AdamW separates the two in under a sixth of the steps."""

    pre_config = load_config("configs/smoke.py")
    pre_config.reconstruction_every_steps = 0
    pre_config.total_steps = 100  # 70 steps: a 2.7-point gap (seed 0), too close to the bar
    pre, init = str(tmp_path / "pretrain"), str(tmp_path / "init")
    pretrain.train_and_evaluate(pre_config, pre)
    # the pretraining's initial weights (pretrain.task builds them the same way)
    write_params_checkpoint(
        init, models.create(models.resolve(pre_config.model), seed=pre_config.seed)
    )
    accuracy = {}
    for name, source in (("pretrained", pre), ("random", init)):
        config = load_config("configs/linprobe_smoke.py")
        config.init_from.path = source
        config.optim.name, config.optim.lr, config.optim.weight_decay = "adamw", 0.01, 0.0
        config.epochs, config.warmup_epochs = 3, 1
        workdir = str(tmp_path / f"probe_{name}")
        linear_probe.train_and_evaluate(config, workdir)
        accuracy[name] = wdir.read_results(workdir)["top1"]
    print(
        f"linear probe top-1: pretrained {accuracy['pretrained']:.2f}%, "
        f"random init {accuracy['random']:.2f}%"
    )
    # measured, 100 pretraining steps, probe 3 epochs (1 warm-up): pretrained 71.8% vs random
    # 64.3% (seed 0), 76.7% vs 64.8% (seed 1); 4 epochs (2 warm-up): 73.5% vs 68.5% (seed 0),
    # 76.3% vs 62.3% (seed 1); 2 epochs (1 warm-up): 65.2% vs 61.8% (seed 0), 59.5% vs 63.8%
    # (seed 1: not separated); 70 steps and 3 epochs: 69.0% vs 64.3% (seed 0). The 20-epoch LARS
    # recipe: 73-75% vs 67-68% over 3 seeds.
    assert accuracy["pretrained"] >= accuracy["random"] + 3.0, accuracy
