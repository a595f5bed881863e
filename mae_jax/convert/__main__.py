"""Convert MAE weights between mae-jax checkpoints and PyTorch files (`mae_jax.convert.cli`).

    python -m mae_jax.convert export --workdir DIR [--step N] --format official|timm|hf \\
        --output PATH [--img-size S] [--force]
    python -m mae_jax.convert import --input PATH --model NAME --workdir DIR \\
        [--set FIELD=VALUE ...] [--seed S] [--ignore-unexpected]
"""

from absl import flags

from mae_jax.convert import cli

if __name__ == "__main__":
    cli.define_flags(flags.FLAGS)
    flags.adopt_module_key_flags(cli)  # listed by --help
    cli.run_app()
