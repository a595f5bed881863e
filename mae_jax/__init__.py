"""mae-jax: Masked Autoencoders (He et al., CVPR 2022) in JAX and Flax NNX.

`mae_jax.load(path, ...)`: a model with its weights from a workdir or a PyTorch file
(`mae_jax.loader`)."""

__version__ = "0.1.0"


def __getattr__(name):
    if name == "load":  # imported on first use: `import mae_jax` stays light
        from mae_jax.loader import load

        return load
    raise AttributeError(f"module 'mae_jax' has no attribute {name!r}")
