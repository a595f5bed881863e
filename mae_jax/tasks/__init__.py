"""Training tasks run by `mae_jax.train.run`: MAE pretraining, linear probing and fine-tuning
(the last two share `classify`). `python -m mae_jax.main` picks one by `config.task`."""
